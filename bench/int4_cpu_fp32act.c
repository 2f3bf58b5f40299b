/* The alternative to csrc/int4_cpu.h's arithmetic, for bench/bench_int4_cpu.py --part arith only:
 * fp32 activations (exact), each nibble converted to float and multiplied in with one FMA per
 * weight and row. Same weight layout, 8-column tiles, the same register transpose, 4 rows per
 * pass, OpenMP over tiles; AVX2 + FMA + F16C, fp16 scales, N a multiple of 8.
 *   y[m, n] = sum_g (scale[g, n] * sum_{k in g} q[n, k] x[m, k] + min[g, n] * sum_{k in g} x[m, k]) */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
#define T __attribute__((target("avx2,fma,f16c")))
#define R 4
T static void tile(const float *x, int m, const uint8_t *q, const uint16_t *sc, const uint16_t *mn, int n, int k,
                   int g, int col0, float *y) {
    const uint8_t *rows[8];
    for (int j = 0; j < 8; j++) rows[j] = q + (size_t)(col0 + j < n ? col0 + j : n - 1) * (k / 2);
    const __m256i m15 = _mm256_set1_epi32(15);
    for (int m0 = 0; m0 < m; m0 += R) {
        int rr = m - m0 < R ? m - m0 : R;
        __m256 acc[R], accq[R], xs[R];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (int gi = 0; gi < k / g; gi++) {
            for (int r = 0; r < R; r++) { accq[r] = _mm256_setzero_ps(); xs[r] = _mm256_setzero_ps(); }
            for (int b = gi * g / 32; b < (gi + 1) * g / 32; b++) {
                __m256i a[4];
                for (int j = 0; j < 4; j++)
                    a[j] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(rows[j] + 16 * b))),
                                                   _mm_loadu_si128((const __m128i *)(rows[j + 4] + 16 * b)), 1);
                __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
                __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
                __m256i u[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                                _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
                for (int uu = 0; uu < 4; uu++)
                    for (int kk = 0; kk < 8; kk++) { /* byte kk/2 of each lane; nibble kk%2 -> k */
                        __m256 wf = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(u[uu], 8 * (kk % 4) + 4 * (kk / 4)), m15));
                        int kidx = 32 * b + (kk < 4 ? 4 * uu + kk : 16 + 4 * uu + kk - 4);
                        for (int r = 0; r < rr; r++) {
                            __m256 xv = _mm256_broadcast_ss(x + (size_t)(m0 + r) * k + kidx);
                            accq[r] = _mm256_fmadd_ps(wf, xv, accq[r]);
                        }
                    }
                for (int r = 0; r < rr; r++) {
                    const float *xb = x + (size_t)(m0 + r) * k + 32 * b;
                    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                             _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
                    xs[r] = _mm256_add_ps(xs[r], s);
                }
            }
            __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + (size_t)gi * n + col0)));
            __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + (size_t)gi * n + col0)));
            for (int r = 0; r < rr; r++) {
                __m128 h = _mm_add_ps(_mm256_castps256_ps128(xs[r]), _mm256_extractf128_ps(xs[r], 1));
                h = _mm_hadd_ps(h, h); h = _mm_hadd_ps(h, h);
                acc[r] = _mm256_fmadd_ps(accq[r], s, acc[r]);
                acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(_mm_cvtss_f32(h)), acc[r]);
            }
        }
        for (int r = 0; r < rr; r++) _mm256_storeu_ps(y + (size_t)(m0 + r) * n + col0, acc[r]);
    }
}
T void exp_fp32_linear(const float *x, int m, const uint8_t *q, const uint16_t *sc, const uint16_t *mn, int n, int k,
                       int g, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < n / 8; t++) tile(x, m, q, sc, mn, n, k, g, 8 * t, y);
}
