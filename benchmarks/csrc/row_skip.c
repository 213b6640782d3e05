// What skipping weight rows can save on this CPU, without any arithmetic: read (and sum, so the
// reads happen) the listed rows of a row-major matrix, in ascending order, optionally prefetching
// the rows `prefetch` entries ahead in software. benchmarks/row_skip_bandwidth.py times it on
// every kept fraction against reading every row, the bound for any sparse GEMV that skips rows.
#include <immintrin.h>
#include <stdint.h>

int64_t read_rows(const char *base, int64_t row_bytes, const int32_t *rows, int64_t count, int64_t prefetch) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t k = 0; k < count; ++k) {
        if (prefetch > 0 && k + prefetch < count) {
            const char *ahead = base + (int64_t)rows[k + prefetch] * row_bytes;
            for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
        }
        const char *row = base + (int64_t)rows[k] * row_bytes;
        for (int64_t off = 0; off + 32 <= row_bytes; off += 32) {
            acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i *)(row + off)));
        }
    }
    return _mm256_extract_epi64(acc, 0) ^ _mm256_extract_epi64(acc, 3);
}
