// Dense linear layer for few rows (decode steps, short prompt chunks) on x86-64 CPUs with AVX2, FMA
// and F16C: y = x W^T (+ b), with W [N, K] in float16, bfloat16 or float32 read once per call
// whatever the row count B, and (below) a whole decoder layer of a decode step in one call. torch's
// half GEMM has no batched kernel on this kind of CPU (8 rows cost 8x one row) and the float32
// GEMM that batched steps used instead reads twice the bytes (benchmarks/cpu_gemm.py measures
// them side by side).
//
// Semantics: F.linear with float32 inputs, accumulated in float32 and rounded to the weight dtype
// (the reference is dense_linear_reference in kernels/dense_cpu.py). With gate_up, W holds
// [gate; up] and the output is silu(gate) * up, each rounded to the weight dtype first, as
// the model's SwiGLU computes it.
//
// Each thread streams a contiguous block of W's rows (whole rows: the hardware prefetcher sees one
// long run), prefetching a few KiB ahead in software, and keeps every batch row's input in L1.
// Built on first use by kernels/cpu_build.py and called through ctypes (see kernels/dense_cpu.py).

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd_cpu.h"
#include "wina_core.h"

enum { ROW_BLOCK = 8, PREFETCH_BYTES = 4096 };

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void prefetch_ahead(const void *row, int64_t row_bytes) {
    const char *ahead = (const char *)row + PREFETCH_BYTES;
    for (int64_t offset = 0; offset < row_bytes; offset += 64) _mm_prefetch(ahead + offset, _MM_HINT_T0);
}

// x . row for one batch row: four accumulators over k (latency hiding), combined in one fixed order,
// then the scalar tail. row_dots computes every row's sum exactly this way.
static inline __attribute__((always_inline)) float dot_one(const float *x, int64_t K, const void *row,
                                                           int dtype) {
    const int64_t vec_end = K & ~(int64_t)7, block_end = K & ~(int64_t)31;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k < block_end; k += 32) {
        a0 = _mm256_fmadd_ps(load8(row, k, dtype), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(row, k + 8, dtype), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(row, k + 16, dtype), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(row, k + 24, dtype), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k < vec_end; k += 8) a0 = _mm256_fmadd_ps(load8(row, k, dtype), _mm256_loadu_ps(x + k), a0);
    float dot = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) dot = fmaf(load1(row, k, dtype), x[k], dot);
    return dot;
}

// dots[b] = x[b, :] . row for b < bn (x row stride K). Each batch row's sum is dot_one's whatever bn
// is, so a row's result never depends on how many rows share the call: the model relies on this
// to give a request the same numbers whoever its batch neighbours are. Rows go two at a time,
// sharing each loaded weight vector (the weight row stays in L1 for the next pair).
static inline __attribute__((always_inline)) void row_dots(const float *x, int64_t bn, int64_t K,
                                                            const void *row, int dtype, float *dots) {
    const int64_t vec_end = K & ~(int64_t)7, block_end = K & ~(int64_t)31;
    int64_t b = 0;
    for (; b + 2 <= bn; b += 2) {
        const float *x0 = x + b * K, *x1 = x0 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        int64_t k = 0;
        for (; k < block_end; k += 32) {
            const __m256 w0 = load8(row, k, dtype), w1 = load8(row, k + 8, dtype);
            const __m256 w2 = load8(row, k + 16, dtype), w3 = load8(row, k + 24, dtype);
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + k), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x0 + k + 8), a1);
            a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x0 + k + 16), a2);
            a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x0 + k + 24), a3);
            c0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + k), c0);
            c1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + k + 8), c1);
            c2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x1 + k + 16), c2);
            c3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x1 + k + 24), c3);
        }
        for (; k < vec_end; k += 8) {
            const __m256 w0 = load8(row, k, dtype);
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + k), a0);
            c0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + k), c0);
        }
        float d0 = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        float d1 = hsum8(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
        for (; k < K; ++k) {
            const float w = load1(row, k, dtype);
            d0 = fmaf(w, x0[k], d0);
            d1 = fmaf(w, x1[k], d1);
        }
        dots[b] = d0;
        dots[b + 1] = d1;
    }
    if (b < bn) dots[b] = dot_one(x + b * K, K, row, dtype);
}

// Output columns [u0, u1) for one weight dtype: inlined per dtype below, so load8's branch on the
// dtype is resolved at compile time instead of once per vector.
static inline __attribute__((always_inline)) void dense_columns(const float *x, int64_t B, int64_t K,
                                                                 const void *weight, int64_t units, int dtype,
                                                                 const float *bias, void *out, int out_dtype,
                                                                 int gate_up, int64_t u0, int64_t u1) {
    const int64_t row_bytes = K * (dtype == DTYPE_F32 ? 4 : 2);
    float dots[ROW_BLOCK], up_dots[ROW_BLOCK];
    for (int64_t u = u0; u < u1; ++u) {
        const char *row = (const char *)weight + u * row_bytes;
        const char *up_row = row + units * row_bytes;
        prefetch_ahead(row, row_bytes);
        if (gate_up) prefetch_ahead(up_row, row_bytes);
        for (int64_t b0 = 0; b0 < B; b0 += ROW_BLOCK) {
            const int64_t bn = B - b0 < ROW_BLOCK ? B - b0 : ROW_BLOCK;
            row_dots(x + b0 * K, bn, K, row, dtype, dots);
            if (gate_up) row_dots(x + b0 * K, bn, K, up_row, dtype, up_dots);
            for (int64_t b = 0; b < bn; ++b) {
                float v = round_to(dtype, dots[b] + (bias ? bias[u] : 0.0f));
                if (gate_up) {
                    const float up = round_to(dtype, up_dots[b] + (bias ? bias[units + u] : 0.0f));
                    v = round_to(dtype, silu(v) * up);
                }
                store1(out, (b0 + b) * units + u, out_dtype, v);
            }
        }
    }
}

// The whole projection, threads splitting the output columns (with gate_up: gate row j and up row
// j + N/2 together). Arguments as dense_linear's, already checked.
static void dense_parallel(const float *x, int64_t B, int64_t K, const void *weight, int64_t N, int dtype,
                           const float *bias, void *out, int out_dtype, int gate_up) {
    const int64_t units = gate_up ? N / 2 : N;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
        if (dtype == DTYPE_F16) {
            dense_columns(x, B, K, weight, units, DTYPE_F16, bias, out, out_dtype, gate_up, u0, u1);
        } else if (dtype == DTYPE_BF16) {
            dense_columns(x, B, K, weight, units, DTYPE_BF16, bias, out, out_dtype, gate_up, u0, u1);
        } else {
            dense_columns(x, B, K, weight, units, DTYPE_F32, bias, out, out_dtype, gate_up, u0, u1);
        }
    }
}

static int valid_dtype(int dtype) { return dtype == DTYPE_F16 || dtype == DTYPE_BF16 || dtype == DTYPE_F32; }

// x: [B, K] float32, contiguous; weight: [N, K] (dtype), contiguous; bias: [N] float32 or NULL;
// out: [B, N] (out_dtype), or [B, N / 2] with gate_up (N even). Returns 0, or -1 on bad arguments.
int dense_linear(const float *x, int64_t B, int64_t K, const void *weight, int64_t N, int dtype,
                 const float *bias, void *out, int out_dtype, int gate_up) {
    if (B < 1 || K < 1 || N < 1 || (gate_up && N % 2) || !valid_dtype(dtype) || !valid_dtype(out_dtype)) return -1;
    dense_parallel(x, B, K, weight, N, dtype, bias, out, out_dtype, gate_up);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// One decoder layer for a decode step (one new token per row) or a short prompt chunk of one
// sequence (its tokens as rows of one slot), fused: the model's DecoderLayer.forward, with WINA
// sparsity for up to 8 sparse rows of a decode step (wina_core.h) and no neuron edits other than
// keep masks, in one call instead of about 25 torch ops, each of which costs more to dispatch
// than to compute at this size. Same math as the torch path: float32 norms, RoPE, attention and
// residual stream; every projection rounded to the weight dtype; keys and values in a float32
// cache.

// One layer's weights and shapes, filled once at load (PreparedDecodeLayer in kernels/dense_cpu.py).
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, max_len, dtype;
    double eps;
    const float *attn_norm, *mlp_norm;              // [hidden]
    const void *qkv_w, *o_w, *gate_up_w, *down_w;   // [(H + 2 KVH) D, hidden], [hidden, H D], [2I, hidden], [hidden, I]
    const float *qkv_b, *o_b, *gate_up_b, *down_b;  // float32 biases or NULL
    const float *cos, *signed_sin;                  // [max_len, D], rotate-half layout, sign folded in
    // WINA sparsity, NULL qkv_wt when the layer has none: each projection's W^T [in, out] (dtype)
    // and score factors [segments, in] float32; q/k/v are 3 segments, gate/up 2, o and down 1
    const void *qkv_wt, *o_wt, *gate_up_wt, *down_wt;
    const float *qkv_factors, *o_factors, *gate_up_factors, *down_factors;
    int64_t qkv_segments[3];
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

// x[i] * cos[i] + x[(i + D/2) % D] * signed_sin[i]: rotate-half RoPE (apply_rope in layers.py)
static void rope_head(float *x, int64_t D, const float *cos, const float *signed_sin) {
    float rotated[512];
    const int64_t half = D / 2;
    for (int64_t i = 0; i < D; ++i) rotated[i] = x[i] * cos[i] + x[(i + half) % D] * signed_sin[i];
    memcpy(x, rotated, sizeof(float) * D);
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum8(acc);
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

// softmax(q K^T / sqrt(D)) V over keys 0..len-1 of one KV head: q [D] -> out [D]
static void attend(const float *q, const float *keys, const float *values, int64_t len, int64_t D, float *scores,
                   float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    float top = -INFINITY;
    for (int64_t s = 0; s < len; ++s) {
        scores[s] = dot_f32(q, keys + s * D, D) * scale;
        if (scores[s] > top) top = scores[s];
    }
    float total = 0.0f;
    for (int64_t s = 0; s < len; ++s) {
        scores[s] = expf(scores[s] - top);
        total += scores[s];
    }
    for (int64_t i = 0; i < D; ++i) out[i] = 0.0f;
    for (int64_t s = 0; s < len; ++s) {
        const float p = scores[s] / total;
        const float *v = values + s * D;
        for (int64_t i = 0; i < D; ++i) out[i] += p * v[i];
    }
}

static int valid_rows(const DecodeLayer *layer, int64_t num_slots, int64_t B, const int64_t *slots,
                      const int64_t *positions) {
    if (B < 1 || layer->head_dim > 512 || layer->head_dim % 2 || layer->heads % layer->kv_heads ||
        !valid_dtype((int)layer->dtype)) {
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
static int attention_rows(const DecodeLayer *layer, const float *qkv, float *keys, float *values, int64_t B,
                          const int64_t *slots, const int64_t *positions, float *out) {
    const int64_t H = layer->heads, KVH = layer->kv_heads, D = layer->head_dim, max_len = layer->max_len;
    const int64_t qkv_width = (H + 2 * KVH) * D;
    const int threads = omp_get_max_threads();
    float *rotated = malloc(sizeof(float) * B * (H + KVH) * D);  // q and k heads after RoPE
    float *scores = malloc(sizeof(float) * threads * max_len);
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
            memcpy(keys + at, rot + (H + g) * D, sizeof(float) * D);
            memcpy(values + at, row + (H + KVH + g) * D, sizeof(float) * D);
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < B * H; ++item) {
        const int64_t b = item / H, head = item % H, g = head / (H / KVH);
        const int64_t base = (slots[b] * KVH + g) * max_len * D;
        attend(rotated + (b * (H + KVH) + head) * D, keys + base, values + base, positions[b] + 1, D,
               scores + (int64_t)omp_get_thread_num() * max_len, out + (b * H + head) * D);
    }
    free(rotated), free(scores);
    return 0;
}

// One projection of a step's rows into out [B, out] float32: all dense (thresholds NULL), all
// sparse (R == B), or mixed: the R sparse rows (sparse_rows, ascending) through wina_project with
// their thresholds' and kept counts' column `column` ([R, 7] tables), the others through
// dense_parallel; each row gets what a call on its group alone gives it (both kernels compute a row
// independently of the others), which is what the model's separate calls give it.
static int project_rows(const float *x, int64_t B, int64_t K, const void *weight, const void *weight_t, int64_t N,
                        int dtype, const float *factors, const int64_t *segments, int64_t G, const float *bias,
                        float *out, int gate_up, const float *thresholds, int32_t *kept, int column,
                        const int64_t *sparse_rows, int64_t R) {
    if (!thresholds) {
        dense_parallel(x, B, K, weight, N, dtype, bias, out, DTYPE_F32, gate_up);
        return 0;
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
        dense_parallel(xd, B - R, K, weight, N, dtype, bias, yd, DTYPE_F32, gate_up);
        for (int64_t b = 0, s = 0, d = 0; b < B; ++b) {
            if (s < R && sparse_rows[s] == b) memcpy(out + b * width, ys + (s++) * width, sizeof(float) * width);
            else memcpy(out + b * width, yd + (d++) * width, sizeof(float) * width);
        }
    }
    free(xs);
    return status;
}

// The attention half of the layer on h [B, hidden], in place: h += o_proj(attention(norm(h))).
static int attention_block(const DecodeLayer *layer, float *keys, float *values, float *h, int64_t B,
                           const int64_t *slots, const int64_t *positions, const float *thresholds, int32_t *kept,
                           const int64_t *sparse_rows, int64_t R) {
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
        status = project_rows(x, B, hidden, layer->qkv_w, layer->qkv_wt, qkv_width, dtype, layer->qkv_factors,
                              layer->qkv_segments, 3, layer->qkv_b, qkv, 0, thresholds, kept, 0, sparse_rows, R);
        if (status == 0) status = attention_rows(layer, qkv, keys, values, B, slots, positions, attn);
        if (status == 0) {
            status = project_rows(attn, B, H * D, layer->o_w, layer->o_wt, hidden, dtype, layer->o_factors, o_segments,
                                  1, layer->o_b, proj, 0, thresholds, kept, 3, sparse_rows, R);
        }
        if (status == 0) {
            for (int64_t i = 0; i < B * hidden; ++i) h[i] += proj[i];
        }
    }
    free(x), free(qkv), free(attn), free(proj);
    return status;
}

// The MLP half on h [B, hidden], in place: h += down(keep * silu(gate(norm(h))) * up(norm(h))), where
// keep ([B, I] 0/1 float32, or NULL for all ones) zeroes the neurons a row prunes.
static int mlp_block(const DecodeLayer *layer, float *h, int64_t B, const float *keep, const float *thresholds,
                     int32_t *kept, const int64_t *sparse_rows, int64_t R) {
    const int64_t hidden = layer->hidden, I = layer->intermediate;
    const int dtype = (int)layer->dtype;
    float *x = malloc(sizeof(float) * B * hidden);
    float *act = malloc(sizeof(float) * B * I);  // silu(gate) * up
    float *proj = malloc(sizeof(float) * B * hidden);
    int status = -1;
    if (x && act && proj) {
        rms_norm_rows(h, B, hidden, layer->mlp_norm, layer->eps, x);
        const int64_t gate_up_segments[2] = {I, I}, down_segments[1] = {hidden};
        status = project_rows(x, B, hidden, layer->gate_up_w, layer->gate_up_wt, 2 * I, dtype, layer->gate_up_factors,
                              gate_up_segments, 2, layer->gate_up_b, act, 1, thresholds, kept, 4, sparse_rows, R);
        if (status == 0 && keep) {
            for (int64_t i = 0; i < B * I; ++i) act[i] *= keep[i];
        }
        if (status == 0) {
            status = project_rows(act, B, I, layer->down_w, layer->down_wt, hidden, dtype, layer->down_factors,
                                  down_segments, 1, layer->down_b, proj, 0, thresholds, kept, 6, sparse_rows, R);
        }
        if (status == 0) {
            for (int64_t i = 0; i < B * hidden; ++i) h[i] += proj[i];
        }
    }
    free(x), free(act), free(proj);
    return status;
}

// keys, values: this layer's cache, [num_slots, KVH, max_len, D] float32; h_in -> h_out: [B, hidden]
// float32 residual stream before and after the layer; slots, positions: [B], each row's cache slot
// and the position of its new token; keep: [B, I] neuron keep mask or NULL (see mlp_block);
// thresholds: NULL (dense), or the WINA thresholds [R, 7] float32 (q, k, v, o, gate, up, down) of
// the R sparse rows, sparse_rows [R] (ascending batch indices; NULL when every row is sparse, R == B):
// their projections run through wina_project (the same call, and so the same numbers, as the
// separate sparse projections), writing the channels each kept to kept [R, 7] int32; the other
// rows' run dense, as in a dense step. Returns 0, or -1 on bad arguments or no memory.
int decode_layer(const DecodeLayer *layer, float *keys, float *values, int64_t num_slots, const float *h_in,
                 float *h_out, int64_t B, const int64_t *slots, const int64_t *positions, const float *keep,
                 const float *thresholds, int32_t *kept, const int64_t *sparse_rows, int64_t R) {
    if (!valid_rows(layer, num_slots, B, slots, positions)) return -1;
    if (thresholds && (!layer->qkv_wt || !kept || R < 1 || R > B || (R < B && !sparse_rows))) return -1;
    for (int64_t s = 0; thresholds && R < B && s < R; ++s) {
        if (sparse_rows[s] < (s ? sparse_rows[s - 1] + 1 : 0) || sparse_rows[s] >= B) return -1;  // ascending, in range
    }
    memcpy(h_out, h_in, sizeof(float) * B * layer->hidden);
    if (attention_block(layer, keys, values, h_out, B, slots, positions, thresholds, kept, sparse_rows, R)) return -1;
    return mlp_block(layer, h_out, B, keep, thresholds, kept, sparse_rows, R);
}

// The layer in parts, for a step with more sparse rows than the fused call takes, or that edits
// neurons beyond keep masks: the model then runs
// the projections in torch (Linear's dense-kernel path for the other rows, so they get the same
// numbers as decode_layer gives them) and these in between.

// qkv [B, (H + 2 KVH) D] float32 projected rows -> out [B, H D]: RoPE, cache write, attention.
int decode_attention(const DecodeLayer *layer, float *keys, float *values, int64_t num_slots, const float *qkv,
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
