// What skipping weight rows can save on this CPU, without any arithmetic: read (and sum, so the
// reads happen) the listed rows of a row-major matrix, in ascending order, optionally prefetching
// the rows `prefetch` entries ahead in software (all of each such row, or its first
// `prefetch_bytes`, leaving the rest to the hardware prefetcher as the WINA CPU kernel did in the
// twenty-third session).
// benchmarks/row_skip_bandwidth.py times it on
// every kept fraction against reading every row: an estimate of what a sparse GEMV that skips rows
// can save (not a bound: reading eight rows side by side, as the WINA kernel does, can be faster).
// `scrambled` visits each row's 64-byte lines (demand loads and prefetches alike) in a coprime-stride
// order instead of ascending, so that no ascending stream inside a page trains the hardware
// prefetcher to run on into the next, skipped row.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

static int64_t line_stride(int64_t lines, int scrambled) {
    if (!scrambled || lines < 2) return 1;
    int64_t step = 7;
    while (lines % step == 0) step += 2;  // odd and not a divisor: visits every line once
    return step % lines ? step % lines : 1;
}

// j + step wrapped into [0, lines) without a division (one per 64-byte line would be the probe's cost)
static inline int64_t next_line(int64_t j, int64_t step, int64_t lines) {
    j += step;
    return j >= lines ? j - lines : j;
}

// The 64-byte lines of bytes [col0, col0 + width) of each listed row (rows `stride` bytes apart),
// visited `step` lines at a time around the piece (1: ascending), prefetching `prefetch` rows ahead
// (the first `prefetch_lines` lines of each, in the same order).
static int64_t read_lines(const char *base, int64_t stride, int64_t col0, int64_t width, const int32_t *rows,
                          int64_t count, int64_t prefetch, int64_t step, int64_t prefetch_lines) {
    __m256i acc = _mm256_setzero_si256();
    const int64_t lines = width / 64;
    for (int64_t k = 0; k < count; ++k) {
        if (prefetch > 0 && k + prefetch < count) {
            const char *ahead = base + (int64_t)rows[k + prefetch] * stride + col0;
            for (int64_t l = 0, j = 0; l < lines && l < prefetch_lines; ++l, j = next_line(j, step, lines)) {
                _mm_prefetch(ahead + j * 64, _MM_HINT_T0);
            }
        }
        const char *row = base + (int64_t)rows[k] * stride + col0;
        for (int64_t l = 0, j = 0; l < lines; ++l, j = next_line(j, step, lines)) {
            acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i *)(row + j * 64)));
            acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i *)(row + j * 64 + 32)));
        }
    }
    return _mm256_extract_epi64(acc, 0) ^ _mm256_extract_epi64(acc, 3);
}

// prefetch_bytes: how much of each row ahead to prefetch, 0 for all of it
static int64_t lines_to_prefetch(int64_t width, int64_t prefetch_bytes) {
    return prefetch_bytes > 0 && prefetch_bytes < width ? (prefetch_bytes + 63) / 64 : width / 64;
}

int64_t read_rows(const char *base, int64_t row_bytes, const int32_t *rows, int64_t count, int64_t prefetch,
                  int scrambled, int64_t prefetch_bytes) {
    return read_lines(base, row_bytes, 0, row_bytes, rows, count, prefetch, line_stride(row_bytes / 64, scrambled),
                      lines_to_prefetch(row_bytes, prefetch_bytes));
}

// Two threads read the listed rows of each of `n_matrices` matrices in turn (a barrier after each,
// as a decode step's projections follow one another), split either by columns (each thread reads its
// half of every listed row: the WINA CPU kernel's split, which keeps one float32 sum order for any
// thread count) or by rows (each thread reads whole rows of its half of the list).
int64_t read_rows_two_threads(const char *const *matrices, int64_t n_matrices, int64_t row_bytes, const int32_t *rows,
                              int64_t count, int64_t prefetch, int split_rows, int64_t prefetch_bytes) {
    int64_t out = 0;
    #pragma omp parallel num_threads(2) reduction(^ : out)
    {
        const int t = omp_get_thread_num();
        const int64_t half_bytes = (row_bytes / 2 + 63) & ~(int64_t)63;  // whole cache lines per thread
        for (int64_t m = 0; m < n_matrices; ++m) {
            if (split_rows) {
                const int64_t lo = count * t / 2, hi = count * (t + 1) / 2;
                out ^= read_lines(matrices[m], row_bytes, 0, row_bytes, rows + lo, hi - lo, prefetch, 1,
                                  lines_to_prefetch(row_bytes, prefetch_bytes));
            } else {
                const int64_t width = t ? row_bytes - half_bytes : half_bytes;
                out ^= read_lines(matrices[m], row_bytes, t ? half_bytes : 0, width, rows, count, prefetch, 1,
                                  lines_to_prefetch(width, prefetch_bytes));
            }
            #pragma omp barrier
        }
    }
    return out;
}
