/* CPU float32 matmul for a few rows, included by specexec_cpu.c (it shares the prologue,
 * the helpers and the ISA dispatch there).
 *
 *   y[m, n] = residual[m, n] + sum_k xhat[m, k] * w[n, k]        (w float32 [n, k], row-major)
 *
 * xhat is x, RMSNorm(x), SiLU(gate) * up, or both, as the int4 kernel's prologue (the layer ops
 * fused into the call: a float32 decode step is otherwise ~27 eager PyTorch ops per layer).
 *
 * A decode step of a float32 model reads every weight once per token, so its matmuls are bound by
 * memory; BLAS GEMV reaches about half of this machine's read bandwidth on weights that are not in
 * cache (measured in bench/bench_int4_cpu.py). This kernel streams the weight rows in order with
 * software prefetch ahead of the hardware prefetcher; rows after the first re-read a 4-column
 * tile from L1.
 *
 * Fixed order (every ISA path bit-identical, and a row's result independent of m):
 *   a[0..7] = 0;  for each k in order: a[k % 8] = fma(xhat[k], w[n, k], a[k % 8])
 *   y = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
 */

#ifndef F32_PREFETCH
#define F32_PREFETCH 4 /* weight rows ahead, in units of the 4-row tile (tuned on a 2-core EPYC) */
#endif

typedef struct {
    const float *w; /* [n, k] */
    const float *x; /* [m, k] prepared rows */
    float *y;
    const float *res;
    int m, n, k;
} f32ctx_t;

INLINE void f32_store(const f32ctx_t *c, int r, int col, float v) {
    size_t i = (size_t)r * c->n + col;
    c->y[i] = c->res ? v + c->res[i] : v;
}

static void f32_cols_scalar(const f32ctx_t *c, int col0, int col1) {
    const int k = c->k;
    for (int col = col0; col < col1; col++) {
        const float *w = c->w + (size_t)col * k;
        for (int r = 0; r < c->m; r++) {
            const float *x = c->x + (size_t)r * k;
            float a[8] = {0};
            for (int i = 0; i < k; i++) a[i % 8] = fmaf(x[i], w[i], a[i % 8]);
            f32_store(c, r, col, q8_hsum8(a));
        }
    }
}

#if SXC_X86
/* Rows r0 .. r0+R-1 (R <= 4) against columns col, col + 1: 2R accumulators, each weight vector
 * loaded once for all R rows; every row in the one-row order. `ahead` (or NULL): the two weight
 * rows to prefetch. */
T_AVX2 INLINE void f32_rows_2col_avx2(const f32ctx_t *c, int col, int r0, const int R, const float *ahead) {
    const int k = c->k;
    const float *w0 = c->w + (size_t)col * k, *w1 = w0 + k;
    __m256 a[4], b[4];
    for (int r = 0; r < R; r++) a[r] = b[r] = _mm256_setzero_ps();
    for (int i = 0; i < k; i += 8) {
        if (ahead && !(i & 15)) {
            _mm_prefetch((const char *)(ahead + i), _MM_HINT_T0);
            _mm_prefetch((const char *)(ahead + k + i), _MM_HINT_T0);
        }
        const __m256 v0 = _mm256_loadu_ps(w0 + i), v1 = _mm256_loadu_ps(w1 + i);
        for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_loadu_ps(c->x + (size_t)(r0 + r) * k + i);
            a[r] = _mm256_fmadd_ps(x, v0, a[r]);
            b[r] = _mm256_fmadd_ps(x, v1, b[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        f32_store(c, r0 + r, col, q8_hsum_avx2(a[r]));
        f32_store(c, r0 + r, col + 1, q8_hsum_avx2(b[r]));
    }
}

/* Rows r0 .. r0+R-1 (R <= 8) against one column: R accumulators, the weight vector loaded once for
 * all of them; every row in the one-row order. `ahead` (or NULL): the weight row to prefetch. */
T_AVX2 INLINE void f32_rows_1col_avx2(const f32ctx_t *c, int col, int r0, const int R, const float *ahead) {
    const int k = c->k;
    const float *w0 = c->w + (size_t)col * k, *x = c->x + (size_t)r0 * k;
    __m256 a[8];
    for (int r = 0; r < R; r++) a[r] = _mm256_setzero_ps();
    for (int i = 0; i < k; i += 8) {
        if (ahead && !(i & 15)) _mm_prefetch((const char *)(ahead + i), _MM_HINT_T0);
        const __m256 v0 = _mm256_loadu_ps(w0 + i);
        for (int r = 0; r < R; r++) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (size_t)r * k + i), v0, a[r]);
    }
    for (int r = 0; r < R; r++) f32_store(c, r0 + r, col, q8_hsum_avx2(a[r]));
}

/* More than 4 rows: column by column, the rows in groups (row_group). The first group streams
 * the column from memory, the others re-read it from L1 at once, so the weights are swept once: a
 * second sweep over a tile for the rows past the fourth cost about as much as the first
 * (measured: 5 rows through 4 + 1 cost 1.3x of 4 rows; through one sweep, the same as 4). */
T_AVX2 static void f32_many_rows_avx2(const f32ctx_t *c, int col, const float *ahead) {
    for (int r0 = 0; r0 < c->m;) {
        const float *pf = r0 == 0 ? ahead : NULL;
        const int R = row_group(c->m - r0);
        switch (R) {
            case 1: f32_rows_1col_avx2(c, col, r0, 1, pf); break;
            case 2: f32_rows_1col_avx2(c, col, r0, 2, pf); break;
            case 3: f32_rows_1col_avx2(c, col, r0, 3, pf); break;
            case 4: f32_rows_1col_avx2(c, col, r0, 4, pf); break;
            case 5: f32_rows_1col_avx2(c, col, r0, 5, pf); break;
            case 6: f32_rows_1col_avx2(c, col, r0, 6, pf); break;
            case 7: f32_rows_1col_avx2(c, col, r0, 7, pf); break;
            default: f32_rows_1col_avx2(c, col, r0, 8, pf); break;
        }
        r0 += R;
    }
}

/* 4 columns at a time (the prefetch unit): one row streams the tile with 4 accumulators, 2-4 rows
 * go through f32_rows_2col_avx2, more through f32_many_rows_avx2. */
T_AVX2 static void f32_tile_avx2(const f32ctx_t *c, int col0, int col1) {
    const int k = c->k;
    int col = col0;
    for (; col + 4 <= col1; col += 4) {
        const float *w0 = c->w + (size_t)col * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        const float *ahead = w0 + (size_t)4 * F32_PREFETCH * k;
        if (c->m > 4) {
            for (int j = 0; j < 4; j++) f32_many_rows_avx2(c, col + j, ahead + (size_t)j * k);
            continue;
        }
        if (c->m > 1) {
            /* All rows against two columns at a time, so the one sweep that streams the tile from
             * memory does the arithmetic of every row. */
            for (int half = 0; half < 2; half++) {
                const float *pf = ahead + 2 * (size_t)k * half;
                switch (c->m) {
                    case 4: f32_rows_2col_avx2(c, col + 2 * half, 0, 4, pf); break;
                    case 3: f32_rows_2col_avx2(c, col + 2 * half, 0, 3, pf); break;
                    default: f32_rows_2col_avx2(c, col + 2 * half, 0, 2, pf); break;
                }
            }
            continue;
        }
        /* One row: the tile streamed with 4 accumulators. */
        const float *x = c->x;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < k; i += 16) {
            for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(ahead + (size_t)j * k + i), _MM_HINT_T0);
            const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + i), a0);
            a1 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w1 + i), a1);
            a2 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w2 + i), a2);
            a3 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w3 + i), a3);
            a0 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w0 + i + 8), a0);
            a1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + i + 8), a1);
            a2 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w2 + i + 8), a2);
            a3 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w3 + i + 8), a3);
        }
        f32_store(c, 0, col, q8_hsum_avx2(a0));
        f32_store(c, 0, col + 1, q8_hsum_avx2(a1));
        f32_store(c, 0, col + 2, q8_hsum_avx2(a2));
        f32_store(c, 0, col + 3, q8_hsum_avx2(a3));
    }
    if (col < col1) f32_cols_scalar(c, col, col1);
}
#endif

/* y [m, n] = residual + prologue(x) [m, k] times W^T for a float32 W [n, k] (row stride k), on
 * `threads` threads at ISA level `isa`. x: float32 rows of stride ldx (>= k, >= 2k with
 * act = SXC_ACT_SWIGLU); k a multiple of 16; y, residual: [m, n] contiguous (residual may be
 * NULL); norm_w: [k] or NULL. */
int sxc_f32_linear(const float *x, int64_t m, int64_t ldx, const float *w, int32_t n, int32_t k, float *y,
                   const float *residual, const float *norm_w, float eps, int act, int threads, int isa) {
    if (!w || n <= 0 || k <= 0 || k % 16 || m < 0 || m > INT32_MAX || isa < SXC_SCALAR || isa > SXC_AVX512VNNI ||
        (act != SXC_ACT_NONE && act != SXC_ACT_SWIGLU) || ldx < (act == SXC_ACT_SWIGLU ? 2 : 1) * (int64_t)k)
        return SXC_EARG;
    if (isa > sxc_best_isa()) return SXC_EISA;
    if (m == 0) return SXC_OK;
    if (!x || !y) return SXC_EARG;
    float *xs = NULL;
    const int need_rows = norm_w || act != SXC_ACT_NONE || ldx != k;
    if (need_rows) {
        xs = (float *)malloc(sizeof(float) * (size_t)m * k);
        if (!xs) return SXC_ENOMEM;
        const prologue_t pro = {x, ldx, norm_w, eps, act, isa};
        for (int64_t r = 0; r < m; r++) {
            const float *row = prepare_row(&pro, k, r, xs + r * k);
            if (row != xs + r * k) memcpy(xs + r * k, row, sizeof(float) * (size_t)k);
        }
    }
    const f32ctx_t c = {w, need_rows ? xs : x, y, residual, (int)m, n, k};
    const int units = (n + 15) / 16;
    const int nthreads = team_size(threads, units);
    (void)nthreads; /* without OpenMP */
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int u0, u1;
        my_units(units, &u0, &u1);
        const int col0 = 16 * u0, col1 = 16 * u1 < n ? 16 * u1 : n;
        if (col0 < col1) {
#if SXC_X86
            if (isa >= SXC_AVX2)
                f32_tile_avx2(&c, col0, col1);
            else
#endif
                f32_cols_scalar(&c, col0, col1);
        }
    }
    free(xs);
    return SXC_OK;
}
