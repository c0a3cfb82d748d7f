/* An RMS meter: audio in, JSON out, once per frame:
 *   {"rms": <this frame>, "peak": <this frame>, "frames": <all so far>}
 * `frames` counts samples per channel across the session (state kept);
 * config `channels` (default 1). */
#include "extism_abi.h"

static uint64_t total;

/* a non-negative number with 6 decimals */
static unsigned put_fixed(char *out, double v) {
    unsigned n = 0;
    uint64_t whole = (uint64_t)v, frac = (uint64_t)((v - (double)whole) * 1e6 + 0.5);
    if (frac >= 1000000) whole++, frac -= 1000000;
    char digits[24];
    unsigned d = 0;
    do digits[d++] = '0' + whole % 10; while (whole /= 10);
    while (d) out[n++] = digits[--d];
    out[n++] = '.';
    for (uint64_t div = 100000; div; div /= 10) out[n++] = '0' + (frac / div) % 10;
    return n;
}

static unsigned put(char *out, const char *s) {
    unsigned n = 0;
    while (s[n]) out[n] = s[n], n++;
    return n;
}

static double sqrt_newton(double x) {
    if (x <= 0) return 0;
    double r = x > 1 ? x : 1;
    for (int i = 0; i < 60; i++) r = (r + x / r) / 2;
    return r;
}

EXTISM_EXPORT("process") int32_t process(void) {
    uint64_t n;
    const float *v = (const float *)input(&n);
    if (!v) return fail("rms: out of memory");
    double ch = config_number("channels", 1);
    uint64_t count = n / 4, channels = ch >= 1 ? (uint64_t)ch : 1;
    double sum = 0, peak = 0;
    for (uint64_t i = 0; i < count; i++) {
        double x = v[i], a = x < 0 ? -x : x;
        sum += x * x;
        if (a > peak) peak = a;
    }
    total += count / channels;
    char json[160];
    unsigned k = put(json, "{\"rms\":");
    k += put_fixed(json + k, count ? sqrt_newton(sum / count) : 0);
    k += put(json + k, ",\"peak\":");
    k += put_fixed(json + k, peak);
    k += put(json + k, ",\"frames\":");
    char digits[24];
    unsigned d = 0;
    uint64_t t = total;
    do digits[d++] = '0' + t % 10; while (t /= 10);
    while (d) json[k++] = digits[--d];
    json[k++] = '}';
    output((unsigned char *)json, k);
    return 0;
}
