"""Tree-masked attention: a Triton flash-attention kernel and its PyTorch reference.

The keys are a committed prefix (seen by every query, no mask) followed by ``n_tree`` tree
entries whose visibility is given per query by a boolean tree mask, bit-packed into int32
words once per forward (:func:`pack_tree_mask`) and read only by the tree tiles.

Kernel layout (``_tree_attn_fwd``): one program owns ``BLOCK_M`` rows, a row being a
(query, query-head-in-group) pair of one KV head, so each K/V tile is loaded once per KV
head for the whole GQA group. Keys are walked in ``BLOCK_N`` tiles: full prefix tiles with
no mask, the prefix tail tile with a bound mask, then the tree tiles with the packed bits.
Tree tiles no row of the block can see are skipped (a short scan of the block's mask words
finds the visible tile range, which halves the tree work for causal/ancestor masks). For
short query sets the tile range is split across programs (flash-decoding): each split writes
its partial (max, sum, unnormalised accumulator) and ``_tree_attn_merge`` combines them.

Shapes: ``q [n_q, n_heads, D]``; ``k, v [n_k, n_kv_heads, D]`` (any strides, e.g. slices of a
``[max_len, n_kv_heads, D]`` cache); ``tree_mask`` bool ``[n_q, n_k - prefix_len]``.

The runtime sends one-token decode steps, whose mask is empty, to :func:`prefix_attention_sdpa`
(flash SDPA) instead: at n_q = 1 this kernel's launch cost exceeds flash SDPA's whole time.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Module attributes on purpose: bench/host_overhead.py stands in for the interpreter check.
from .triton_env import interpreting as _interpreting, sm_count as _sm_count

__all__ = [
    "Segments",
    "TileConfig",
    "TreeAttentionLaunch",
    "pack_tree_mask",
    "prefix_attention_sdpa",
    "tree_attention",
    "tree_attention_packed",
    "tree_attention_reference",
    "tree_attention_ragged",
    "tree_attention_ragged_reference",
]

_LOG2E = 1.4426950408889634


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
def _load_kv(k_ptrs, v_ptrs, key_ok, d_ok, BOUND: tl.constexpr, EVEN_D: tl.constexpr):
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
    return k, v


@triton.jit
def _tree_attn_fwd(
    Q, K, V, PM, Out, PartM, PartL, PartAcc,
    SegQ, SegBase, SegPrefix, SegTree, ProgSeg, ProgBlock,
    n_q, n_heads, n_splits, qk_scale,
    sq_n, sq_h, sq_d, sk_n, sk_h, sk_d, sv_n, sv_h, sv_d, so_n, so_h, so_d, spm_q, spm_w,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    """Grid: (programs, n_kv_heads, n_splits), a program being one ``BLOCK_M`` block of one
    segment's rows (``ProgSeg``/``ProgBlock``, planned on the host).

    A ragged batch of segments (one per request): segment ``s`` owns query rows
    ``[SegQ[s], SegQ[s + 1])``, sees the ``SegPrefix[s]`` committed keys starting at cache row
    ``SegBase[s]`` without a mask, and the ``SegTree[s]`` tree keys right after them through
    its rows' mask bits. Every per-segment value is read on the device, so one launch (or CUDA
    graph) serves any prefix length."""
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
    pm_rows = PM + qi * spm_q

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
                        offs_n < prefix_len, d_ok, False, EVEN_D)
        acc, m_i, l_i = _softmax_step(q, k, v, None, acc, m_i, l_i, qk_scale, False)

    # The prefix tail tile (0 or 1 iteration): keys past prefix_len belong to the tree part.
    for t in range(tl.maximum(t_lo, n_pre_full), tl.minimum(t_hi, n_pre_tiles)):
        offs_n = t * BLOCK_N + arange_n
        key_ok = offs_n < prefix_len
        k, v = _load_kv(k_base + offs_n[:, None] * sk_n, v_base + offs_n[:, None] * sv_n,
                        key_ok, d_ok, True, EVEN_D)
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
                        key_ok, d_ok, True, EVEN_D)
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


# ----------------------------------------------------------------------------- launcher


class TileConfig(NamedTuple):
    """Block sizes and launch parameters of ``_tree_attn_fwd`` (BLOCK_N a multiple of 32)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _choose_config(rows: int, d_pad: int, interpreted: bool) -> TileConfig:
    """Tile sizes from a small table keyed on the packed row count and the padded head dim.

    rows = n_q * group (query x head-in-group pairs of one KV head). tl.dot needs >= 16 rows.
    """
    if interpreted:
        # The interpreter's cost is per tile step: big tiles are fastest.
        return TileConfig(min(64, max(16, triton.next_power_of_2(rows))), 64, 4, 1)
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
    if d_pad > 128:
        return TileConfig(min(block_m, 64), 32, 4, 2)
    if block_m == 128:
        return TileConfig(128, 64, 8 if d_pad == 128 else 4, 3)
    return TileConfig(block_m, 64, 4, 3)


def _choose_splits(programs: int, n_tiles: int, device: torch.device) -> int:
    """Flash-decoding split count: fill ~2 waves of SMs, at least 2 key tiles per split."""
    if device.type != "cuda" or n_tiles < 4:
        return 1
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), n_tiles // 2, 128))


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int) -> None:
    """Shape/dtype/device checks shared by the kernel and the reference (host-only, no sync)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [n, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head_dim differs: q has {q.shape[2]}, k/v have {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_kv == 0 or n_heads % n_kv != 0:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(f"prefix_len must be a Python int, got {type(prefix_len).__name__}")
    if not 0 <= prefix_len <= k.shape[0]:
        raise ValueError(f"prefix_len {prefix_len} is outside [0, n_k={k.shape[0]}]")


def _check_tree_mask(tree_mask: torch.Tensor, n_q: int, n_tree: int, device) -> None:
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool:
        raise TypeError("tree_mask must be a bool tensor [n_q, n_k - prefix_len]")
    if tuple(tree_mask.shape) != (n_q, n_tree):
        raise ValueError(f"tree_mask shape {tuple(tree_mask.shape)} != (n_q, n_k - prefix_len) = "
                         f"({n_q}, {n_tree})")
    if tree_mask.device != device:
        raise ValueError(f"tree_mask is on {tree_mask.device}, q/k/v on {device}")


def _check_rows_visible(tree_mask: torch.Tensor) -> None:
    """With an empty prefix every query must see a tree entry (host sync: call once)."""
    if tree_mask.shape[0] and tree_mask.shape[1] == 0:
        raise ValueError("prefix_len == 0 and no tree entries: every query row is fully masked")
    empty = ~tree_mask.any(dim=1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten()[:8].tolist()
        raise ValueError(f"prefix_len == 0 and tree_mask rows {rows} see no key "
                         "(a tree node must at least see itself)")


def pack_tree_mask(tree_mask: torch.Tensor, prefix_len: int | None = None) -> torch.Tensor:
    """Bit-pack a bool ``[n_q, T]`` tree mask into int32 ``[n_q, ceil(T / 32)]``.

    Bit ``b`` of word ``w`` in row ``i`` is ``tree_mask[i, 32 * w + b]``; padding bits are 0.
    Call once per forward and reuse for every layer. If ``prefix_len == 0`` is passed, rows
    that see no key are rejected with a ValueError here (this check syncs with the device
    once; it is the fully-masked-row check of the hot path, which the kernel does not do).
    """
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool or tree_mask.dim() != 2:
        raise TypeError("tree_mask must be a 2-D bool tensor [n_q, T]")
    if prefix_len == 0:
        _check_rows_visible(tree_mask)
    n_q, n_tree = tree_mask.shape
    n_words = triton.cdiv(n_tree, 32)
    padded = torch.zeros(n_q, n_words * 32, dtype=torch.int32, device=tree_mask.device)
    padded[:, :n_tree] = tree_mask
    # Bit 31 weighs -2**31 (two's complement); the bits are distinct, so the int32 sum is an
    # OR and can never overflow.
    return (padded.view(n_q, n_words, 32) * _bit_weights(tree_mask.device)).sum(-1, dtype=torch.int32)


@functools.lru_cache(maxsize=None)
def _bit_weights(device: torch.device) -> torch.Tensor:
    """int32 [32]: 2**b, with bit 31 as -2**31 (built once per device: no per-call copy)."""
    return torch.tensor([1 << b for b in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)


def _check_kernel_inputs(q, k, v, packed_mask, prefix_len, n_tree):
    _check_qkv(q, k, v, prefix_len)
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"the CUDA kernel takes float16/bfloat16, got {q.dtype} "
                            "(use tree_attention_reference for float32)")
    elif q.device.type == "cpu" and _interpreting():
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"unsupported dtype {q.dtype}")
    else:
        raise RuntimeError(
            f"tree_attention's Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
            f"tensors), got {q.device}; call tree_attention_reference on the CPU")
    d = q.shape[2]
    if not 16 <= d <= 256:
        raise ValueError(f"head_dim {d} unsupported by the kernel (16..256)")
    n_k = k.shape[0]
    if isinstance(n_tree, bool) or not isinstance(n_tree, int) or n_tree != n_k - prefix_len:
        raise ValueError(f"n_tree ({n_tree}) must equal n_k - prefix_len = {n_k - prefix_len}")
    if n_k == 0:
        raise ValueError("no keys (n_k == 0): every query row would be fully masked")
    if not isinstance(packed_mask, torch.Tensor) or packed_mask.dtype != torch.int32:
        raise TypeError("packed_mask must be an int32 tensor from pack_tree_mask")
    want = (q.shape[0], triton.cdiv(n_tree, 32))
    if tuple(packed_mask.shape) != want:
        raise ValueError(f"packed_mask shape {tuple(packed_mask.shape)} != {want} "
                         "([n_q, ceil(n_tree / 32)])")
    if packed_mask.device != q.device:
        raise ValueError(f"packed_mask is on {packed_mask.device}, q on {q.device}")


def _check_ragged_inputs(q, k, v, packed_mask, segments: "Segments") -> None:
    _check_qkv(q, k, v, 0)
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"the CUDA kernel takes float16/bfloat16, got {q.dtype}")
    elif not (q.device.type == "cpu" and _interpreting()):
        raise RuntimeError(f"tree_attention's Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                           f"tensors), got {q.device}; call tree_attention_ragged_reference on the CPU")
    if not 16 <= q.shape[2] <= 256:
        raise ValueError(f"head_dim {q.shape[2]} unsupported by the kernel (16..256)")
    segments.check(q.shape[0], k.shape[0])
    if not isinstance(packed_mask, torch.Tensor) or packed_mask.dtype != torch.int32 or packed_mask.dim() != 2:
        raise TypeError("packed_mask must be a 2-D int32 tensor from pack_tree_mask")
    if packed_mask.shape[0] != q.shape[0] or packed_mask.shape[1] < triton.cdiv(segments.max_tree, 32):
        raise ValueError(f"packed_mask shape {tuple(packed_mask.shape)} must be [{q.shape[0]}, >= "
                         f"{triton.cdiv(segments.max_tree, 32)}] (rows of every segment, words of the widest tree)")
    if packed_mask.device != q.device:
        raise ValueError(f"packed_mask is on {packed_mask.device}, q on {q.device}")


@functools.lru_cache(maxsize=256)
def _device_table(values: tuple, device: torch.device) -> torch.Tensor:
    """The int32 segment and program table of a launch, on ``device``; built once per distinct
    table (the static-shape draft steps reuse one, which keeps host-to-device copies out of a
    CUDA graph capture)."""
    return torch.tensor(values, dtype=torch.int32).to(device)


class Segments(NamedTuple):
    """A ragged batch of attention problems over one KV cache (one segment per request).

    Segment ``s`` owns ``n_q[s]`` consecutive query rows (in segment order); its keys are the
    cache rows ``[base[s], base[s] + prefix[s] + n_tree[s])``: ``prefix[s]`` committed keys
    seen by every row of the segment, then ``n_tree[s]`` tree keys seen through the row's
    mask bits (bit ``j`` of a row = tree key ``j`` of its own segment). Host ints: the
    launch is planned from them once per forward.
    """

    n_q: tuple
    base: tuple
    prefix: tuple
    n_tree: tuple

    @staticmethod
    def single(n_q: int, prefix_len: int, n_tree: int) -> "Segments":
        return Segments((int(n_q),), (0,), (int(prefix_len),), (int(n_tree),))

    @property
    def total_q(self) -> int:
        return sum(self.n_q)

    @property
    def max_tree(self) -> int:
        return max(self.n_tree, default=0)

    def check(self, n_q_total: int, n_keys: int) -> None:
        """Host checks: the rows add up and every segment's keys lie inside the cache."""
        if not (len(self.n_q) == len(self.base) == len(self.prefix) == len(self.n_tree)) or not self.n_q:
            raise ValueError("Segments: n_q, base, prefix and n_tree must be non-empty and of one length")
        if self.total_q != n_q_total:
            raise ValueError(f"segments hold {self.total_q} query rows but q has {n_q_total}")
        for i, (nq, b, p, t) in enumerate(zip(*self)):
            if min(nq, b, p, t) < 0:
                raise ValueError(f"segment {i}: negative size in n_q={nq}, base={b}, prefix={p}, n_tree={t}")
            if b + p + t > n_keys:
                raise ValueError(f"segment {i}: keys [{b}, {b + p + t}) exceed the {n_keys} cache rows")


class TreeAttentionLaunch:
    """One forward's tree-attention launch, planned once and run for every layer.

    Everything but the q/k/v pointers is the same in every layer of a pass (shapes, mask,
    segments, tile config, split count), so the checks, the choices, the program table and the
    split-K partial buffers happen once here; :meth:`run` is then one output allocation and the
    launches (the whole launcher was ~48 us of Python per layer on a 2-core EPYC, most of a
    small tree pass's time on a launch-bound draft). The partial buffers are shared by the
    layers: each layer's merge reads them before the next layer's kernel, in stream order.

    One request: ``TreeAttentionLaunch(q, k, v, packed_mask, prefix_len, n_tree)`` with k, v
    ``[prefix_len + n_tree, n_kv, D]``. A ragged batch of requests: ``segments=Segments(...)``
    (then ``prefix_len``/``n_tree`` are not given) with k, v the whole cache layer, and
    ``packed_mask`` ``[total n_q, ceil(max n_tree / 32)]`` packed from per-row masks padded with
    False past each segment's tree.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed_mask: torch.Tensor,
                 prefix_len: int | None = None, n_tree: int | None = None, scale: float | None = None, *,
                 segments: Segments | None = None, num_splits: int | None = None, config: TileConfig | None = None,
                 validate: bool = False, prefix_dev: torch.Tensor | None = None):
        """``prefix_dev`` (int32 ``[1]`` on q's device, one segment only): the real prefix
        length, read by the kernel on the device, so the launch does not depend on it (CUDA
        graphs); then ``prefix_len`` is its upper bound (k/v hold ``prefix_len + n_tree`` keys)
        and the tree region starts at the device value. The caller keeps the value <= the bound."""
        if segments is None:
            if prefix_len is None or n_tree is None:
                raise TypeError("TreeAttentionLaunch needs prefix_len and n_tree, or segments=")
            _check_kernel_inputs(q, k, v, packed_mask, prefix_len, n_tree)
            segments = Segments.single(q.shape[0], prefix_len, n_tree)
        else:
            if prefix_len is not None or n_tree is not None or prefix_dev is not None:
                raise TypeError("with segments=, pass no prefix_len, n_tree or prefix_dev")
            _check_ragged_inputs(q, k, v, packed_mask, segments)
        if prefix_dev is not None:
            if (not isinstance(prefix_dev, torch.Tensor) or prefix_dev.dtype != torch.int32
                    or prefix_dev.numel() != 1 or prefix_dev.device != q.device):
                raise ValueError(f"prefix_dev must be an int32 tensor of one element on {q.device}")
            if validate:
                raise ValueError("validate=True needs the prefix length on the host")
        self.prefix_dev = prefix_dev
        if validate:
            for i, (p, t) in enumerate(zip(segments.prefix, segments.n_tree)):
                if p == 0:
                    q0 = sum(segments.n_q[:i])
                    rows = packed_mask[q0:q0 + segments.n_q[i]]
                    if t == 0 or bool((rows == 0).all(dim=1).any()):
                        raise ValueError("prefix_len == 0 and some tree_mask row sees no key")
        n_q, n_heads, d = q.shape
        n_kv = k.shape[1]
        self.q_shape, self.k_shape, self.dtype = q.shape, k.shape, q.dtype
        self.packed_mask, self.segments = packed_mask, segments
        self.n_q, self.n_heads, self.n_kv = n_q, n_heads, n_kv
        self.group = n_heads // n_kv
        self.scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        self.d, self.d_pad = d, triton.next_power_of_2(d)
        max_rows = max(segments.n_q) * self.group
        cfg = config or _choose_config(max_rows, self.d_pad, q.device.type != "cuda")
        if cfg.block_n % 32 or cfg.block_m < 16 or cfg.block_n < 32:
            raise ValueError(f"bad TileConfig {cfg}: block_m >= 16, block_n a multiple of 32")
        self.cfg = cfg
        # The program table: one program per BLOCK_M rows of one segment (plan once, run many).
        prog_seg, prog_block = [], []
        for s_i, nq in enumerate(segments.n_q):
            blocks = triton.cdiv(nq * self.group, cfg.block_m)
            prog_seg += [s_i] * blocks
            prog_block += list(range(blocks))
        self.programs = len(prog_seg)
        n_tiles = max(triton.cdiv(p, cfg.block_n) + triton.cdiv(t, cfg.block_n)
                      for p, t in zip(segments.prefix, segments.n_tree))
        n_tiles = max(n_tiles, 1)
        splits = num_splits if num_splits is not None else _choose_splits(self.programs * n_kv, n_tiles, q.device)
        self.splits = max(1, min(int(splits), n_tiles))
        q_offsets = [0]
        for nq in segments.n_q:
            q_offsets.append(q_offsets[-1] + nq)
        b = len(segments.n_q)
        table = _device_table(tuple(q_offsets + list(segments.base) + list(segments.prefix) + list(segments.n_tree)
                                    + prog_seg + prog_block), q.device)
        o = 0
        self.seg_q, o = table[o:o + b + 1], o + b + 1
        self.seg_base, o = table[o:o + b], o + b
        self.seg_prefix, o = (prefix_dev if prefix_dev is not None else table[o:o + b]), o + b
        self.seg_tree, o = table[o:o + b], o + b
        self.prog_seg, o = table[o:o + self.programs], o + self.programs
        self.prog_block = table[o:o + self.programs]
        if self.splits > 1:
            rows = n_q * n_heads
            self.part_m = torch.empty(self.splits, rows, device=q.device, dtype=torch.float32)
            self.part_l = torch.empty_like(self.part_m)
            self.part_acc = torch.empty(self.splits, rows, self.d_pad, device=q.device, dtype=torch.float32)

    # Kept for callers of the one-request form.
    @property
    def prefix_len(self) -> int:
        return self.segments.prefix[0]

    @property
    def n_tree(self) -> int:
        return self.segments.n_tree[0]

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention for one layer's q ``[n_q, n_heads, D]`` and k, v (the planned shapes)."""
        if q.shape != self.q_shape or k.shape != self.k_shape or v.shape != self.k_shape or q.dtype != self.dtype:
            raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} {q.dtype} differ from "
                             f"the planned q {tuple(self.q_shape)}, k/v {tuple(self.k_shape)} {self.dtype}")
        if out is None:
            out = torch.empty(self.q_shape, dtype=self.dtype, device=q.device)
        elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")
        if self.n_q == 0:
            return out
        cfg, split = self.cfg, self.splits > 1
        pm = self.packed_mask
        part_m, part_l, part_acc = (self.part_m, self.part_l, self.part_acc) if split else (out, out, out)
        _tree_attn_fwd[(self.programs, self.n_kv, self.splits)](
            q, k, v, pm, out, part_m, part_l, part_acc,
            self.seg_q, self.seg_base, self.seg_prefix, self.seg_tree, self.prog_seg, self.prog_block,
            self.n_q, self.n_heads, self.splits, self.scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *pm.stride(),
            GROUP=self.group, HEAD_DIM=self.d, D_PAD=self.d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            SPLIT=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split:
            _tree_attn_merge[(self.n_q * self.n_heads,)](
                part_m, part_l, part_acc, out, self.splits, self.n_q * self.n_heads, self.n_heads, *out.stride(),
                HEAD_DIM=self.d, D_PAD=self.d_pad, S_PAD=max(2, triton.next_power_of_2(self.splits)), num_warps=4,
            )
        return out


def tree_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packed_mask: torch.Tensor,
    prefix_len: int,
    n_tree: int,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: TileConfig | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Tree-masked attention with a mask from :func:`pack_tree_mask`.

    q ``[n_q, n_heads, D]``; k, v ``[prefix_len + n_tree, n_kv_heads, D]`` (any strides);
    packed_mask int32 ``[n_q, ceil(n_tree / 32)]``. Returns ``[n_q, n_heads, D]`` in q's dtype
    (written into ``out`` if given). ``num_splits`` forces the flash-decoding split count
    (None: chosen from the grid size and the SM count); ``config`` overrides the tile table.
    The launcher checks shapes, dtypes and devices on the host only; ``validate=True`` also
    rejects fully masked rows when prefix_len == 0 (a device sync; the hot path instead gets
    that check from ``pack_tree_mask(mask, prefix_len)``). Unvalidated fully masked rows
    come out as zeros. A forward that calls this for every layer should plan once with
    :class:`TreeAttentionLaunch` and ``run`` it per layer (what the runtime does).
    """
    launch = TreeAttentionLaunch(q, k, v, packed_mask, prefix_len, n_tree, scale, num_splits=num_splits,
                                 config=config, validate=validate)
    return launch.run(q, k, v, out)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    prefix_len: int,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Tree-masked attention (Triton): pack the mask, then :func:`tree_attention_packed`.

    q ``[n_q, n_heads, D]``; k, v ``[n_k, n_kv_heads, D]``; tree_mask bool
    ``[n_q, n_k - prefix_len]``. Fully masked rows (possible only when prefix_len == 0) are
    rejected by the packing step, which syncs once; per-layer callers should pack once and
    call :func:`tree_attention_packed`.
    """
    _check_qkv(q, k, v, prefix_len)
    n_tree = k.shape[0] - prefix_len
    _check_tree_mask(tree_mask, q.shape[0], n_tree, q.device)
    packed = pack_tree_mask(tree_mask, prefix_len)
    return tree_attention_packed(q, k, v, packed, prefix_len, n_tree, scale,
                                 out=out, num_splits=num_splits, config=config)


def tree_attention_ragged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    segments: Segments,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Tree-masked attention for a ragged batch of requests in one launch (Triton).

    q ``[sum n_q, n_heads, D]`` (segments' rows in order); k, v the shared cache
    ``[n_rows, n_kv_heads, D]``; tree_mask bool ``[sum n_q, max n_tree]``, row ``i`` of segment
    ``s`` holding its visibility of tree keys ``0 .. n_tree[s] - 1`` of its own segment (columns
    past ``n_tree[s]`` must be False). See :class:`Segments`. Per-layer callers should pack the
    mask once and plan with ``TreeAttentionLaunch(..., segments=...)``.
    """
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool or tree_mask.dim() != 2:
        raise TypeError("tree_mask must be a 2-D bool tensor [sum n_q, max n_tree]")
    launch = TreeAttentionLaunch(q, k, v, pack_tree_mask(tree_mask), scale=scale, segments=segments,
                                 num_splits=num_splits, config=config)
    return launch.run(q, k, v, out)


# ----------------------------------------------------------------------------- reference


def reference_mask(tree_mask: torch.Tensor | None, prefix_len: int, group: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The reference path's mask, built once per forward and reused by every layer.

    Additive (0 / -inf) ``[group * n_q, prefix_len + n_tree]`` with the query heads of a KV
    group folded into the rows (row ``g * n_q + i`` is query ``i``); ``None`` when every query
    sees every key (``tree_mask`` None or all True), which lets SDPA skip masking entirely.
    """
    if tree_mask is None or (tree_mask.device.type == "cpu" and bool(tree_mask.all())):
        return None
    n_q, n_tree = tree_mask.shape
    visible = torch.ones(n_q, prefix_len + n_tree, dtype=torch.bool, device=tree_mask.device)
    visible[:, prefix_len:] = tree_mask
    return _additive(visible, group, dtype)


def reference_mask_device_prefix(tree_mask: torch.Tensor, bound: int, prefix_dev: torch.Tensor,
                                 group: int) -> torch.Tensor:
    """``reference_mask`` when the prefix length is a device value (static-shape passes):
    ``[group * n_q, bound + n_tree]``, key j visible if ``j < prefix`` or
    ``tree_mask[i, j - prefix]``; device ops only, no sync."""
    n_q, n_tree = tree_mask.shape
    rel = torch.arange(bound + n_tree, device=tree_mask.device) - prefix_dev.long()
    in_tree = (rel >= 0) & (rel < n_tree)
    visible = tree_mask[:, rel.clamp(0, max(0, n_tree - 1))] & in_tree if n_tree else in_tree[None].expand(n_q, -1)
    return _additive(visible | (rel < 0)[None, :], group, torch.float32)


def _additive(visible: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """bool ``[n_q, n_k]`` -> additive 0 / -inf mask with the GQA group folded into the rows."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    return mask.repeat(group, 1) if group > 1 else mask


def tree_attention_reference_prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """The reference with a mask from ``reference_mask`` (no validation: the hot CPU path).

    The query heads of a KV group are folded into the query axis (q viewed as
    ``[n_kv, group * n_q, D]``) so K/V are never repeated per query head; SDPA runs once.
    Computes in q's dtype when it is float32 (the CPU runtime), else upcasts to float32.
    """
    n_q, n_heads, d = q.shape
    n_k, n_kv, _ = k.shape
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # [n_q, n_kv, group, D] -> [1, n_kv, group * n_q, D]: row index = g * n_q + i.
    qg = q.float().view(n_q, n_kv, group, d).permute(1, 2, 0, 3).reshape(1, n_kv, group * n_q, d)
    kf = k.float().permute(1, 0, 2).unsqueeze(0)
    vf = v.float().permute(1, 0, 2).unsqueeze(0)
    if mask is not None:
        mask = mask.to(qg.dtype)
    o = torch.nn.functional.scaled_dot_product_attention(qg, kf, vf, attn_mask=mask, scale=scale)
    o = o.view(n_kv, group, n_q, d).permute(2, 0, 1, 3).reshape(n_q, n_heads, d)
    return o.to(q.dtype)


def prefix_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """Attention where every query sees every key: PyTorch SDPA, no mask, in q's dtype.

    This is the one-token decode step (autoregressive decoding, chain drafting): the new
    token sees the whole prefix and itself, so there is nothing to mask. There the tree
    kernel's time is its launch cost (host checks, Triton launch, split-K merge: ~0.12 ms on
    an H100 at n_q=1 against 0.015-0.05 ms for flash SDPA), and flash SDPA is the floor.
    Same layout as :func:`tree_attention_reference_prepared` but no upcast and no copy of
    K/V: the query heads of a KV group are folded into the query axis (q viewed as
    ``[1, n_kv, group * n_q, D]``) and K/V go in as permuted views of the cache slice, so
    they are neither repeated per query head nor made contiguous. No validation (hot path).

    q ``[n_q, n_heads, D]``; k, v ``[n_k, n_kv_heads, D]`` (unit stride on D, e.g. a slice
    of a ``[max_len, n_kv_heads, D]`` cache). Returns a new ``[n_q, n_heads, D]`` tensor.
    """
    n_q, n_heads, d = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    # Row index of the folded query axis = g * n_q + i (a view when n_q == 1).
    qg = q.reshape(n_q, n_kv, group, d).permute(1, 2, 0, 3).reshape(1, n_kv, group * n_q, d)
    o = torch.nn.functional.scaled_dot_product_attention(
        qg, k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0), scale=scale)
    return o.view(n_kv, group, n_q, d).permute(2, 0, 1, 3).reshape(n_q, n_heads, d)


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    prefix_len: int,
    scale: float | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """PyTorch tree attention in float32 (the oracle of the kernel tests); same contract.

    ``reference_mask`` + ``tree_attention_reference_prepared``, with the inputs checked.
    ``validate`` rejects fully masked rows when prefix_len == 0 (a sync on CUDA).
    """
    _check_qkv(q, k, v, prefix_len)
    n_q, n_heads, _ = q.shape
    n_k, n_kv, _ = k.shape
    _check_tree_mask(tree_mask, n_q, n_k - prefix_len, q.device)
    if validate and prefix_len == 0:
        _check_rows_visible(tree_mask)
    mask = reference_mask(tree_mask, prefix_len, n_heads // n_kv) if n_k - prefix_len > 0 else None
    return tree_attention_reference_prepared(q, k, v, mask, scale)


def ragged_reference_masks(tree_mask: torch.Tensor, segments: Segments, group: int) -> list:
    """Per segment, the reference path's additive mask (``reference_mask``; None where the
    segment's rows see all their keys), built once per forward; ``tree_mask`` as for
    :func:`tree_attention_ragged`."""
    masks, q0 = [], 0
    for nq, p, t in zip(segments.n_q, segments.prefix, segments.n_tree):
        masks.append(reference_mask(tree_mask[q0:q0 + nq, :t], p, group) if t else None)
        q0 += nq
    return masks


def tree_attention_ragged_reference_prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: list,
                                             segments: Segments, scale: float | None = None) -> torch.Tensor:
    """The ragged reference with masks from :func:`ragged_reference_masks`: one SDPA per
    segment over its own slice of the cache (the CPU runtime's path)."""
    if len(segments.n_q) == 1 and segments.base[0] == 0:
        n = segments.prefix[0] + segments.n_tree[0]
        return tree_attention_reference_prepared(q, k[:n], v[:n], masks[0], scale)
    out, q0 = [], 0
    for nq, b, p, t, mask in zip(*segments, masks):
        out.append(tree_attention_reference_prepared(q[q0:q0 + nq], k[b:b + p + t], v[b:b + p + t], mask, scale))
        q0 += nq
    return torch.cat(out, 0)


def tree_attention_ragged_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor,
                                    segments: Segments, scale: float | None = None) -> torch.Tensor:
    """PyTorch oracle of :func:`tree_attention_ragged`: each segment through
    :func:`tree_attention_reference` on its own slice of the cache. Same contract."""
    _check_qkv(q, k, v, 0)
    segments.check(q.shape[0], k.shape[0])
    if tree_mask.shape[0] != q.shape[0] or tree_mask.shape[1] < segments.max_tree:
        raise ValueError(f"tree_mask shape {tuple(tree_mask.shape)} must be [{q.shape[0]}, >= {segments.max_tree}]")
    out, q0 = [], 0
    for nq, b, p, t in zip(*segments):
        out.append(tree_attention_reference(q[q0:q0 + nq], k[b:b + p + t], v[b:b + p + t], tree_mask[q0:q0 + nq, :t],
                                            p, scale))
        q0 += nq
    return torch.cat(out, 0)
