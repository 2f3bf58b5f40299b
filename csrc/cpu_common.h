/* Helpers every op of the CPU library shares; included first by specexec_cpu.c. */

/* ------------------------------------------------------------------ scalar helpers */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, f;
    if (exp == 0) {
        if (man == 0) {
            f = sign;
        } else { /* subnormal half: normalise */
            exp = 113;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            f = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        f = sign | 0x7f800000u | (man << 13);
    } else {
        f = sign | ((exp + 112) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &f, 4);
    return out;
}

static float load_scale(const void *p, int f16, size_t i) {
    return f16 ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

INLINE int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ------------------------------------------------------------------ activation quantization
 * x [m, k] row-major -> xq int8 [m, k], d float [m, k/32], xs float [m, k/group]. A block with a
 * non-finite value gets d = NaN and xq = 0, so its rows' outputs are NaN. */

static void finish_block(float amax, int finite, int isum, int b, int bpg, float *d, float *xs,
                         float *group_acc) {
    float dd = finite ? amax / 127.0f : NAN;
    d[b] = dd;
    if (b % bpg == 0) *group_acc = 0.0f;
    *group_acc = *group_acc + dd * (float)isum;
    if (b % bpg == bpg - 1) xs[b / bpg] = *group_acc;
}

static void quant_row_scalar(const float *x, const int64_t *perm, int k, int bpg, int8_t *q, float *d,
                             float *xs) {
    float tmp[32], gacc = 0.0f;
    for (int b = 0; b < k / 32; b++) {
        const float *src = x + 32 * b;
        if (perm) {
            for (int i = 0; i < 32; i++) tmp[i] = x[perm[32 * b + i]];
            src = tmp;
        }
        float amax = 0.0f;
        int finite = 1;
        for (int i = 0; i < 32; i++) {
            float a = fabsf(src[i]);
            if (!isfinite(a)) finite = 0;
            amax = a > amax ? a : amax;
        }
        float dd = amax / 127.0f, id = (finite && dd != 0.0f) ? 1.0f / dd : 0.0f;
        int isum = 0;
        for (int i = 0; i < 32; i++) {
            int v = finite ? (int)nearbyintf(src[i] * id) : 0;
            q[32 * b + i] = (int8_t)v;
            isum += v;
        }
        finish_block(amax, finite, isum, b, bpg, d, xs, &gacc);
    }
}

#if SXC_X86

T_AVX2 static void quant_row_avx2(const float *x, const int64_t *perm, int k, int bpg, int8_t *q, float *d,
                                  float *xs) {
    float tmp[32], gacc = 0.0f;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < k / 32; b++) {
        const float *src = x + 32 * b;
        if (perm) {
            for (int i = 0; i < 32; i++) tmp[i] = x[perm[32 * b + i]];
            src = tmp;
        }
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(src + 8 * i);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                                  _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
        /* x * 0 is NaN exactly for inf/NaN inputs (max_ps may drop NaNs, so check apart). */
        __m256 z = _mm256_setzero_ps();
        __m256 chk = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(v[0], z), _mm256_mul_ps(v[1], z)),
                                   _mm256_add_ps(_mm256_mul_ps(v[2], z), _mm256_mul_ps(v[3], z)));
        int finite = _mm256_movemask_ps(_mm256_cmp_ps(chk, chk, _CMP_UNORD_Q)) == 0;
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        float amax = _mm_cvtss_f32(m4);
        float dd = amax / 127.0f, id = (finite && dd != 0.0f) ? 1.0f / dd : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i iv[4];
        for (int i = 0; i < 4; i++)
            iv[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], vid),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        if (!finite)
            for (int i = 0; i < 4; i++) iv[i] = _mm256_setzero_si256();
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
        _mm256_storeu_si256((__m256i *)(q + 32 * b), _mm256_permutevar8x32_epi32(p, order));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        finish_block(amax, finite, _mm_cvtsi128_si32(s4), b, bpg, d, xs, &gacc);
    }
}
#endif

/* ------------------------------------------------------------------ threads */

/* Threads for `units` work units (at least 1, at most one unit each). */
static int team_size(int threads, int units) {
    int t = threads > 0 ? threads : 1;
    return t > units ? units : t;
}

/* The float32 and Q8_0 kernels take a pass's rows in groups of at most 8, of balanced sizes (9
 * rows as 5 + 4, not 8 + 1: a group of one is a single latency-bound FMA chain). The size of the
 * next group when `left` rows remain. */
INLINE int row_group(int left) {
    return left / ((left + 7) / 8);
}

/* This thread's contiguous share [*u0, *u1) of `units` work units, inside a parallel region. */
INLINE void my_units(int units, int *u0, int *u1) {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    *u0 = (int)((int64_t)units * tid / nth);
    *u1 = (int)((int64_t)units * (tid + 1) / nth);
}

/* ------------------------------------------------------------------ exp in fixed operations
 * exp(x) for SiLU and the attention softmax, as one fixed sequence of float operations that the
 * scalar and the AVX2 forms both run, so every ISA path gives the same bits (libm's expf is
 * scalar: SiLU over 1536 values per layer cost 22 us of a 63 us down projection at one row, and
 * 110 of 280 us at five). Cephes' expf: n = round(x log2 e), r = x - n ln 2 in two parts, a
 * degree-7 polynomial, times 2^n; within an ulp of the exact value (tested). x > 88.376: +inf;
 * x < -87.336: 0 (where 2^n would leave the normal range); NaN stays NaN. */
#define SXC_EXP_HI 88.3762626647949f
#define SXC_EXP_LO -87.3365447504019f

static float exp_fixed(float x) {
    if (x != x) return x;
    if (x > SXC_EXP_HI) return INFINITY;
    if (x < SXC_EXP_LO) return 0.0f;
    const float n = nearbyintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float p2;
    memcpy(&p2, &bits, 4);
    return y * p2;
}

#if SXC_X86
T_AVX2 static inline __m256 exp_fixed_avx2(__m256 x) {
    const __m256 hi = _mm256_set1_ps(SXC_EXP_HI), lo = _mm256_set1_ps(SXC_EXP_LO);
    const __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    /* Clamped for the arithmetic (NaN passes: max/min return their second operand on NaN). */
    const __m256 xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    const __m256 z = _mm256_mul_ps(r, r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, z), r), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 out = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
    out = _mm256_blendv_ps(out, _mm256_set1_ps(INFINITY), over);
    return _mm256_blendv_ps(out, _mm256_setzero_ps(), under);
}

T_AVX2 static int64_t exp_many_avx2(const float *x, int64_t n, float *y) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp_fixed_avx2(_mm256_loadu_ps(x + i)));
    return i;
}
#endif

/* y[i] = exp_fixed(x[i]) (y may be x), vectorised where `vec`: the same bits either way. */
static void exp_many(const float *x, int64_t n, float *y, int vec) {
    int64_t i = 0;
#if SXC_X86
    if (vec) i = exp_many_avx2(x, n, y);
#else
    (void)vec;
#endif
    for (; i < n; i++) y[i] = exp_fixed(x[i]);
}

#if SXC_X86

/* tmp[i] = g[i] / (1 + exp(-g[i])) * up[i] for i < k rounded down to 8; returns that count. */
T_AVX2 static int silu_mul_avx2(const float *g, const float *up, int k, float *tmp) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        const __m256 e = exp_fixed_avx2(_mm256_xor_ps(v, sign));
        _mm256_storeu_ps(tmp + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    return i;
}
#endif

/* y[i] = exp(x[i]) through exp_fixed at ISA level `isa` (exported for the tests). */
int sxc_exp(const float *x, int64_t n, float *y, int isa) {
    if (n < 0 || isa < SXC_SCALAR || isa > SXC_AVX512VNNI || (n > 0 && (!x || !y))) return SXC_EARG;
    if (isa > sxc_best_isa()) return SXC_EISA;
    exp_many(x, n, y, isa >= SXC_AVX2);
    return SXC_OK;
}

/* What is applied to each row of x before quantization (the layer ops fused into the call). */
enum { SXC_ACT_NONE = 0, SXC_ACT_SWIGLU = 1 };
typedef struct {
    const float *x;
    int64_t ldx;          /* row stride of x in floats */
    const float *norm_w;  /* RMSNorm weight [k], or NULL */
    float eps;
    int act;              /* SXC_ACT_SWIGLU: x rows are [gate (k) | up (k)], input = silu(gate) * up */
    int isa;
} prologue_t;

/* Row r of the matmul's input (k floats): x itself, or prepared into `tmp` (k floats). Fixed
 * operation order, so every ISA path quantizes the same values. */
static const float *prepare_row(const prologue_t *p, int k, int64_t r, float *tmp) {
    const float *src = p->x + r * p->ldx;
    if (p->act == SXC_ACT_SWIGLU) { /* silu(g) * up = g / (1 + exp(-g)) * up */
        int i = 0;
#if SXC_X86
        if (p->isa >= SXC_AVX2) i = silu_mul_avx2(src, src + k, k, tmp);
#endif
        for (; i < k; i++) {
            const float g = src[i];
            tmp[i] = g / (1.0f + exp_fixed(-g)) * src[k + i];
        }
        src = tmp;
    }
    if (p->norm_w) { /* RMSNorm as HF Llama in fp32: w * (x * (1 / sqrt(mean(x^2) + eps))) */
        float part[8] = {0};
        for (int i = 0; i < k; i++) part[i % 8] += src[i] * src[i];
        float ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        float rr = 1.0f / sqrtf(ss / (float)k + p->eps);
        for (int i = 0; i < k; i++) tmp[i] = p->norm_w[i] * (src[i] * rr);
        src = tmp;
    }
    return src;
}
