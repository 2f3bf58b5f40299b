/* Row-wise argmax of float32 rows, included by specexec_cpu.c.
 *
 * Why: greedy decoding picks every token (the draft's proposals, the target's draws) as the
 * argmax of a vocabulary-wide row, and torch.argmax does not vectorize that reduction on a CPU:
 * ~60-110 us per 49152-wide row on a 2-core EPYC, against ~12 us for torch.aminmax over the
 * same row. A chain pass of k draft tokens takes k + 1 rows of them.
 *
 * The result is torch.argmax's: the first index of the row's largest value (-0.0 and 0.0 are
 * equal), and for a row holding a NaN the index of its first NaN (NaN ranks above everything).
 * Two sweeps over a row (its max, then the first index equal to it) that stays in L2 between them.
 */

static int64_t argmax_row_scalar(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 0; i < n; i++) {
        if (x[i] != x[i]) return i; /* the first NaN */
        if (x[i] > x[best]) best = i;
    }
    return best;
}

#if SXC_X86
T_AVX2 static int64_t argmax_row_avx2(const float *x, int64_t n) {
    const int64_t n8 = n & ~(int64_t)7;
    if (n8 == 0) return argmax_row_scalar(x, n);
    __m256 mx0 = _mm256_loadu_ps(x), mx1 = mx0, nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n8; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
        mx0 = _mm256_max_ps(mx0, a);
        mx1 = _mm256_max_ps(mx1, b);
    }
    for (; i < n8; i += 8) {
        const __m256 a = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        mx0 = _mm256_max_ps(mx0, a);
    }
    float t[8], mx;
    _mm256_storeu_ps(t, _mm256_max_ps(mx0, mx1));
    mx = t[0];
    for (int l = 1; l < 8; l++) mx = t[l] > mx ? t[l] : mx;
    for (int64_t j = n8; j < n; j++) {
        if (x[j] != x[j]) return argmax_row_scalar(x, n);
        mx = x[j] > mx ? x[j] : mx;
    }
    if (_mm256_movemask_ps(nan)) return argmax_row_scalar(x, n);
    const __m256 target = _mm256_set1_ps(mx);
    for (i = 0; i < n8; i += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz((unsigned)hit);
    }
    for (; i < n; i++)
        if (x[i] == mx) return i;
    return 0; /* not reached: mx is one of the row's values */
}
#endif

/* out[r] = argmax of row r of x (m rows of n floats, row stride ldx >= n), at ISA level `isa`. */
int sxc_argmax_rows(const float *x, int64_t m, int64_t n, int64_t ldx, int64_t *out, int isa) {
    if (m < 0 || n <= 0 || ldx < n || isa < SXC_SCALAR || isa > SXC_AVX512VNNI) return SXC_EARG;
    if (isa > sxc_best_isa()) return SXC_EISA;
    if (m == 0) return SXC_OK;
    if (!x || !out) return SXC_EARG;
    for (int64_t r = 0; r < m; r++) {
#if SXC_X86
        if (isa >= SXC_AVX2) {
            out[r] = argmax_row_avx2(x + r * ldx, n);
            continue;
        }
#endif
        out[r] = argmax_row_scalar(x + r * ldx, n);
    }
    return SXC_OK;
}
