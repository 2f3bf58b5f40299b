/* CPU Q8_0 weight-only matmul, included by specexec_cpu.c (it shares its helpers, its
 * prologue and its ISA dispatch, and lives in the same library).
 *
 *   y[m, n] = residual[m, n] + sum_k xhat[m, k] * q[n, k] * d[n, k / 32]
 *
 * The weight is llama.cpp's Q8_0 split in two arrays (kernels/q8_weight.py): q int8 [n, k]
 * row-major and d fp16 [n, k/32], one scale per 32 weights along k. It serves tied LM heads,
 * which GGUF files store as Q8_0: 4x fewer bytes to stream than the float32 copy, and the head
 * is the largest matrix of a small model (SmolLM2: 49152 x 576, 113 MB in float32).
 *
 * Unlike the int4 kernel, the activations stay float32: the product is the dequantized
 * weight's up to float32 rounding, so a float32 target keeps its results. At one row that costs
 * little, the call being bound by the weight bytes (SmolLM2's head: 3.2 ms vs 2.9 ms with int8
 * activations, bench/results/2026-11-30-cpu-native-quick.md); software prefetch 16 rows ahead
 * halved both (the hardware prefetcher alone left them at about 6 ms).
 * xhat is x, or RMSNorm(x) when a norm weight is given (the final norm fused into the head).
 *
 * The arithmetic is fixed, so every ISA path gives bit-identical results, for any m:
 *   a[0..7] = 0
 *   for each block b of 32:  p[l] = xhat[32b + l] * w[32b + l]                 (l = 0..7)
 *                            p[l] = fma(xhat[32b + 8j + l], w[32b + 8j + l], p[l])   j = 1, 2, 3
 *                            a[l] = fma(p[l], d[b], a[l])
 *   y = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
 * with w = (float)q. AVX2 holds a[] and p[] in one register each; AVX-512 CPUs take the AVX2
 * path (the head is bound by memory, not by vector width). AVX2 goes column by column: a
 * column's 4 weight vectors per block are converted once and serve every row (up to 8 at a time).
 *
 * With act_q8 the activations are quantized as the int4 kernel's (int8 per row and 32-block,
 * d_x = amax / 127) and each block is an exact integer dot, as llama.cpp multiplies Q8_0 by
 * Q8_0 (1.4x faster at 32 rows), for the int4 target, whose layers already quantize theirs.
 * Its fixed order:
 *   for each block b:  s = d[b] * d_x[b]
 *                      i[l] = sum of q * xq over the block's bytes 4l .. 4l + 3 (exact)
 *                      a[l] = fma((float)i[l], s, a[l])
 *   y = the same sum of the a[l].
 *
 * Threads (OpenMP when built with it): output columns are split into contiguous ranges of 16.
 */

typedef struct {
    const int8_t *q;    /* [n, k] */
    const uint16_t *d;  /* [n, k/32], fp16 */
    int32_t n, k;
} sxc_q8weight;

typedef struct {
    const sxc_q8weight *w;
    const float *x;   /* [m, k] prepared rows (float activations) */
    const int8_t *xq; /* [m, k] quantized rows, and their block scales d_x [m, k/32] (act_q8) */
    const float *dx;
    float *y;
    const float *res;
    int m;
} q8ctx_t;

INLINE float q8_hsum8(const float *a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

INLINE void q8_store(const q8ctx_t *c, int r, int col, float v) {
    size_t i = (size_t)r * c->w->n + col;
    c->y[i] = c->res ? v + c->res[i] : v;
}

static void q8_cols_scalar(const q8ctx_t *c, int col0, int col1) {
    const int k = c->w->k, nb = k / 32;
    for (int col = col0; col < col1; col++) {
        const int8_t *q = c->w->q + (size_t)col * k;
        const uint16_t *d = c->w->d + (size_t)col * nb;
        for (int r = 0; r < c->m; r++) {
            const float *x = c->x + (size_t)r * k;
            float a[8] = {0};
            for (int b = 0; b < nb; b++) {
                const float s = half_to_float(d[b]);
                for (int l = 0; l < 8; l++) {
                    const int i = 32 * b + l;
                    float p = x[i] * (float)q[i];
                    for (int j = 1; j < 4; j++) p = fmaf(x[i + 8 * j], (float)q[i + 8 * j], p);
                    a[l] = fmaf(p, s, a[l]);
                }
            }
            q8_store(c, r, col, q8_hsum8(a));
        }
    }
}

static void q8q_cols_scalar(const q8ctx_t *c, int col0, int col1) {
    const int k = c->w->k, nb = k / 32;
    for (int col = col0; col < col1; col++) {
        const int8_t *q = c->w->q + (size_t)col * k;
        const uint16_t *d = c->w->d + (size_t)col * nb;
        for (int r = 0; r < c->m; r++) {
            const int8_t *x = c->xq + (size_t)r * k;
            const float *dx = c->dx + (size_t)r * nb;
            float a[8] = {0};
            for (int b = 0; b < nb; b++) {
                const float s = half_to_float(d[b]) * dx[b];
                for (int l = 0; l < 8; l++) {
                    const int i = 32 * b + 4 * l;
                    int32_t isum = q[i] * x[i] + q[i + 1] * x[i + 1] + q[i + 2] * x[i + 2] + q[i + 3] * x[i + 3];
                    a[l] = fmaf((float)isum, s, a[l]);
                }
            }
            q8_store(c, r, col, q8_hsum8(a));
        }
    }
}

#if SXC_X86
/* How far ahead (in weight rows) the column loops prefetch; tuned on a 2-core EPYC. */
#ifndef Q8_PREFETCH
#define Q8_PREFETCH 16
#endif

T_AVX2 INLINE float q8_hsum_avx2(__m256 a) {
    float t[8];
    _mm256_storeu_ps(t, a);
    return q8_hsum8(t);
}

/* out[b] = d[b] (fp16 -> float), times dx[b] when dx is given: the per-block scales of one
 * column, 8 at a time, so that the block loops broadcast them straight from L1. */
T_AVX2 static void q8_scales_avx2(const uint16_t *d, const float *dx, int nb, float *out) {
    int b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b)));
        _mm256_storeu_ps(out + b, dx ? _mm256_mul_ps(v, _mm256_loadu_ps(dx + b)) : v);
    }
    for (; b < nb; b++) out[b] = dx ? _cvtsh_ss(d[b]) * dx[b] : _cvtsh_ss(d[b]);
}

/* act_q8, every row, 4 columns at a time: the 4 columns' bytes stay in L1 across the rows.
 * maddubs takes an unsigned and a signed operand: |q| and x with q's sign (the products are
 * q * x; a pair sums to at most 2 * 128 * 127 < 32767). */
T_AVX2 static void q8q_tile_avx2(const q8ctx_t *c, int col0, int col1, float *sbuf) {
    const int k = c->w->k, nb = k / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    int col = col0;
    for (; col + 4 <= col1; col += 4) {
        const int8_t *q0 = c->w->q + (size_t)col * k, *q1 = q0 + k, *q2 = q1 + k, *q3 = q2 + k;
        const uint16_t *d0 = c->w->d + (size_t)col * nb, *d1 = d0 + nb, *d2 = d1 + nb, *d3 = d2 + nb;
        for (int r = 0; r < c->m; r++) {
            const int8_t *x = c->xq + (size_t)r * k;
            const float *dx = c->dx + (size_t)r * nb;
            float *s0 = sbuf, *s1 = s0 + nb, *s2 = s1 + nb, *s3 = s2 + nb;
            q8_scales_avx2(d0, dx, nb, s0);
            q8_scales_avx2(d1, dx, nb, s1);
            q8_scales_avx2(d2, dx, nb, s2);
            q8_scales_avx2(d3, dx, nb, s3);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int b = 0; b < nb; b++) {
                const int o = 32 * b;
                if (r == 0 && !(b & 1)) /* the next tiles' bytes, ahead of the hardware prefetcher */
                    for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(q0 + j * k + o + Q8_PREFETCH * k), _MM_HINT_T0);
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + o));
#define SXC_Q8Q_COL(q, d, a)                                                                       \
    do {                                                                                           \
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + o));                          \
        const __m256i p = _mm256_madd_epi16(                                                       \
            _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);       \
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(d + b), a);                 \
    } while (0)
                SXC_Q8Q_COL(q0, s0, a0);
                SXC_Q8Q_COL(q1, s1, a1);
                SXC_Q8Q_COL(q2, s2, a2);
                SXC_Q8Q_COL(q3, s3, a3);
#undef SXC_Q8Q_COL
            }
            q8_store(c, r, col, q8_hsum_avx2(a0));
            q8_store(c, r, col + 1, q8_hsum_avx2(a1));
            q8_store(c, r, col + 2, q8_hsum_avx2(a2));
            q8_store(c, r, col + 3, q8_hsum_avx2(a3));
        }
    }
    if (col < col1) q8q_cols_scalar(c, col, col1);
}

T_AVX2 INLINE __m256 q8_load8_avx2(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Rows r0 .. r0+R-1 (R <= 8) against column col: the column's 4 weight vectors of each block are
 * converted to float in registers once and multiplied with every row's activations (read from
 * L1), R accumulator chains in the one-row order. `pf`: prefetch the weight row Q8_PREFETCH
 * ahead (the group that streams the column from memory). */
T_AVX2 INLINE void q8_col_rows_avx2(const q8ctx_t *c, int col, int r0, const int R, const float *s, int pf) {
    const int k = c->w->k, nb = k / 32;
    const int8_t *q = c->w->q + (size_t)col * k;
    const float *x = c->x + (size_t)r0 * k;
    __m256 a[8];
    for (int r = 0; r < R; r++) a[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int o = 32 * b;
        if (pf && !(b & 1)) _mm_prefetch((const char *)(q + o + Q8_PREFETCH * k), _MM_HINT_T0);
        const __m256 w0 = q8_load8_avx2(q + o), w1 = q8_load8_avx2(q + o + 8), w2 = q8_load8_avx2(q + o + 16),
                     w3 = q8_load8_avx2(q + o + 24), sv = _mm256_broadcast_ss(s + b);
        for (int r = 0; r < R; r++) {
            const float *xr = x + (size_t)r * k + o;
            __m256 p = _mm256_mul_ps(_mm256_loadu_ps(xr), w0);
            p = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), w1, p);
            p = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), w2, p);
            p = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), w3, p);
            a[r] = _mm256_fmadd_ps(p, sv, a[r]);
        }
    }
    for (int r = 0; r < R; r++) q8_store(c, r0 + r, col, q8_hsum_avx2(a[r]));
}

/* Any number of rows, column by column, the rows in groups (row_group). Each block's weights are
 * converted once per group, in registers. Measured on SmolLM2's head (49152 x 576, weights cold,
 * 2 threads of a 2-core EPYC, one process against the previous kernels): 1 row 2.80 -> 2.56 ms
 * (4 columns at a time before: one column's bytes in order prefetch better than four streams),
 * 2 rows 6.5 -> 3.1 ms, 5 rows 8.2 -> 4.6 ms, 8 rows 7.6 -> 5.1 ms (each column converted once
 * into a float buffer before: its stores and reloads kept the column loop from overlapping the
 * memory stream). Past 8 rows the rows no longer fit L1 beside the column (16 rows: 12.8 -> 9.9
 * ms); a target verifies that many rows on the CPU only with trees it rarely picks. */
T_AVX2 static void q8_rows_direct_avx2(const q8ctx_t *c, int col0, int col1, float *sbuf) {
    const int nb = c->w->k / 32;
    for (int col = col0; col < col1; col++) {
        q8_scales_avx2(c->w->d + (size_t)col * nb, NULL, nb, sbuf);
        for (int r = 0; r < c->m;) {
            const int R = row_group(c->m - r), pf = r == 0;
            switch (R) {
                case 8: q8_col_rows_avx2(c, col, r, 8, sbuf, pf); break;
                case 7: q8_col_rows_avx2(c, col, r, 7, sbuf, pf); break;
                case 6: q8_col_rows_avx2(c, col, r, 6, sbuf, pf); break;
                case 5: q8_col_rows_avx2(c, col, r, 5, sbuf, pf); break;
                case 4: q8_col_rows_avx2(c, col, r, 4, sbuf, pf); break;
                case 3: q8_col_rows_avx2(c, col, r, 3, sbuf, pf); break;
                case 2: q8_col_rows_avx2(c, col, r, 2, sbuf, pf); break;
                default: q8_col_rows_avx2(c, col, r, 1, sbuf, pf); break;
            }
            r += R;
        }
    }
}

#endif

/* y [m, n] = residual + prologue(x) [m, k] times W^T (W the Q8_0 weight), on `threads` threads
 * at ISA level `isa`. x: float32 rows of stride ldx (>= k); y, residual: [m, n] contiguous
 * (residual may be NULL); norm_w: [k] or NULL (then RMSNorm with eps first); act_q8: quantize
 * the activations to int8 (see the top of this file). */
int sxc_q8_linear(const float *x, int64_t m, int64_t ldx, const sxc_q8weight *w, float *y, const float *residual,
                  const float *norm_w, float eps, int act_q8, int threads, int isa) {
    if (!w || !w->q || !w->d || w->n <= 0 || w->k <= 0 || w->k % 32 || m < 0 || m > INT32_MAX ||
        isa < SXC_SCALAR || isa > SXC_AVX512VNNI || ldx < (int64_t)w->k || (act_q8 != 0 && act_q8 != 1))
        return SXC_EARG;
    if (isa > sxc_best_isa()) return SXC_EISA;
    if (m == 0) return SXC_OK;
    if (!x || !y) return SXC_EARG;
    const int k = w->k, nb = k / 32;
    /* The prologue (and the quantization) once per row, before the parallel matmul: every
     * column reads every row. */
    float *xs = NULL;
    int8_t *xq = NULL;
    float *dx = NULL;
    const int need_rows = norm_w || ldx != k;
    if (need_rows || act_q8) {
        xs = (float *)malloc(sizeof(float) * (size_t)(need_rows ? m : 1) * k);
        if (act_q8) {
            xq = (int8_t *)malloc((size_t)m * k);
            dx = (float *)malloc(sizeof(float) * (size_t)m * (nb + nb)); /* d_x, then unused group sums */
        }
        if (!xs || (act_q8 && (!xq || !dx))) {
            free(xs);
            free(xq);
            free(dx);
            return SXC_ENOMEM;
        }
        const prologue_t pro = {x, ldx, norm_w, eps, SXC_ACT_NONE, isa};
        /* quantize_row reads k, the group (32) and the act-order perm (none) from a weight. */
        const sxc_weight qw = {(const uint8_t *)w->q, w->d, w->d, NULL, w->n, k, 32, 1, NULL};
        for (int64_t r = 0; r < m; r++) {
            float *dst = xs + (need_rows ? r * k : 0);
            const float *row = need_rows ? prepare_row(&pro, k, r, dst) : x + r * ldx;
            if (need_rows && row != dst) memcpy(dst, row, sizeof(float) * (size_t)k);
            if (act_q8) quantize_row(row, &qw, isa, r, xq, dx, dx + (size_t)m * nb);
        }
    }
    const q8ctx_t c = {w, need_rows ? xs : x, xq, dx, y, residual, (int)m};
    const int units = (w->n + 15) / 16;
    const int nthreads = team_size(threads, units);
    (void)nthreads; /* without OpenMP */
    int status = SXC_OK;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int u0, u1;
        my_units(units, &u0, &u1);
        const int col0 = 16 * u0, col1 = 16 * u1 < w->n ? 16 * u1 : w->n;
        if (col0 < col1) {
#if SXC_X86
            if (isa >= SXC_AVX2) {
                /* one column's block scales (q8_rows_direct_avx2) or 4 columns' (q8q_tile_avx2) */
                void *buf = NULL;
                if (posix_memalign(&buf, 64, sizeof(float) * 4 * (size_t)nb) != 0) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
                    status = SXC_ENOMEM;
                } else if (act_q8) {
                    q8q_tile_avx2(&c, col0, col1, (float *)buf);
                } else {
                    q8_rows_direct_avx2(&c, col0, col1, (float *)buf);
                }
                free(buf);
            } else
#endif
            if (act_q8) {
                q8q_cols_scalar(&c, col0, col1);
            } else {
                q8_cols_scalar(&c, col0, col1);
            }
        }
    }
    free(xs);
    free(xq);
    free(dx);
    return status;
}
