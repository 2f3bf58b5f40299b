"""The Triton kernels of tree attention (launched by ``launch.TreeAttentionLaunch``).

``_tree_attn_fwd``: one program owns ``BLOCK_M`` rows, a row being a (query,
query-head-in-group) pair of one KV head, so each K/V tile is loaded once per KV head for the
whole GQA group. Keys are walked in ``BLOCK_N`` tiles: full prefix tiles with no mask, the
prefix tail tile with a bound mask, then the tree tiles with the packed bits. Tree tiles no row
of the block can see are skipped. With split-K (flash-decoding) each split writes its partial
(max, sum, unnormalised accumulator) and ``_tree_attn_merge`` combines them. Launchers call the
kernels through this module (``triton_kernels._tree_attn_fwd``), so one patch reaches them all.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores are scaled by it: the kernels use exp2


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _softmax_step(q, k, v, visible, acc, m_i, l_i, qk_scale, MASKED: tl.constexpr):
    """One online-softmax update with a [BLOCK_N, D] K/V tile; scores in the log2 domain."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row that has seen no key yet keeps m = -inf; shifting by 0 instead makes its
        # p and alpha exactly 0 rather than NaN (-inf - -inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _load_kv(k_ptrs, v_ptrs, ks_ptrs, vs_ptrs, key_ok, d_ok, q_dtype: tl.constexpr, BOUND: tl.constexpr,
             EVEN_D: tl.constexpr, SCALED: tl.constexpr):
    """A K/V tile in the cache's storage dtype, as ``q_dtype`` values for the dots: int8 rows
    (``SCALED``) dequantized with their per-row scales (``kv.decode``), other dtypes converted."""
    if BOUND:
        if EVEN_D:
            k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if SCALED:
        # Keys past the bound get scale 0: their (zero) rows stay finite.
        if BOUND:
            ks = tl.load(ks_ptrs, mask=key_ok, other=0.0)
            vs = tl.load(vs_ptrs, mask=key_ok, other=0.0)
        else:
            ks = tl.load(ks_ptrs)
            vs = tl.load(vs_ptrs)
        k = k.to(tl.float32) * ks[:, None]
        v = v.to(tl.float32) * vs[:, None]
    return k.to(q_dtype), v.to(q_dtype)


@triton.jit
def _tree_attn_fwd(
    Q, K, V, KS, VS, PM, Out, PartM, PartL, PartAcc,
    SegQ, SegBase, SegPrefix, SegTree, ProgSeg, ProgBlock,
    n_q, n_heads, n_splits, qk_scale,
    sq_n, sq_h, sq_d, sk_n, sk_h, sk_d, sv_n, sv_h, sv_d, sks_n, sks_h, svs_n, svs_h, so_n, so_h, so_d, spm_q, spm_w,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, SCALED: tl.constexpr,
):
    """Grid: (programs, n_kv_heads, n_splits), a program being one ``BLOCK_M`` block of one
    segment's rows (``ProgSeg``/``ProgBlock``, planned on the host).

    A ragged batch of segments (one per request): segment ``s`` owns query rows
    ``[SegQ[s], SegQ[s + 1])``, sees the ``SegPrefix[s]`` committed keys starting at cache row
    ``SegBase[s]`` without a mask, and the ``SegTree[s]`` tree keys right after them through
    its rows' mask bits. Every per-segment value is read on the device, so one launch (or CUDA
    graph) serves any prefix length.

    K and V are read in the cache's storage dtype and converted to q's tile by tile; int8 ones
    (``SCALED``) with their float32 scales ``KS``/``VS`` ``[keys, heads]`` (``kv.py``)."""
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    WORDS: tl.constexpr = BLOCK_N // 32
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seg = tl.load(ProgSeg + pid)
    q0 = tl.load(SegQ + seg)
    seg_rows = (tl.load(SegQ + seg + 1) - q0) * GROUP
    base = tl.load(SegBase + seg).to(tl.int64)
    prefix_len = tl.load(SegPrefix + seg)
    n_tree = tl.load(SegTree + seg)
    n_words = (n_tree + 31) // 32

    rows = tl.load(ProgBlock + pid) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seg_rows
    qi = q0 + rows // GROUP
    head = kvh * GROUP + rows % GROUP
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + qi[:, None] * sq_n + head[:, None] * sq_h + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + base * sk_n + kvh * sk_h + offs_d[None, :] * sk_d
    v_base = V + base * sv_n + kvh * sv_h + offs_d[None, :] * sv_d
    ks_base = KS + base * sks_n + kvh * sks_h
    vs_base = VS + base * svs_n + kvh * svs_h
    pm_rows = PM + qi * spm_q
    q_dtype: tl.constexpr = Q.dtype.element_ty

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    n_pre_full = prefix_len // BLOCK_N
    n_pre_tiles = (prefix_len + BLOCK_N - 1) // BLOCK_N
    n_tiles = n_pre_tiles + (n_tree + BLOCK_N - 1) // BLOCK_N
    tiles_per_split = (n_tiles + n_splits - 1) // n_splits
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    arange_n = tl.arange(0, BLOCK_N)

    # Prefix tiles that lie wholly inside the prefix: no mask of any kind.
    for t in range(t_lo, tl.minimum(t_hi, n_pre_full)):
        offs_n = t * BLOCK_N + arange_n
        k, v = _load_kv(k_base + offs_n[:, None] * sk_n, v_base + offs_n[:, None] * sv_n,
                        ks_base + offs_n * sks_n, vs_base + offs_n * svs_n,
                        offs_n < prefix_len, d_ok, q_dtype, False, EVEN_D, SCALED)
        acc, m_i, l_i = _softmax_step(q, k, v, None, acc, m_i, l_i, qk_scale, False)

    # The prefix tail tile (0 or 1 iteration): keys past prefix_len belong to the tree part.
    for t in range(tl.maximum(t_lo, n_pre_full), tl.minimum(t_hi, n_pre_tiles)):
        offs_n = t * BLOCK_N + arange_n
        key_ok = offs_n < prefix_len
        k, v = _load_kv(k_base + offs_n[:, None] * sk_n, v_base + offs_n[:, None] * sv_n,
                        ks_base + offs_n * sks_n, vs_base + offs_n * svs_n,
                        key_ok, d_ok, q_dtype, True, EVEN_D, SCALED)
        acc, m_i, l_i = _softmax_step(q, k, v, key_ok[None, :], acc, m_i, l_i, qk_scale, True)

    # Range of mask words any row of this block has a bit in; tree tiles outside it are
    # invisible to the whole block and skipped.
    first_w = tl.zeros([BLOCK_M], tl.int32) + n_words  # n_words = "no bit": empty range
    last_w = tl.zeros([BLOCK_M], tl.int32)
    for w0 in range(0, n_words, 32):
        widx = w0 + tl.arange(0, 32)
        words = tl.load(pm_rows[:, None] + widx[None, :] * spm_w,
                        mask=row_ok[:, None] & (widx < n_words)[None, :], other=0)
        nz = words != 0
        first_w = tl.minimum(first_w, tl.min(tl.where(nz, widx[None, :], n_words), 1))
        last_w = tl.maximum(last_w, tl.max(tl.where(nz, widx[None, :] + 1, 0), 1))
    tree_t_lo = n_pre_tiles + (tl.min(first_w, 0) * 32) // BLOCK_N
    tree_t_hi = n_pre_tiles + (tl.max(last_w, 0) * 32 + BLOCK_N - 1) // BLOCK_N
    tree_t_hi = tl.minimum(tree_t_hi, n_tiles)

    shifts = tl.arange(0, 32)
    for t in range(tl.maximum(t_lo, tree_t_lo), tl.minimum(t_hi, tree_t_hi)):
        j0 = (t - n_pre_tiles) * BLOCK_N
        offs_n = prefix_len + j0 + arange_n
        key_ok = j0 + arange_n < n_tree
        k, v = _load_kv(k_base + offs_n[:, None] * sk_n, v_base + offs_n[:, None] * sv_n,
                        ks_base + offs_n * sks_n, vs_base + offs_n * svs_n,
                        key_ok, d_ok, q_dtype, True, EVEN_D, SCALED)
        widx = j0 // 32 + tl.arange(0, WORDS)
        words = tl.load(pm_rows[:, None] + widx[None, :] * spm_w,
                        mask=row_ok[:, None] & (widx < n_words)[None, :], other=0)
        # Bits past the segment's n_tree are zero (the packed rows are padded with False), so
        # the bits alone mask the tile's out-of-range keys too.
        bits = (words[:, :, None] >> shifts[None, None, :]) & 1
        visible = tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0
        acc, m_i, l_i = _softmax_step(q, k, v, visible, acc, m_i, l_i, qk_scale, True)

    if SPLIT:
        # Partial results, indexed [split, query, head]; m in the log2 domain. A split with
        # no tile of this segment stores m = -inf, l = 0: the merge gives it weight 0.
        r = (split.to(tl.int64) * n_q + qi) * n_heads + head
        tl.store(PartM + r, m_i, mask=row_ok)
        tl.store(PartL + r, l_i, mask=row_ok)
        tl.store(PartAcc + r[:, None] * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
    else:
        # l == 0 only for padding rows (or an unvalidated fully masked row, which gives 0).
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        o_ptrs = Out + qi[:, None] * so_n + head[:, None] * so_h + offs_d[None, :] * so_d
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _tree_attn_merge(
    PartM, PartL, PartAcc, Out, n_splits, n_rows, n_heads, so_n, so_h, so_d,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    """Grid: (n_q * n_heads,). Log-sum-exp merge of the split partials of one output row."""
    r = tl.program_id(0)
    s = tl.arange(0, S_PAD)
    s_ok = s < n_splits
    offs_d = tl.arange(0, D_PAD)
    m = tl.load(PartM + s * n_rows + r, mask=s_ok, other=float("-inf"))
    l = tl.load(PartL + s * n_rows + r, mask=s_ok, other=0.0)
    acc = tl.load(PartAcc + (s[:, None] * n_rows + r) * D_PAD + offs_d[None, :],
                  mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # splits that saw no key have m = -inf: weight 0
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    den = tl.where(den == 0.0, 1.0, den)
    qi = r // n_heads
    h = r % n_heads
    tl.store(Out + qi * so_n + h * so_h + offs_d * so_d, (num / den).to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
