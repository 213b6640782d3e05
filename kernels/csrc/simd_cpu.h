// Helpers shared by the CPU kernels (wina_cpu.c, dense_cpu.c): loads and stores of float32,
// float16 and bfloat16 with AVX2/F16C, rounding to a storage dtype, and SiLU, 8 lanes at a time
// (and load16, 16 lanes, where the build has AVX-512).

#ifndef NEURONSERVE_SIMD_CPU_H
#define NEURONSERVE_SIMD_CPU_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2 };

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

#ifdef __AVX512F__
// load8 on 16 lanes (the AVX-512 build)
static inline __m512 load16(const void *base, int64_t offset, int dtype) {
    if (dtype == DTYPE_F16) {
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + offset)));
    }
    if (dtype == DTYPE_BF16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + offset));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    return _mm512_loadu_ps((const float *)base + offset);
}
#endif

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

// The value as the weight dtype holds it: outputs are rounded to it (as a half GEMV's are) whatever
// dtype they are stored in, so a float32 output carries the same numbers as a half one.
static inline float round_to(int dtype, float v) {
    if (dtype == DTYPE_F32) return v;
    uint16_t bits;
    store1(&bits, 0, dtype, v);
    return load1(&bits, 0, dtype);
}

// round_to on 8 values at once (the same results, bit for bit)
static inline __m256 round8_to(int dtype, __m256 v) {
    if (dtype == DTYPE_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    if (dtype == DTYPE_BF16) {
        const __m256i bits = _mm256_castps_si256(v);
        const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
        const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
        const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));  // keep NaN a NaN
        const __m256i chosen = _mm256_blendv_epi8(rounded, quiet, nan);
        return _mm256_castsi256_ps(_mm256_and_si256(chosen, _mm256_set1_epi32((int)0xffff0000u)));
    }
    return v;
}

// values[0:n] (n <= 8) in the low lanes, zeros above
static inline __m256 load_padded8(const float *values, int64_t n) {
    if (n == 8) return _mm256_loadu_ps(values);
    float padded[8] = {0.0f};
    memcpy(padded, values, sizeof(float) * n);
    return _mm256_loadu_ps(padded);
}

// store1 on 8 values at once (the same bits)
static inline void store8(void *base, int64_t offset, int dtype, __m256 v) {
    if (dtype == DTYPE_F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)base + offset), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else if (dtype == DTYPE_BF16) {
        const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(round8_to(DTYPE_BF16, v)), 16);
        _mm_storeu_si128((__m128i *)((uint16_t *)base + offset),
                         _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
    } else {
        _mm256_storeu_ps((float *)base + offset, v);
    }
}

// store8 of the first n (<= 8) lanes only
static inline __attribute__((always_inline)) void store_first(void *base, int64_t offset, int dtype, __m256 v,
                                                               int64_t n) {
    if (n == 8) {
        store8(base, offset, dtype, v);
        return;
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    for (int64_t i = 0; i < n; ++i) store1(base, offset + i, dtype, lanes[i]);
}

// e^x on 8 lanes, within 2 ulp of expf over the float range (Cephes' expf: x = n ln2 + r with
// |r| <= ln2 / 2, a degree-7 polynomial for e^r, then 2^n through the exponent bits); inputs
// clamped to where 2^n stays a normal float (e^x then saturates near 3.4e38 and 1.2e-38).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// v * sigmoid(v) on 8 lanes, as v / (1 + e^-v) in float32 gives it: e^-v past the float range is
// infinity (a zero result), not exp8's saturated value; a NaN stays a NaN (it is the numerator)
static inline __m256 silu8(__m256 v) {
    const __m256 minus_v = _mm256_sub_ps(_mm256_setzero_ps(), v);
    const __m256 overflow = _mm256_cmp_ps(minus_v, _mm256_set1_ps(88.72284f), _CMP_GT_OQ);  // ln(FLT_MAX)
    const __m256 e = _mm256_blendv_ps(exp8(minus_v), _mm256_set1_ps(INFINITY), overflow);
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// The epilogue of 8 outputs of a projection (the first n <= 8 real), as the references compute it:
// the bias added (bias, up_bias: NULL for none; read for n lanes only), rounded to the weight
// dtype, and with gate_up silu(gate) * up of the rounded gate (sum) and up (up_sum), rounded again.
// (always inlined: called per vector in the kernels' epilogues, with dtype and gate_up constants there)
static inline __attribute__((always_inline)) __m256 finish8(__m256 sum, __m256 up_sum, const float *bias,
                                                             const float *up_bias, int64_t n, int dtype, int gate_up) {
    if (bias) sum = _mm256_add_ps(sum, load_padded8(bias, n));
    sum = round8_to(dtype, sum);
    if (!gate_up) return sum;
    if (up_bias) up_sum = _mm256_add_ps(up_sum, load_padded8(up_bias, n));
    return round8_to(dtype, _mm256_mul_ps(silu8(sum), round8_to(dtype, up_sum)));
}

#endif
