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
 * ATTN_CHUNK. A unit of work is (segment, block of rows, chunk): it streams the chunk's cache rows
 * (every KV head: contiguous memory) once, converted to float32 into a thread-local buffer, and
 * runs every query head of every row of the block against it; so a pass reads each key of the
 * prefix once per row block, not once per row and query head, and a decode step spreads one
 * request's keys over every thread. Each (query, chunk) leaves a partial softmax
 * (max, sum, unnormalised sum of p V); the partials are merged in chunk order afterwards.
 *
 * Fixed arithmetic: RoPE as x * cos + rotate_half(x) * sin with separate multiplies and an add
 * (-ffp-contract=off), the same bits as the PyTorch reference; dot products and P V in explicit
 * fused multiply-adds, in 8 lanes (lane = element index % 8) summed in a fixed tree (below);
 * within a chunk the softmax over the visible keys in key order (exp_fixed); the merge in chunk
 * order. A query's result therefore depends only on the
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
/* Cache rows ahead that the loads prefetch (a row: every KV head of one slot, 384 bytes of
 * float16 for SmolLM2): 16 rows (6 KB) measured 10-15% faster than 4 on a decode step after
 * 1.5-4K keys (2-core Zen 4, same bits), 32 no better. Reading K and V straight from the cache
 * without the float32 copy was tried and was 15-45% slower (the loads stall the arithmetic), as
 * were loading one KV head at a time (strided reads), P V in 32-column blocks (register
 * pressure) and in 512-bit registers (16-35% slower on Zen 4, whose 512-bit ops are two 256-bit
 * halves). */
#define ATTN_PF_ROWS 16

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

/* n consecutive cache rows (slots row0 ..) of K or V, every KV head, into buf as float32:
 * head g's row t at buf + (g * ATTN_CHUNK + t) * d. The rows are read in order, whole (all heads),
 * so the loads stream through memory. */
static void kv_load_scalar(const void *src, const float *sc, int type, int64_t row0, int n, int hkv, int d,
                           float *buf) {
    for (int t = 0; t < n; t++)
        for (int g = 0; g < hkv; g++) {
            const int64_t e = ((row0 + t) * hkv + g) * d;
            float *o = buf + ((int64_t)g * ATTN_CHUNK + t) * d;
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
T_AVX2 static void kv_load_avx2(const void *src, const float *sc, int type, int64_t row0, int n, int hkv, int d,
                                float *buf) {
    const int64_t row_bytes = (int64_t)hkv * d * kv_elem_size(type);
    for (int t = 0; t < n; t++) {
        if (t + ATTN_PF_ROWS < n) {
            const char *pf = (const char *)src + (row0 + t + ATTN_PF_ROWS) * row_bytes;
            for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
        }
        for (int g = 0; g < hkv; g++) {
            const int64_t e = ((row0 + t) * hkv + g) * d;
            float *o = buf + ((int64_t)g * ATTN_CHUNK + t) * d;
            if (type == SXC_KV_F32) {
                const float *s = (const float *)src + e;
                for (int i = 0; i < d; i += 8) _mm256_storeu_ps(o + i, _mm256_loadu_ps(s + i));
            } else if (type == SXC_KV_F16) {
                const uint16_t *s = (const uint16_t *)src + e;
                for (int i = 0; i < d; i += 8)
                    _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
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
}
#endif

static void kv_load(const kvsrc_t *kv, int which_v, int64_t row0, int n, int hkv, int d, float *buf, int vec) {
    const void *src = which_v ? kv->v : kv->k;
    const float *sc = which_v ? kv->vs : kv->ks;
#if SXC_X86
    if (vec) {
        kv_load_avx2(src, sc, kv->type, row0, n, hkv, d, buf);
        return;
    }
#else
    (void)vec;
#endif
    kv_load_scalar(src, sc, kv->type, row0, n, hkv, d, buf);
}

/* ------------------------------------------------------------------ scores and P V
 * In fused multiply-adds: every path (fmaf in the scalar one, vfmadd in AVX2) rounds once per
 * product-and-add, so the paths agree bit for bit, and the vector loops do half the arithmetic
 * instructions of a separate multiply and add. A score: lane l (l = element index % 8) sums its
 * elements in order, then the lanes as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). P V:
 * o = fma(p_t, v_t, o) over the visible keys in order, from 0. */

INLINE void attn_rope(const float *x, const float *c, const float *s, int d, float *y) {
    const int half = d / 2;
    for (int j = 0; j < half; j++) y[j] = x[j] * c[j] + (-x[j + half]) * s[j];
    for (int j = half; j < d; j++) y[j] = x[j] * c[j] + x[j - half] * s[j];
}

INLINE float attn_hsum8(const float *l) {
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

static float attn_dot_scalar(const float *a, const float *b, int d) {
    float acc[8] = {0};
    for (int i = 0; i < d; i++) acc[i % 8] = fmaf(a[i], b[i], acc[i % 8]);
    return attn_hsum8(acc);
}

static void attn_pv_scalar(const float *p, const float *vb, const int32_t *idx, int n, int d, float *o) {
    for (int i = 0; i < d; i++) o[i] = 0.0f;
    for (int t = 0; t < n; t++) {
        const float *v = vb + (int64_t)idx[t] * d;
        for (int i = 0; i < d; i++) o[i] = fmaf(p[t], v[i], o[i]);
    }
}

#if SXC_X86
T_AVX2 INLINE float attn_hsum_avx2(__m256 a) {
    float l[8];
    _mm256_storeu_ps(l, a);
    return attn_hsum8(l);
}

/* d % 8 == 0. */
T_AVX2 static float attn_dot_avx2(const float *a, const float *b, int d) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return attn_hsum_avx2(acc);
}

/* Scores of query q against the keys kb + idx[t] * d, eight keys per sweep: eight independent
 * chains, then the eight lane sums at once (hadd tree in attn_hsum8's order), times scale. */
T_AVX2 static void attn_scores_avx2(const float *q, const float *kb, const int32_t *idx, int n, int d, float scale,
                                    float *s) {
    const __m256 sc = _mm256_set1_ps(scale);
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const float *k[8];
        for (int j = 0; j < 8; j++) k[j] = kb + (int64_t)idx[t + j] * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int i = 0; i < d; i += 8) {
            const __m256 x = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[0] + i), a0);
            a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[1] + i), a1);
            a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[2] + i), a2);
            a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[3] + i), a3);
            a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[4] + i), a4);
            a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[5] + i), a5);
            a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[6] + i), a6);
            a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[7] + i), a7);
        }
        /* hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7] */
        const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
        const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
        _mm256_storeu_ps(s + t, _mm256_mul_ps(r, sc));
    }
    for (; t < n; t++) s[t] = attn_dot_avx2(q, kb + (int64_t)idx[t] * d, d) * scale;
}

/* o_w = sum_t p_w[t] V[idx[t]] for NQ <= 3 queries (heads of one KV group: the same keys), 16
 * columns at a time (2 * NQ accumulators stay in registers), each V row loaded once for all of
 * them. d % 8 == 0. */
#define ATTN_PV_AVX2(NQ)                                                                                      \
    T_AVX2 static void attn_pv##NQ##_avx2(const float *const *p, const float *vb, const int32_t *idx, int n,   \
                                          int d, float *const *o) {                                         \
        int i = 0;                                                                                          \
        for (; i + 16 <= d; i += 16) {                                                                      \
            __m256 a[NQ][2];                                                                                \
            for (int w = 0; w < NQ; w++) a[w][0] = a[w][1] = _mm256_setzero_ps();                           \
            for (int t = 0; t < n; t++) {                                                                   \
                const float *v = vb + (int64_t)idx[t] * d + i;                                              \
                const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);                          \
                for (int w = 0; w < NQ; w++) {                                                              \
                    const __m256 x = _mm256_broadcast_ss(p[w] + t);                                         \
                    a[w][0] = _mm256_fmadd_ps(x, v0, a[w][0]);                                              \
                    a[w][1] = _mm256_fmadd_ps(x, v1, a[w][1]);                                              \
                }                                                                                           \
            }                                                                                               \
            for (int w = 0; w < NQ; w++) {                                                                  \
                _mm256_storeu_ps(o[w] + i, a[w][0]);                                                        \
                _mm256_storeu_ps(o[w] + i + 8, a[w][1]);                                                    \
            }                                                                                               \
        }                                                                                                   \
        for (; i < d; i += 8) {                                                                             \
            __m256 a[NQ];                                                                                   \
            for (int w = 0; w < NQ; w++) a[w] = _mm256_setzero_ps();                                        \
            for (int t = 0; t < n; t++) {                                                                   \
                const __m256 v = _mm256_loadu_ps(vb + (int64_t)idx[t] * d + i);                             \
                for (int w = 0; w < NQ; w++) a[w] = _mm256_fmadd_ps(_mm256_broadcast_ss(p[w] + t), v, a[w]); \
            }                                                                                               \
            for (int w = 0; w < NQ; w++) _mm256_storeu_ps(o[w] + i, a[w]);                                  \
        }                                                                                                   \
    }
ATTN_PV_AVX2(1)
ATTN_PV_AVX2(2)
ATTN_PV_AVX2(3)

T_AVX2 static void attn_pv_avx2(int nq, const float *const *p, const float *vb, const int32_t *idx, int n, int d,
                                float *const *o) {
    if (nq == 3)
        attn_pv3_avx2(p, vb, idx, n, d, o);
    else if (nq == 2)
        attn_pv2_avx2(p, vb, idx, n, d, o);
    else
        attn_pv1_avx2(p, vb, idx, n, d, o);
}

/* The largest of s[0 .. n) (max is exact: any order gives it). */
T_AVX2 static float attn_max_avx2(const float *s, int n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 8 <= n; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
    float l[8];
    _mm256_storeu_ps(l, m);
    float mx = l[0];
    for (int j = 1; j < 8; j++) mx = l[j] > mx ? l[j] : mx;
    for (; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    return mx;
}

/* s[t] = exp(s[t] - mx) for t < n rounded down to 8, summed into lanes[t % 8]; returns that count. */
T_AVX2 static int attn_exp_sum_avx2(float *s, int n, float mx, float *lanes) {
    const __m256 m = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp_fixed_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    _mm256_storeu_ps(lanes, acc);
    return t;
}
#endif

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

/* The chunk's softmax over one query's visible scores s[0 .. n): p[0] = their max, s[t] =
 * exp(s[t] - max), p[1] = their sum, in 8 lanes (t % 8) summed as attn_hsum8. */
static void attn_softmax(float *s, int n, int vec, float *p) {
    float lanes[8] = {0};
    float mx = -INFINITY;
    int t = 0;
#if SXC_X86
    if (vec) {
        mx = attn_max_avx2(s, n);
        t = attn_exp_sum_avx2(s, n, mx, lanes);
    } else
#else
    (void)vec;
#endif
        for (int j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    for (; t < n; t++) {
        s[t] = exp_fixed(s[t] - mx);
        lanes[t % 8] = lanes[t % 8] + s[t];
    }
    p[0] = mx;
    p[1] = attn_hsum8(lanes);
}

/* Unit: rows [r0, r1) of segment s, chunk ch, every KV head. kbuf/vbuf [hkv, ATTN_CHUNK, d],
 * sc [3 ATTN_CHUNK], idx [ATTN_CHUNK]: the thread's scratch. */
static void attn_unit(const attnctx_t *c, const attnseg_t *s, int r0, int r1, int ch, float *kbuf, float *vbuf,
                      float *sc, int32_t *idx) {
    const int d = c->d, n_keys = s->prefix + s->n_tree;
    const int j0 = ch * ATTN_CHUNK, nk = (n_keys - j0 < ATTN_CHUNK ? n_keys - j0 : ATTN_CHUNK);
    kv_load(&c->kv, 0, (int64_t)s->base + j0, nk, c->hkv, d, kbuf, c->vec);
    kv_load(&c->kv, 1, (int64_t)s->base + j0, nk, c->hkv, d, vbuf, c->vec);
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
        /* The heads of each KV group, up to 3 at a time: their P V reads each V row once. */
        for (int hh = 0; hh < c->h;) {
            const int g = hh / c->grp, nq = (g + 1) * c->grp - hh < 3 ? (g + 1) * c->grp - hh : 3;
            const float *kb = kbuf + (int64_t)g * ATTN_CHUNK * d, *vb = vbuf + (int64_t)g * ATTN_CHUNK * d;
            float *part[3], *prob[3], *acc[3];
            for (int w = 0; w < nq; w++) {
                part[w] = ATTN_PART(c, i, hh + w, ch);
                prob[w] = sc + w * ATTN_CHUNK;
                acc[w] = part[w] + 2;
            }
            for (int w = 0; w < nq; w++) {
                const float *q = c->q + ((int64_t)i * c->h + hh + w) * d;
                float *p = part[w], *s_ = prob[w];
                if (n == 0) { /* this chunk holds no key the row sees */
                    p[0] = -INFINITY;
                    p[1] = 0.0f;
                    memset(acc[w], 0, sizeof(float) * (size_t)d);
                    continue;
                }
#if SXC_X86
                if (c->vec)
                    attn_scores_avx2(q, kb, idx, n, d, c->scale, s_);
                else
#endif
                    for (int t = 0; t < n; t++) s_[t] = attn_dot_scalar(q, kb + (int64_t)idx[t] * d, d) * c->scale;
                attn_softmax(s_, n, c->vec, p);
            }
            if (n > 0) {
#if SXC_X86
                if (c->vec)
                    attn_pv_avx2(nq, (const float *const *)prob, vb, idx, n, d, acc);
                else
#endif
                    for (int w = 0; w < nq; w++) attn_pv_scalar(prob[w], vb, idx, n, d, acc[w]);
            }
            hh += nq;
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
                units += (b - a + ATTN_ROW_BLOCK - 1) / ATTN_ROW_BLOCK * s->chunks;
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
            float *scratch = (float *)malloc(sizeof(float) * (size_t)(2 * hkv * ATTN_CHUNK * d + 4 * ATTN_CHUNK));
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
                const int ch = (int)(v % s->chunks);
                const int64_t r0 = a + v / s->chunks * ATTN_ROW_BLOCK;
                const int64_t r1 = r0 + ATTN_ROW_BLOCK < b ? r0 + ATTN_ROW_BLOCK : b;
                float *kbuf = scratch, *vbuf = kbuf + (int64_t)hkv * ATTN_CHUNK * d, *sc = vbuf + (int64_t)hkv * ATTN_CHUNK * d;
                attn_unit(&c, s, (int)r0, (int)r1, ch, kbuf, vbuf, sc, (int32_t *)(sc + 3 * ATTN_CHUNK));
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
