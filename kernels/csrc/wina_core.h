// WINA sparse linear layer for x86-64 CPUs with AVX2, FMA and F16C (AVX-512 where built for it):
// reads only the rows of the transposed weight W^T [K, N] whose input channel some batch row keeps,
// and accumulates in float32. Semantics: kernels/wina_reference.py (wina_linear_reference and
// wina_gate_up_reference), the oracle the tests compare this against.
//
// Batch invariance: every output is two float32 chains, one over the kept channels below
// K_SPLIT(K) and one over the rest, each starting at 0 and visiting its channels in ascending
// order, one fused multiply-add each, added at the end; a channel that only a neighbour keeps
// contributes fma(0, w, acc) == acc, which leaves a chain bit-for-bit unchanged. So a row's output
// never depends on its neighbours, nor on the thread count (the split point is fixed). The dense
// kernel (dense_cpu.c) forms its sums the same way, so a sparse row computed as a dense one over
// its kept inputs gets these numbers too.
//
// Layout of the work: threads 0 and 1 build the kept-channel sets of one half of the channels
// each (AVX-512 with one row: two compress-stores per 16 channels; else eight channels per vector
// compare), then each reads the kept rows of its half (with more than two threads, shares of the
// output columns within it), so each reads whole kept rows of W^T; each streams the kept rows'
// pieces eight rows side by side into float32 sums (16 columns per vector in the AVX-512 build, 8
// in the AVX2 one: the same chains); one barrier, then every thread adds the halves of its share of
// the outputs and finishes them, eight at a time. (Until the sixteenth session threads split the
// output columns, each reading part of every kept row: on the AVX-512 Xeon that session ran on,
// reading whole rows is 1.6-1.7x faster at half the rows kept against 1.3-1.4x
// (benchmarks/row_skip_bandwidth.py), and whole batch-1 decode steps at 50% became 1.06-1.08x
// faster (benchmarks/decode_context.py --sparsity). Until the seventeenth, one thread built the
// sets while the others waited.) In a served step at 50% the sparse projections take 0.63-0.67x
// of the dense ones' time (0.68-0.79x before the twenty-fourth session's paced prefetch, see
// accumulate) though they read about half the bytes; what is left is mostly per call (threads,
// barriers, kept sets, epilogue: about 4 us a call with nothing kept) and the hardware
// prefetcher reading skipped rows beside kept ones (RESULTS.md, "WINA sparsity: speed").
//
// A header of static functions, included by wina_cpu.c (which exports wina_project as wina_linear)
// and dense_cpu.c (whose fused decode layer runs sparse rows through it).

#ifndef NEURONSERVE_WINA_CORE_H
#define NEURONSERVE_WINA_CORE_H

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_cpu.h"

enum { MAX_SEGMENTS = 4 };
// Where each output's float32 sum splits in two over the K input channels (see wina_project)
#define K_SPLIT(K) ((K) / 2)

// One segment's kept channels: the ascending union over rows, and each row's coefficient per
// union entry (its input where it keeps the channel, 0 where only a neighbour does).
typedef struct {
    int32_t count;
    int32_t *channels;  // [count]
    float *coefficients;  // [count, B]
} ActiveSet;

// BYTES_PER_THREAD: weight bytes below which another thread costs more to start than it saves
enum { PASS_CHANNELS = 8, BYTES_PER_THREAD = 96 * 1024 };
// Software prefetch: the kept rows of the pass at least PREFETCH_AHEAD_BYTES of rows ahead of
// the one being read, a line of each for each line read, up to each row's first
// PREFETCH_ROW_BYTES (see accumulate)
enum { PREFETCH_AHEAD_BYTES = 8192, PREFETCH_ROW_BYTES = 4096 };

// The line at byte `offset` of each of the rows in `rows`. The callers test whether `offset`
// starts a line within PREFETCH_ROW_BYTES (PREFETCHES_AT) before calling: with the test inside this
// function instead, gcc 12 made the column loops slower (a call of o at 47% kept from memory went
// from 0.75-0.79x of the dense kernel's time to 0.97-1.02x; RESULTS.md, "WINA sparsity: speed").
static inline void prefetch_line(const char *const *rows, int count, int64_t offset) {
    for (int i = 0; i < count; ++i) _mm_prefetch(rows[i] + offset, _MM_HINT_T0);
}

// Whether a column loop at byte `offset` of its row pieces prefetches the rows ahead there
#define PREFETCHES_AT(offset) ((((offset) & 63) == 0) && (offset) < PREFETCH_ROW_BYTES)

// acc[b, 0:width] (row stride acc_stride) continues, over all active entries in order, the sum of
// coef[a, b] * W^T[channel_a, col0 : col0 + width]: one fused multiply-add per channel, in channel
// order, so the result is the same float32 chain whatever the pass grouping below.
// Eight channels per pass: eight weight row pieces are read side by side (each a contiguous run)
// and each accumulator is loaded and stored once per eight multiply-adds. The kept channels are
// scattered, which defeats the hardware prefetcher across rows, so the rows of a pass ahead are
// prefetched in software, one line of each per line read, as the dense kernel prefetches its
// panels: the loads then find their lines while the multiply-adds run. With a burst of
// prefetches at the start of each pass instead (whole rows, or each row's first 512 bytes as
// until the twenty-fourth session), a call that keeps every row took 1.5-1.7x the dense kernel's
// time on 1152-byte rows from memory, against 1.25-1.3x paced, though the same loads alone, eight
// rows side by side, run at the dense kernel's speed: reading and arithmetic took turns, it seems
// (ad-hoc drivers; RESULTS.md, "WINA sparsity: speed"). Past a row's first PREFETCH_ROW_BYTES the
// hardware prefetcher, which streams a long row once it has started, reads the rest: on
// Llama-3-8B's 28 KB gate/up and 8 KB down row pieces that took 0.83x and 0.92x the time of
// prefetching whole rows (medians of three noisy microbenchmark runs); the default model's rows
// are all shorter.
static void accumulate(const ActiveSet *set, int64_t B, const void *weight_t, int64_t ldw, int dtype, int64_t col0,
                       int64_t width, float *acc, int64_t acc_stride) {
    const int64_t vec_end = width & ~(int64_t)7;
    const int64_t elem = dtype == DTYPE_F32 ? 4 : 2;
    const int64_t row_bytes = width * elem, pass_bytes = PASS_CHANNELS * row_bytes;
    const int32_t ahead = PASS_CHANNELS * (int32_t)((PREFETCH_AHEAD_BYTES + pass_bytes - 1) / pass_bytes);
    const char *base = (const char *)weight_t;
    const int32_t count = set->count;
    for (int32_t a = 0; a < (ahead < count ? ahead : count); ++a) {  // the first passes' rows, before any is read
        const char *row = base + ((int64_t)set->channels[a] * ldw + col0) * elem;
        for (int64_t off = 0; off < row_bytes && off < PREFETCH_ROW_BYTES; off += 64) {
            _mm_prefetch(row + off, _MM_HINT_T0);
        }
    }
    int32_t a = 0;
    for (; a + PASS_CHANNELS <= count; a += PASS_CHANNELS) {
        const char *next[PASS_CHANNELS];  // the rows of the pass `ahead` rows on
        int next_count = 0;
        for (int32_t p = a + ahead; p < a + ahead + PASS_CHANNELS && p < count; ++p) {
            next[next_count++] = base + ((int64_t)set->channels[p] * ldw + col0) * elem;
        }
        int64_t r[PASS_CHANNELS];
        for (int i = 0; i < PASS_CHANNELS; ++i) r[i] = (int64_t)set->channels[a + i] * ldw + col0;
        const float *coef = set->coefficients + (int64_t)a * B;
        if (B == 1) {  // the eight coefficients stay in registers across the row pieces
            int64_t j = 0;
#ifdef __AVX512F__
            __m512 c16[PASS_CHANNELS];
            for (int i = 0; i < PASS_CHANNELS; ++i) c16[i] = _mm512_set1_ps(coef[i]);
            for (; j + 16 <= vec_end; j += 16) {
                if (PREFETCHES_AT(j * elem)) prefetch_line(next, next_count, j * elem);
                __m512 v = _mm512_loadu_ps(acc + j);
                for (int i = 0; i < PASS_CHANNELS; ++i) {
                    v = _mm512_fmadd_ps(c16[i], load16(weight_t, r[i] + j, dtype), v);
                }
                _mm512_storeu_ps(acc + j, v);
            }
#endif
            __m256 c[PASS_CHANNELS];
            for (int i = 0; i < PASS_CHANNELS; ++i) c[i] = _mm256_set1_ps(coef[i]);
            for (; j < vec_end; j += 8) {
                if (PREFETCHES_AT(j * elem)) prefetch_line(next, next_count, j * elem);
                __m256 v = _mm256_loadu_ps(acc + j);
                for (int i = 0; i < PASS_CHANNELS; ++i) v = _mm256_fmadd_ps(c[i], load8(weight_t, r[i] + j, dtype), v);
                _mm256_storeu_ps(acc + j, v);
            }
        } else {  // each weight vector loaded and converted once for every row
            int64_t j = 0;
#ifdef __AVX512F__
            for (; j + 16 <= vec_end; j += 16) {
                if (PREFETCHES_AT(j * elem)) prefetch_line(next, next_count, j * elem);
                __m512 w[PASS_CHANNELS];
                for (int i = 0; i < PASS_CHANNELS; ++i) w[i] = load16(weight_t, r[i] + j, dtype);
                for (int64_t b = 0; b < B; ++b) {
                    float *dst = acc + b * acc_stride + j;
                    __m512 v = _mm512_loadu_ps(dst);
                    for (int i = 0; i < PASS_CHANNELS; ++i) {
                        v = _mm512_fmadd_ps(_mm512_set1_ps(coef[i * B + b]), w[i], v);
                    }
                    _mm512_storeu_ps(dst, v);
                }
            }
#endif
            for (; j < vec_end; j += 8) {
                if (PREFETCHES_AT(j * elem)) prefetch_line(next, next_count, j * elem);
                __m256 w[PASS_CHANNELS];
                for (int i = 0; i < PASS_CHANNELS; ++i) w[i] = load8(weight_t, r[i] + j, dtype);
                for (int64_t b = 0; b < B; ++b) {
                    float *dst = acc + b * acc_stride + j;
                    __m256 v = _mm256_loadu_ps(dst);
                    for (int i = 0; i < PASS_CHANNELS; ++i) v = _mm256_fmadd_ps(_mm256_set1_ps(coef[i * B + b]), w[i], v);
                    _mm256_storeu_ps(dst, v);
                }
            }
        }
        for (int64_t b = 0; b < B; ++b) {
            float *dst = acc + b * acc_stride;
            for (int64_t j = vec_end; j < width; ++j) {
                float v = dst[j];
                for (int i = 0; i < PASS_CHANNELS; ++i) v = fmaf(coef[i * B + b], load1(weight_t, r[i] + j, dtype), v);
                dst[j] = v;
            }
        }
    }
    for (; a < count; ++a) {
        const int64_t r0 = (int64_t)set->channels[a] * ldw + col0;
        const float *coef = set->coefficients + (int64_t)a * B;
        for (int64_t b = 0; b < B; ++b) {
            const __m256 c0 = _mm256_set1_ps(coef[b]);
            float *dst = acc + b * acc_stride;
            int64_t j = 0;
#ifdef __AVX512F__
            for (; j + 16 <= vec_end; j += 16) {
                _mm512_storeu_ps(dst + j, _mm512_fmadd_ps(_mm512_set1_ps(coef[b]), load16(weight_t, r0 + j, dtype),
                                                          _mm512_loadu_ps(dst + j)));
            }
#endif
            for (; j < vec_end; j += 8) {
                _mm256_storeu_ps(dst + j, _mm256_fmadd_ps(c0, load8(weight_t, r0 + j, dtype), _mm256_loadu_ps(dst + j)));
            }
            for (int64_t j = vec_end; j < width; ++j) dst[j] = fmaf(coef[b], load1(weight_t, r0 + j, dtype), dst[j]);
        }
    }
}

// Columns [*c0, *c1) of a segment of `size` that share t of nt takes: fixed, 8-aligned shares (the
// same for gate and up, which have equal sizes).
static inline void owned_columns(int64_t size, int t, int nt, int64_t *c0, int64_t *c1) {
    const int64_t vectors = (size + 7) / 8, end = 8 * (vectors * (t + 1) / nt);
    *c0 = 8 * (vectors * t / nt);
    *c1 = end < size ? end : size;
}

// The kept channels [lo, hi) of every segment (one half of K): sets[g] gets their ascending union
// over the B rows and each row's coefficient per entry, in the buffers at offset lo (so the two
// halves are built at once, by different threads), and kept_half[b * G + g] each row's count.
// Eight channels per step: each row's keep bits from one vector compare (the same
// |x| * norm > threshold as the scalar tail), then the union's channels in order; one row in the
// AVX-512 build: 16 channels per step, its kept channels and inputs written by compress-stores.
static void build_half(const float *x, int64_t B, int64_t K, int64_t lo, int64_t hi, const float *col_norms,
                       const float *thresholds, int64_t threshold_stride, int64_t G, int32_t *channel_buffer,
                       float *coef_buffer, unsigned *row_bits, ActiveSet *sets, int32_t *kept_half) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t g = 0; g < G; ++g) {
        ActiveSet *set = &sets[g];
        set->count = 0;
        set->channels = channel_buffer + g * K + lo;
        set->coefficients = coef_buffer + (g * K + lo) * B;
        const float *norms = col_norms + g * K;
        int32_t *kept = kept_half + g;
        for (int64_t b = 0; b < B; ++b) kept[b * G] = 0;
        int64_t i = lo;
#ifdef __AVX512F__
        if (B == 1) {
            const __m512 threshold = _mm512_set1_ps(thresholds[g]);
            const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            for (; i + 16 <= hi; i += 16) {
                const __m512 xv = _mm512_loadu_ps(x + i);
                const __m512 score = _mm512_mul_ps(_mm512_abs_ps(xv), _mm512_loadu_ps(norms + i));
                const __mmask16 keep = _mm512_cmp_ps_mask(score, threshold, _CMP_GT_OQ);
                _mm512_mask_compressstoreu_epi32(set->channels + set->count, keep,
                                                 _mm512_add_epi32(lanes, _mm512_set1_epi32((int32_t)i)));
                _mm512_mask_compressstoreu_ps(set->coefficients + set->count, keep, xv);
                set->count += __builtin_popcount(keep);
            }
            kept[0] = set->count;
        }
#endif
        for (; i + 8 <= hi; i += 8) {
            const __m256 n = _mm256_loadu_ps(norms + i);
            unsigned any = 0;
            for (int64_t b = 0; b < B; ++b) {
                const __m256 score = _mm256_mul_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + b * K + i)), n);
                const __m256 threshold = _mm256_set1_ps(thresholds[b * threshold_stride + g]);
                row_bits[b] = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(score, threshold, _CMP_GT_OQ));
                kept[b * G] += __builtin_popcount(row_bits[b]);
                any |= row_bits[b];
            }
            for (; any; any &= any - 1) {
                const int bit = __builtin_ctz(any);
                float *coef = set->coefficients + (int64_t)set->count * B;
                for (int64_t b = 0; b < B; ++b) coef[b] = (row_bits[b] >> bit) & 1u ? x[b * K + i + bit] : 0.0f;
                set->channels[set->count++] = (int32_t)(i + bit);
            }
        }
        for (; i < hi; ++i) {
            int any = 0;
            float *coef = set->coefficients + (int64_t)set->count * B;
            for (int64_t b = 0; b < B; ++b) {
                const float xi = x[b * K + i];
                const int keep = fabsf(xi) * norms[i] > thresholds[b * threshold_stride + g];
                coef[b] = keep ? xi : 0.0f;
                kept[b * G] += keep;
                any |= keep;
            }
            if (any) set->channels[set->count++] = (int32_t)i;
        }
    }
}

// The sparse projection; arguments and result as wina_linear's (wina_cpu.c).
static int wina_project(const float *x, int64_t B, int64_t K, const void *weight_t, int64_t N, int dtype,
                        const float *col_norms, const float *thresholds, int64_t threshold_stride,
                        const int64_t *segment_sizes, int64_t G, const float *bias, void *out, int out_dtype,
                        int32_t *kept, int64_t kept_stride, int gate_up) {
    if (G < 1 || G > MAX_SEGMENTS || B < 1 || K < 1) return -1;
    if (gate_up && (G != 2 || segment_sizes[0] != segment_sizes[1])) return -1;
    int64_t segment_start[MAX_SEGMENTS + 1];
    segment_start[0] = 0;
    for (int64_t g = 0; g < G; ++g) segment_start[g + 1] = segment_start[g] + segment_sizes[g];
    if (segment_start[G] != N) return -1;

    int32_t *channel_buffer = malloc(sizeof(int32_t) * G * K);
    float *coef_buffer = malloc(sizeof(float) * G * K * B);
    // per half, 64 bytes apart: the two threads building them must not write one cache line
    const int64_t bits_stride = B + 16, kept_stride_half = B * G + 16;
    unsigned *row_bits = malloc(sizeof(unsigned) * 2 * bits_stride);
    int32_t *kept_half = malloc(sizeof(int32_t) * 2 * kept_stride_half);  // [2, B, G], halves padded
    float *acc = malloc(sizeof(float) * 2 * B * N);  // [2, B, N]: each half's sums
    if (!channel_buffer || !coef_buffer || !row_bits || !kept_half || !acc) {
        free(channel_buffer), free(coef_buffer), free(row_bits), free(kept_half), free(acc);
        return -1;
    }

    // Each output is two float32 chains, over the kept channels below K_SPLIT(K) and over those
    // from it on, added at the end: the split point is fixed, so the result depends only on the
    // row's own kept channels. Threads 0 and 1 each build one half's kept sets (no serial part),
    // then read its kept rows (with more than two threads, shares of its columns each): each
    // reads whole rows of W^T, which on the AVX-512 Xeon reads kept rows 1.6-1.7x faster than
    // every thread reading part of every row (benchmarks/row_skip_bandwidth.py). Where one half
    // keeps more, its thread takes longer: handing the other thread part of its columns (rows read
    // in pieces) made whole steps 0.94-0.95x as fast as waiting (RESULTS.md). The thread count is
    // fixed before the kept counts are known, by the weight's size: small ones stay on one.
    const int64_t out_width = gate_up ? N / 2 : N;
    const int64_t elem = dtype == DTYPE_F32 ? 4 : 2;
    const int32_t split = (int32_t)K_SPLIT(K);
    ActiveSet halves[2][MAX_SEGMENTS];
    int64_t threads = omp_get_max_threads();
    const int64_t weight_bytes = K * N * elem;
    if (weight_bytes / (2 * BYTES_PER_THREAD) + 1 < threads) threads = weight_bytes / (2 * BYTES_PER_THREAD) + 1;
#pragma omp parallel num_threads((int)threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int h = 0; h < 2; ++h) {
            if (nt > 1 ? h == t : t == 0) {
                build_half(x, B, K, h ? split : 0, h ? K : split, col_norms, thresholds, threshold_stride, G,
                           channel_buffer, coef_buffer, row_bits + h * bits_stride, halves[h],
                           kept_half + h * kept_stride_half);
            }
        }
        const int64_t acc_len = 2 * B * N;
        memset(acc + acc_len * t / nt, 0, sizeof(float) * (acc_len * (t + 1) / nt - acc_len * t / nt));
#pragma omp barrier
        if (t == 0) {
            for (int64_t b = 0; b < B; ++b) {
                for (int64_t g = 0; g < G; ++g) {
                    kept[b * kept_stride + g] = kept_half[b * G + g] + kept_half[kept_stride_half + b * G + g];
                }
            }
        }
        for (int h = 0; h < 2; ++h) {
            if (nt > 1 && h != t % 2) continue;  // one thread: both halves
            const int share = nt > 1 ? t / 2 : 0, shares = nt > 1 ? (nt - h + 1) / 2 : 1;
            for (int64_t g = 0; g < G; ++g) {
                int64_t c0, c1;
                owned_columns(segment_sizes[g], share, shares, &c0, &c1);
                if (c0 >= c1 || halves[h][g].count == 0) continue;
                accumulate(&halves[h][g], B, weight_t, N, dtype, segment_start[g] + c0, c1 - c0,
                           acc + h * B * N + segment_start[g] + c0, N);
            }
        }
#pragma omp barrier
        // Epilogue for the owned columns: the halves added, bias, rounding to the weight dtype, SwiGLU.
        for (int64_t g = 0; g < (gate_up ? 1 : G); ++g) {
            int64_t c0, c1;
            owned_columns(segment_sizes[g], t, nt, &c0, &c1);
            for (int64_t b = 0; b < B; ++b) {
                const float *low = acc + b * N, *high = acc + B * N + b * N;
                for (int64_t c = c0; c < c1; c += 8) {  // 8 outputs at a time, the last group padded
                    const int64_t j = segment_start[g] + c;  // output column (gate column with gate_up)
                    const int64_t n = c1 - c < 8 ? c1 - c : 8;
                    const __m256 up = gate_up ? _mm256_add_ps(load_padded8(low + out_width + j, n),
                                                              load_padded8(high + out_width + j, n))
                                              : _mm256_setzero_ps();
                    const __m256 v = finish8(_mm256_add_ps(load_padded8(low + j, n), load_padded8(high + j, n)), up,
                                             bias ? bias + j : NULL, bias && gate_up ? bias + out_width + j : NULL, n,
                                             dtype, gate_up);
                    store_first(out, b * out_width + j, out_dtype, v, n);
                }
            }
        }
    }
    free(channel_buffer), free(coef_buffer), free(row_bits), free(kept_half), free(acc);
    return 0;
}

#endif
