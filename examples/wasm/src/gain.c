/* Gain: every float32 sample times `gain` (config, linear; default 1). */
#include "extism_abi.h"

EXTISM_EXPORT("process") int32_t process(void) {
    uint64_t n;
    float *samples = (float *)input(&n);
    if (!samples) return fail("gain: out of memory");
    float gain = (float)config_number("gain", 1.0);
    for (uint64_t i = 0; i < n / 4; i++) samples[i] *= gain;
    output((unsigned char *)samples, n);
    return 0;
}
