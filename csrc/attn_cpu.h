/* One layer's attention for a CPU float32 pass, with RoPE and the KV-cache write in the same
 * call; included by specexec_cpu.c (it shares the ISA dispatch, the threads and the 8-lane sum
 * there).
 *
 * Why native: a decode step of SmolLM2-135M spent about 10 ms of a 23 ms draft step in the eager
 * PyTorch ops around attention (RoPE's cat/neg/mul/add, two index_copy_ calls, the views and
 * permutes, and SDPA at ~90 us per layer for one query), i.e. per-op overhead, not arithmetic.
 *
 *   qkv [m, (h + 2*hkv) * d], row stride ldq: each new token's q heads, k heads, v heads.
 *   1. k' = rope(k) and v are stored at cache slot slots[i] (cache [max_len, hkv, d] per layer,
 *      in the cache's storage type, below); every row's K/V is written before any row attends,
 *      since tree rows see each other.
 *   2. out[i, hh] = softmax_j(scale * rope(q[i, hh]) . K[j]) . V[j] over the keys row i sees:
 *      cache slots base + j for j < prefix (the committed text), and base + prefix + t for the
 *      tree slots t < n_tree with mask[i, t] != 0 (rows[i] = {base, prefix, n_tree}).
 *
 * Storage types (kernels/attention/kv.py, the same bits as its `encode`): float32; float16 and
 * bfloat16 rounded to nearest even; int8 with one float32 scale per (token, head) row, amax / 127,
 * q = round_half_even(x * (1 / scale)), a non-finite row stored as zeros with a NaN scale.
 *
 * How the keys are read (long contexts): the keys of a segment are cut into chunks of
 * ATTN_CHUNK. A unit of work is (segment, KV head, block of rows, chunk): it loads the chunk's K
 * and V once, converted to float32 in a thread-local buffer, and runs every query of the block
 * that reads that KV head (each row's GQA group of heads) against it; so a pass reads each key
 * of the prefix once per KV head and row block, not once per row and query head, and a decode
 * step spreads one request's keys over every thread. Each (query, chunk) leaves a partial softmax
 * (max, sum, unnormalised sum of p V); the partials are merged in chunk order afterwards.
 *
 * Fixed arithmetic: RoPE as x * cos + rotate_half(x) * sin with separate multiplies and an add
 * (-ffp-contract=off), the same bits as the PyTorch reference; dot products in 8 lanes (lane =
 * element index % 8) summed as q8_hsum8; within a chunk the softmax over the visible keys in key
 * order (exp_fixed); the merge in chunk order. A query's result therefore depends only on the
 * keys it sees and their positions (not on the other rows of the call, masked keys, the thread
 * count or the ISA path). A row that sees no key gets zeros.
 */

#define SXC_ATTN_MAX_D 256
/* Keys per chunk: a chunk's K and V as float32 (64 KB at head_dim 64) stay in L2 while every
 * query of a block reads them; at 4096 keys a decode step has 32 chunks per KV head to share
 * out between threads. */
#define ATTN_CHUNK 128
/* Rows per block of a unit: 16 rows of 3 heads are 48 queries per loaded chunk. */
#define ATTN_ROW_BLOCK 16
/* The partials of one wave of rows are at most this many bytes; larger passes (long prefills)
 * run in several waves, each reading the keys again. */
#define ATTN_PARTIAL_BYTES ((int64_t)8 << 20)
/* Keys ahead that the loads prefetch: one KV head of a cache row is 128-256 bytes of a strided
 * stream the hardware prefetchers followed poorly (a draft decode step at an 800-token prefix
 * 13.2 -> 11.5 ms with it, 2-core EPYC). */
#define ATTN_PF_KEYS 8

enum { SXC_KV_F32 = 0, SXC_KV_F16 = 1, SXC_KV_BF16 = 2, SXC_KV_I8 = 3 };

static int kv_elem_size(int type) { return type == SXC_KV_F32 ? 4 : type == SXC_KV_I8 ? 1 : 2; }

/* ------------------------------------------------------------------ storing K and V */

/* Round to nearest even, as torch's float -> float16 (NaN -> quiet NaN). */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;
    if (ax >= 0x477ff000u) return sign | 0x7c00u; /* inf, and finite values from 65520 up (RNE) */
    if (ax < 0x38800000u) { /* below 2^-14: a half subnormal, in units of 2^-24 (exact scaling) */
        float a;
        memcpy(&a, &ax, 4);
        return sign | (uint16_t)nearbyintf(a * 16777216.0f);
    }
    uint32_t r = ax - 0x38000000u; /* rebias the exponent (127 - 15) */
    r = r + 0xfffu + ((r >> 13) & 1u);
    return sign | (uint16_t)(r >> 13);
}

/* Round to nearest even, as torch's float -> bfloat16 (NaN -> 0x7fc0). */
static uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static float bf16_to_f32(uint16_t b) {
    const uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* One (token, head) row of d values into the storage type; `scale` for int8. */
static void kv_store_row(const float *x, int d, int type, void *dst, float *scale) {
    if (type == SXC_KV_F32) {
        memcpy(dst, x, sizeof(float) * (size_t)d);
    } else if (type == SXC_KV_F16) {
        for (int i = 0; i < d; i++) ((uint16_t *)dst)[i] = f32_to_f16(x[i]);
    } else if (type == SXC_KV_BF16) {
        for (int i = 0; i < d; i++) ((uint16_t *)dst)[i] = f32_to_bf16(x[i]);
    } else {
        float amax = 0.0f;
        int finite = 1;
        for (int i = 0; i < d; i++) {
            const float a = fabsf(x[i]);
            if (!isfinite(a)) finite = 0;
            amax = a > amax ? a : amax;
        }
        const float s = finite ? amax / 127.0f : NAN;
        const float inv = (finite && s != 0.0f) ? 1.0f / s : 0.0f;
        for (int i = 0; i < d; i++) {
            float v = finite ? nearbyintf(x[i] * inv) : 0.0f;
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            ((int8_t *)dst)[i] = (int8_t)v;
        }
        *scale = s;
    }
}

/* ------------------------------------------------------------------ loading K and V as float32 */

typedef struct {
    const void *k, *v;     /* [max_len, hkv, d] in `type` */
    const float *ks, *vs;  /* [max_len, hkv] (int8) */
    int type;
} kvsrc_t;

/* n consecutive rows (cache slots row0.., KV head g) of K or V into buf [n, d] as float32. */
static void kv_load_scalar(const void *src, const float *sc, int type, int64_t row0, int n, int hkv, int g, int d,
                           float *buf) {
    const int64_t stride = (int64_t)hkv * d;
    for (int t = 0; t < n; t++) {
        const int64_t e = (row0 + t) * stride + (int64_t)g * d;
        float *o = buf + (int64_t)t * d;
        if (type == SXC_KV_F32) {
            memcpy(o, (const float *)src + e, sizeof(float) * (size_t)d);
        } else if (type == SXC_KV_F16) {
            for (int i = 0; i < d; i++) o[i] = half_to_float(((const uint16_t *)src)[e + i]);
        } else if (type == SXC_KV_BF16) {
            for (int i = 0; i < d; i++) o[i] = bf16_to_f32(((const uint16_t *)src)[e + i]);
        } else {
            const float s = sc[(row0 + t) * hkv + g];
            for (int i = 0; i < d; i++) o[i] = (float)((const int8_t *)src)[e + i] * s;
        }
    }
}

#if SXC_X86
/* d % 8 == 0; the same values as kv_load_scalar (every conversion is exact but int8's one
 * multiply, which both do once). */
T_AVX2 static void kv_load_avx2(const void *src, const float *sc, int type, int64_t row0, int n, int hkv, int g,
                                int d, float *buf) {
    const int64_t stride = (int64_t)hkv * d;
    const int esz = kv_elem_size(type);
    for (int t = 0; t < n; t++) {
        const int64_t e = (row0 + t) * stride + (int64_t)g * d;
        if (t + ATTN_PF_KEYS < n) {
            const char *pf = (const char *)src + (e + ATTN_PF_KEYS * stride) * esz;
            for (int o = 0; o < d * esz; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
        }
        float *o = buf + (int64_t)t * d;
        if (type == SXC_KV_F32) {
            const float *s = (const float *)src + e;
            for (int i = 0; i < d; i += 8) _mm256_storeu_ps(o + i, _mm256_loadu_ps(s + i));
        } else if (type == SXC_KV_F16) {
            const uint16_t *s = (const uint16_t *)src + e;
            for (int i = 0; i < d; i += 8) _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
        } else if (type == SXC_KV_BF16) {
            const uint16_t *s = (const uint16_t *)src + e;
            for (int i = 0; i < d; i += 8) {
                const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
                _mm256_storeu_ps(o + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
            }
        } else {
            const int8_t *s = (const int8_t *)src + e;
            const __m256 sv = _mm256_set1_ps(sc[(row0 + t) * hkv + g]);
            for (int i = 0; i < d; i += 8) {
                const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(s + i)));
                _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_cvtepi32_ps(w), sv));
            }
        }
    }
}
#endif

static void kv_load(const kvsrc_t *kv, int which_v, int64_t row0, int n, int hkv, int g, int d, float *buf, int vec) {
    const void *src = which_v ? kv->v : kv->k;
    const float *sc = which_v ? kv->vs : kv->ks;
#if SXC_X86
    if (vec) {
        kv_load_avx2(src, sc, kv->type, row0, n, hkv, g, d, buf);
        return;
    }
#else
    (void)vec;
#endif
    kv_load_scalar(src, sc, kv->type, row0, n, hkv, g, d, buf);
}

/* ------------------------------------------------------------------ scores and P V */

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

#if SXC_X86
T_AVX2 static float attn_dot_avx2(const float *a, const float *b, int d) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < d; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    return q8_hsum_avx2(acc);
}

/* Scores of two queries (two heads of one row: they see the same keys) against the keys
 * kb + idx[t] * d, four keys per sweep: 8 independent add chains, each key loaded once for both.
 * Each score is attn_dot_avx2's, times scale. */
T_AVX2 static void attn_scores2_avx2(const float *q0, const float *q1, const float *kb, const int32_t *idx, int n,
                                     int d, float scale, float *s0, float *s1) {
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        const float *k0 = kb + (int64_t)idx[t] * d, *k1 = kb + (int64_t)idx[t + 1] * d;
        const float *k2 = kb + (int64_t)idx[t + 2] * d, *k3 = kb + (int64_t)idx[t + 3] * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int i = 0; i < d; i += 8) {
            const __m256 x = _mm256_loadu_ps(q0 + i), y = _mm256_loadu_ps(q1 + i);
            __m256 kv = _mm256_loadu_ps(k0 + i);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(x, kv));
            b0 = _mm256_add_ps(b0, _mm256_mul_ps(y, kv));
            kv = _mm256_loadu_ps(k1 + i);
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(x, kv));
            b1 = _mm256_add_ps(b1, _mm256_mul_ps(y, kv));
            kv = _mm256_loadu_ps(k2 + i);
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(x, kv));
            b2 = _mm256_add_ps(b2, _mm256_mul_ps(y, kv));
            kv = _mm256_loadu_ps(k3 + i);
            a3 = _mm256_add_ps(a3, _mm256_mul_ps(x, kv));
            b3 = _mm256_add_ps(b3, _mm256_mul_ps(y, kv));
        }
        s0[t] = q8_hsum_avx2(a0) * scale;
        s0[t + 1] = q8_hsum_avx2(a1) * scale;
        s0[t + 2] = q8_hsum_avx2(a2) * scale;
        s0[t + 3] = q8_hsum_avx2(a3) * scale;
        s1[t] = q8_hsum_avx2(b0) * scale;
        s1[t + 1] = q8_hsum_avx2(b1) * scale;
        s1[t + 2] = q8_hsum_avx2(b2) * scale;
        s1[t + 3] = q8_hsum_avx2(b3) * scale;
    }
    for (; t < n; t++) {
        s0[t] = attn_dot_avx2(q0, kb + (int64_t)idx[t] * d, d) * scale;
        s1[t] = attn_dot_avx2(q1, kb + (int64_t)idx[t] * d, d) * scale;
    }
}

/* The same for one query (four keys per sweep). */
T_AVX2 static void attn_scores1_avx2(const float *q, const float *kb, const int32_t *idx, int n, int d, float scale,
                                     float *s) {
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        const float *k0 = kb + (int64_t)idx[t] * d, *k1 = kb + (int64_t)idx[t + 1] * d;
        const float *k2 = kb + (int64_t)idx[t + 2] * d, *k3 = kb + (int64_t)idx[t + 3] * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < d; i += 8) {
            const __m256 x = _mm256_loadu_ps(q + i);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(x, _mm256_loadu_ps(k0 + i)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(x, _mm256_loadu_ps(k1 + i)));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(x, _mm256_loadu_ps(k2 + i)));
            a3 = _mm256_add_ps(a3, _mm256_mul_ps(x, _mm256_loadu_ps(k3 + i)));
        }
        s[t] = q8_hsum_avx2(a0) * scale;
        s[t + 1] = q8_hsum_avx2(a1) * scale;
        s[t + 2] = q8_hsum_avx2(a2) * scale;
        s[t + 3] = q8_hsum_avx2(a3) * scale;
    }
    for (; t < n; t++) s[t] = attn_dot_avx2(q, kb + (int64_t)idx[t] * d, d) * scale;
}

/* o0 = sum_t p0[t] V[idx[t]], o1 likewise (o = o + p v in key order, from o = 0), 8 columns at
 * a time: each V row loaded once for both queries. */
T_AVX2 static void attn_pv_avx2(int nq, const float *p0, const float *p1, const float *vb, const int32_t *idx,
                                int n, int d, float *o0, float *o1) {
    int i = 0;
    for (; i + 16 <= d; i += 16) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        for (int t = 0; t < n; t++) {
            const float *v = vb + (int64_t)idx[t] * d + i;
            const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
            const __m256 x = _mm256_set1_ps(p0[t]);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(x, v0));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(x, v1));
            if (nq == 2) {
                const __m256 y = _mm256_set1_ps(p1[t]);
                b0 = _mm256_add_ps(b0, _mm256_mul_ps(y, v0));
                b1 = _mm256_add_ps(b1, _mm256_mul_ps(y, v1));
            }
        }
        _mm256_storeu_ps(o0 + i, a0);
        _mm256_storeu_ps(o0 + i + 8, a1);
        if (nq == 2) {
            _mm256_storeu_ps(o1 + i, b0);
            _mm256_storeu_ps(o1 + i + 8, b1);
        }
    }
    for (; i < d; i += 8) {
        __m256 a = _mm256_setzero_ps(), b = a;
        for (int t = 0; t < n; t++) {
            const __m256 v = _mm256_loadu_ps(vb + (int64_t)idx[t] * d + i);
            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_set1_ps(p0[t]), v));
            if (nq == 2) b = _mm256_add_ps(b, _mm256_mul_ps(_mm256_set1_ps(p1[t]), v));
        }
        _mm256_storeu_ps(o0 + i, a);
        if (nq == 2) _mm256_storeu_ps(o1 + i, b);
    }
}
#endif

static void attn_pv_scalar(const float *p, const float *vb, const int32_t *idx, int n, int d, float *o) {
    for (int i = 0; i < d; i++) o[i] = 0.0f;
    for (int t = 0; t < n; t++) {
        const float *v = vb + (int64_t)idx[t] * d;
        for (int i = 0; i < d; i++) o[i] = o[i] + p[t] * v[i];
    }
}

/* ------------------------------------------------------------------ one pass */

/* A segment: a run of rows with the same (base, prefix, n_tree). */
typedef struct {
    int32_t row0, rows, base, prefix, n_tree, chunks;
    int64_t unit0; /* its first unit in the wave's list */
} attnseg_t;

typedef struct {
    int h, hkv, d, grp, width, vec, maxc;
    float scale;
    const float *q;        /* [m, h, d]: the rotated queries */
    const uint8_t *mask;   /* [m, width] */
    kvsrc_t kv;
    float *part;           /* per (row - prow0, head, chunk): max, sum, then d values */
    int64_t prow0;         /* the first row of the wave */
} attnctx_t;

#define ATTN_PART(c, i, hh, ch) \
    ((c)->part + ((((int64_t)(i) - (c)->prow0) * (c)->h + (hh)) * (c)->maxc + (ch)) * ((c)->d + 2))

/* Unit: rows [r0, r1) of segment s, KV head g, chunk ch. kbuf/vbuf [ATTN_CHUNK, d], sc [2 ATTN_CHUNK],
 * idx [ATTN_CHUNK]: the thread's scratch. */
static void attn_unit(const attnctx_t *c, const attnseg_t *s, int g, int r0, int r1, int ch, float *kbuf,
                      float *vbuf, float *sc, int32_t *idx) {
    const int d = c->d, n_keys = s->prefix + s->n_tree;
    const int j0 = ch * ATTN_CHUNK, nk = (n_keys - j0 < ATTN_CHUNK ? n_keys - j0 : ATTN_CHUNK);
    kv_load(&c->kv, 0, (int64_t)s->base + j0, nk, c->hkv, g, d, kbuf, c->vec);
    kv_load(&c->kv, 1, (int64_t)s->base + j0, nk, c->hkv, g, d, vbuf, c->vec);
    const int all_prefix = j0 + nk <= s->prefix;
    if (all_prefix)
        for (int t = 0; t < nk; t++) idx[t] = t;
    for (int i = r0; i < r1; i++) {
        int n = nk;
        if (!all_prefix) { /* the keys row i sees, in order */
            const uint8_t *mrow = c->mask + (int64_t)i * c->width;
            n = 0;
            for (int t = 0; t < nk; t++) {
                const int j = j0 + t;
                if (j < s->prefix || mrow[j - s->prefix]) idx[n++] = t;
            }
        }
        for (int e = 0; e < c->grp;) {
            const int hh = g * c->grp + e, pair = e + 1 < c->grp && c->vec;
            float *pa = ATTN_PART(c, i, hh, ch), *pb = pair ? ATTN_PART(c, i, hh + 1, ch) : NULL;
            const float *qa = c->q + ((int64_t)i * c->h + hh) * d;
            if (n == 0) { /* this chunk holds no key the row sees */
                for (int w = 0; w < (pair ? 2 : 1); w++) {
                    float *p = w ? pb : pa;
                    p[0] = -INFINITY;
                    p[1] = 0.0f;
                    memset(p + 2, 0, sizeof(float) * (size_t)d);
                }
                e += pair ? 2 : 1;
                continue;
            }
            float *sa = sc, *sb = sc + ATTN_CHUNK;
#if SXC_X86
            if (pair)
                attn_scores2_avx2(qa, qa + d, kbuf, idx, n, d, c->scale, sa, sb);
            else if (c->vec)
                attn_scores1_avx2(qa, kbuf, idx, n, d, c->scale, sa);
            else
#endif
                for (int t = 0; t < n; t++) sa[t] = attn_dot_scalar(qa, kbuf + (int64_t)idx[t] * d, d) * c->scale;
            for (int w = 0; w < (pair ? 2 : 1); w++) {
                float *s_ = w ? sb : sa, *p = w ? pb : pa;
                float mx = -INFINITY;
                for (int t = 0; t < n; t++)
                    if (s_[t] > mx) mx = s_[t];
                for (int t = 0; t < n; t++) s_[t] = s_[t] - mx;
                exp_many(s_, n, s_, c->vec);
                float sum = 0.0f;
                for (int t = 0; t < n; t++) sum += s_[t];
                p[0] = mx;
                p[1] = sum;
            }
#if SXC_X86
            if (c->vec)
                attn_pv_avx2(pair ? 2 : 1, sa, sb, vbuf, idx, n, d, pa + 2, pair ? pb + 2 : NULL);
            else
#endif
                attn_pv_scalar(sa, vbuf, idx, n, d, pa + 2);
            e += pair ? 2 : 1;
        }
    }
}

/* out = sum_c w_c acc_c / sum_c w_c l_c with w_c = exp(m_c - max_c m_c), in chunk order. */
static void attn_merge(const attnctx_t *c, int i, int hh, int chunks, float *out) {
    const int d = c->d;
    float mx = -INFINITY;
    for (int ch = 0; ch < chunks; ch++) {
        const float m = ATTN_PART(c, i, hh, ch)[0];
        if (m > mx) mx = m;
    }
    for (int t = 0; t < d; t++) out[t] = 0.0f;
    if (mx == -INFINITY) return; /* sees no key */
    float den = 0.0f;
    for (int ch = 0; ch < chunks; ch++) {
        const float *p = ATTN_PART(c, i, hh, ch);
        if (p[0] == -INFINITY) continue;
        const float w = exp_fixed(p[0] - mx);
        den = den + w * p[1];
        for (int t = 0; t < d; t++) out[t] = out[t] + w * p[2 + t];
    }
    for (int t = 0; t < d; t++) out[t] = out[t] / den;
}

/* Returns SXC_EARG for inconsistent shapes, an unknown storage type, or a slot or key outside
 * [0, max_len). cache_k / cache_v: [max_len, hkv, d] in kv_type; k_scale / v_scale: [max_len, hkv]
 * float32 for int8 (else unused). */
int sxc_rope_attention(const float *qkv, int64_t m, int64_t ldq, int32_t h, int32_t hkv, int32_t d,
                       const float *cos, const float *sin, void *cache_k, void *cache_v, float *k_scale,
                       float *v_scale, int32_t kv_type, int64_t max_len, const int64_t *slots, const int32_t *rows,
                       const uint8_t *mask, int32_t width, float scale, float *out, int threads, int isa) {
    if (m < 0 || m > INT32_MAX || h <= 0 || hkv <= 0 || h % hkv || d <= 0 || d % 2 || d > SXC_ATTN_MAX_D ||
        width < 0 || ldq < (int64_t)(h + 2 * hkv) * d || max_len <= 0 || max_len > INT32_MAX ||
        kv_type < SXC_KV_F32 || kv_type > SXC_KV_I8 || isa < SXC_SCALAR || isa > SXC_AVX512VNNI)
        return SXC_EARG;
    if (isa > sxc_best_isa()) return SXC_EISA;
    if (m == 0) return SXC_OK;
    if (!qkv || !cos || !sin || !cache_k || !cache_v || !slots || !rows || !out || (width > 0 && !mask) ||
        (kv_type == SXC_KV_I8 && (!k_scale || !v_scale)))
        return SXC_EARG;
    int maxc = 1, nseg = 0;
    for (int64_t i = 0; i < m; i++) {
        const int64_t base = rows[3 * i], prefix = rows[3 * i + 1], n_tree = rows[3 * i + 2];
        if (base < 0 || prefix < 0 || n_tree < 0 || n_tree > width || base + prefix + n_tree > max_len ||
            slots[i] < 0 || slots[i] >= max_len)
            return SXC_EARG;
        const int chunks = (int)((prefix + n_tree + ATTN_CHUNK - 1) / ATTN_CHUNK);
        if (chunks > maxc) maxc = chunks;
        if (i == 0 || memcmp(rows + 3 * i, rows + 3 * (i - 1), 3 * sizeof(int32_t))) nseg++;
    }
    const int esz = kv_elem_size(kv_type);
    const int64_t stride = (int64_t)hkv * d;
    /* 1. The new tokens' K (rotated) and V into their cache slots, and the rotated queries. */
    float *q = (float *)malloc(sizeof(float) * (size_t)(m * h * d));
    attnseg_t *segs = (attnseg_t *)malloc(sizeof(attnseg_t) * (size_t)nseg);
    if (!q || !segs) {
        free(q);
        free(segs);
        return SXC_ENOMEM;
    }
    for (int64_t i = 0; i < m; i++) {
        const float *row = qkv + i * ldq;
        float tmp[SXC_ATTN_MAX_D];
        for (int g = 0; g < hkv; g++) {
            const int64_t e = slots[i] * stride + (int64_t)g * d;
            attn_rope(row + (int64_t)(h + g) * d, cos + i * d, sin + i * d, d, tmp);
            kv_store_row(tmp, d, kv_type, (char *)cache_k + e * esz, k_scale ? k_scale + slots[i] * hkv + g : NULL);
            kv_store_row(row + (int64_t)(h + hkv + g) * d, d, kv_type, (char *)cache_v + e * esz,
                         v_scale ? v_scale + slots[i] * hkv + g : NULL);
        }
        for (int hh = 0; hh < h; hh++)
            attn_rope(row + (int64_t)hh * d, cos + i * d, sin + i * d, d, q + (i * h + hh) * d);
    }
    nseg = 0;
    for (int64_t i = 0; i < m; i++) {
        if (i == 0 || memcmp(rows + 3 * i, rows + 3 * (i - 1), 3 * sizeof(int32_t))) {
            attnseg_t *s = segs + nseg++;
            s->row0 = (int32_t)i;
            s->rows = 0;
            s->base = rows[3 * i];
            s->prefix = rows[3 * i + 1];
            s->n_tree = rows[3 * i + 2];
            s->chunks = (s->prefix + s->n_tree + ATTN_CHUNK - 1) / ATTN_CHUNK;
        }
        segs[nseg - 1].rows++;
    }
    /* 2. Attention, in waves of rows whose partials fit ATTN_PARTIAL_BYTES. */
    const int64_t row_bytes = (int64_t)h * maxc * (d + 2) * (int64_t)sizeof(float);
    int64_t wave = ATTN_PARTIAL_BYTES / row_bytes;
    if (wave < 1) wave = 1;
    if (wave > m) wave = m;
    float *part = (float *)malloc((size_t)(wave * row_bytes));
    if (!part) {
        free(q);
        free(segs);
        return SXC_ENOMEM;
    }
    attnctx_t c = {h, hkv, d, h / hkv, width, isa >= SXC_AVX2 && d % 8 == 0, maxc, scale, q, mask,
                   {cache_k, cache_v, k_scale, v_scale, kv_type}, part, 0};
    int status = SXC_OK;
    for (int64_t w0 = 0; w0 < m && status == SXC_OK; w0 += wave) {
        const int64_t w1 = w0 + wave < m ? w0 + wave : m;
        c.prow0 = w0;
        /* The wave's units: per segment rows within [w0, w1), in blocks, times KV heads and chunks. */
        int64_t units = 0, work = 0;
        for (int si = 0; si < nseg; si++) {
            attnseg_t *s = segs + si;
            const int64_t a = s->row0 > w0 ? s->row0 : w0, b = s->row0 + s->rows < w1 ? s->row0 + s->rows : w1;
            s->unit0 = units;
            if (b > a) {
                units += (int64_t)hkv * ((b - a + ATTN_ROW_BLOCK - 1) / ATTN_ROW_BLOCK) * s->chunks;
                work += (b - a) * (int64_t)h * (s->prefix + s->n_tree) * d;
            }
        }
        /* A thread team costs about a microsecond (workers spinning from the last call): from
         * ~16K multiply-adds (measured on one query's 9 heads of 64 over 2 threads). */
        const int nthreads = work > 16384 ? team_size(threads, (int)(units < INT32_MAX ? units : INT32_MAX)) : 1;
        (void)nthreads; /* without OpenMP */
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
        {
            float *scratch = (float *)malloc(sizeof(float) * (size_t)(2 * ATTN_CHUNK * d + 3 * ATTN_CHUNK));
            if (!scratch) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
                status = SXC_ENOMEM;
            }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t u = 0; u < units; u++) {
                if (!scratch) continue;
                int si = 0;
                /* The last segment starting at or before u (segments without rows in this wave
                 * start where the next one does). */
                while (si + 1 < nseg && segs[si + 1].unit0 <= u) si++;
                const attnseg_t *s = segs + si;
                const int64_t a = s->row0 > w0 ? s->row0 : w0, b = s->row0 + s->rows < w1 ? s->row0 + s->rows : w1;
                const int64_t v = u - s->unit0;
                const int ch = (int)(v % s->chunks), g = (int)(v / s->chunks % hkv);
                const int64_t r0 = a + v / s->chunks / hkv * ATTN_ROW_BLOCK;
                const int64_t r1 = r0 + ATTN_ROW_BLOCK < b ? r0 + ATTN_ROW_BLOCK : b;
                float *kbuf = scratch, *vbuf = kbuf + ATTN_CHUNK * d, *sc = vbuf + ATTN_CHUNK * d;
                attn_unit(&c, s, g, (int)r0, (int)r1, ch, kbuf, vbuf, sc, (int32_t *)(sc + 2 * ATTN_CHUNK));
            }
            /* (the loop's implied barrier: every partial is written) */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t r = w0 * h; r < w1 * h; r++) {
                const int64_t i = r / h;
                int si = 0;
                while (si + 1 < nseg && segs[si + 1].row0 <= i) si++;
                attn_merge(&c, (int)i, (int)(r % h), segs[si].chunks, out + r * d);
            }
            free(scratch);
        }
    }
    free(part);
    free(q);
    free(segs);
    return status;
}
