/* The transformer layers of a CPU float32 pass in one native call; included at the end of
 * specexec_cpu.c, after the matmuls and attention it strings together.
 *
 * Why: with the matmuls and attention native, what was left of a small model's decode step was
 * Python and ctypes around them: five calls per layer, each a ctypes call (~3.5 us for its
 * arguments), an output tensor (~2.5 us) and the dispatch checks, about 4 ms of a 15 ms draft
 * step of SmolLM2-135M. Here every layer runs the same calls as model/transformer.py's block, in
 * the same order and with the same arithmetic (so the result is bit-identical to the per-op
 * path), from one call per pass:
 *
 *   qkv  = rms_norm(x, attn_norm) @ wqkv^T (+ bqkv)
 *   attn = rope_attention(qkv)                  (writes this layer's K/V for the new tokens)
 *   x    = x + (attn @ wo^T (+ bo))
 *   gu   = rms_norm(x, ffn_norm) @ w_gate_up^T
 *   x    = x + (silu(gate) * up) @ w_down^T
 *
 * A matrix is float32 (sxc_f32_linear) or 4-bit (sxc_int4_linear); the caller decides that every
 * matrix of the pass is one these kernels serve (model/transformer.py).
 */

enum { SXC_MAT_F32 = 0, SXC_MAT_INT4 = 1 };

typedef struct {
    int32_t kind, n, k;
    const float *f32;     /* [n, k] row-major, kind SXC_MAT_F32 */
    const sxc_weight *q4; /* kind SXC_MAT_INT4 */
} sxc_mat;

typedef struct {
    const float *attn_norm, *ffn_norm; /* [hidden] */
    const float *bqkv, *bo;            /* or NULL */
    sxc_mat wqkv, wo, w_gate_up, w_down;
} sxc_layer;

static int mat_linear(const sxc_mat *w, const float *x, int64_t m, int64_t ldx, float *y, const float *res,
                      const float *bias, const float *norm_w, float eps, int act, int threads, int isa) {
    const float *r = bias ? NULL : res;
    int rc;
    if (w->kind == SXC_MAT_INT4)
        rc = sxc_int4_linear(x, m, ldx, w->q4, y, r, norm_w, eps, act, threads, isa);
    else if (w->kind == SXC_MAT_F32)
        rc = sxc_f32_linear(x, m, ldx, w->f32, w->n, w->k, y, r, norm_w, eps, act, threads, isa);
    else
        return SXC_EARG;
    if (rc != SXC_OK || !bias) return rc;
    /* As ops.linear with a bias: (x W^T + b), then the residual added to it. */
    for (int64_t i = 0; i < m; i++)
        for (int32_t j = 0; j < w->n; j++) {
            const int64_t t = i * w->n + j;
            y[t] = y[t] + bias[j];
            if (res) y[t] = res[t] + y[t];
        }
    return SXC_OK;
}

/* x [m, hidden] float32 (updated in place) through n_layers layers. cache_k / cache_v:
 * [n_layers, max_len, hkv, d] in kv_type, k_scale / v_scale [n_layers, max_len, hkv] (int8); the
 * other attention arguments as sxc_rope_attention's. */
int sxc_forward_layers(const sxc_layer *layers, int32_t n_layers, float *x, int64_t m, int32_t hidden, int32_t h,
                       int32_t hkv, int32_t d, int32_t inter, float eps, const float *cos, const float *sin,
                       void *cache_k, void *cache_v, float *k_scale, float *v_scale, int32_t kv_type,
                       int64_t max_len, const int64_t *slots, const int32_t *rows, const uint8_t *mask, int32_t width,
                       float scale, int threads, int isa) {
    if (!layers || n_layers < 0 || !x || m < 0 || hidden <= 0 || h <= 0 || hkv <= 0 || d <= 0 || inter <= 0 ||
        max_len <= 0 || kv_type < SXC_KV_F32 || kv_type > SXC_KV_I8 ||
        (kv_type == SXC_KV_I8 && (!k_scale || !v_scale)))
        return SXC_EARG;
    const int32_t nqkv = (h + 2 * hkv) * d;
    for (int32_t l = 0; l < n_layers; l++) {
        const sxc_layer *L = layers + l;
        if (L->wqkv.n != nqkv || L->wqkv.k != hidden || L->wo.n != hidden || L->wo.k != h * d ||
            L->w_gate_up.n != 2 * inter || L->w_gate_up.k != hidden || L->w_down.n != hidden || L->w_down.k != inter ||
            !L->attn_norm || !L->ffn_norm)
            return SXC_EARG;
    }
    if (m == 0 || n_layers == 0) return SXC_OK;
    const size_t per_row = (size_t)nqkv + (size_t)h * d + 2 * (size_t)inter + hidden;
    float *buf = (float *)malloc(sizeof(float) * (size_t)m * per_row);
    if (!buf) return SXC_ENOMEM;
    float *qkv = buf, *attn = qkv + (size_t)m * nqkv, *gu = attn + (size_t)m * h * d, *xb = gu + (size_t)m * 2 * inter;
    const int64_t layer_bytes = max_len * hkv * d * kv_elem_size(kv_type), scale_stride = max_len * hkv;
    int rc = SXC_OK;
    for (int32_t l = 0; l < n_layers && rc == SXC_OK; l++) {
        const sxc_layer *L = layers + l;
        rc = mat_linear(&L->wqkv, x, m, hidden, qkv, NULL, L->bqkv, L->attn_norm, eps, SXC_ACT_NONE, threads, isa);
        if (rc == SXC_OK)
            rc = sxc_rope_attention(qkv, m, nqkv, h, hkv, d, cos, sin, (char *)cache_k + l * layer_bytes,
                                    (char *)cache_v + l * layer_bytes, k_scale ? k_scale + l * scale_stride : NULL,
                                    v_scale ? v_scale + l * scale_stride : NULL, kv_type, max_len, slots, rows, mask,
                                    width, scale, attn, threads, isa);
        if (rc == SXC_OK)
            rc = mat_linear(&L->wo, attn, m, (int64_t)h * d, xb, x, L->bo, NULL, 0.0f, SXC_ACT_NONE, threads, isa);
        if (rc == SXC_OK)
            rc = mat_linear(&L->w_gate_up, xb, m, hidden, gu, NULL, NULL, L->ffn_norm, eps, SXC_ACT_NONE, threads, isa);
        if (rc == SXC_OK)
            rc = mat_linear(&L->w_down, gu, m, 2 * (int64_t)inter, x, xb, NULL, NULL, 0.0f, SXC_ACT_SWIGLU, threads,
                            isa);
    }
    free(buf);
    return rc;
}
