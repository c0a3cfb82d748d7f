/* A biquad low-pass filter (RBJ cookbook), state kept across frames.
 * Config: cutoff_hz (default 1000), q (0.7071), sample_rate (16000),
 * channels (1: interleaved input, one filter state per channel). */
#include "extism_abi.h"

#define MAX_CHANNELS 8

static int ready;
static unsigned channels;
static double b0, b1, b2, a1, a2;
static double x1[MAX_CHANNELS], x2[MAX_CHANNELS], y1[MAX_CHANNELS], y2[MAX_CHANNELS];

/* sin and cos by Taylor series on [-pi, pi] (no libm in the sandbox) */
static void sincos(double w, double *s, double *c) {
    double term_s = w, term_c = 1, ss = 0, cc = 0;
    for (int k = 1; k < 24; k += 2) {
        ss += term_s;
        cc += term_c;
        term_s *= -w * w / ((k + 1) * (k + 2));
        term_c *= -w * w / (k * (k + 1));
    }
    *s = ss;
    *c = cc;
}

static int32_t setup(void) {
    double rate = config_number("sample_rate", 16000);
    double cutoff = config_number("cutoff_hz", 1000);
    double q = config_number("q", 0.70710678);
    double ch = config_number("channels", 1);
    if (rate <= 0 || cutoff <= 0 || cutoff >= rate / 2 || q <= 0)
        return fail("biquad: need 0 < cutoff_hz < sample_rate/2 and q > 0");
    if (ch < 1 || ch > MAX_CHANNELS || ch != (unsigned)ch)
        return fail("biquad: channels must be a whole number from 1 to 8");
    channels = (unsigned)ch;
    double s, c;
    sincos(2 * 3.14159265358979323846 * cutoff / rate, &s, &c);
    double alpha = s / (2 * q), a0 = 1 + alpha;
    b0 = (1 - c) / 2 / a0;
    b1 = (1 - c) / a0;
    b2 = b0;
    a1 = -2 * c / a0;
    a2 = (1 - alpha) / a0;
    ready = 1;
    return 0;
}

EXTISM_EXPORT("process") int32_t process(void) {
    if (!ready && setup()) return 1;
    uint64_t n;
    float *v = (float *)input(&n);
    if (!v) return fail("biquad: out of memory");
    uint64_t count = n / 4;
    if (count % channels) return fail("biquad: input is not a whole number of frames");
    for (uint64_t i = 0; i < count; i++) {
        unsigned k = i % channels;
        double x = v[i];
        double y = b0 * x + b1 * x1[k] + b2 * x2[k] - a1 * y1[k] - a2 * y2[k];
        x2[k] = x1[k];
        x1[k] = x;
        y2[k] = y1[k];
        y1[k] = y;
        v[i] = (float)y;
    }
    output((unsigned char *)v, n);
    return 0;
}
