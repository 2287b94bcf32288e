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

/* Whether hit (sa, ra) ranks below (sb, rb): a lower score, or an equal one at a higher
 * row (ties go to the lower row, so the higher one is evicted first). */
static inline int worse(float sa, int64_t ra, float sb, int64_t rb)
{
    return sa < sb || (sa == sb && ra > rb);
}

/* Replace the root (the worst hit) of a heap of k (score, row) pairs and sift down. */
static void heap_replace_top(float *hs, int64_t *hr, int64_t k, float s, int64_t r)
{
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1, c;
        if (l >= k) break;
        c = (l + 1 < k && worse(hs[l + 1], hr[l + 1], hs[l], hr[l])) ? l + 1 : l;
        if (!worse(hs[c], hr[c], s, r)) break;
        hs[i] = hs[c];
        hr[i] = hr[c];
        i = c;
    }
    hs[i] = s;
    hr[i] = r;
}

/* The same for a heap of scores alone. */
static void heap_replace_scores(float *hs, int64_t k, float s)
{
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1, c;
        if (l >= k) break;
        c = (l + 1 < k && hs[l + 1] < hs[l]) ? l + 1 : l;
        if (hs[c] >= s) break;
        hs[i] = hs[c];
        i = c;
    }
    hs[i] = s;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

int bankd_flatip_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

int bankd_flatip_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
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

/*
 * The same search with AVX-512: 12 keys against a tile's 16 queries (one zmm each, the
 * key element broadcast from memory into the multiply-add), so twice the multiply-adds
 * per instruction of the AVX2 tile. Every score is the same chain of fused
 * multiply-adds over e = 0 .. d-1 as above: results are bit-identical to it.
 */
#define MR512 12
__attribute__((target("avx512f"))) int
bankd_flatip_search512(const float *keys, int64_t d, int64_t r0, int64_t r1, const float *qpack,
                       int64_t nq, int64_t k, float *hs, int64_t *hr)
{
    if (!bankd_flatip_avx512()) return -1;
    const int64_t groups = (nq + NR - 1) / NR;
    for (int64_t r = r0; r < r1; r += MR512) {
        const int m = (int)(r1 - r < MR512 ? r1 - r : MR512);
        const float *a[MR512];
        for (int i = 0; i < MR512; i++) a[i] = keys + (r + (i < m ? i : 0)) * d;
        for (int64_t g = 0; g < groups; g++) {
            const float *b = qpack + g * d * NR;
            __m512 c[MR512];
            for (int i = 0; i < MR512; i++) c[i] = _mm512_setzero_ps();
            for (int64_t e = 0; e < d; e++) {
                const __m512 bq = _mm512_loadu_ps(b + e * NR);
                for (int i = 0; i < MR512; i++)
                    c[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i][e]), bq, c[i]);
            }
            const int64_t q0 = g * NR;
            float buf[NR];
            for (int j = 0; j < NR; j++) buf[j] = q0 + j < nq ? hs[(q0 + j) * k] : INFINITY;
            __m512 t = _mm512_loadu_ps(buf);
            for (int i = 0; i < m; i++) {
                unsigned above = _mm512_cmp_ps_mask(c[i], t, _CMP_GT_OQ);
                if (!above) continue;
                float sc[NR];
                _mm512_storeu_ps(sc, c[i]);
                while (above) {
                    const int j = __builtin_ctz(above);
                    above &= above - 1;
                    heap_replace_top(hs + (q0 + j) * k, hr + (q0 + j) * k, k, sc[j], r + i);
                }
                for (int j = 0; j < NR; j++) buf[j] = q0 + j < nq ? hs[(q0 + j) * k] : INFINITY;
                t = _mm512_loadu_ps(buf);
            }
        }
    }
    return 0;
}

/*
 * Exact fp32 scores of chosen rows: out[q][j] = keys[rows[q][j]] . queries[q], one fp32
 * fused multiply-add per element in order e = 0 .. d-1 from 0, the arithmetic of
 * bankd_flatip_search above, so a re-ranked score is bit-identical to the kernel's.
 * rows[q][j] < 0 gives -inf. queries: [nq][d] row-major; rows, out: [nq][m].
 */
__attribute__((target("avx2,fma"))) int
bankd_flatip_rescore(const float *keys, int64_t d, const float *queries, int64_t nq,
                     const int64_t *rows, int64_t m, float *out)
{
    if (!bankd_flatip_supported()) return -1;
    for (int64_t q = 0; q < nq; q++) {
        const float *x = queries + q * d;
        for (int64_t j = 0; j < m; j++) {
            const int64_t r = rows[q * m + j];
            if (r < 0) {
                out[q * m + j] = -INFINITY;
                continue;
            }
            const float *a = keys + r * d;
            float acc = 0.0f;
            for (int64_t e = 0; e < d; e++) acc = __builtin_fmaf(a[e], x[e], acc);
            out[q * m + j] = acc;
        }
    }
    return 0;
}

int bankd_bf16_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

/* Smallest float not above x - m: the threshold is never rounded upwards. */
static inline float below(float x, float m) { return nextafterf(x - m, -INFINITY); }

/*
 * Candidate collection over one block of low-precision scores (bankd/search/bf16_search.py).
 * scores: [nq][ld] bfloat16 bits, columns [0, ncols) are bank rows row0 .. row0+ncols-1.
 * Per query q (state continued across blocks): hs[q][k], a min-heap of the k best scores
 * so far (-inf to start); every score s >= hs[q][0] - margin[q] at the time it is read is
 * a candidate: (s, row) appended to cs/cr[q][0 .. cap), count[q] counting past cap (the
 * caller then searches that query another way). The heap only rises, so any score at or
 * above (final k-th best - margin) is collected.
 */
__attribute__((target("avx512f,avx512bw,avx512vl"))) int
bankd_bf16_collect(const uint16_t *scores, int64_t ld, int64_t ncols, int64_t row0, int64_t nq,
                   int64_t k, const float *margin, float *hs, float *cs, int64_t *cr,
                   int64_t cap, int64_t *count)
{
    if (!bankd_bf16_supported()) return -1;
    for (int64_t q = 0; q < nq; q++) {
        const uint16_t *row = scores + q * ld;
        float *h = hs + q * k;
        float thr = below(h[0], margin[q]);
        __m512 t = _mm512_set1_ps(thr);
        for (int64_t c0 = 0; c0 < ncols; c0 += 16) {
            const int64_t n = ncols - c0 < 16 ? ncols - c0 : 16;
            const __mmask16 valid = (__mmask16)(n == 16 ? 0xFFFF : (1u << n) - 1);
            const __m256i raw = _mm256_maskz_loadu_epi16(valid, row + c0);
            const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            __mmask16 hit = _mm512_mask_cmp_ps_mask(valid, v, t, _CMP_GE_OQ);
            while (hit) {
                const int j = __builtin_ctz(hit);
                hit &= hit - 1;
                uint32_t bits = (uint32_t)row[c0 + j] << 16;
                float s;
                __builtin_memcpy(&s, &bits, 4);
                if (!(s >= thr)) continue; /* the threshold rose within this vector */
                int64_t *cnt = count + q;
                if (*cnt < cap) {
                    cs[q * cap + *cnt] = s;
                    cr[q * cap + *cnt] = row0 + c0 + j;
                }
                (*cnt)++;
                if (s > h[0]) {
                    heap_replace_scores(h, k, s);
                    thr = below(h[0], margin[q]);
                    t = _mm512_set1_ps(thr);
                }
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
        (void)hr, (void)heap_replace_top, (void)heap_replace_scores;
    return -1;
}

int bankd_flatip_rescore(const float *keys, int64_t d, const float *queries, int64_t nq,
                         const int64_t *rows, int64_t m, float *out)
{
    (void)keys, (void)d, (void)queries, (void)nq, (void)rows, (void)m, (void)out;
    return -1;
}

int bankd_bf16_supported(void) { return 0; }

int bankd_flatip_avx512(void) { return 0; }

int bankd_flatip_search512(const float *keys, int64_t d, int64_t r0, int64_t r1,
                           const float *qpack, int64_t nq, int64_t k, float *hs, int64_t *hr)
{
    return bankd_flatip_search(keys, d, r0, r1, qpack, nq, k, hs, hr);
}

int bankd_bf16_collect(const uint16_t *scores, int64_t ld, int64_t ncols, int64_t row0, int64_t nq,
                       int64_t k, const float *margin, float *hs, float *cs, int64_t *cr,
                       int64_t cap, int64_t *count)
{
    (void)scores, (void)ld, (void)ncols, (void)row0, (void)nq, (void)k, (void)margin, (void)hs,
        (void)cs, (void)cr, (void)cap, (void)count;
    return -1;
}

#endif
