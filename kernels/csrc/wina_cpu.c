// WINA sparse linear layer for x86-64 CPUs with AVX2, FMA and F16C: the exported entry point of
// wina_core.h (which says how it works), called on its own for each sparse projection.
//
// Built on first use by kernels/wina_cpu.py (gcc -O3 -fopenmp, for AVX2/FMA/F16C or AVX-512: see
// kernels/cpu_build.py) and called through ctypes; OpenMP resolves to the libgomp that torch has
// already loaded, so the kernel shares torch's thread pool instead of starting a second one.

#include "wina_core.h"

// x: [B, K] float32; weight_t: [K, N] (dtype); col_norms: [G, K] float32; thresholds: [B, G]
// float32 with row stride threshold_stride (so one [B, 7] table serves every projection of a
// layer); segment_sizes: [G], summing to N; bias: [N] float32 or NULL; out: [B, N] (out_dtype), or
// [B, N / 2] = silu(gate) * up when gate_up (G == 2, equal segments); kept: [B, G] int32 with row
// stride kept_stride, the channels each row kept per segment.
// Returns 0, or -1 when the arguments are out of range or memory runs out.
int wina_linear(const float *x, int64_t B, int64_t K, const void *weight_t, int64_t N, int dtype,
                const float *col_norms, const float *thresholds, int64_t threshold_stride,
                const int64_t *segment_sizes, int64_t G, const float *bias, void *out, int out_dtype,
                int32_t *kept, int64_t kept_stride, int gate_up) {
    return wina_project(x, B, K, weight_t, N, dtype, col_norms, thresholds, threshold_stride, segment_sizes, G, bias,
                        out, out_dtype, kept, kept_stride, gate_up);
}
