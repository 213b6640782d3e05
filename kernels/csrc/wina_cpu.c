// WINA sparse linear layer for x86-64 CPUs with AVX2, FMA and F16C: reads only the rows of the
// transposed weight W^T [K, N] whose input channel some batch row keeps, at full bandwidth, and
// accumulates in float32. Semantics: kernels/wina_reference.py (wina_linear_reference and
// wina_gate_up_reference), the oracle the tests compare this against.
//
// Batch invariance: every row's sum visits its kept channels in ascending order, one fused
// multiply-add each; a channel that only a neighbour keeps contributes fma(0, w, acc) == acc,
// which leaves the sum bit-for-bit unchanged. So a row's output never depends on its neighbours.
//
// Built on first use by kernels/wina_cpu.py (gcc -O3 -mavx2 -mfma -mf16c -fopenmp) and called
// through ctypes; OpenMP resolves to the libgomp that torch has already loaded, so the kernel
// shares torch's thread pool instead of starting a second one.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_cpu.h"

enum { MAX_SEGMENTS = 4 };

// One segment's kept channels: the ascending union over rows, and each row's coefficient per
// union entry (its input where it keeps the channel, 0 where only a neighbour does).
typedef struct {
    int32_t count;
    int32_t *channels;  // [count]
    float *coefficients;  // [count, B]
} ActiveSet;

// Rows [a_begin, a_end) of the active set, ahead of which accumulate() prefetches.
static inline void prefetch_rows(const ActiveSet *set, int32_t a, int32_t a_end, const char *base,
                                 int64_t row_bytes, int64_t ldw_bytes, int64_t col0_bytes) {
    for (; a < a_end; ++a) {
        const char *row = base + (int64_t)set->channels[a] * ldw_bytes + col0_bytes;
        for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
    }
}

// acc[b, 0:width] (row stride acc_stride) += sum over active entries [a_begin, a_end) of
// coef[a, b] * W^T[channel_a, col0 : col0 + width].
// Four channels per pass: four weight rows are read side by side and each accumulator is loaded
// and stored once per four multiply-adds (still applied one channel after another, in order).
// The kept channels are scattered, which defeats the hardware prefetcher, so rows a few passes
// ahead are prefetched in software.
static void accumulate(const ActiveSet *set, int32_t a_begin, int32_t a_end, int64_t B, const void *weight_t,
                       int64_t ldw, int dtype, int64_t col0, int64_t width, float *acc, int64_t acc_stride) {
    const int64_t vec_end = width & ~(int64_t)7;
    const int64_t elem = dtype == DTYPE_F32 ? 4 : 2;
    const int64_t row_bytes = width * elem;
    int32_t ahead = (int32_t)(16384 / (row_bytes + 1));  // about 16 KiB in flight
    ahead = ahead < 8 ? 8 : (ahead > 64 ? 64 : ahead);
    const char *base = (const char *)weight_t;
    prefetch_rows(set, a_begin, a_begin + ahead < a_end ? a_begin + ahead : a_end, base, row_bytes, ldw * elem,
                  col0 * elem);
    int32_t a = a_begin;
    for (; a + 4 <= a_end; a += 4) {
        const int32_t p0 = a + ahead, p1 = p0 + 4 < a_end ? p0 + 4 : a_end;
        if (p0 < p1) prefetch_rows(set, p0, p1, base, row_bytes, ldw * elem, col0 * elem);
        const int64_t r0 = (int64_t)set->channels[a] * ldw + col0;
        const int64_t r1 = (int64_t)set->channels[a + 1] * ldw + col0;
        const int64_t r2 = (int64_t)set->channels[a + 2] * ldw + col0;
        const int64_t r3 = (int64_t)set->channels[a + 3] * ldw + col0;
        const float *coef = set->coefficients + (int64_t)a * B;
        for (int64_t j = 0; j < vec_end; j += 8) {
            const __m256 w0 = load8(weight_t, r0 + j, dtype), w1 = load8(weight_t, r1 + j, dtype);
            const __m256 w2 = load8(weight_t, r2 + j, dtype), w3 = load8(weight_t, r3 + j, dtype);
            for (int64_t b = 0; b < B; ++b) {
                float *dst = acc + b * acc_stride + j;
                __m256 v = _mm256_loadu_ps(dst);
                v = _mm256_fmadd_ps(_mm256_set1_ps(coef[b]), w0, v);
                v = _mm256_fmadd_ps(_mm256_set1_ps(coef[B + b]), w1, v);
                v = _mm256_fmadd_ps(_mm256_set1_ps(coef[2 * B + b]), w2, v);
                v = _mm256_fmadd_ps(_mm256_set1_ps(coef[3 * B + b]), w3, v);
                _mm256_storeu_ps(dst, v);
            }
        }
        for (int64_t j = vec_end; j < width; ++j) {
            const float w0 = load1(weight_t, r0 + j, dtype), w1 = load1(weight_t, r1 + j, dtype);
            const float w2 = load1(weight_t, r2 + j, dtype), w3 = load1(weight_t, r3 + j, dtype);
            for (int64_t b = 0; b < B; ++b) {
                float v = acc[b * acc_stride + j];
                v = fmaf(coef[b], w0, v);
                v = fmaf(coef[B + b], w1, v);
                v = fmaf(coef[2 * B + b], w2, v);
                v = fmaf(coef[3 * B + b], w3, v);
                acc[b * acc_stride + j] = v;
            }
        }
    }
    for (; a < a_end; ++a) {
        const int64_t r0 = (int64_t)set->channels[a] * ldw + col0;
        const float *coef = set->coefficients + (int64_t)a * B;
        for (int64_t j = 0; j < vec_end; j += 8) {
            const __m256 w0 = load8(weight_t, r0 + j, dtype);
            for (int64_t b = 0; b < B; ++b) {
                float *dst = acc + b * acc_stride + j;
                _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_set1_ps(coef[b]), w0, _mm256_loadu_ps(dst)));
            }
        }
        for (int64_t j = vec_end; j < width; ++j) {
            const float w0 = load1(weight_t, r0 + j, dtype);
            for (int64_t b = 0; b < B; ++b) acc[b * acc_stride + j] = fmaf(coef[b], w0, acc[b * acc_stride + j]);
        }
    }
}

// First active entry whose channel is >= channel (channels ascend).
static int32_t lower_bound(const ActiveSet *set, int64_t channel) {
    int32_t lo = 0, hi = set->count;
    while (lo < hi) {
        const int32_t mid = (lo + hi) / 2;
        if (set->channels[mid] < channel) lo = mid + 1; else hi = mid;
    }
    return lo;
}

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
    if (G < 1 || G > MAX_SEGMENTS || B < 1 || K < 1) return -1;
    if (gate_up && (G != 2 || segment_sizes[0] != segment_sizes[1])) return -1;
    int64_t segment_start[MAX_SEGMENTS + 1];
    segment_start[0] = 0;
    for (int64_t g = 0; g < G; ++g) segment_start[g + 1] = segment_start[g] + segment_sizes[g];
    if (segment_start[G] != N) return -1;

    ActiveSet sets[MAX_SEGMENTS];
    int32_t *channel_buffer = malloc(sizeof(int32_t) * G * K);
    float *coef_buffer = malloc(sizeof(float) * G * K * B);
    if (!channel_buffer || !coef_buffer) {
        free(channel_buffer);
        free(coef_buffer);
        return -1;
    }
    for (int64_t g = 0; g < G; ++g) {
        ActiveSet *set = &sets[g];
        set->count = 0;
        set->channels = channel_buffer + g * K;
        set->coefficients = coef_buffer + g * K * B;
        for (int64_t b = 0; b < B; ++b) kept[b * kept_stride + g] = 0;
        const float *norms = col_norms + g * K;
        for (int64_t i = 0; i < K; ++i) {
            int any = 0;
            float *coef = set->coefficients + (int64_t)set->count * B;
            for (int64_t b = 0; b < B; ++b) {
                const float xi = x[b * K + i];
                const int keep = fabsf(xi) * norms[i] > thresholds[b * threshold_stride + g];
                coef[b] = keep ? xi : 0.0f;
                kept[b * kept_stride + g] += keep;
                any |= keep;
            }
            if (any) set->channels[set->count++] = (int32_t)i;
        }
    }

    // Threads split the input channels at fixed boundaries (not by how many are kept, which
    // depends on the neighbours): each reads whole rows of W^T, long contiguous runs, into its own
    // partial sums, which are then added in thread order. A row's result thus depends only on its
    // own mask and the thread count.
    const int64_t out_width = gate_up ? N / 2 : N;
    const int threads = (int)omp_get_max_threads();
    float *partial = calloc((size_t)threads * B * N, sizeof(float));  // [threads, B, N]
    if (!partial) {
        free(channel_buffer);
        free(coef_buffer);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *acc = partial + (int64_t)t * B * N;
        const int64_t k0 = K * t / nt, k1 = K * (t + 1) / nt;
        for (int64_t g = 0; g < G; ++g) {
            const ActiveSet *set = &sets[g];
            accumulate(set, lower_bound(set, k0), lower_bound(set, k1), B, weight_t, N, dtype, segment_start[g],
                       segment_sizes[g], acc + segment_start[g], N);
        }
#pragma omp barrier
        const int64_t c0 = out_width * t / nt, c1 = out_width * (t + 1) / nt;
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t j = c0; j < c1; ++j) {
                float v = 0.0f, u = 0.0f;
                for (int s = 0; s < nt; ++s) {
                    const float *row = partial + ((int64_t)s * B + b) * N;
                    v += row[j];
                    if (gate_up) u += row[out_width + j];
                }
                if (bias) {
                    v += bias[j];
                    if (gate_up) u += bias[out_width + j];
                }
                if (gate_up) {
                    v = round_to(dtype, v);  // gate and up rounded first, as the reference does
                    u = round_to(dtype, u);
                    v = silu(v) * u;
                }
                store1(out, b * out_width + j, out_dtype, round_to(dtype, v));
            }
        }
    }
    free(partial);
    free(channel_buffer);
    free(coef_buffer);
    return 0;
}
