/*
 * Exact top-k inner-product search over row-major float32 keys, for x86-64 CPUs with
 * AVX2 and FMA. Loaded by bankd/flat_kernel.py with ctypes (no Python API here).
 *
 * Why: a flat search of B=128 queries over 100000 x 768 keys is ~20 GFLOP of
 * multiply-adds. FAISS hands it to its bundled BLAS, which first packs every key block
 * into its own layout, then scans the score blocks for the top k. This kernel multiplies
 * straight from the keys as they lie in the index (broadcasting 6 keys' elements against
 * 16 packed queries, 12 AVX2 accumulators) and tests each 6 x 16 tile of finished scores
 * against the queries' current k-th best, so the keys are read once and nothing else is
 * written. Each score is one fp32 sum over the d products in order, whatever the row
 * range, thread split or shard: results do not depend on how the search is divided.
 *
 * Ties: a key enters a query's top k only with a score strictly above the k-th best so
 * far, so among equal scores the lower row wins within one call; callers merging calls
 * order by (score descending, row ascending) to keep that everywhere.
 */

#include <math.h>
#include <stdint.h>

#define MR 6  /* keys per tile */
#define NR 16 /* queries per tile: two 8-float AVX2 registers */

/* Replace the root of a min-heap of k (score, row) pairs and sift it down. */
static void heap_replace_top(float *hs, int64_t *hr, int64_t k, float s, int64_t r)
{
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1, c;
        if (l >= k) break;
        c = (l + 1 < k && hs[l + 1] < hs[l]) ? l + 1 : l;
        if (hs[c] >= s) break;
        hs[i] = hs[c];
        hr[i] = hr[c];
        i = c;
    }
    hs[i] = s;
    hr[i] = r;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

int bankd_flatip_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Loads the current k-th best score of queries q0 .. q0+15 (+inf past the last one,
 * so padded queries never pass the test). */
__attribute__((target("avx2,fma"))) static inline void
thresholds(const float *hs, int64_t k, int64_t q0, int64_t nq, __m256 *t0, __m256 *t1)
{
    float buf[NR];
    for (int j = 0; j < NR; j++) buf[j] = q0 + j < nq ? hs[(q0 + j) * k] : INFINITY;
    *t0 = _mm256_loadu_ps(buf);
    *t1 = _mm256_loadu_ps(buf + 8);
}

/*
 * Rows [r0, r1) of keys [*, d] against nq queries, packed by the caller as
 * qpack[g][d][16] (query g*16+j at [g][.][j]; zeros past nq). hs, hr: [nq][k] min-heaps
 * of the best scores and rows so far (fill with -inf / -1 before the first call; calls
 * over further rows continue them). Returns 0, or -1 when the CPU lacks AVX2 or FMA.
 */
__attribute__((target("avx2,fma"))) int
bankd_flatip_search(const float *keys, int64_t d, int64_t r0, int64_t r1, const float *qpack,
                    int64_t nq, int64_t k, float *hs, int64_t *hr)
{
    if (!bankd_flatip_supported()) return -1;
    const int64_t groups = (nq + NR - 1) / NR;
    for (int64_t r = r0; r < r1; r += MR) {
        const int m = (int)(r1 - r < MR ? r1 - r : MR);
        /* A last tile of m < 6 rows repeats row r in the missing places; their scores
         * are computed and ignored. */
        const float *a[MR];
        for (int i = 0; i < MR; i++) a[i] = keys + (r + (i < m ? i : 0)) * d;
        for (int64_t g = 0; g < groups; g++) {
            const float *b = qpack + g * d * NR;
            __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
                   c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
            for (int64_t e = 0; e < d; e++) {
                const __m256 b0 = _mm256_loadu_ps(b + e * NR), b1 = _mm256_loadu_ps(b + e * NR + 8);
                /* key row i's element e times the tile's 16 queries */
#define BANKD_ROW(i, lo, hi)                                   \
    do {                                                       \
        const __m256 x = _mm256_broadcast_ss(a[i] + e);        \
        lo = _mm256_fmadd_ps(x, b0, lo);                       \
        hi = _mm256_fmadd_ps(x, b1, hi);                       \
    } while (0)
                BANKD_ROW(0, c00, c01);
                BANKD_ROW(1, c10, c11);
                BANKD_ROW(2, c20, c21);
                BANKD_ROW(3, c30, c31);
                BANKD_ROW(4, c40, c41);
                BANKD_ROW(5, c50, c51);
#undef BANKD_ROW
            }
            const int64_t q0 = g * NR;
            const __m256 tile[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                                        {c30, c31}, {c40, c41}, {c50, c51}};
            __m256 t0, t1;
            thresholds(hs, k, q0, nq, &t0, &t1);
            for (int i = 0; i < m; i++) {
                unsigned above =
                    (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(tile[i][0], t0, _CMP_GT_OQ)) |
                    (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(tile[i][1], t1, _CMP_GT_OQ)) << 8;
                if (!above) continue;
                float s[NR];
                _mm256_storeu_ps(s, tile[i][0]);
                _mm256_storeu_ps(s + 8, tile[i][1]);
                while (above) {
                    const int j = __builtin_ctz(above);
                    above &= above - 1;
                    heap_replace_top(hs + (q0 + j) * k, hr + (q0 + j) * k, k, s[j], r + i);
                }
                thresholds(hs, k, q0, nq, &t0, &t1);
            }
        }
    }
    return 0;
}

#else /* not x86-64 with GCC or clang: the caller falls back to FAISS */

int bankd_flatip_supported(void) { return 0; }

int bankd_flatip_search(const float *keys, int64_t d, int64_t r0, int64_t r1,
                        const float *qpack, int64_t nq, int64_t k, float *hs, int64_t *hr)
{
    (void)keys, (void)d, (void)r0, (void)r1, (void)qpack, (void)nq, (void)k, (void)hs,
        (void)hr, (void)heap_replace_top;
    return -1;
}

#endif
