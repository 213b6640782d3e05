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

enum { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2 };
enum { MAX_SEGMENTS = 4, MIN_TASK_COLUMNS = 64, MAX_TASKS = 4096 };

static inline __m256 load8(const void *base, int64_t offset, int dtype) {
    if (dtype == DTYPE_F16) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + offset)));
    }
    if (dtype == DTYPE_BF16) {
        __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + offset));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
    return _mm256_loadu_ps((const float *)base + offset);
}

static inline float load1(const void *base, int64_t offset, int dtype) {
    if (dtype == DTYPE_F16) return _cvtsh_ss(((const uint16_t *)base)[offset]);
    if (dtype == DTYPE_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)base)[offset] << 16;
        float value;
        memcpy(&value, &bits, sizeof value);
        return value;
    }
    return ((const float *)base)[offset];
}

static inline void store1(void *base, int64_t offset, int dtype, float value) {
    if (dtype == DTYPE_F16) {
        ((uint16_t *)base)[offset] = _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT);
    } else if (dtype == DTYPE_BF16) {
        uint32_t bits;
        memcpy(&bits, &value, sizeof bits);
        if ((bits & 0x7fffffffu) > 0x7f800000u) {
            bits |= 0x00400000u;  // keep NaN a NaN
        } else {
            bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
        }
        ((uint16_t *)base)[offset] = (uint16_t)(bits >> 16);
    } else {
        ((float *)base)[offset] = value;
    }
}

// One segment's kept channels: the ascending union over rows, and each row's coefficient per
// union entry (its input where it keeps the channel, 0 where only a neighbour does).
typedef struct {
    int32_t count;
    int32_t *channels;  // [count]
    float *coefficients;  // [count, B]
} ActiveSet;

// acc[b, 0:width] += sum over the active set of coef[a, b] * W^T[channel_a, col0 : col0 + width].
// Four channels per pass: four weight streams are read side by side and each accumulator is loaded
// and stored once per four multiply-adds (still applied one channel after another, in order).
static void accumulate(const ActiveSet *set, int64_t B, const void *weight_t, int64_t ldw, int dtype,
                       int64_t col0, int64_t width, float *acc) {
    const int64_t vec_end = width & ~(int64_t)7;
    int32_t a = 0;
    for (; a + 4 <= set->count; a += 4) {
        const int64_t r0 = (int64_t)set->channels[a] * ldw + col0;
        const int64_t r1 = (int64_t)set->channels[a + 1] * ldw + col0;
        const int64_t r2 = (int64_t)set->channels[a + 2] * ldw + col0;
        const int64_t r3 = (int64_t)set->channels[a + 3] * ldw + col0;
        const float *coef = set->coefficients + (int64_t)a * B;
        for (int64_t j = 0; j < vec_end; j += 8) {
            const __m256 w0 = load8(weight_t, r0 + j, dtype), w1 = load8(weight_t, r1 + j, dtype);
            const __m256 w2 = load8(weight_t, r2 + j, dtype), w3 = load8(weight_t, r3 + j, dtype);
            for (int64_t b = 0; b < B; ++b) {
                float *dst = acc + b * width + j;
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
                float v = acc[b * width + j];
                v = fmaf(coef[b], w0, v);
                v = fmaf(coef[B + b], w1, v);
                v = fmaf(coef[2 * B + b], w2, v);
                v = fmaf(coef[3 * B + b], w3, v);
                acc[b * width + j] = v;
            }
        }
    }
    for (; a < set->count; ++a) {
        const int64_t r0 = (int64_t)set->channels[a] * ldw + col0;
        const float *coef = set->coefficients + (int64_t)a * B;
        for (int64_t j = 0; j < vec_end; j += 8) {
            const __m256 w0 = load8(weight_t, r0 + j, dtype);
            for (int64_t b = 0; b < B; ++b) {
                float *dst = acc + b * width + j;
                _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_set1_ps(coef[b]), w0, _mm256_loadu_ps(dst)));
            }
        }
        for (int64_t j = vec_end; j < width; ++j) {
            const float w0 = load1(weight_t, r0 + j, dtype);
            for (int64_t b = 0; b < B; ++b) acc[b * width + j] = fmaf(coef[b], w0, acc[b * width + j]);
        }
    }
}

// The value as the weight dtype holds it: outputs are rounded to it (as a half GEMV's are) whatever
// dtype they are stored in, so a float32 output carries the same numbers as a half one.
static inline float round_to(int dtype, float v) {
    if (dtype == DTYPE_F32) return v;
    uint16_t bits;
    store1(&bits, 0, dtype, v);
    return load1(&bits, 0, dtype);
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

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

    // Tasks: column chunks of the output, each inside one segment (or, for gate_up, one chunk of
    // the gate columns together with the matching up columns). One wide chunk per thread and
    // segment keeps each weight row's read long and contiguous, which the prefetcher needs.
    const int64_t out_width = gate_up ? N / 2 : N;
    int64_t task_segment[MAX_TASKS], task_col0[MAX_TASKS], task_width[MAX_TASKS];
    int64_t num_tasks = 0;
    const int64_t task_groups = gate_up ? 1 : G;
    const int64_t threads = omp_get_max_threads();
    for (int64_t g = 0; g < task_groups; ++g) {
        const int64_t start = gate_up ? 0 : segment_start[g];
        const int64_t end = gate_up ? out_width : segment_start[g + 1];
        int64_t chunk = ((end - start + threads - 1) / threads + 7) & ~(int64_t)7;
        if (chunk < MIN_TASK_COLUMNS) chunk = MIN_TASK_COLUMNS;
        for (int64_t c = start; c < end; c += chunk) {
            if (num_tasks == MAX_TASKS) {
                free(channel_buffer);
                free(coef_buffer);
                return -1;
            }
            task_segment[num_tasks] = g;
            task_col0[num_tasks] = c;
            task_width[num_tasks] = end - c < chunk ? end - c : chunk;
            ++num_tasks;
        }
    }

    int failed = 0;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < num_tasks; ++t) {
        const int64_t col0 = task_col0[t], width = task_width[t];
        const int64_t acc_len = B * width;
        float *gate_acc = malloc(sizeof(float) * (gate_up ? 2 : 1) * acc_len);  // [B, width] (x2)
        if (!gate_acc) {
            failed = 1;
            continue;
        }
        memset(gate_acc, 0, sizeof(float) * (gate_up ? 2 : 1) * acc_len);
        if (gate_up) {
            float *up_acc = gate_acc + acc_len;
            accumulate(&sets[0], B, weight_t, N, dtype, col0, width, gate_acc);
            accumulate(&sets[1], B, weight_t, N, dtype, out_width + col0, width, up_acc);
            for (int64_t b = 0; b < B; ++b) {
                for (int64_t j = 0; j < width; ++j) {
                    float g = gate_acc[b * width + j], u = up_acc[b * width + j];
                    if (bias) {
                        g += bias[col0 + j];
                        u += bias[out_width + col0 + j];
                    }
                    g = round_to(dtype, g);  // gate and up rounded first, as the reference does
                    u = round_to(dtype, u);
                    store1(out, b * out_width + col0 + j, out_dtype, round_to(dtype, silu(g) * u));
                }
            }
        } else {
            accumulate(&sets[task_segment[t]], B, weight_t, N, dtype, col0, width, gate_acc);
            for (int64_t b = 0; b < B; ++b) {
                for (int64_t j = 0; j < width; ++j) {
                    const float v = gate_acc[b * width + j] + (bias ? bias[col0 + j] : 0.0f);
                    store1(out, b * N + col0 + j, out_dtype, round_to(dtype, v));
                }
            }
        }
        free(gate_acc);
    }
    free(channel_buffer);
    free(coef_buffer);
    return failed ? -1 : 0;
}
