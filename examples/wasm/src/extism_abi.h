/* The Extism plugin ABI, as a C plugin sees it: the host's kernel functions
 * (module "extism:host/env") and small helpers over them. A plugin exports
 * `int32_t f(void)`; it reads its input and writes its output through the
 * kernel, which keeps both in its own memory (offsets, not pointers).
 * Returning non-zero after error_set() fails the call with that message.
 *
 * Only what these examples use; any Extism PDK offers the same calls. */
#ifndef EXTISM_ABI_H
#define EXTISM_ABI_H

#include <stddef.h>
#include <stdint.h>

typedef uint64_t extism_offset;

#define EXTISM_IMPORT(name) \
    __attribute__((import_module("extism:host/env"), import_name(name)))
#define EXTISM_EXPORT(name) __attribute__((export_name(name)))

EXTISM_IMPORT("input_length") uint64_t extism_input_length(void);
EXTISM_IMPORT("input_load_u8") uint8_t extism_input_load_u8(uint64_t at);
EXTISM_IMPORT("input_load_u64") uint64_t extism_input_load_u64(uint64_t at);
EXTISM_IMPORT("alloc") extism_offset extism_alloc(uint64_t n);
EXTISM_IMPORT("free") void extism_free(extism_offset at);
EXTISM_IMPORT("length") uint64_t extism_length(extism_offset at);
EXTISM_IMPORT("load_u8") uint8_t extism_load_u8(extism_offset at);
EXTISM_IMPORT("load_u64") uint64_t extism_load_u64(extism_offset at);
EXTISM_IMPORT("store_u8") void extism_store_u8(extism_offset at, uint8_t v);
EXTISM_IMPORT("store_u64") void extism_store_u64(extism_offset at, uint64_t v);
EXTISM_IMPORT("output_set") void extism_output_set(extism_offset at, uint64_t n);
EXTISM_IMPORT("error_set") void extism_error_set(extism_offset at);
EXTISM_IMPORT("config_get") extism_offset extism_config_get(extism_offset key);

/* Plugin memory: one growable buffer after the module's data (no libc). */
extern unsigned char __heap_base;
static unsigned char *scratch(size_t n) {
    size_t have = __builtin_wasm_memory_size(0) * 65536 - (size_t)&__heap_base;
    if (n > have) {
        size_t pages = (n - have + 65535) / 65536;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return 0;
    }
    return &__heap_base;
}

/* Copy n bytes between the kernel's memory (at) and the plugin's (p). */
static void from_kernel(unsigned char *p, extism_offset at, uint64_t n, int input) {
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = input ? extism_input_load_u64(i) : extism_load_u64(at + i);
        __builtin_memcpy(p + i, &v, 8);
    }
    for (; i < n; i++) p[i] = input ? extism_input_load_u8(i) : extism_load_u8(at + i);
}

static extism_offset to_kernel(const unsigned char *p, uint64_t n) {
    extism_offset at = extism_alloc(n);
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        __builtin_memcpy(&v, p + i, 8);
        extism_store_u64(at + i, v);
    }
    for (; i < n; i++) extism_store_u8(at + i, p[i]);
    return at;
}

/* The call's input in plugin memory (its length in *n); 0 when out of memory. */
static unsigned char *input(uint64_t *n) {
    *n = extism_input_length();
    unsigned char *p = scratch(*n);
    if (p) from_kernel(p, 0, *n, 1);
    return p;
}

static void output(const unsigned char *p, uint64_t n) {
    extism_output_set(to_kernel(p, n), n);
}

static size_t cstrlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

static int32_t fail(const char *message) {
    extism_error_set(to_kernel((const unsigned char *)message, cstrlen(message)));
    return 1;
}

/* A config value as a number (e.g. "0.5", "-3", "1e3"); `dflt` when unset or not a number. */
static double config_number(const char *key, double dflt) {
    extism_offset at = extism_config_get(to_kernel((const unsigned char *)key, cstrlen(key)));
    if (!at) return dflt;
    uint64_t n = extism_length(at);
    char text[64];
    if (n == 0 || n >= sizeof text) return dflt;
    from_kernel((unsigned char *)text, at, n, 0);
    text[n] = 0;
    const char *s = text;
    double sign = 1, value = 0, scale = 1;
    int digits = 0;
    if (*s == '-' || *s == '+') sign = (*s++ == '-') ? -1 : 1;
    for (; *s >= '0' && *s <= '9'; s++, digits++) value = value * 10 + (*s - '0');
    if (*s == '.')
        for (s++; *s >= '0' && *s <= '9'; s++, digits++) value += (*s - '0') * (scale /= 10);
    if (*s == 'e' || *s == 'E') {
        int esign = 1, e = 0;
        s++;
        if (*s == '-' || *s == '+') esign = (*s++ == '-') ? -1 : 1;
        for (; *s >= '0' && *s <= '9'; s++) e = e * 10 + (*s - '0');
        while (e-- > 0) value = esign > 0 ? value * 10 : value / 10;
    }
    return (digits && !*s) ? sign * value : dflt;
}

#endif
