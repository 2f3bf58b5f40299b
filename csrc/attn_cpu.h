/* One layer's attention for a CPU float32 pass, with RoPE and the KV-cache write in the same
 * call; included by specexec_cpu.c (it shares the ISA dispatch, the thread split and the
 * 8-lane sum there).
 *
 * Why native: a decode step of SmolLM2-135M spent about 10 ms of a 23 ms draft step in the eager
 * PyTorch ops around attention (RoPE's cat/neg/mul/add, two index_copy_ calls, the views and
 * permutes, and SDPA at ~90 us per layer for one query), i.e. per-op overhead, not arithmetic:
 * one query against a hundred keys is ~0.1 MFLOP per layer.
 *
 *   qkv [m, (h + 2*hkv) * d], row stride ldq: each new token's q heads, k heads, v heads.
 *   1. k' = rope(k), v are written to cache slot slots[i] (cache [max_len, hkv, d] per layer);
 *      every row's K/V is written before any row attends, since tree rows see each other.
 *   2. out[i, hh] = softmax_j(scale * rope(q[i, hh]) . K[j]) . V[j] over the keys row i sees:
 *      cache slots base + j for j < prefix (the committed text), and base + prefix + t for the
 *      tree slots t < n_tree with mask[i, t] != 0 (rows[i] = {base, prefix, n_tree}).
 *
 * RoPE is rotate-half, computed as x * cos + rotate_half(x) * sin with separate multiplies and an
 * add (the build has -ffp-contract=off): the same bits as the PyTorch reference. Attention has a
 * fixed summation order: dot products in 8 lanes (lane = element index % 8) summed as q8_hsum8,
 * the softmax over the visible keys in key order (its exp is exp_fixed, the same bits scalar or
 * vectorised), so a row's result depends only on the keys it sees (not on the other rows of the
 * call, nor on masked keys), and every ISA path gives the same bits. A row that sees no key gets
 * zeros.
 */

#define SXC_ATTN_MAX_D 256
/* Keys ahead that the score and value loops prefetch. A row's keys are 256 bytes (one KV head)
 * of every 768-byte cache row (SmolLM2), read once per layer from DRAM (the weights streamed in
 * between evict them), and the hardware prefetchers did not keep up: a draft decode step at a
 * 400-token prefix 10.8 -> 9.7 ms, 800 tokens 13.2 -> 11.5, 64 tokens within noise (2-core EPYC,
 * one process, interleaved). */
#define ATTN_PF_KEYS 8

typedef struct {
    const float *qkv;
    int64_t ldq;
    int h, hkv, d;
    const float *cos, *sin; /* [m, d] */
    const float *ck, *cv;   /* [max_len, hkv, d] */
    const int32_t *rows;    /* [m, 3] */
    const uint8_t *mask;    /* [m, width] */
    int width;
    float scale;
    float *out; /* [m, h * d] */
} attnctx_t;

INLINE void attn_rope(const float *x, const float *c, const float *s, int d, float *y) {
    const int half = d / 2;
    for (int j = 0; j < half; j++) y[j] = x[j] * c[j] + (-x[j + half]) * s[j];
    for (int j = half; j < d; j++) y[j] = x[j] * c[j] + x[j - half] * s[j];
}

static float attn_dot_scalar(const float *a, const float *b, int d) {
    float acc[8] = {0};
    for (int i = 0; i < d; i++) acc[i % 8] = acc[i % 8] + a[i] * b[i];
    return q8_hsum8(acc);
}

static void attn_axpy_scalar(float *o, float p, const float *v, int d) {
    for (int i = 0; i < d; i++) o[i] = o[i] + p * v[i];
}

#if SXC_X86
/* d % 8 == 0: lane l of the vector accumulates elements l, l + 8, ... as the scalar loop does. */
T_AVX2 static float attn_dot_avx2(const float *a, const float *b, int d) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < d; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    return q8_hsum_avx2(acc);
}

/* Scores of the n keys at kb + idx[t] * stride (each as attn_dot_avx2, times scale), four keys per
 * sweep: four independent add chains instead of one (the chain's latency bound the loop). */
T_AVX2 static void attn_scores_avx2(const float *q, const float *kb, int64_t stride, const int32_t *idx, int n,
                                    int d, float scale, float *scores) {
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        if (t + ATTN_PF_KEYS + 4 <= n)
            for (int j = 0; j < 4; j++) {
                const char *pk = (const char *)(kb + idx[t + ATTN_PF_KEYS + j] * stride);
                for (int o = 0; o < d * 4; o += 64) _mm_prefetch(pk + o, _MM_HINT_T0);
            }
        const float *k0 = kb + idx[t] * stride, *k1 = kb + idx[t + 1] * stride;
        const float *k2 = kb + idx[t + 2] * stride, *k3 = kb + idx[t + 3] * stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < d; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(qv, _mm256_loadu_ps(k0 + i)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(qv, _mm256_loadu_ps(k1 + i)));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(qv, _mm256_loadu_ps(k2 + i)));
            a3 = _mm256_add_ps(a3, _mm256_mul_ps(qv, _mm256_loadu_ps(k3 + i)));
        }
        scores[t] = q8_hsum_avx2(a0) * scale;
        scores[t + 1] = q8_hsum_avx2(a1) * scale;
        scores[t + 2] = q8_hsum_avx2(a2) * scale;
        scores[t + 3] = q8_hsum_avx2(a3) * scale;
    }
    for (; t < n; t++) scores[t] = attn_dot_avx2(q, kb + idx[t] * stride, d) * scale;
}

T_AVX2 static void attn_axpy_avx2(float *o, float p, const float *v, int d) {
    const __m256 pv = _mm256_set1_ps(p);
    for (int i = 0; i < d; i += 8)
        _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(o + i), _mm256_mul_ps(pv, _mm256_loadu_ps(v + i))));
}
#endif

/* Query head hh of row i; `scores` and `idx` hold at least prefix + n_tree entries. */
static void attn_head(const attnctx_t *c, int i, int hh, float *scores, int32_t *idx, int vec) {
    const int d = c->d, kvh = hh / (c->h / c->hkv);
    float q[SXC_ATTN_MAX_D];
    attn_rope(c->qkv + (int64_t)i * c->ldq + (int64_t)hh * d, c->cos + (int64_t)i * d, c->sin + (int64_t)i * d, d, q);
    const int32_t base = c->rows[3 * i], prefix = c->rows[3 * i + 1], n_tree = c->rows[3 * i + 2];
    const uint8_t *mrow = c->mask + (int64_t)i * c->width;
    const int64_t stride = (int64_t)c->hkv * d;
    const float *kb = c->ck + (int64_t)base * stride + kvh * d, *vb = c->cv + (int64_t)base * stride + kvh * d;
    float *o = c->out + (int64_t)i * c->h * d + (int64_t)hh * d;
    /* The keys this row sees, in order. */
    int n = 0;
    for (int j = 0; j < prefix; j++) idx[n++] = j;
    for (int t = 0; t < n_tree; t++)
        if (mrow[t]) idx[n++] = prefix + t;
    memset(o, 0, sizeof(float) * (size_t)d);
    if (n == 0) return;
#if SXC_X86
    if (vec)
        attn_scores_avx2(q, kb, stride, idx, n, d, c->scale, scores);
    else
#endif
        for (int t = 0; t < n; t++) scores[t] = attn_dot_scalar(q, kb + idx[t] * stride, d) * c->scale;
    float mx = -INFINITY;
    for (int t = 0; t < n; t++)
        if (scores[t] > mx) mx = scores[t];
    for (int t = 0; t < n; t++) scores[t] = scores[t] - mx;
    exp_many(scores, n, scores, vec);
    float sum = 0.0f;
    for (int t = 0; t < n; t++) sum += scores[t];
    for (int t = 0; t < n; t++) {
#if SXC_X86
        if (vec && t + ATTN_PF_KEYS < n) {
            const char *pv = (const char *)(vb + idx[t + ATTN_PF_KEYS] * stride);
            for (int o2 = 0; o2 < d * 4; o2 += 64) _mm_prefetch(pv + o2, _MM_HINT_T0);
        }
        if (vec)
            attn_axpy_avx2(o, scores[t], vb + idx[t] * stride, d);
        else
#endif
            attn_axpy_scalar(o, scores[t], vb + idx[t] * stride, d);
    }
    for (int t = 0; t < d; t++) o[t] = o[t] / sum;
}

/* Returns SXC_EARG for inconsistent shapes or a slot or key outside [0, max_len). */
int sxc_rope_attention(const float *qkv, int64_t m, int64_t ldq, int32_t h, int32_t hkv, int32_t d,
                       const float *cos, const float *sin, float *cache_k, float *cache_v, int64_t max_len,
                       const int64_t *slots, const int32_t *rows, const uint8_t *mask, int32_t width, float scale,
                       float *out, int threads, int isa) {
    if (m < 0 || m > INT32_MAX || h <= 0 || hkv <= 0 || h % hkv || d <= 0 || d % 2 || d > SXC_ATTN_MAX_D ||
        width < 0 || ldq < (int64_t)(h + 2 * hkv) * d || max_len <= 0 || isa < SXC_SCALAR || isa > SXC_AVX512VNNI)
        return SXC_EARG;
    if (isa > sxc_best_isa()) return SXC_EISA;
    if (m == 0) return SXC_OK;
    if (!qkv || !cos || !sin || !cache_k || !cache_v || !slots || !rows || !out || (width > 0 && !mask))
        return SXC_EARG;
    int64_t max_keys = 1;
    for (int64_t i = 0; i < m; i++) {
        const int64_t base = rows[3 * i], prefix = rows[3 * i + 1], n_tree = rows[3 * i + 2];
        if (base < 0 || prefix < 0 || n_tree < 0 || n_tree > width || base + prefix + n_tree > max_len ||
            slots[i] < 0 || slots[i] >= max_len)
            return SXC_EARG;
        if (prefix + n_tree > max_keys) max_keys = prefix + n_tree;
    }
    /* 1. The new tokens' K (rotated) and V into their cache slots. */
    const int64_t stride = (int64_t)hkv * d;
    for (int64_t i = 0; i < m; i++) {
        const float *row = qkv + i * ldq;
        float *kd = cache_k + slots[i] * stride, *vd = cache_v + slots[i] * stride;
        for (int g = 0; g < hkv; g++) attn_rope(row + (int64_t)(h + g) * d, cos + i * d, sin + i * d, d, kd + g * d);
        memcpy(vd, row + (int64_t)(h + hkv) * d, sizeof(float) * (size_t)stride);
    }
    /* 2. Every (row, query head) on its own: a unit of work each. */
    const attnctx_t c = {qkv, ldq, h, hkv, d, cos, sin, cache_k, cache_v, rows, mask, width, scale, out};
    const int units = (int)m * h;
    /* A thread team costs about a microsecond (workers spinning from the last call): measured on
     * one query's 9 heads of 64 over 2 threads, 16 keys 4.6 -> 6.8 us, 32 keys 8.0 -> 5.6 us,
     * 64 keys 15 -> 12 us; so a team from ~16K multiply-adds. */
    const int big = (int64_t)units * max_keys * d > 16384;
    const int nthreads = big ? team_size(threads, units) : 1;
    const int vec = isa >= SXC_AVX2 && d % 8 == 0;
    int status = SXC_OK;
    (void)nthreads; /* without OpenMP */
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        float *scores = (float *)malloc((sizeof(float) + sizeof(int32_t)) * (size_t)max_keys);
        if (!scores) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            status = SXC_ENOMEM;
        } else {
            int u0, u1;
            my_units(units, &u0, &u1);
            int32_t *idx = (int32_t *)(scores + max_keys);
            for (int u = u0; u < u1; u++) attn_head(&c, u / h, u % h, scores, idx, vec);
            free(scores);
        }
    }
    return status;
}
