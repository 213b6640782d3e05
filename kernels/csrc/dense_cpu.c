// Dense linear layer on x86-64 CPUs with AVX2, FMA and F16C (a second build uses AVX-512: see
// lanes_t below): y = x W^T (+ b) for any number of rows B, with W in float16, bfloat16 or
// float32 read once per call whatever B is, and (below) a whole decoder layer of a decode step in
// one call. torch's half GEMM has no batched kernel on the AVX2 CPU this was written on (8 rows
// cost 8x one row) and the float32 GEMM that batched steps used instead reads twice the bytes
// (benchmarks/cpu_gemm.py measures them side by side).
//
// Semantics: F.linear with float32 inputs, accumulated in float32 and rounded to the weight dtype
// (the reference is dense_linear_reference in kernels/dense_cpu.py). With gate_up, W holds
// [gate; up] and the output is silu(gate) * up, each rounded to the weight dtype first, as
// the model's SwiGLU computes it.
//
// Layout: W is re-laid once, at load (pack_panels in kernels/dense_cpu.py), as panels of PANEL
// output columns, each panel [K, PANEL] contiguous: a panel's weights for one input channel are
// three vectors (AVX2; two in the AVX-512 build), which the kernel multiplies by each row's input
// channel (a broadcast). In the AVX2 build a block of 4 rows x 24 outputs keeps its 12 sums in
// registers and feeds 12 FMAs from 3 weight loads and 4 broadcasts (AVX-512: 8 rows x 32 outputs,
// 16 FMAs from 2 loads and 8 broadcasts), where dot products along W's rows need about one load
// per FMA (AVX2 build on an AMD EPYC, against torch's best
// GEMM, benchmarks/cpu_gemm.py: 1.80x instead of 1.44x at 8 rows, 1.50x instead of 1.00x at 16,
// 1.38x instead of 1.14x at one row; benchmarks/RESULTS.md). A weight in `parts`
// equal parts (gate_up: 2) pads each part to whole panels, so gate panel i and up panel i hold the
// same neurons.
//
// Each output is two float32 chains over k in order, k < K_SPLIT(K) and the rest, added at the
// end (as the WINA kernel forms its sums, wina_core.h), whatever B is and whichever thread computes
// it: a row's result never depends on its batch neighbours or the thread count (the model relies
// on this to give a request the same numbers whoever it is batched with).
// Built on first use by kernels/cpu_build.py and called through ctypes (see kernels/dense_cpu.py).

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd_cpu.h"
#include "wina_core.h"

// Seconds spent in each stage of the decode path since the library was loaded, in a build with
// -DNEURONSERVE_STAGE_TIMERS only (benchmarks/decode_breakdown.py makes one; the served build has
// no timers and no state): where a decode step's time goes, projection by projection.
enum { STAGE_QKV, STAGE_ATTENTION, STAGE_O, STAGE_GATE_UP, STAGE_DOWN, STAGE_LAYER, STAGE_DENSE_LINEAR, STAGES };
#ifdef NEURONSERVE_STAGE_TIMERS
static double stage_seconds[STAGES];
double *stage_timers(void) { return stage_seconds; }
#define STAGE_BEGIN(name) const double name##_begin = omp_get_wtime()
#define STAGE_END(name, stage) (stage_seconds[stage] += omp_get_wtime() - name##_begin)
#else
#define STAGE_BEGIN(name) ((void)0)
#define STAGE_END(name, stage) ((void)0)
#endif

// The panel loop's vectors: 16 float32 lanes where the library is built for AVX-512
// (kernels/cpu_build.py picks the build from the CPU's flags), 8 otherwise. The AVX-512 build
// has 32 vector registers, so a block of 8 rows x 32 outputs keeps its 16 sums in registers and
// reads each panel once for 8 rows (the AVX2 build's 16 registers hold 4 rows x 24 outputs). Only
// the blocking changes between builds: each output is still the same float32 chains of FMAs over
// k, so both give the same bits (tests/test_dense_cpu.py compares them). Projections of one
// forward pass on an Intel Xeon with AVX-512 (benchmarks/cpu_gemm.py, RESULTS.md): 8 rows 1.8x
// faster than the AVX2 build, whole 8-row decode steps 1.5x, one row the same (it waits on
// memory either way).
#ifdef __AVX512F__
#define BLOCK_ROWS 8
typedef __m512 lanes_t;
enum { LANES = 16, PANEL = 32 };
// How far ahead in a panel the k loop asks for weights, in bytes: picked among 1024, 2048, 4096
// and 8192 by ad-hoc timings of 8 rows on the Xeon (4096: 1.2x faster than 1024 there).
enum { PREFETCH_BYTES = 4096 };
static inline lanes_t lanes_zero(void) { return _mm512_setzero_ps(); }
static inline lanes_t lanes_broadcast(const float *x) { return _mm512_set1_ps(*x); }
static inline lanes_t lanes_fma(lanes_t a, lanes_t b, lanes_t c) { return _mm512_fmadd_ps(a, b, c); }
static inline void lanes_store(float *out, lanes_t v) { _mm512_storeu_ps(out, v); }
static inline lanes_t lanes_add(lanes_t a, lanes_t b) { return _mm512_add_ps(a, b); }
static inline lanes_t lanes_load_f32(const float *in) { return _mm512_loadu_ps(in); }
static inline lanes_t lanes_load(const void *base, int64_t offset, int dtype) { return load16(base, offset, dtype); }
#else
#define BLOCK_ROWS 4
typedef __m256 lanes_t;
enum { LANES = 8, PANEL = 24 };
// picked among 512, 1024 and 2048 by an ad-hoc timing on the AMD EPYC the AVX2 build was written
// on; benchmarks/decode_context.py measured the chosen one against none
enum { PREFETCH_BYTES = 1024 };
static inline lanes_t lanes_zero(void) { return _mm256_setzero_ps(); }
static inline lanes_t lanes_broadcast(const float *x) { return _mm256_broadcast_ss(x); }
static inline lanes_t lanes_fma(lanes_t a, lanes_t b, lanes_t c) { return _mm256_fmadd_ps(a, b, c); }
static inline void lanes_store(float *out, lanes_t v) { _mm256_storeu_ps(out, v); }
static inline lanes_t lanes_add(lanes_t a, lanes_t b) { return _mm256_add_ps(a, b); }
static inline lanes_t lanes_load_f32(const float *in) { return _mm256_loadu_ps(in); }
static inline lanes_t lanes_load(const void *base, int64_t offset, int dtype) { return load8(base, offset, dtype); }
#endif
enum { PANEL_VECTORS = PANEL / LANES };

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// sums[q][r][c] = x[r, :] . (column c of panel q) for r < R (x row stride K) and q < Q (1 or 2)
// panels: R and Q constants after inlining, so the R x Q x PANEL_VECTORS accumulators stay in
// registers. Each sum runs over k in order, whatever R and Q are. Few rows take two panels at once
// so that six sums (not three) are in flight per row: one row's FMAs otherwise wait on each other.
static inline __attribute__((always_inline)) void panel_block(const float *x, int64_t R, int64_t K, int64_t Q,
                                                               const void *panel0, const void *panel1, int dtype,
                                                               float sums[2][BLOCK_ROWS][PANEL]) {
    lanes_t acc[2][BLOCK_ROWS][PANEL_VECTORS];
    for (int64_t q = 0; q < Q; ++q) {
        for (int64_t r = 0; r < R; ++r) {
            for (int64_t v = 0; v < PANEL_VECTORS; ++v) acc[q][r][v] = lanes_zero();
        }
    }
    const int64_t bytes_per_k = PANEL * (dtype == DTYPE_F32 ? 4 : 2);
    // Two chains per output, over k < K_SPLIT(K) and over the rest, added at the end: the sums the
    // WINA kernel forms (wina_core.h), so that a sparse row computed as a masked dense one
    // (masked_dense_rows) gets the sparse kernel's numbers.
    for (int half = 0; half < 2; ++half) {
        const int64_t k_begin = half ? K_SPLIT(K) : 0, k_end = half ? K : K_SPLIT(K);
        for (int64_t k = k_begin; k < k_end; ++k) {
            // The panel's next lines, PREFETCH_BYTES ahead (into the next panel near the end, which
            // comes next): the hardware prefetcher alone left the first row block waiting on DRAM.
            _mm_prefetch((const char *)panel0 + k * bytes_per_k + PREFETCH_BYTES, _MM_HINT_T0);
            if (Q == 2) _mm_prefetch((const char *)panel1 + k * bytes_per_k + PREFETCH_BYTES, _MM_HINT_T0);
            if (Q == 1) {  // the panel's weight vectors, and one broadcast at a time (AVX2, 4 rows: 16 registers)
                lanes_t w[PANEL_VECTORS];
                for (int64_t v = 0; v < PANEL_VECTORS; ++v) w[v] = lanes_load(panel0, k * PANEL + v * LANES, dtype);
                for (int64_t r = 0; r < R; ++r) {
                    const lanes_t xr = lanes_broadcast(x + r * K + k);
                    for (int64_t v = 0; v < PANEL_VECTORS; ++v) acc[0][r][v] = lanes_fma(xr, w[v], acc[0][r][v]);
                }
            } else {  // the (at most 2) broadcasts held, one weight vector at a time
                lanes_t xr[2];
                for (int64_t r = 0; r < R; ++r) xr[r] = lanes_broadcast(x + r * K + k);
                for (int64_t q = 0; q < Q; ++q) {
                    for (int64_t v = 0; v < PANEL_VECTORS; ++v) {
                        const lanes_t w = lanes_load(q ? panel1 : panel0, k * PANEL + v * LANES, dtype);
                        for (int64_t r = 0; r < R; ++r) acc[q][r][v] = lanes_fma(xr[r], w, acc[q][r][v]);
                    }
                }
            }
        }
        for (int64_t q = 0; q < Q; ++q) {  // the first half's sums put by, or the second's added to them
            for (int64_t r = 0; r < R; ++r) {
                for (int64_t v = 0; v < PANEL_VECTORS; ++v) {
                    float *at = sums[q][r] + v * LANES;
                    lanes_store(at, half ? lanes_add(lanes_load_f32(at), acc[q][r][v]) : acc[q][r][v]);
                    acc[q][r][v] = lanes_zero();
                }
            }
        }
    }
}

// panel_block for R rows of two panels (panel1 NULL: one), in one pass where R is at most 2 and
// one pass per panel otherwise.
static inline __attribute__((always_inline)) void panel_pair(const float *x, int64_t R, int64_t K,
                                                              const void *panel0, const void *panel1, int dtype,
                                                              float sums[2][BLOCK_ROWS][PANEL]) {
    switch (R) {  // one specialised copy per row count
        case 1:
            if (panel1) panel_block(x, 1, K, 2, panel0, panel1, dtype, sums);
            else panel_block(x, 1, K, 1, panel0, panel0, dtype, sums);
            break;
        case 2:
            if (panel1) panel_block(x, 2, K, 2, panel0, panel1, dtype, sums);
            else panel_block(x, 2, K, 1, panel0, panel0, dtype, sums);
            break;
#define ONE_PANEL_AT_A_TIME(rows)                                                          \
        case rows:                                                                         \
            panel_block(x, rows, K, 1, panel0, panel0, dtype, sums);                       \
            if (panel1) panel_block(x, rows, K, 1, panel1, panel1, dtype, sums + 1);       \
            break;
        ONE_PANEL_AT_A_TIME(3)
        ONE_PANEL_AT_A_TIME(4)
#if BLOCK_ROWS > 4
        ONE_PANEL_AT_A_TIME(5)
        ONE_PANEL_AT_A_TIME(6)
        ONE_PANEL_AT_A_TIME(7)
        ONE_PANEL_AT_A_TIME(8)
#endif
#undef ONE_PANEL_AT_A_TIME
    }
}

// The epilogue of one panel's outputs for one row, 8 at a time: bias, rounding to the weight dtype
// and (gate_up) the SwiGLU product of gate sums `sum` and up sums `up_sum`, written to
// out[0:columns]; bias and up_bias point at the panel's first column (NULL: none).
static inline __attribute__((always_inline)) void finish_panel(const float *sum, const float *up_sum,
                                                                const float *bias, const float *up_bias,
                                                                int64_t columns, int dtype, int gate_up, void *out,
                                                                int64_t out_offset, int out_dtype) {
    for (int64_t v = 0; v < PANEL / 8; ++v) {
        // bias read only within the part: the part's last panel may be cut short
        const int64_t n = columns - v * 8 < 0 ? 0 : (columns - v * 8 > 8 ? 8 : columns - v * 8);
        const __m256 y = finish8(_mm256_loadu_ps(sum + v * 8), _mm256_loadu_ps(up_sum + v * 8),
                                 bias ? bias + v * 8 : NULL, up_bias ? up_bias + v * 8 : NULL, n, dtype, gate_up);
        store_first(out, out_offset + v * 8, out_dtype, y, n);
    }
}

// Panels [p0, p1) of one part for one weight dtype (inlined per dtype below, so load8's branch on
// the dtype is resolved at compile time): output columns part * width_part + [p0 * PANEL, p1 * PANEL),
// the last panel cut at width_part. With gate_up, panel p is gate's and panel p + panels_part is
// up's, and the output is their SwiGLU product (then part is 0 and there is one part of outputs);
// otherwise panels go two at a time (p and p + 1) where the range has two left.
static inline __attribute__((always_inline)) void dense_panels(const float *x, int64_t B, int64_t K, const void *panels,
                                                                int64_t width_part, int64_t panels_part, int64_t part,
                                                                int dtype, const float *bias, void *out,
                                                                int64_t out_width, int out_dtype, int gate_up,
                                                                int64_t p0, int64_t p1) {
    const int64_t panel_bytes = K * PANEL * (dtype == DTYPE_F32 ? 4 : 2);
    float sums[2][BLOCK_ROWS][PANEL];
    for (int64_t p = p0; p < p1; p += gate_up || p + 1 == p1 ? 1 : 2) {
        const char *panel = (const char *)panels + (part * panels_part + p) * panel_bytes;
        const char *second = gate_up ? panel + panels_part * panel_bytes : p + 1 < p1 ? panel + panel_bytes : NULL;
        for (int64_t b0 = 0; b0 < B; b0 += BLOCK_ROWS) {
            const int64_t R = B - b0 < BLOCK_ROWS ? B - b0 : BLOCK_ROWS;
            panel_pair(x + b0 * K, R, K, panel, second, dtype, sums);
            for (int64_t q = 0; q < (gate_up || !second ? 1 : 2); ++q) {
                const int64_t first = (p + q) * PANEL;
                const int64_t columns = width_part - first < PANEL ? width_part - first : PANEL;
                const int64_t u = part * width_part + first;  // first output (and bias) column
                for (int64_t r = 0; r < R; ++r) {
                    finish_panel(sums[q][r], sums[1][r], bias ? bias + u : NULL,
                                 bias && gate_up ? bias + width_part + u : NULL, columns, dtype, gate_up, out,
                                 (b0 + r) * out_width + u, out_dtype);
                }
            }
        }
    }
}

// Panels [unit0, unit1) of the projection (counted over the parts in order; with gate_up, gate
// panel i and up panel i are unit i), threads splitting them: the output columns they hold. W [N, K]
// packed in `parts` parts; arguments as dense_linear's, already checked.
static void dense_parallel_units(const float *x, int64_t B, int64_t K, const void *panels, int64_t N,
                                 int64_t parts, int dtype, const float *bias, void *out, int out_dtype, int gate_up,
                                 int64_t unit0, int64_t unit1) {
    const int64_t width_part = N / parts, panels_part = (width_part + PANEL - 1) / PANEL;
    const int64_t out_width = gate_up ? width_part : N;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t u0 = unit0 + (unit1 - unit0) * t / nt, u1 = unit0 + (unit1 - unit0) * (t + 1) / nt;
        for (int64_t part = u0 / panels_part; part * panels_part < u1; ++part) {
            const int64_t p0 = u0 > part * panels_part ? u0 - part * panels_part : 0;
            const int64_t p1 = u1 < (part + 1) * panels_part ? u1 - part * panels_part : panels_part;
            if (dtype == DTYPE_F16) {
                dense_panels(x, B, K, panels, width_part, panels_part, part, DTYPE_F16, bias, out, out_width, out_dtype,
                             gate_up, p0, p1);
            } else if (dtype == DTYPE_BF16) {
                dense_panels(x, B, K, panels, width_part, panels_part, part, DTYPE_BF16, bias, out, out_width,
                             out_dtype, gate_up, p0, p1);
            } else {
                dense_panels(x, B, K, panels, width_part, panels_part, part, DTYPE_F32, bias, out, out_width, out_dtype,
                             gate_up, p0, p1);
            }
        }
    }
}

// The whole projection (with gate_up: its one part of outputs)
static void dense_parallel(const float *x, int64_t B, int64_t K, const void *panels, int64_t N, int64_t parts,
                           int dtype, const float *bias, void *out, int out_dtype, int gate_up) {
    const int64_t panels_part = (N / parts + PANEL - 1) / PANEL;
    dense_parallel_units(x, B, K, panels, N, parts, dtype, bias, out, out_dtype, gate_up, 0,
                         gate_up ? panels_part : parts * panels_part);
}

static int valid_dtype(int dtype) { return dtype == DTYPE_F16 || dtype == DTYPE_BF16 || dtype == DTYPE_F32; }

// x: [B, K] float32, contiguous; panels: W [N, K] (dtype) packed in `parts` equal parts (1 or 2; 2
// with gate_up), [parts * ceil(N / parts / PANEL), K, PANEL]; bias: [N] float32 or NULL; out:
// [B, N] (out_dtype), or [B, N / 2] with gate_up. Returns 0, or -1 on bad arguments.
int dense_linear(const float *x, int64_t B, int64_t K, const void *panels, int64_t N, int64_t parts, int dtype,
                 const float *bias, void *out, int out_dtype, int gate_up) {
    if (B < 1 || K < 1 || N < 1 || parts < 1 || parts > 2 || N % parts || (gate_up && parts != 2) ||
        !valid_dtype(dtype) || !valid_dtype(out_dtype)) {
        return -1;
    }
    STAGE_BEGIN(linear);
    dense_parallel(x, B, K, panels, N, parts, dtype, bias, out, out_dtype, gate_up);
    STAGE_END(linear, STAGE_DENSE_LINEAR);
    return 0;
}

int dense_panel_width(void) { return PANEL; }

// ---------------------------------------------------------------------------------------------
// One decoder layer for a decode step (one new token per row) or a short prompt chunk of one
// sequence (its tokens as rows of one slot), fused: the model's DecoderLayer.forward, with WINA
// sparsity for up to 8 sparse rows of a decode step (wina_core.h) and no neuron edits other than
// keep masks, in one call instead of about 25 torch ops, each of which costs more to dispatch
// than to compute at this size. Same math as the torch path: float32 norms, RoPE, attention and
// residual stream; every projection rounded to the weight dtype; keys and values stored in the
// cache's dtype (the weight dtype on CPU, float32 for a float32 model).

// One layer's weights and shapes, filled once at load (PreparedDecodeLayer in kernels/dense_cpu.py).
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, max_len, dtype;
    double eps;
    const float *attn_norm, *mlp_norm;              // [hidden]
    // W [(H + 2 KVH) D, hidden], [hidden, H D], [2I, hidden] (in 2 parts), [hidden, I], in panels
    const void *qkv_w, *o_w, *gate_up_w, *down_w;
    const float *qkv_b, *o_b, *gate_up_b, *down_b;  // float32 biases or NULL
    const float *cos, *signed_sin;                  // [max_len, D], rotate-half layout, sign folded in
    // WINA sparsity, NULL qkv_wt when the layer has none: each projection's W^T [in, out] (dtype)
    // and score factors [segments, in] float32; q/k/v are 3 segments, gate/up 2, o and down 1
    const void *qkv_wt, *o_wt, *gate_up_wt, *down_wt;
    const float *qkv_factors, *o_factors, *gate_up_factors, *down_factors;
    int64_t qkv_segments[3];
    int64_t kv_dtype;  // the KV cache's dtype (DTYPE_*): the model's weight dtype on CPU
} DecodeLayer;

enum { TABLE_COLUMNS = 7 };  // q, k, v, o, gate, up, down: the model's [rows, 7] threshold and kept tables

// out = x * rsqrt(mean(x^2) + eps) * w, per row, as RMSNorm.forward computes it
static void rms_norm_rows(const float *x, int64_t B, int64_t n, const float *w, double eps, float *out) {
    for (int64_t b = 0; b < B; ++b) {
        const float *xb = x + b * n;
        float ss = 0.0f;
        for (int64_t i = 0; i < n; ++i) ss += xb[i] * xb[i];
        const float r = 1.0f / sqrtf(ss / (float)n + (float)eps);
        for (int64_t i = 0; i < n; ++i) out[b * n + i] = xb[i] * r * w[i];
    }
}

// x[i] * cos[i] + x[(i + D/2) % D] * signed_sin[i]: rotate-half RoPE (apply_rope in layers.py),
// as two loops without the modulo (a division per element), which the compiler vectorizes: the
// same products and sums
static void rope_head(float *x, int64_t D, const float *cos, const float *signed_sin) {
    float rotated[512];
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; ++i) rotated[i] = x[i] * cos[i] + x[i + half] * signed_sin[i];
    for (int64_t i = half; i < D; ++i) rotated[i] = x[i] * cos[i] + x[i - half] * signed_sin[i];
    memcpy(x, rotated, sizeof(float) * D);
}

enum { VALUE_KEYS = 64 };  // keys per block of the value sums: 64 rows of values stay in L1
// Query heads handled together, so that each key and value read (and converted from half) once
// serves all of them: their sums fill the 16 vector registers of AVX2 (3 heads x 4 keys of scores;
// 3 heads x 4 vectors of value lanes)
enum { HEADS_PER_PASS = 3 };

// The cache's keys and values of a KV head are one contiguous run per row, read in order, yet
// prefetching them in software KV_PREFETCH_AHEAD_BYTES ahead made decode steps of 8 rows at
// 1000-2000 positions 1.11-1.23x faster, of one row at 2000 1.08-1.10x (decode_context.py against
// this code without it, four runs; in an ad-hoc driver of the attention alone 1 KiB ahead gained
// less and 8 KiB was slower): the hardware prefetcher, it seems, does not run far enough ahead.
enum { KV_PREFETCH_AHEAD_BYTES = 4096 };

// Prefetch the lines of elements [offset, offset + count) of a KV cache run, KV_PREFETCH_AHEAD_BYTES
// on, but none at or past element `end` (the run's last key): at 100 positions, prefetching past it
// made steps of 8 rows 0.91-0.93x as fast as without the prefetch (decode_context.py, two runs)
static inline __attribute__((always_inline)) void prefetch_ahead(const void *base, int64_t offset, int64_t count,
                                                                 int64_t end, int kv_dtype) {
    const int64_t elem = kv_dtype == DTYPE_F32 ? 4 : 2;
    const int64_t first = offset * elem + KV_PREFETCH_AHEAD_BYTES, stop = first + count * elem;
    const int64_t last = stop < end * elem ? stop : end * elem;
    for (int64_t b = first; b < last; b += 64) _mm_prefetch((const char *)base + b, _MM_HINT_T0);
}

// The sums of 4 vectors' lanes, each by the tree ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))
// (until the twenty-fifth session's attention, eight keys' sums at once by the same tree)
static inline __m128 hsum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

// scores[h][s] for `heads` (a constant where inlined) query heads q[0:heads] and the keys of the
// whole 8-key blocks, four keys at a time: each key's 8-lane pieces loaded once for all the heads
static inline __attribute__((always_inline)) void score_blocks(const float *q, int64_t heads, const void *keys,
                                                               int64_t blocked, int64_t len, int64_t D, int kv_dtype,
                                                               float *scores) {
    const int64_t vec_end = D & ~(int64_t)7;
    for (int64_t s = 0; s < blocked; s += 4) {
        __m256 acc[HEADS_PER_PASS][4];
        for (int64_t h = 0; h < heads; ++h) {
            for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_setzero_ps();
        }
        prefetch_ahead(keys, s * D, 4 * D, len * D, kv_dtype);
        for (int64_t i = 0; i < vec_end; i += 8) {
            __m256 k[4];
            for (int j = 0; j < 4; ++j) k[j] = load8(keys, (s + j) * D + i, kv_dtype);
            for (int64_t h = 0; h < heads; ++h) {
                const __m256 qv = _mm256_loadu_ps(q + h * D + i);
                for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_fmadd_ps(qv, k[j], acc[h][j]);
            }
        }
        for (int64_t h = 0; h < heads; ++h) {
            _mm_storeu_ps(scores + h * len + s, hsum4x8(acc[h][0], acc[h][1], acc[h][2], acc[h][3]));
        }
    }
}

// scores[h][s] = q[h] . keys[s] * scale for the G query heads h of one KV head and s < len: four
// keys of a block of eight at a time for up to three heads (twelve independent sums in flight;
// one key's dot product alone is a chain of dependent FMAs), the last len % 8 keys one at a time.
// Each output is the same float32 sum whatever the grouping: 8-lane partial sums over the head
// dimension in order, then a fixed tree.
static inline __attribute__((always_inline)) void attention_scores(const float *q, int64_t G, const void *keys,
                                                                   int64_t len, int64_t D, int kv_dtype, float scale,
                                                                   float *scores) {
    const int64_t vec_end = D & ~(int64_t)7, blocked = len & ~(int64_t)7;
    for (int64_t h0 = 0; h0 < G; h0 += HEADS_PER_PASS) {
        const float *qh = q + h0 * D;
        float *sh = scores + h0 * len;
        switch (G - h0 < HEADS_PER_PASS ? G - h0 : HEADS_PER_PASS) {  // the head count a constant in each
            case 1: score_blocks(qh, 1, keys, blocked, len, D, kv_dtype, sh); break;
            case 2: score_blocks(qh, 2, keys, blocked, len, D, kv_dtype, sh); break;
            default: score_blocks(qh, 3, keys, blocked, len, D, kv_dtype, sh); break;
        }
    }
    for (int64_t s = blocked; s < len; ++s) {
        for (int64_t h = 0; h < G; ++h) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t i = 0; i < vec_end; i += 8) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + i), load8(keys, s * D + i, kv_dtype), acc);
            }
            scores[h * len + s] = hsum8(acc);
        }
    }
    for (int64_t h = 0; h < G; ++h) {
        for (int64_t s = 0; s < len; ++s) {
            float dot = scores[h * len + s];
            for (int64_t i = vec_end; i < D; ++i) dot = fmaf(q[h * D + i], load1(keys, s * D + i, kv_dtype), dot);
            scores[h * len + s] = dot * scale;
        }
    }
}

// p[h] = softmax(p[h]) in place over n scores, for the G rows of p [G, n]: the maximum eight lanes
// at a time (exact in any order), e^(score - max) eight at a time, each row's sum in order from
// its first score, the G rows' sums side by side (independent chains), then the divisions
static void softmax_rows(float *p, int64_t G, int64_t n) {
    float total[64];
    for (int64_t h0 = 0; h0 < G; h0 += 64) {
        const int64_t rows = G - h0 < 64 ? G - h0 : 64;
        for (int64_t h = h0; h < h0 + rows; ++h) {
            float *row = p + h * n;
            __m256 top8 = _mm256_set1_ps(-INFINITY);
            int64_t s = 0;
            for (; s + 8 <= n; s += 8) top8 = _mm256_max_ps(_mm256_loadu_ps(row + s), top8);
            float lanes[8], top = -INFINITY;
            _mm256_storeu_ps(lanes, top8);
            for (int j = 0; j < 8; ++j) top = lanes[j] > top ? lanes[j] : top;
            for (; s < n; ++s) top = row[s] > top ? row[s] : top;
            top8 = _mm256_set1_ps(top);
            for (s = 0; s < n; s += 8) {  // e^(score - top), 8 at a time
                const int64_t m = n - s < 8 ? n - s : 8;
                const __m256 e = exp8(_mm256_sub_ps(load_padded8(row + s, m), top8));
                if (m == 8) {
                    _mm256_storeu_ps(row + s, e);
                } else {
                    _mm256_storeu_ps(lanes, e);
                    memcpy(row + s, lanes, sizeof(float) * m);
                }
            }
            total[h - h0] = 0.0f;
        }
        for (int64_t s = 0; s < n; ++s) {
            for (int64_t h = 0; h < rows; ++h) total[h] += p[(h0 + h) * n + s];
        }
        for (int64_t h = 0; h < rows; ++h) {
            float *row = p + (h0 + h) * n;
            for (int64_t s = 0; s < n; ++s) row[s] /= total[h];
        }
    }
}

#ifdef __AVX512F__
enum { VALUE_LANES = 16 };  // lanes per vector of the value sums
typedef __m512 ValueVector;
#define VALUE_LOAD(base, offset, dtype) load16(base, offset, dtype)
#define VALUE_LOADU(p) _mm512_loadu_ps(p)
#define VALUE_STOREU(p, v) _mm512_storeu_ps(p, v)
#define VALUE_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VALUE_SET1(x) _mm512_set1_ps(x)
#else
enum { VALUE_LANES = 8 };
typedef __m256 ValueVector;
#define VALUE_LOAD(base, offset, dtype) load8(base, offset, dtype)
#define VALUE_LOADU(p) _mm256_loadu_ps(p)
#define VALUE_STOREU(p, v) _mm256_storeu_ps(p, v)
#define VALUE_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VALUE_SET1(x) _mm256_set1_ps(x)
#endif

// out[h][i0 : i0 + vectors * VALUE_LANES] += sum over keys s0..s1-1 of p[h][s] v[s][...], for
// `heads` query heads and `vectors` (both constants where inlined): the lanes of all the heads in
// registers, each value piece loaded once for them all; one FMA per key per lane, keys in order
static inline __attribute__((always_inline)) void value_tile(const float *p, int64_t heads, int64_t len,
                                                             const void *values, int64_t s0, int64_t s1, int64_t D,
                                                             int64_t i0, int vectors, int kv_dtype, float *out) {
    ValueVector acc[HEADS_PER_PASS][4];
    for (int64_t h = 0; h < heads; ++h) {
        for (int j = 0; j < vectors; ++j) acc[h][j] = VALUE_LOADU(out + h * D + i0 + j * VALUE_LANES);
    }
    for (int64_t s = s0; s < s1; ++s) {
        ValueVector v[4];
        if (i0 == 0) prefetch_ahead(values, s * D, D, len * D, kv_dtype);
        for (int j = 0; j < vectors; ++j) v[j] = VALUE_LOAD(values, s * D + i0 + j * VALUE_LANES, kv_dtype);
        for (int64_t h = 0; h < heads; ++h) {
            const ValueVector ps = VALUE_SET1(p[h * len + s]);
            for (int j = 0; j < vectors; ++j) acc[h][j] = VALUE_FMA(ps, v[j], acc[h][j]);
        }
    }
    for (int64_t h = 0; h < heads; ++h) {
        for (int j = 0; j < vectors; ++j) VALUE_STOREU(out + h * D + i0 + j * VALUE_LANES, acc[h][j]);
    }
}

// value_tile with its head count a constant: 1, 2 or HEADS_PER_PASS
static inline __attribute__((always_inline)) void value_tile_heads(const float *p, int64_t heads, int64_t len,
                                                                   const void *values, int64_t s0, int64_t s1,
                                                                   int64_t D, int64_t i0, int vectors, int kv_dtype,
                                                                   float *out) {
    switch (heads) {
        case 1: value_tile(p, 1, len, values, s0, s1, D, i0, vectors, kv_dtype, out); break;
        case 2: value_tile(p, 2, len, values, s0, s1, D, i0, vectors, kv_dtype, out); break;
        default: value_tile(p, HEADS_PER_PASS, len, values, s0, s1, D, i0, vectors, kv_dtype, out); break;
    }
}

// softmax(q K^T / sqrt(D)) V over keys 0..len-1 of one KV head, for its G query heads: q [G, D]
// -> out [G, D]; scores: scratch of G * len. Keys and values are read once for up to three heads:
// each output lane is one chain of FMAs over the keys in order, from zero.
static inline __attribute__((always_inline)) void attend(const float *q, int64_t G, const void *keys,
                                                          const void *values, int64_t len, int64_t D, int kv_dtype,
                                                          float *scores, float *out) {
    attention_scores(q, G, keys, len, D, kv_dtype, 1.0f / sqrtf((float)D), scores);
    softmax_rows(scores, G, len);
    const int64_t vec_end = D - D % VALUE_LANES, tile = 4 * VALUE_LANES;
    for (int64_t i = 0; i < G * D; ++i) out[i] = 0.0f;
    for (int64_t s0 = 0; s0 < len; s0 += VALUE_KEYS) {
        const int64_t s1 = len - s0 < VALUE_KEYS ? len : s0 + VALUE_KEYS;
        for (int64_t h0 = 0; h0 < G; h0 += HEADS_PER_PASS) {
            const int64_t heads = G - h0 < HEADS_PER_PASS ? G - h0 : HEADS_PER_PASS;
            const float *p = scores + h0 * len;
            float *o = out + h0 * D;
            int64_t i0 = 0;
            for (; i0 + tile <= vec_end; i0 += tile) {
                value_tile_heads(p, heads, len, values, s0, s1, D, i0, 4, kv_dtype, o);
            }
            for (; i0 < vec_end; i0 += VALUE_LANES) {
                value_tile_heads(p, heads, len, values, s0, s1, D, i0, 1, kv_dtype, o);
            }
            for (int64_t h = 0; h < heads; ++h) {
                int64_t i = vec_end;
                for (; i + 8 <= D; i += 8) {  // AVX-512: 8 lanes past the last 16
                    __m256 acc = _mm256_loadu_ps(o + h * D + i);
                    for (int64_t s = s0; s < s1; ++s) {
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(p[h * len + s]), load8(values, s * D + i, kv_dtype), acc);
                    }
                    _mm256_storeu_ps(o + h * D + i, acc);
                }
                for (; i < D; ++i) {  // lanes past the last whole vector
                    float sum = o[h * D + i];
                    for (int64_t s = s0; s < s1; ++s) {
                        sum = fmaf(p[h * len + s], load1(values, s * D + i, kv_dtype), sum);
                    }
                    o[h * D + i] = sum;
                }
            }
        }
    }
}

// attend with the cache dtype a constant, so that its loads need no branch
static void attend_any(const float *q, int64_t G, const void *keys, const void *values, int64_t len, int64_t D,
                       int kv_dtype, float *scores, float *out) {
    if (kv_dtype == DTYPE_F16) attend(q, G, keys, values, len, D, DTYPE_F16, scores, out);
    else if (kv_dtype == DTYPE_BF16) attend(q, G, keys, values, len, D, DTYPE_BF16, scores, out);
    else attend(q, G, keys, values, len, D, DTYPE_F32, scores, out);
}

// dst[offset : offset + n] = src[0:n] in dtype (rounded to nearest)
static void store_row(void *dst, int64_t offset, int dtype, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store8(dst, offset + i, dtype, _mm256_loadu_ps(src + i));
    for (; i < n; ++i) store1(dst, offset + i, dtype, src[i]);
}

static int valid_rows(const DecodeLayer *layer, int64_t num_slots, int64_t B, const int64_t *slots,
                      const int64_t *positions) {
    if (B < 1 || layer->head_dim > 512 || layer->head_dim % 2 || layer->heads % layer->kv_heads ||
        !valid_dtype((int)layer->dtype) || !valid_dtype((int)layer->kv_dtype)) {
        return 0;
    }
    for (int64_t b = 0; b < B; ++b) {
        if (slots[b] < 0 || slots[b] >= num_slots || positions[b] < 0 || positions[b] >= layer->max_len) return 0;
    }
    return 1;
}

// Attention of one new token per row, from its projected q, k, v: qkv [B, (H + 2 KVH) D] float32
// (unchanged) -> out [B, H D]. Rotates q and k, writes k and v into the cache at each row's slot
// and position, and attends over the row's keys 0..position. Arguments checked by the caller.
static int attention_rows(const DecodeLayer *layer, const float *qkv, void *keys, void *values, int64_t B,
                          const int64_t *slots, const int64_t *positions, float *out) {
    const int64_t H = layer->heads, KVH = layer->kv_heads, D = layer->head_dim, max_len = layer->max_len;
    const int64_t qkv_width = (H + 2 * KVH) * D;
    const int threads = omp_get_max_threads();
    float *rotated = malloc(sizeof(float) * B * (H + KVH) * D);  // q and k heads after RoPE
    const int64_t G = H / KVH;  // query heads per KV head
    float *scores = malloc(sizeof(float) * threads * G * max_len);
    if (!rotated || !scores) {
        free(rotated), free(scores);
        return -1;
    }
    for (int64_t b = 0; b < B; ++b) {
        const float *cos = layer->cos + positions[b] * D, *sin = layer->signed_sin + positions[b] * D;
        const float *row = qkv + b * qkv_width;
        float *rot = rotated + b * (H + KVH) * D;
        memcpy(rot, row, sizeof(float) * (H + KVH) * D);
        for (int64_t head = 0; head < H + KVH; ++head) rope_head(rot + head * D, D, cos, sin);
        for (int64_t g = 0; g < KVH; ++g) {
            const int64_t at = ((slots[b] * KVH + g) * max_len + positions[b]) * D;
            store_row(keys, at, (int)layer->kv_dtype, rot + (H + g) * D, D);
            store_row(values, at, (int)layer->kv_dtype, row + (H + KVH + g) * D, D);
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < B * KVH; ++item) {  // one KV head of one row: its G query heads
        const int64_t b = item / KVH, g = item % KVH;
        const int64_t base = (slots[b] * KVH + g) * max_len * D;
        const int64_t offset = base * (layer->kv_dtype == DTYPE_F32 ? 4 : 2);  // bytes
        attend_any(rotated + (b * (H + KVH) + g * G) * D, G, (const char *)keys + offset,
                   (const char *)values + offset, positions[b] + 1, D, (int)layer->kv_dtype,
                   scores + (int64_t)omp_get_thread_num() * G * max_len, out + (b * H + g * G) * D);
    }
    free(rotated), free(scores);
    return 0;
}

// The sparse rows' projection as a dense one whose dropped inputs are zeros: rows b of x [B, K]
// (the R sparse ones: sparse_rows, or all when NULL) keep channel i of segment g where
// |x_i| * factors[g, i] > their threshold, as wina_project decides, and write the kept counts as it
// does; every output then runs the dense kernel over the masked inputs. The same bits as
// wina_project: both sum the same two float32 FMA chains (k below K_SPLIT(K), and the rest) in
// ascending order from zero, and a zero input adds fma(0, w, acc) == acc. Worth it where the
// sparse rows are several: their kept channels together cover most of the weight, and the dense
// kernel's register blocks beat accumulating the kept rows one row of sums at a time (RESULTS.md,
// "WINA sparsity: speed"). Returns 0, -1 without
// memory, or 1 where it cannot run: a segment boundary inside a panel (the panels of one segment
// must see only its mask).
static int masked_dense_rows(const float *x, int64_t B, int64_t K, const void *weight, int64_t N, int dtype,
                             const float *factors, const int64_t *segments, int64_t G, const float *bias, float *out,
                             int gate_up, const float *thresholds, int32_t *kept, int column,
                             const int64_t *sparse_rows, int64_t R) {
    int64_t start = 0;
    for (int64_t g = 0; g + 1 < G && !gate_up; ++g) {
        start += segments[g];
        if (start % PANEL) return 1;
    }
    float *masked = malloc(sizeof(float) * G * B * K + (gate_up ? sizeof(float) * B * N : 0));  // [G, B, K] (+ [B, N])
    if (!masked) return -1;
    for (int64_t g = 0; g < G; ++g) {
        float *xg = masked + g * B * K;
        memcpy(xg, x, sizeof(float) * B * K);
        for (int64_t s = 0; s < R; ++s) {
            const int64_t b = sparse_rows ? sparse_rows[s] : s;
            const float threshold = thresholds[s * TABLE_COLUMNS + column + g];
            int32_t count = 0;
            for (int64_t i = 0; i < K; ++i) {
                const int keep = fabsf(x[b * K + i]) * factors[g * K + i] > threshold;
                xg[b * K + i] = keep ? x[b * K + i] : 0.0f;
                count += keep;
            }
            kept[s * TABLE_COLUMNS + column + g] = count;
        }
    }
    if (gate_up) {  // gate and up as plain outputs over their own masks, then the SwiGLU epilogue
        float *both = masked + G * B * K;  // [B, N]: gate's columns, then up's, each rounded with its bias
        const int64_t width = N / 2, panels_part = (width + PANEL - 1) / PANEL;
        dense_parallel_units(masked, B, K, weight, N, 2, dtype, bias, both, DTYPE_F32, 0, 0, panels_part);
        dense_parallel_units(masked + B * K, B, K, weight, N, 2, dtype, bias, both, DTYPE_F32, 0, panels_part,
                             2 * panels_part);
#pragma omp parallel for schedule(static) if (B > 1)
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t j = 0; j < width; j += 8) {
                const int64_t n = width - j < 8 ? width - j : 8;
                const __m256 y = finish8(load_padded8(both + b * N + j, n), load_padded8(both + b * N + width + j, n),
                                         NULL, NULL, n, dtype, 1);  // the rounding again leaves them as they are
                store_first(out, b * width + j, DTYPE_F32, y, n);
            }
        }
    } else {
        start = 0;
        for (int64_t g = 0; g < G; ++g) {
            const int64_t end = start + segments[g];
            dense_parallel_units(masked + g * B * K, B, K, weight, N, 1, dtype, bias, out, DTYPE_F32, 0,
                                 start / PANEL, (end + PANEL - 1) / PANEL);
            start = end;
        }
    }
    free(masked);
    return 0;
}

// One projection of a step's rows into out [B, out] float32: all dense (thresholds NULL), all
// sparse (R == B), or mixed: the R sparse rows (sparse_rows, ascending) through wina_project with
// their thresholds' and kept counts' column `column` ([R, 7] tables), the others through
// dense_parallel; each row gets what a call on its group alone gives it (both kernels compute a row
// independently of the others), which is what the model's separate calls give it. With
// masked_dense, every row through masked_dense_rows instead (the same numbers).
static int project_rows(const float *x, int64_t B, int64_t K, const void *weight, const void *weight_t, int64_t N,
                        int dtype, const float *factors, const int64_t *segments, int64_t G, const float *bias,
                        float *out, int gate_up, const float *thresholds, int32_t *kept, int column,
                        const int64_t *sparse_rows, int64_t R, int masked_dense) {
    if (!thresholds) {
        dense_parallel(x, B, K, weight, N, gate_up ? 2 : 1, dtype, bias, out, DTYPE_F32, gate_up);
        return 0;
    }
    if (masked_dense) {
        const int status = masked_dense_rows(x, B, K, weight, N, dtype, factors, segments, G, bias, out, gate_up,
                                             thresholds, kept, column, R < B ? sparse_rows : NULL, R);
        if (status <= 0) return status;  // else (segments not on panel boundaries) the sparse kernel
    }
    if (R == B) {
        return wina_project(x, B, K, weight_t, N, dtype, factors, thresholds + column, TABLE_COLUMNS, segments, G,
                            bias, out, DTYPE_F32, kept + column, TABLE_COLUMNS, gate_up);
    }
    const int64_t width = gate_up ? N / 2 : N;
    float *xs = malloc(sizeof(float) * (R * K + R * width + (B - R) * K + (B - R) * width));
    if (!xs) return -1;
    float *ys = xs + R * K, *xd = ys + R * width, *yd = xd + (B - R) * K;
    for (int64_t b = 0, s = 0, d = 0; b < B; ++b) {
        if (s < R && sparse_rows[s] == b) memcpy(xs + (s++) * K, x + b * K, sizeof(float) * K);
        else memcpy(xd + (d++) * K, x + b * K, sizeof(float) * K);
    }
    int status = wina_project(xs, R, K, weight_t, N, dtype, factors, thresholds + column, TABLE_COLUMNS, segments, G,
                              bias, ys, DTYPE_F32, kept + column, TABLE_COLUMNS, gate_up);
    if (status == 0) {
        dense_parallel(xd, B - R, K, weight, N, gate_up ? 2 : 1, dtype, bias, yd, DTYPE_F32, gate_up);
        for (int64_t b = 0, s = 0, d = 0; b < B; ++b) {
            if (s < R && sparse_rows[s] == b) memcpy(out + b * width, ys + (s++) * width, sizeof(float) * width);
            else memcpy(out + b * width, yd + (d++) * width, sizeof(float) * width);
        }
    }
    free(xs);
    return status;
}

// The attention half of the layer on h [B, hidden], in place: h += o_proj(attention(norm(h))).
static int attention_block(const DecodeLayer *layer, void *keys, void *values, float *h, int64_t B,
                           const int64_t *slots, const int64_t *positions, const float *thresholds, int32_t *kept,
                           const int64_t *sparse_rows, int64_t R, int masked_dense) {
    const int64_t hidden = layer->hidden, H = layer->heads, KVH = layer->kv_heads, D = layer->head_dim;
    const int64_t qkv_width = (H + 2 * KVH) * D;
    const int dtype = (int)layer->dtype;
    float *x = malloc(sizeof(float) * B * hidden);
    float *qkv = malloc(sizeof(float) * B * qkv_width);
    float *attn = malloc(sizeof(float) * B * H * D);
    float *proj = malloc(sizeof(float) * B * hidden);
    int status = -1;
    if (x && qkv && attn && proj) {
        rms_norm_rows(h, B, hidden, layer->attn_norm, layer->eps, x);
        const int64_t o_segments[1] = {hidden};
        STAGE_BEGIN(qkv_projection);
        status = project_rows(x, B, hidden, layer->qkv_w, layer->qkv_wt, qkv_width, dtype, layer->qkv_factors,
                              layer->qkv_segments, 3, layer->qkv_b, qkv, 0, thresholds, kept, 0, sparse_rows, R,
                              masked_dense);
        STAGE_END(qkv_projection, STAGE_QKV);
        STAGE_BEGIN(attention);
        if (status == 0) status = attention_rows(layer, qkv, keys, values, B, slots, positions, attn);
        STAGE_END(attention, STAGE_ATTENTION);
        STAGE_BEGIN(o_projection);
        if (status == 0) {
            status = project_rows(attn, B, H * D, layer->o_w, layer->o_wt, hidden, dtype, layer->o_factors, o_segments,
                                  1, layer->o_b, proj, 0, thresholds, kept, 3, sparse_rows, R,
                                  masked_dense);
        }
        STAGE_END(o_projection, STAGE_O);
        if (status == 0) {
            for (int64_t i = 0; i < B * hidden; ++i) h[i] += proj[i];
        }
    }
    free(x), free(qkv), free(attn), free(proj);
    return status;
}

// A memorization subspace (server/interventions/memorization.py) on the rows that ask, in place:
// act -= U (U^T act - offset), act [B, I]; basis: U [I, rank] and basis_t: U^T [rank, I], both
// row-major (each loop reads the layout it vectorizes over); offset [rank]; rows: [B] 1 where the
// row asks, or NULL for every row. 2 I rank multiply-adds per row, rows in parallel.
static int remove_subspace(float *act, int64_t B, int64_t I, const float *basis, const float *basis_t,
                           const float *offset, int64_t rank, const uint8_t *rows) {
    int failed = 0;
#pragma omp parallel for schedule(static) if (B > 1) reduction(| : failed)
    for (int64_t b = 0; b < B; ++b) {
        if (rows && !rows[b]) continue;
        float *restrict coords = malloc(sizeof(float) * rank);  // restrict: the loops below vectorize
        if (!coords) {
            failed = 1;
            continue;
        }
        float *restrict a = act + b * I;
        for (int64_t j = 0; j < rank; ++j) coords[j] = -offset[j];
        for (int64_t i = 0; i < I; ++i) {
            const float x = a[i];
            const float *restrict u = basis + i * rank;
            for (int64_t j = 0; j < rank; ++j) coords[j] += x * u[j];
        }
        for (int64_t j = 0; j < rank; ++j) {
            const float c = coords[j];
            const float *restrict u = basis_t + j * I;
            for (int64_t i = 0; i < I; ++i) a[i] -= c * u[i];
        }
        free(coords);
    }
    return failed ? -1 : 0;
}

// The MLP half on h [B, hidden], in place: h += down(edit(silu(gate(norm(h))) * up(norm(h)))), where
// edit multiplies by keep ([B, I] 0/1 float32, or NULL for all ones: the neurons a row prunes), then
// removes the subspace `basis` (NULL: none; see remove_subspace) from the rows that ask.
static int mlp_block(const DecodeLayer *layer, float *h, int64_t B, const float *keep, const float *basis,
                     const float *basis_t, const float *offset, int64_t rank, const uint8_t *basis_rows,
                     const float *thresholds, int32_t *kept, const int64_t *sparse_rows, int64_t R,
                     int masked_dense) {
    const int64_t hidden = layer->hidden, I = layer->intermediate;
    const int dtype = (int)layer->dtype;
    float *x = malloc(sizeof(float) * B * hidden);
    float *act = malloc(sizeof(float) * B * I);  // silu(gate) * up
    float *proj = malloc(sizeof(float) * B * hidden);
    int status = -1;
    if (x && act && proj) {
        rms_norm_rows(h, B, hidden, layer->mlp_norm, layer->eps, x);
        const int64_t gate_up_segments[2] = {I, I}, down_segments[1] = {hidden};
        STAGE_BEGIN(gate_up_projection);
        status = project_rows(x, B, hidden, layer->gate_up_w, layer->gate_up_wt, 2 * I, dtype, layer->gate_up_factors,
                              gate_up_segments, 2, layer->gate_up_b, act, 1, thresholds, kept, 4, sparse_rows, R,
                              masked_dense);
        STAGE_END(gate_up_projection, STAGE_GATE_UP);
        if (status == 0 && keep) {
            for (int64_t i = 0; i < B * I; ++i) act[i] *= keep[i];
        }
        if (status == 0 && basis) status = remove_subspace(act, B, I, basis, basis_t, offset, rank, basis_rows);
        STAGE_BEGIN(down_projection);
        if (status == 0) {
            status = project_rows(act, B, I, layer->down_w, layer->down_wt, hidden, dtype, layer->down_factors,
                                  down_segments, 1, layer->down_b, proj, 0, thresholds, kept, 6, sparse_rows, R,
                                  masked_dense);
        }
        STAGE_END(down_projection, STAGE_DOWN);
        if (status == 0) {
            for (int64_t i = 0; i < B * hidden; ++i) h[i] += proj[i];
        }
    }
    free(x), free(act), free(proj);
    return status;
}

// Checks what decode_layer and decode_stack share: the rows, the subspace's parts, and the sparse
// rows (ascending, in range) with their tables.
static int valid_call(const DecodeLayer *layer, int64_t num_slots, int64_t B, const int64_t *slots,
                      const int64_t *positions, const float *basis, const float *basis_t, const float *offset,
                      int64_t rank, const float *thresholds, const int32_t *kept, const int64_t *sparse_rows,
                      int64_t R) {
    if (!valid_rows(layer, num_slots, B, slots, positions)) return 0;
    if (basis && (!basis_t || !offset || rank < 1)) return 0;
    if (thresholds && (!layer->qkv_wt || !kept || R < 1 || R > B || (R < B && !sparse_rows))) return 0;
    for (int64_t s = 0; thresholds && R < B && s < R; ++s) {
        if (sparse_rows[s] < (s ? sparse_rows[s - 1] + 1 : 0) || sparse_rows[s] >= B) return 0;
    }
    return 1;
}

// One layer on h [B, hidden] in place (the arguments as decode_layer's, checked).
static int layer_in_place(const DecodeLayer *layer, void *keys, void *values, float *h, int64_t B,
                          const int64_t *slots, const int64_t *positions, const float *keep, const float *basis,
                          const float *basis_t, const float *offset, int64_t rank, const uint8_t *basis_rows,
                          const float *thresholds, int32_t *kept, const int64_t *sparse_rows, int64_t R,
                          int masked_dense) {
    STAGE_BEGIN(layer);
    int status = attention_block(layer, keys, values, h, B, slots, positions, thresholds, kept, sparse_rows, R,
                                 masked_dense);
    if (status == 0) {
        status = mlp_block(layer, h, B, keep, basis, basis_t, offset, rank, basis_rows, thresholds, kept,
                           sparse_rows, R, masked_dense);
    }
    STAGE_END(layer, STAGE_LAYER);
    return status;
}

// keys, values: this layer's cache, [num_slots, KVH, max_len, D] in layer->kv_dtype; h_in -> h_out: [B, hidden]
// float32 residual stream before and after the layer; slots, positions: [B], each row's cache slot
// and the position of its new token; keep: [B, I] neuron keep mask or NULL; basis, basis_t, offset,
// rank, basis_rows: a subspace to remove, or basis NULL (see remove_subspace);
// thresholds: NULL (dense), or the WINA thresholds [R, 7] float32 (q, k, v, o, gate, up, down) of
// the R sparse rows, sparse_rows [R] (ascending batch indices; NULL when every row is sparse, R == B):
// their projections run through wina_project (the same call, and so the same numbers, as the
// separate sparse projections), or with masked_dense as dense ones over their kept inputs
// (masked_dense_rows: the same numbers again), writing the channels each kept to kept [R, 7] int32;
// the other rows' run dense, as in a dense step. Returns 0, or -1 on bad arguments or no memory.
int decode_layer(const DecodeLayer *layer, void *keys, void *values, int64_t num_slots, const float *h_in,
                 float *h_out, int64_t B, const int64_t *slots, const int64_t *positions, const float *keep,
                 const float *basis, const float *basis_t, const float *offset, int64_t rank,
                 const uint8_t *basis_rows, const float *thresholds, int32_t *kept, const int64_t *sparse_rows,
                 int64_t R, int masked_dense) {
    if (!valid_call(layer, num_slots, B, slots, positions, basis, basis_t, offset, rank, thresholds, kept,
                    sparse_rows, R)) {
        return -1;
    }
    memcpy(h_out, h_in, sizeof(float) * B * layer->hidden);
    return layer_in_place(layer, keys, values, h_out, B, slots, positions, keep, basis, basis_t, offset, rank,
                          basis_rows, thresholds, kept, sparse_rows, R, masked_dense);
}

// The L layers of a model in one call, in order, without neuron edits: what decode_layer gives
// called once per layer (the same numbers), without a call from Python per layer (together 15-20%
// of a batch-1 step on the 2-core CPU; RESULTS.md). layers: [L]; keys, values: the whole cache, [L, num_slots,
// KVH, max_len, D] contiguous; thresholds, kept: NULL, or the [L, R, 7] tables of the sparse rows,
// layer after layer; the rest as decode_layer's. Returns 0, or -1 on bad arguments or no memory.
int decode_stack(const DecodeLayer *const *layers, int64_t L, void *keys, void *values, int64_t num_slots,
                 const float *h_in, float *h_out, int64_t B, const int64_t *slots, const int64_t *positions,
                 const float *thresholds, int32_t *kept, const int64_t *sparse_rows, int64_t R, int masked_dense) {
    if (L < 1) return -1;
    for (int64_t i = 0; i < L; ++i) {
        const DecodeLayer *layer = layers[i];
        if (!valid_call(layer, num_slots, B, slots, positions, NULL, NULL, NULL, 0, thresholds, kept, sparse_rows,
                        R) ||
            layer->kv_dtype != layers[0]->kv_dtype || layer->kv_heads != layers[0]->kv_heads ||
            layer->head_dim != layers[0]->head_dim || layer->max_len != layers[0]->max_len ||
            layer->hidden != layers[0]->hidden) {
            return -1;
        }
    }
    const DecodeLayer *first = layers[0];
    const int64_t layer_bytes = num_slots * first->kv_heads * first->max_len * first->head_dim *
                                (first->kv_dtype == DTYPE_F32 ? 4 : 2);
    memcpy(h_out, h_in, sizeof(float) * B * first->hidden);
    for (int64_t i = 0; i < L; ++i) {
        const int64_t table = thresholds ? i * R * TABLE_COLUMNS : 0;
        const int status = layer_in_place(layers[i], (char *)keys + i * layer_bytes, (char *)values + i * layer_bytes,
                                          h_out, B, slots, positions, NULL, NULL, NULL, NULL, 0, NULL,
                                          thresholds ? thresholds + table : NULL, thresholds ? kept + table : NULL,
                                          sparse_rows, R, masked_dense);
        if (status != 0) return status;
    }
    return 0;
}

// The layer in parts, for a step with more sparse rows than the fused call takes, or that edits
// neurons beyond keep masks: the model then runs
// the projections in torch (Linear's dense-kernel path for the other rows, so they get the same
// numbers as decode_layer gives them) and these in between.

// qkv [B, (H + 2 KVH) D] float32 projected rows -> out [B, H D]: RoPE, cache write, attention.
int decode_attention(const DecodeLayer *layer, void *keys, void *values, int64_t num_slots, const float *qkv,
                     float *out, int64_t B, const int64_t *slots, const int64_t *positions) {
    if (!valid_rows(layer, num_slots, B, slots, positions)) return -1;
    return attention_rows(layer, qkv, keys, values, B, slots, positions, out);
}

// h [B, hidden] -> out: the layer's attention norm (which == 0) or MLP norm (which == 1).
int decode_norm(const DecodeLayer *layer, int which, const float *h, int64_t B, float *out) {
    if (B < 1) return -1;
    rms_norm_rows(h, B, layer->hidden, which ? layer->mlp_norm : layer->attn_norm, layer->eps, out);
    return 0;
}
