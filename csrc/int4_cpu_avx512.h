/* The AVX-512 tile kernel of int4_cpu.h (16 output columns, one int32 lane per column).
 * Included twice by int4_cpu.h with SXC_AVX512_NAME / SXC_AVX512_TARGET / SXC_AVX512_VNNI set:
 * without VNNI the block's dot goes through vpmaddubsw (int16 sums, see int4_cpu.h) + vpmaddwd,
 * with VNNI through vpdpbusd (int32 accumulation). Arithmetic as in int4_cpu.h's header. */

#define SXC_CAT2(a, b) a##b
#define SXC_CAT(a, b) SXC_CAT2(a, b)
#define SXC_FN(suffix) SXC_CAT(SXC_AVX512_NAME, suffix)
#define AVX512_ROWS 8

/* Block b of 16 rows -> 4 low-nibble + 4 high-nibble operands, lane j = 4 bytes of row j. */
SXC_AVX512_TARGET INLINE void SXC_FN(_unpack)(const uint8_t *const rows[16], size_t off, __m512i lo[4],
                                               __m512i hi[4]) {
    __m512i a[4];
    for (int j = 0; j < 4; j++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rows[j] + off)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[j + 4] + off)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[j + 8] + off)), 2);
        a[j] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[j + 12] + off)), 3);
    }
    __m512i t0 = _mm512_unpacklo_epi32(a[0], a[1]), t1 = _mm512_unpackhi_epi32(a[0], a[1]);
    __m512i t2 = _mm512_unpacklo_epi32(a[2], a[3]), t3 = _mm512_unpackhi_epi32(a[2], a[3]);
    __m512i u[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                    _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
    const __m512i mask = _mm512_set1_epi8(15);
    for (int j = 0; j < 4; j++) {
        lo[j] = _mm512_and_si512(u[j], mask);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(u[j], 4), mask);
    }
}

SXC_AVX512_TARGET INLINE __m512 SXC_FN(_load16)(const ctx_t *c, const void *p, int g, int col0) {
    size_t i = (size_t)g * c->w->n + col0;
    if (!c->w->scale_f16) return _mm512_loadu_ps((const float *)p + i);
    /* Two F16C conversions (exact, as one vcvtph2ps zmm would be; SIMDe lacks the latter). */
    const uint16_t *h = (const uint16_t *)p + i;
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 8)));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}

SXC_AVX512_TARGET INLINE void SXC_FN(_scales)(const ctx_t *c, int g, int col0, __m512 *s, __m512 *mn) {
    if (col0 + 16 <= c->w->n) {
        *s = SXC_FN(_load16)(c, c->w->scales, g, col0);
        *mn = SXC_FN(_load16)(c, c->w->mins, g, col0);
    } else {
        float sf[16], mf[16];
        load_cols_scalar(c, g, col0, 16, sf, mf);
        *s = _mm512_loadu_ps(sf);
        *mn = _mm512_loadu_ps(mf);
    }
}

SXC_AVX512_TARGET INLINE void SXC_FN(_store)(const ctx_t *c, int row, int col0, __m512 v) {
    if (col0 + 16 <= c->w->n) {
        size_t i = (size_t)row * c->w->n + col0;
        if (c->res) v = _mm512_add_ps(v, _mm512_loadu_ps(c->res + i));
        _mm512_storeu_ps(c->y + i, v);
    } else {
        float tmp[16];
        _mm512_storeu_ps(tmp, v);
        store_cols(c, row, col0, 16, tmp);
    }
}

/* dot += lo . xl + hi . xh (int32 lanes with VNNI, int16 sums without: see int4_cpu.h). */
SXC_AVX512_TARGET INLINE __m512i SXC_FN(_dot)(__m512i dot, __m512i lo, __m512i hi, const int8_t *xl, const int8_t *xh) {
#if SXC_AVX512_VNNI
    dot = _mm512_dpbusd_epi32(dot, lo, _mm512_set1_epi32(load_i32(xl)));
    return _mm512_dpbusd_epi32(dot, hi, _mm512_set1_epi32(load_i32(xh)));
#else
    dot = _mm512_add_epi16(dot, _mm512_maddubs_epi16(lo, _mm512_set1_epi32(load_i32(xl))));
    return _mm512_add_epi16(dot, _mm512_maddubs_epi16(hi, _mm512_set1_epi32(load_i32(xh))));
#endif
}

SXC_AVX512_TARGET INLINE __m512 SXC_FN(_dot_float)(__m512i dot) {
#if SXC_AVX512_VNNI
    return _mm512_cvtepi32_ps(dot);
#else
    return _mm512_cvtepi32_ps(_mm512_madd_epi16(dot, _mm512_set1_epi16(1)));
#endif
}

/* One row (decode), prefetching the tile PREFETCH_TILES ahead (256 bytes, 4 lines, per block). */
SXC_AVX512_TARGET static void SXC_FN(_row1)(const ctx_t *c, const uint8_t *const rows[16], int col0) {
    const uint8_t *ahead = rows[0] + (size_t)PREFETCH_TILES * 16 * c->row_bytes;
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < c->ng; g++) {
        __m512 s, mn;
        SXC_FN(_scales)(c, g, col0, &s, &mn);
        for (int bb = 0; bb < c->bpg; bb++) {
            const int b = g * c->bpg + bb;
            for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(ahead + 256 * (size_t)b + 64 * l), _MM_HINT_T0);
            __m512i lo[4], hi[4];
            SXC_FN(_unpack)(rows, 16 * (size_t)b, lo, hi);
            const int8_t *xb = c->xq + 32 * b;
            __m512i dot = _mm512_setzero_si512();
            for (int u = 0; u < 4; u++) {
                dot = SXC_FN(_dot)(dot, lo[u], hi[u], xb + 4 * u, xb + 16 + 4 * u);
                KEEP_ZMM(dot);
            }
            acc = _mm512_fmadd_ps(SXC_FN(_dot_float)(dot), _mm512_mul_ps(s, _mm512_set1_ps(c->d[b])), acc);
        }
        acc = _mm512_fmadd_ps(mn, _mm512_set1_ps(c->xs[g]), acc);
    }
    SXC_FN(_store)(c, 0, col0, acc);
}

/* R rows from the tile's unpacked operands `buf` (8 per block: lo 0-3, hi 0-3). */
SXC_AVX512_TARGET INLINE void SXC_FN(_rows)(const ctx_t *c, int col0, int m0, const int R, const __m512i *buf) {
    const int k = c->w->k;
    __m512 acc[AVX512_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < c->ng; g++) {
        __m512 s, mn;
        SXC_FN(_scales)(c, g, col0, &s, &mn);
        for (int bb = 0; bb < c->bpg; bb++) {
            const int b = g * c->bpg + bb;
            __m512i dot[AVX512_ROWS];
            for (int r = 0; r < R; r++) dot[r] = _mm512_setzero_si512();
            for (int u = 0; u < 4; u++) {
                const __m512i lo = _mm512_load_si512(buf + 8 * b + u), hi = _mm512_load_si512(buf + 8 * b + 4 + u);
                for (int r = 0; r < R; r++) {
                    const int8_t *xb = c->xq + (size_t)(m0 + r) * k + 32 * b;
                    dot[r] = SXC_FN(_dot)(dot[r], lo, hi, xb + 4 * u, xb + 16 + 4 * u);
                    KEEP_ZMM(dot[r]);
                }
            }
            for (int r = 0; r < R; r++) {
                __m512 sd = _mm512_mul_ps(s, _mm512_set1_ps(c->d[(size_t)(m0 + r) * c->nb + b]));
                acc[r] = _mm512_fmadd_ps(SXC_FN(_dot_float)(dot[r]), sd, acc[r]);
            }
        }
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(c->xs[(size_t)(m0 + r) * c->ng + g]), acc[r]);
    }
    for (int r = 0; r < R; r++) SXC_FN(_store)(c, m0 + r, col0, acc[r]);
}

SXC_AVX512_TARGET static void SXC_AVX512_NAME(const ctx_t *c, int col0, void *buf_) {
    __m512i *buf = (__m512i *)buf_;
    const uint8_t *rows[16];
    for (int j = 0; j < 16; j++) rows[j] = col_row(c, col0 + j);
    if (c->m == 1) {
        SXC_FN(_row1)(c, rows, col0);
        return;
    }
    const uint8_t *ahead = rows[0] + (size_t)PREFETCH_TILES * 16 * c->row_bytes;
    for (int b = 0; b < c->nb; b++) {
        for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(ahead + 256 * (size_t)b + 64 * l), _MM_HINT_T0);
        SXC_FN(_unpack)(rows, 16 * (size_t)b, buf + 8 * b, buf + 8 * b + 4);
    }
    int m0 = 0;
    for (; m0 + AVX512_ROWS <= c->m; m0 += AVX512_ROWS) SXC_FN(_rows)(c, col0, m0, AVX512_ROWS, buf);
    switch (c->m - m0) {
        case 7: SXC_FN(_rows)(c, col0, m0, 7, buf); break;
        case 6: SXC_FN(_rows)(c, col0, m0, 6, buf); break;
        case 5: SXC_FN(_rows)(c, col0, m0, 5, buf); break;
        case 4: SXC_FN(_rows)(c, col0, m0, 4, buf); break;
        case 3: SXC_FN(_rows)(c, col0, m0, 3, buf); break;
        case 2: SXC_FN(_rows)(c, col0, m0, 2, buf); break;
        case 1: SXC_FN(_rows)(c, col0, m0, 1, buf); break;
        default: break;
    }
}

#undef SXC_FN
#undef SXC_CAT
#undef SXC_CAT2
#undef AVX512_ROWS
