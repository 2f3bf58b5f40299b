/* CPU int4 weight-only matmul for specexec-rt's Int4Weight format; included by specexec_cpu.c.
 *
 *   y[m, n] = sum_k Wdeq[n, k] * xhat[m, k]          (y, x float32; W 4-bit)
 *
 * Weight (kernels/int4_weight.py, read in place, never repacked): qweight uint8 [N, K/2], every
 * 32 weights along K are 16 bytes whose low nibbles hold elements 0-15 and high nibbles 16-31
 * (GGUF Q4_0/Q4_1 order); scales, mins [K/G, N] fp16 or fp32; W = q * scale + min.
 *
 * Activations are quantized per row and per 32-element block to int8 (llama.cpp's Q8 scheme):
 * d = amax / 127, xq = round_half_even(x * (1/d)), xhat = d * xq; the optional act-order perm is
 * applied first (the block runs over x[perm[k]]). The weight minimum folds in through the
 * group sums of xhat: sum_k (q s + m) xhat = s * sum_k q xhat + m * sum_k xhat.
 *
 * The arithmetic is fixed, so every ISA path gives bit-identical results:
 *   acc = 0
 *   for each group g:
 *     for each 32-block b of g:  acc = fma((float)isum[b], scale[g] * d[b], acc)
 *     acc = fma(min[g], xs[g], acc)        xs[g] = sum over b of d[b] * (float)sum(xq[b]), in order
 * isum is the exact integer dot of the block's nibbles with its int8 activations. Build with
 * -ffp-contract=off so the compiler adds no fused operations of its own.
 *
 * Vector layout: a tile of 8 output columns (16 with AVX-512) holds one int32 lane per column.
 * The 16 bytes of a block of 8 rows are transposed in registers so that each 32-byte operand
 * holds 4 consecutive bytes (4 low nibbles = 4 k's, and their high nibbles = k + 16) of each of
 * the 8 columns; the matching 4 activation bytes are broadcast, and _mm256_maddubs_epi16
 * (u8 x s8 -> pairs summed to int16) + _mm256_madd_epi16 (pairs -> int32) leave in lane j the
 * dot of column j. A block's 8 maddubs results are summed in int16 before the madd:
 * 16 products of at most 15 * 127 = 1905 each stay below 32767. AVX-512 VNNI does the same with
 * one vpdpbusd per operand (int32 accumulation).
 *
 * Threads (OpenMP when built with it): output columns are split into contiguous ranges of 16.
 */

/* One Int4Weight, as pointers into its (contiguous) tensors. */
typedef struct {
    const uint8_t *q;       /* [n, k/2] */
    const void *scales;     /* [k/group, n], fp16 (scale_f16 = 1) or fp32 */
    const void *mins;       /* same */
    const int64_t *perm;    /* [k] or NULL */
    int32_t n, k, group, scale_f16;
    const uint8_t *pk;      /* the same weight in the streaming layout (sxc_int4_pack), or NULL */
} sxc_weight;


/* ------------------------------------------------------------------ per-call context */

typedef struct {
    const sxc_weight *w;
    const int8_t *xq;
    const float *d, *xs;
    float *y;
    const float *res; /* [m, n] added to the output, or NULL */
    int m, nb, ng, bpg;
    size_t row_bytes;
    const uint8_t *pk;  /* the streaming layout (AVX2 kernels), or NULL */
    size_t group_bytes; /* its bytes per 16-column unit and group: 64 + 256 * bpg */
} ctx_t;

/* Row pointer of output column `col`, clamped so a partial tile never reads past the weight
 * (the duplicated columns' results are never stored). */
INLINE const uint8_t *col_row(const ctx_t *c, int col) {
    int n = c->w->n;
    return c->w->q + (size_t)(col < n ? col : n - 1) * c->row_bytes;
}

/* Scale and min of 8 columns starting at col0 for group g, into floats (zeros past n). */
static void load_cols_scalar(const ctx_t *c, int g, int col0, int count, float *s, float *mn) {
    const sxc_weight *w = c->w;
    for (int j = 0; j < count; j++) {
        int col = col0 + j;
        size_t i = (size_t)g * w->n + col;
        s[j] = col < w->n ? load_scale(w->scales, w->scale_f16, i) : 0.0f;
        mn[j] = col < w->n ? load_scale(w->mins, w->scale_f16, i) : 0.0f;
    }
}

static void store_cols(const ctx_t *c, int row, int col0, int count, const float *v) {
    int n = c->w->n;
    float *dst = c->y + (size_t)row * n;
    const float *res = c->res ? c->res + (size_t)row * n : NULL;
    for (int j = 0; j < count && col0 + j < n; j++) dst[col0 + j] = res ? v[j] + res[col0 + j] : v[j];
}

/* ------------------------------------------------------------------ scalar kernel (8 columns) */

static void tile_scalar(const ctx_t *c, int col0) {
    const int k = c->w->k;
    const uint8_t *rows[8];
    for (int j = 0; j < 8; j++) rows[j] = col_row(c, col0 + j);
    for (int r = 0; r < c->m; r++) {
        const int8_t *xr = c->xq + (size_t)r * k;
        float acc[8] = {0}, s[8], mn[8];
        for (int g = 0; g < c->ng; g++) {
            load_cols_scalar(c, g, col0, 8, s, mn);
            for (int bb = 0; bb < c->bpg; bb++) {
                int b = g * c->bpg + bb;
                float dx = c->d[(size_t)r * c->nb + b];
                const int8_t *xb = xr + 32 * b;
                for (int j = 0; j < 8; j++) {
                    const uint8_t *qb = rows[j] + 16 * b;
                    int32_t isum = 0;
                    for (int i = 0; i < 16; i++) isum += (qb[i] & 15) * xb[i] + (qb[i] >> 4) * xb[16 + i];
                    acc[j] = fmaf((float)isum, s[j] * dx, acc[j]);
                }
            }
            for (int j = 0; j < 8; j++) acc[j] = fmaf(mn[j], c->xs[(size_t)r * c->ng + g], acc[j]);
        }
        store_cols(c, r, col0, 8, acc);
    }
}

/* ------------------------------------------------------------------ AVX2 kernel (8 columns) */
#if SXC_X86

/* The 16 nibble bytes of block b of 8 rows -> 4 operands (low nibbles) + 4 (high nibbles), each
 * lane j = 4 bytes of row j: operand u covers k = 32b + 4u .. +3 (lo) and k + 16 (hi). */
T_AVX2 INLINE void unpack8_avx2(const uint8_t *const rows[8], size_t off, __m256i lo[4], __m256i hi[4]) {
    __m256i a[4];
    for (int j = 0; j < 4; j++)
        a[j] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(rows[j] + off))),
                                       _mm_loadu_si128((const __m128i *)(rows[j + 4] + off)), 1);
    __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
    __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
    __m256i u[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                    _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
    const __m256i mask = _mm256_set1_epi8(15);
    for (int j = 0; j < 4; j++) {
        lo[j] = _mm256_and_si256(u[j], mask);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(u[j], 4), mask);
    }
}

T_AVX2 INLINE __m256 load8_avx2(const ctx_t *c, const void *p, int g, int col0) {
    size_t i = (size_t)g * c->w->n + col0;
    if (c->w->scale_f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

#define AVX2_ROWS 4
/* Software prefetch distance in tiles: the strided 8-row access of a tile (16 bytes from each
 * row per block) defeats the hardware prefetchers (measured: a GEMV ran at memory latency). */
#ifndef PREFETCH_TILES
#define PREFETCH_TILES 2
#endif

/* Scale and min vectors of 8 columns for group g. */
/* Group g of the unit holding column col0 (a multiple of 8). */
INLINE const uint8_t *pk_group(const ctx_t *c, int col0, int g) {
    return c->pk + ((size_t)(col0 / 16) * c->ng + g) * c->group_bytes;
}

T_AVX2 INLINE void scales8_avx2(const ctx_t *c, int g, int col0, __m256 *s, __m256 *mn) {
    if (c->pk) { /* 16 fp16 scales then 16 fp16 mins at the group's start; zeros past n */
        const uint8_t *p = pk_group(c, col0, g) + 16 * ((col0 >> 3) & 1);
        *s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        *mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32)));
    } else if (col0 + 8 <= c->w->n) {
        *s = load8_avx2(c, c->w->scales, g, col0);
        *mn = load8_avx2(c, c->w->mins, g, col0);
    } else {
        float sf[8], mf[8];
        load_cols_scalar(c, g, col0, 8, sf, mf);
        *s = _mm256_loadu_ps(sf);
        *mn = _mm256_loadu_ps(mf);
    }
}

T_AVX2 INLINE void store8_avx2(const ctx_t *c, int row, int col0, __m256 v) {
    if (col0 + 8 <= c->w->n) {
        size_t i = (size_t)row * c->w->n + col0;
        if (c->res) v = _mm256_add_ps(v, _mm256_loadu_ps(c->res + i));
        _mm256_storeu_ps(c->y + i, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        store_cols(c, row, col0, 8, tmp);
    }
}

/* ---- the streaming layout (sxc_int4_pack): a 16-column unit is one stream, group by group */
#ifndef PK_ROWS_OVER_AVX512
#define PK_ROWS_OVER_AVX512 8 /* up to this many rows the streamed AVX2 kernels serve AVX-512 CPUs */
#endif
#ifndef PK_PREFETCH
#define PK_PREFETCH 2048 /* bytes ahead in the unit's stream (tuned on a 2-core EPYC: 1024 until the
                            * inner loop lost its division, then 2048 was 4-6% faster at 1 row) */
#endif

/* The 8 operands of one block for one 8-column tile, as unpack8_avx2 leaves them (32 bytes per
 * operand step, already in lane order), from `p`: the unit's group start (pk_group) + 64 +
 * 256 * (block within the group) + 32 * (second tile of the unit). Callers step `p` themselves:
 * computing it from the block index here put an integer division in the inner loop. */
T_AVX2 INLINE void unpack8_pk_avx2(const uint8_t *p, __m256i lo[4], __m256i hi[4]) {
    const __m256i mask = _mm256_set1_epi8(15);
    for (int u = 0; u < 4; u++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 64 * u));
        lo[u] = _mm256_and_si256(v, mask);
        hi[u] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
}

/* Prefetch the unit's stream PK_PREFETCH bytes past the start of group g (one group's lines). */
INLINE void pk_prefetch(const ctx_t *c, int col0, int g) {
    const char *p = (const char *)pk_group(c, col0, g) + PK_PREFETCH;
    for (size_t o = 0; o < c->group_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

/* Block b of one row against two 8-column tiles (operands lo/hi 0 and 1, scales s0/s1): the
 * exact integer dots, then acc += dot * (s * d_b). */
T_AVX2 INLINE void row1_block_avx2(const ctx_t *c, int b, const __m256i lo0[4], const __m256i hi0[4],
                                   const __m256i lo1[4], const __m256i hi1[4], __m256 s0, __m256 s1, __m256 *acc0,
                                   __m256 *acc1) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xb = c->xq + 32 * b;
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    for (int u = 0; u < 4; u++) {
        const __m256i xl = _mm256_set1_epi32(load_i32(xb + 4 * u));
        const __m256i xh = _mm256_set1_epi32(load_i32(xb + 16 + 4 * u));
        a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(lo0[u], xl));
        a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(lo1[u], xl));
        a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(hi0[u], xh));
        a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(hi1[u], xh));
        KEEP_YMM(a0);
        KEEP_YMM(a1);
    }
    const __m256 d = _mm256_set1_ps(c->d[b]);
    *acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a0, ones)), _mm256_mul_ps(s0, d), *acc0);
    *acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a1, ones)), _mm256_mul_ps(s1, d), *acc1);
}

/* One row (decode), 16 columns as two 8-column tiles whose chains interleave (5-10% faster
 * than one tile at a time, measured). Each block is unpacked and used at once. `stream`
 * (a constant at each call, so each caller compiles to its own loop without a branch; one loop
 * branching at run time measured 4-10% slower): read the streaming layout, whose unit stream is
 * prefetched PK_PREFETCH bytes ahead, else the plain one, whose tiles PREFETCH_TILES ahead are
 * prefetched (a tile's 8 rows are contiguous: 128 bytes per block). */
T_AVX2 INLINE void row1_tiles_avx2(const ctx_t *c, int col0, const int stream) {
    const uint8_t *rows[16] = {NULL};
    const uint8_t *ahead = NULL;
    if (!stream) {
        for (int j = 0; j < 16; j++) rows[j] = col_row(c, col0 + j);
        ahead = rows[0] + (size_t)PREFETCH_TILES * 8 * c->row_bytes;
    }
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int g = 0; g < c->ng; g++) {
        if (stream) pk_prefetch(c, col0, g);
        __m256 s0, mn0, s1, mn1;
        scales8_avx2(c, g, col0, &s0, &mn0);
        scales8_avx2(c, g, col0 + 8, &s1, &mn1);
        for (int bb = 0; bb < c->bpg; bb++) {
            const int b = g * c->bpg + bb;
            __m256i lo0[4], hi0[4], lo1[4], hi1[4];
            if (stream) {
                const uint8_t *p = pk_group(c, col0, g) + 64 + 256 * (size_t)bb;
                unpack8_pk_avx2(p, lo0, hi0);
                unpack8_pk_avx2(p + 32, lo1, hi1);
            } else {
                for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(ahead + 256 * (size_t)b + 64 * l), _MM_HINT_T0);
                unpack8_avx2(rows, 16 * (size_t)b, lo0, hi0);
                unpack8_avx2(rows + 8, 16 * (size_t)b, lo1, hi1);
            }
            row1_block_avx2(c, b, lo0, hi0, lo1, hi1, s0, s1, &acc0, &acc1);
        }
        const __m256 xs = _mm256_set1_ps(c->xs[g]);
        acc0 = _mm256_fmadd_ps(mn0, xs, acc0);
        acc1 = _mm256_fmadd_ps(mn1, xs, acc1);
    }
    store8_avx2(c, 0, col0, acc0);
    store8_avx2(c, 0, col0 + 8, acc1);
}

T_AVX2 static void row1_pk_avx2(const ctx_t *c, int col0) { row1_tiles_avx2(c, col0, 1); }
T_AVX2 static void row1_avx2(const ctx_t *c, int col0) { row1_tiles_avx2(c, col0, 0); }

/* R rows (m0 .. m0+R-1) of an 8-column tile of the plain layout. Each block's operands (lo 0-3,
 * hi 0-3) come from `buf`, the tile unpacked once into L1 for many rows (tile_avx2), or, with
 * `buf` NULL, are unpacked into registers here and used at once by every row (2-4 rows: a small
 * tree level or verification; through the buffer a 2-row draft step of SmolLM2 cost ~1.4x a
 * 1-row step).
 * Per row the same operations in the same order either way, so the same bits. */
T_AVX2 INLINE void rows_avx2(const ctx_t *c, int col0, int m0, const int R, const __m256i *buf) {
    const int k = c->w->k;
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *rows[8] = {NULL};
    const uint8_t *ahead = NULL;
    if (!buf) {
        for (int j = 0; j < 8; j++) rows[j] = col_row(c, col0 + j);
        ahead = rows[0] + (size_t)PREFETCH_TILES * 8 * c->row_bytes;
    }
    __m256 acc[AVX2_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < c->ng; g++) {
        __m256 s, mn;
        scales8_avx2(c, g, col0, &s, &mn);
        for (int bb = 0; bb < c->bpg; bb++) {
            const int b = g * c->bpg + bb;
            __m256i lo[4], hi[4];
            if (buf) {
                for (int u = 0; u < 4; u++) {
                    lo[u] = _mm256_load_si256(buf + 8 * b + u);
                    hi[u] = _mm256_load_si256(buf + 8 * b + 4 + u);
                }
            } else {
                _mm_prefetch((const char *)(ahead + 128 * (size_t)b), _MM_HINT_T0);
                _mm_prefetch((const char *)(ahead + 128 * (size_t)b + 64), _MM_HINT_T0);
                unpack8_avx2(rows, 16 * (size_t)b, lo, hi);
            }
            /* Rows interleaved inside each operand step: R independent int16 chains. */
            __m256i a16[AVX2_ROWS];
            for (int r = 0; r < R; r++) a16[r] = _mm256_setzero_si256();
            for (int u = 0; u < 4; u++)
                for (int r = 0; r < R; r++) {
                    const int8_t *xb = c->xq + (size_t)(m0 + r) * k + 32 * b;
                    a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(lo[u], _mm256_set1_epi32(load_i32(xb + 4 * u))));
                    a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(hi[u], _mm256_set1_epi32(load_i32(xb + 16 + 4 * u))));
                    KEEP_YMM(a16[r]);
                }
            for (int r = 0; r < R; r++) {
                __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(a16[r], ones));
                __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(c->d[(size_t)(m0 + r) * c->nb + b]));
                acc[r] = _mm256_fmadd_ps(f, sd, acc[r]);
            }
        }
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(c->xs[(size_t)(m0 + r) * c->ng + g]), acc[r]);
    }
    for (int r = 0; r < R; r++) store8_avx2(c, m0 + r, col0, acc[r]);
}

/* 2 to 4 rows straight from registers. */
T_AVX2 static void rows_small_tile_avx2(const ctx_t *c, int col0) {
    switch (c->m) {
        case 2: rows_avx2(c, col0, 0, 2, NULL); break;
        case 3: rows_avx2(c, col0, 0, 3, NULL); break;
        default: rows_avx2(c, col0, 0, 4, NULL); break;
    }
}

/* Rows m0 .. m0+R-1 (R = 2 or 3) of a 16-column unit of the streaming layout, the unit's two
 * 8-column tiles interleaved as in row1_tiles_avx2: 2R independent int16 chains. One tile at a
 * time, 2 rows were two chains and latency-bound (measured: a 2-row LM head took longer than a
 * 4-row one). Per row and tile the same operations in the same order as rows_avx2, so the
 * same bits. One row keeps row1_tiles_avx2 (this with R = 1 was 1.5-7% slower, measured). */
T_AVX2 INLINE void rows16_pk_avx2(const ctx_t *c, int col0, int m0, const int R) {
    const int k = c->w->k;
    const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(15);
    __m256 acc0[3], acc1[3];
    for (int r = 0; r < R; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int g = 0; g < c->ng; g++) {
        if (m0 == 0) pk_prefetch(c, col0, g); /* later row groups find the unit in L1/L2 */
        __m256 s0, mn0, s1, mn1;
        scales8_avx2(c, g, col0, &s0, &mn0);
        scales8_avx2(c, g, col0 + 8, &s1, &mn1);
        for (int bb = 0; bb < c->bpg; bb++) {
            const int b = g * c->bpg + bb;
            const uint8_t *p = pk_group(c, col0, g) + 64 + 256 * (size_t)bb;
            __m256i a0[3], a1[3];
            for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_si256();
            /* Operand step u unpacked just before its use (4 live operands, not 16: with 2R
             * accumulators the block's operands all at once spilled to the stack). */
            for (int u = 0; u < 4; u++) {
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(p + 64 * u));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 64 * u + 32));
                const __m256i lo0 = _mm256_and_si256(v0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
                const __m256i lo1 = _mm256_and_si256(v1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
                for (int r = 0; r < R; r++) {
                    const int8_t *xb = c->xq + (size_t)(m0 + r) * k + 32 * b;
                    const __m256i xl = _mm256_set1_epi32(load_i32(xb + 4 * u));
                    const __m256i xh = _mm256_set1_epi32(load_i32(xb + 16 + 4 * u));
                    a0[r] = _mm256_add_epi16(a0[r], _mm256_maddubs_epi16(lo0, xl));
                    a1[r] = _mm256_add_epi16(a1[r], _mm256_maddubs_epi16(lo1, xl));
                    a0[r] = _mm256_add_epi16(a0[r], _mm256_maddubs_epi16(hi0, xh));
                    a1[r] = _mm256_add_epi16(a1[r], _mm256_maddubs_epi16(hi1, xh));
                    KEEP_YMM(a0[r]);
                    KEEP_YMM(a1[r]);
                }
            }
            for (int r = 0; r < R; r++) {
                const __m256 d = _mm256_set1_ps(c->d[(size_t)(m0 + r) * c->nb + b]);
                acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a0[r], ones)), _mm256_mul_ps(s0, d), acc0[r]);
                acc1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a1[r], ones)), _mm256_mul_ps(s1, d), acc1[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256 xs = _mm256_set1_ps(c->xs[(size_t)(m0 + r) * c->ng + g]);
            acc0[r] = _mm256_fmadd_ps(mn0, xs, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(mn1, xs, acc1[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        store8_avx2(c, m0 + r, col0, acc0[r]);
        store8_avx2(c, m0 + r, col0 + 8, acc1[r]);
    }
}

/* Every row (m >= 2) of a 16-column unit of the streaming layout, in groups of 3 (2 where 3
 * would leave 1): the unit (K/2 * 16 bytes plus scales, 5-13 KB on SmolLM2) is read from
 * memory by the first group and from L1/L2 by the rest. */
T_AVX2 static void rows_pk_avx2(const ctx_t *c, int col0) {
    for (int m0 = 0; m0 < c->m;) {
        const int left = c->m - m0;
        if (left == 2 || left == 4) {
            rows16_pk_avx2(c, col0, m0, 2);
            m0 += 2;
        } else {
            rows16_pk_avx2(c, col0, m0, 3);
            m0 += 3;
        }
    }
}

/* Several rows of the plain layout: unpack the tile once into `buf` (L1-resident) and stream
 * rows over it. */
T_AVX2 static void tile_avx2(const ctx_t *c, int col0, __m256i *buf) {
    const uint8_t *rows[8];
    for (int j = 0; j < 8; j++) rows[j] = col_row(c, col0 + j);
    const uint8_t *ahead = rows[0] + (size_t)PREFETCH_TILES * 8 * c->row_bytes;
    for (int b = 0; b < c->nb; b++) {
        _mm_prefetch((const char *)(ahead + 128 * (size_t)b), _MM_HINT_T0);
        _mm_prefetch((const char *)(ahead + 128 * (size_t)b + 64), _MM_HINT_T0);
        unpack8_avx2(rows, 16 * (size_t)b, buf + 8 * b, buf + 8 * b + 4);
    }
    int m0 = 0;
    for (; m0 + AVX2_ROWS <= c->m; m0 += AVX2_ROWS) rows_avx2(c, col0, m0, AVX2_ROWS, buf);
    switch (c->m - m0) {
        case 3: rows_avx2(c, col0, m0, 3, buf); break;
        case 2: rows_avx2(c, col0, m0, 2, buf); break;
        case 1: rows_avx2(c, col0, m0, 1, buf); break;
        default: break;
    }
}

/* AVX-512 (16 columns), without and with VNNI: one body, included twice. */
#ifdef SXC_EMULATE_AVX512
#define SXC_TARGET_512 T_AVX2
#define SXC_TARGET_512VNNI T_AVX2
#else
#define SXC_TARGET_512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define SXC_TARGET_512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
#endif
#define SXC_AVX512_NAME tile_avx512
#define SXC_AVX512_TARGET SXC_TARGET_512
#define SXC_AVX512_VNNI 0
#include "int4_cpu_avx512.h"
#undef SXC_AVX512_NAME
#undef SXC_AVX512_TARGET
#undef SXC_AVX512_VNNI
#define SXC_AVX512_NAME tile_avx512vnni
#define SXC_AVX512_TARGET SXC_TARGET_512VNNI
#define SXC_AVX512_VNNI 1
#include "int4_cpu_avx512.h"
#undef SXC_AVX512_NAME
#undef SXC_AVX512_TARGET
#undef SXC_AVX512_VNNI

#endif /* SXC_X86 */

/* ------------------------------------------------------------------ entry points */

static int check_weight(const sxc_weight *w) {
    if (!w || !w->q || !w->scales || !w->mins || w->n <= 0 || w->k <= 0 || w->group <= 0 || w->group % 32 ||
        w->k % w->group)
        return SXC_EARG;
    return SXC_OK;
}

/* ------------------------------------------------------------------ the streaming layout
 * The AVX2 kernels read a tile of 8 columns 16 bytes per column per block. In the [n, k/2]
 * layout, with scales and mins as [k/group, n], a 16-column unit is 16 nibble streams plus 2 x
 * ng scale streams at once, and a decode step's matmuls reached ~63% of a plain read's
 * bandwidth (weights cold, 2 threads of a 2-core EPYC). sxc_int4_pack writes each 16-column unit
 * as one stream, in the order the kernels read it:
 *   for each group g:  16 fp16 scales, 16 fp16 mins (64 bytes), then for each of the group's
 *                      bpg blocks 256 bytes: for each operand step u = 0..3, columns 0-7 then
 *                      8-15 of the unit, 4 bytes each: bytes 4u .. 4u+3 of the column's 16-byte
 *                      block (the operand unpack8_avx2 gathers with shuffles).
 * Columns past n are zeros. The bytes are the same, so are the results, bit for bit. SmolLM2's
 * 120 decode-step matmuls ran ~1.4x faster in a C harness, the draft's decode step 8.83 -> 6.80
 * ms (bench/results/2026-11-30-int4-stream.md).
 * The same size as q, scales and mins together; fp16 scales only. */
size_t sxc_int4_pack_bytes(int32_t n, int32_t k, int32_t group) {
    if (n <= 0 || k <= 0 || group <= 0 || group % 32 || k % group) return 0;
    return (size_t)((n + 15) / 16) * (size_t)(k / group) * (64 + 256 * (size_t)(group / 32));
}

int sxc_int4_pack(const sxc_weight *w, uint8_t *out) {
    if (check_weight(w) != SXC_OK || !w->scale_f16 || !out) return SXC_EARG;
    const int n = w->n, k = w->k, ng = k / w->group, bpg = w->group / 32;
    const size_t gb = 64 + 256 * (size_t)bpg, row_bytes = (size_t)k / 2;
    memset(out, 0, sxc_int4_pack_bytes(n, k, w->group));
    const uint16_t *sc = (const uint16_t *)w->scales, *mn = (const uint16_t *)w->mins;
    for (int r = 0; r < n; r++) {
        const int j = r % 16;
        for (int g = 0; g < ng; g++) {
            uint8_t *gp = out + ((size_t)(r / 16) * ng + g) * gb;
            memcpy(gp + 2 * j, sc + (size_t)g * n + r, 2);
            memcpy(gp + 32 + 2 * j, mn + (size_t)g * n + r, 2);
            for (int bb = 0; bb < bpg; bb++) {
                const uint8_t *src = w->q + (size_t)r * row_bytes + 16 * (size_t)(g * bpg + bb);
                for (int u = 0; u < 4; u++) memcpy(gp + 64 + 256 * bb + 64 * u + 4 * j, src + 4 * u, 4);
            }
        }
    }
    return SXC_OK;
}

static void quantize_row(const float *row, const sxc_weight *w, int isa, int64_t r, int8_t *xq, float *d,
                         float *xs) {
    const int k = w->k, nb = k / 32, ng = k / w->group, bpg = w->group / 32;
#if SXC_X86
    if (isa >= SXC_AVX2) {
        quant_row_avx2(row, w->perm, k, bpg, xq + r * k, d + r * nb, xs + r * ng);
        return;
    }
#endif
    (void)isa;
    quant_row_scalar(row, w->perm, k, bpg, xq + r * k, d + r * nb, xs + r * ng);
}

/* Quantize activations as the matmul does (exported for the tests' bit-exact comparison). */
int sxc_quantize_q8(const float *x, int64_t m, const sxc_weight *w, int isa, int8_t *xq, float *d, float *xs) {
    if (check_weight(w) != SXC_OK || m < 0 || isa < SXC_SCALAR || isa > SXC_AVX512VNNI) return SXC_EARG;
    if (isa > sxc_best_isa()) return SXC_EISA;
    for (int64_t r = 0; r < m; r++) quantize_row(x + r * w->k, w, isa, r, xq, d, xs);
    return SXC_OK;
}

/* y [m, n] = residual + prologue(x) [m, k] times W^T, on `threads` threads at ISA level `isa`.
 * x: float32 rows of stride ldx (>= k, or >= 2k with act = SXC_ACT_SWIGLU); y, residual:
 * [m, n] contiguous (residual may be NULL); norm_w: [k] or NULL. */
int sxc_int4_linear(const float *x, int64_t m, int64_t ldx, const sxc_weight *w, float *y, const float *residual,
                    const float *norm_w, float eps, int act, int threads, int isa) {
    if (check_weight(w) != SXC_OK || m < 0 || m > INT32_MAX || isa < SXC_SCALAR || isa > SXC_AVX512VNNI ||
        (act != SXC_ACT_NONE && act != SXC_ACT_SWIGLU) || ldx < (act == SXC_ACT_SWIGLU ? 2 : 1) * (int64_t)w->k)
        return SXC_EARG;
    if (isa > sxc_best_isa()) return SXC_EISA;
    if (m == 0) return SXC_OK;
    if (!x || !y) return SXC_EARG;
    const int k = w->k, nb = k / 32, ng = k / w->group;
    size_t xq_bytes = ((size_t)m * k + 63) & ~(size_t)63;
    char *ws = (char *)malloc(xq_bytes + sizeof(float) * (size_t)m * (nb + ng));
    if (!ws) return SXC_ENOMEM;
    ctx_t c = {w, (const int8_t *)ws, (const float *)(ws + xq_bytes), NULL, y, residual, (int)m, nb, ng,
               w->group / 32, (size_t)k / 2, NULL, 0};
    /* The streaming layout serves the AVX2 kernels (fp16 scales only: sxc_int4_pack), and those
     * serve an AVX-512 CPU too up to PK_ROWS_OVER_AVX512 rows: the AVX-512 kernels read the plain
     * layout, and on a 2-core Zen 4 EPYC the streamed AVX2 ones ran SmolLM2's int4 draft step
     * 1.27x faster at 1 row, 1.28x at 4 and 1.05x at 8, 0.85x at 32 (one process, interleaved).
     * Every path gives the same bits, so which one runs changes nothing else. */
    int kisa = isa;
    if (w->pk && w->scale_f16 && (isa == SXC_AVX2 || (isa > SXC_AVX2 && m <= PK_ROWS_OVER_AVX512))) {
        c.pk = w->pk;
        c.group_bytes = 64 + 256 * (size_t)(w->group / 32);
        kisa = SXC_AVX2;
    }
    c.xs = c.d + (size_t)m * nb;
    const prologue_t pro = {x, ldx, norm_w, eps, act, isa};
    const int need_tmp = norm_w != NULL || act != SXC_ACT_NONE;
    const int units = (w->n + 15) / 16; /* columns are handed out 16 at a time */
    const int nthreads = team_size(threads, units);
    int status = SXC_OK;
    /* Activations first, outside the matmul's parallel region (no barrier inside it, which a
     * descheduled thread would stall on a busy machine); in parallel only when M is large. */
    int qthreads = m >= 64 ? nthreads : 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(qthreads) if (qthreads > 1)
#endif
    {
        float *tmp = need_tmp ? (float *)malloc(sizeof(float) * (size_t)k) : NULL;
        if (need_tmp && !tmp) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            status = SXC_ENOMEM;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < m; r++)
            if (!need_tmp || tmp)
                quantize_row(prepare_row(&pro, k, r, tmp), w, isa, r, (int8_t *)ws, (float *)c.d, (float *)c.xs);
        free(tmp);
    }
    if (status != SXC_OK) {
        free(ws);
        return status;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int u0, u1;
        my_units(units, &u0, &u1);
        void *buf = NULL;
        /* Unpacked tile operands for m > 1: 8 operands per block of 32 (AVX2) or 64 bytes
         * (AVX-512). */
        if (isa != SXC_SCALAR && m > 1 && !c.pk && posix_memalign(&buf, 64, (size_t)nb * 512) != 0) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            status = SXC_ENOMEM;
        } else {
            for (int u = u0; u < u1; u++) {
                const int col0 = 16 * u;
                switch (kisa) {
#if SXC_X86
                    case SXC_AVX512VNNI: tile_avx512vnni(&c, col0, buf); break;
                    case SXC_AVX512: tile_avx512(&c, col0, buf); break;
                    case SXC_AVX2:
                        if (m == 1 && c.pk) {
                            row1_pk_avx2(&c, col0);
                        } else if (m == 1) {
                            row1_avx2(&c, col0);
                        } else if (c.pk) {
                            rows_pk_avx2(&c, col0);
                        } else if (m <= 4) {
                            rows_small_tile_avx2(&c, col0);
                            if (col0 + 8 < w->n) rows_small_tile_avx2(&c, col0 + 8);
                        } else {
                            tile_avx2(&c, col0, (__m256i *)buf);
                            if (col0 + 8 < w->n) tile_avx2(&c, col0 + 8, (__m256i *)buf);
                        }
                        break;
#endif
                    default:
                        tile_scalar(&c, col0);
                        if (col0 + 8 < w->n) tile_scalar(&c, col0 + 8);
                        break;
                }
            }
        }
        free(buf);
    }
    free(ws);
    return status;
}
