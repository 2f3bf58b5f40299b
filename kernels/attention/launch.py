"""Tree-masked attention on the GPU: plan the Triton launch once per forward, run it per layer.

The keys are a committed prefix (seen by every query, no mask) followed by ``n_tree`` tree
entries whose visibility is given per query by a boolean tree mask, bit-packed into int32
words once per forward (:func:`pack_tree_mask`) and read only by the tree tiles. The kernels
(``triton_kernels``) skip tree tiles no row of a block can see and, for short query sets, split
the key range across programs (flash-decoding) and merge by log-sum-exp.

:class:`TreeAttentionLaunch` is the plan (checks, tile config, split count, the program table,
the split-K buffers: once per forward) and ``run`` (per layer); ``tree_attention``,
``tree_attention_packed`` and ``tree_attention_ragged`` plan and run once. The references are
in ``reference``.

Shapes: ``q [n_q, n_heads, D]``; ``k, v [n_k, n_kv_heads, D]`` (any strides, e.g. slices of a
``[max_len, n_kv_heads, D]`` cache) in q's dtype or a KV storage dtype (``kv.py``: float16,
bfloat16, float32, or int8 with ``k_scale``/``v_scale`` ``[n_k, n_kv_heads]``); ``tree_mask`` bool
``[n_q, n_k - prefix_len]``.

The runtime sends one-token decode steps, whose mask is empty, to ``prefix_attention_sdpa``
(flash SDPA) instead: at n_q = 1 this kernel's launch cost exceeds flash SDPA's whole time.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton

from .. import device_info
from . import triton_kernels
from .inputs import Segments, check_qkv, check_rows_visible, check_tree_mask


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
    sms = device_info.sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), n_tiles // 2, 128))


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
        check_rows_visible(tree_mask)
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


def _check_kernel_inputs(q, k, v, packed_mask, prefix_len, n_tree, k_scale=None, v_scale=None):
    check_qkv(q, k, v, prefix_len, k_scale, v_scale)
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"the CUDA kernel takes float16/bfloat16, got {q.dtype} "
                            "(use tree_attention_reference for float32)")
    elif q.device.type == "cpu" and device_info.interpreting():
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


def _check_ragged_inputs(q, k, v, packed_mask, segments: "Segments", k_scale=None, v_scale=None) -> None:
    check_qkv(q, k, v, 0, k_scale, v_scale)
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"the CUDA kernel takes float16/bfloat16, got {q.dtype}")
    elif not (q.device.type == "cpu" and device_info.interpreting()):
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
                 validate: bool = False, prefix_dev: torch.Tensor | None = None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None):
        """``prefix_dev`` (int32 ``[1]`` on q's device, one segment only): the real prefix
        length, read by the kernel on the device, so the launch does not depend on it (CUDA
        graphs); then ``prefix_len`` is its upper bound (k/v hold ``prefix_len + n_tree`` keys)
        and the tree region starts at the device value. The caller keeps the value <= the bound.
        K/V may be in any KV storage dtype (``kv.py``), int8 with ``k_scale``/``v_scale``
        ``[n_k, n_kv_heads]`` (float32); the kernel converts them to q's dtype tile by tile."""
        if segments is None:
            if prefix_len is None or n_tree is None:
                raise TypeError("TreeAttentionLaunch needs prefix_len and n_tree, or segments=")
            _check_kernel_inputs(q, k, v, packed_mask, prefix_len, n_tree, k_scale, v_scale)
            segments = Segments.single(q.shape[0], prefix_len, n_tree)
        else:
            if prefix_len is not None or n_tree is not None or prefix_dev is not None:
                raise TypeError("with segments=, pass no prefix_len, n_tree or prefix_dev")
            _check_ragged_inputs(q, k, v, packed_mask, segments, k_scale, v_scale)
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
        self.q_shape, self.k_shape, self.dtype, self.kv_dtype = q.shape, k.shape, q.dtype, k.dtype
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
            out: torch.Tensor | None = None, *, k_scale: torch.Tensor | None = None,
            v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Attention for one layer's q ``[n_q, n_heads, D]`` and k, v (the planned shapes and
        dtypes; int8 k/v with this layer's ``k_scale``/``v_scale``)."""
        if q.shape != self.q_shape or k.shape != self.k_shape or v.shape != self.k_shape or q.dtype != self.dtype \
                or k.dtype != self.kv_dtype or v.dtype != self.kv_dtype:
            raise ValueError(f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, v {tuple(v.shape)} {k.dtype} differ "
                             f"from the planned q {tuple(self.q_shape)} {self.dtype}, k/v {tuple(self.k_shape)} "
                             f"{self.kv_dtype}")
        scaled = k.dtype is torch.int8
        if scaled and (k_scale is None or v_scale is None):
            raise ValueError("an int8 k/v needs this layer's k_scale and v_scale")
        if out is None:
            out = torch.empty(self.q_shape, dtype=self.dtype, device=q.device)
        elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")
        if self.n_q == 0:
            return out
        cfg, split = self.cfg, self.splits > 1
        pm = self.packed_mask
        part_m, part_l, part_acc = (self.part_m, self.part_l, self.part_acc) if split else (out, out, out)
        # Without scales the kernel never reads KS/VS (SCALED is a constexpr): k stands in.
        ks, vs = (k_scale, v_scale) if scaled else (k, v)
        ks_strides = (k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1)) if scaled \
            else (0, 0, 0, 0)
        triton_kernels._tree_attn_fwd[(self.programs, self.n_kv, self.splits)](
            q, k, v, ks, vs, pm, out, part_m, part_l, part_acc,
            self.seg_q, self.seg_base, self.seg_prefix, self.seg_tree, self.prog_seg, self.prog_block,
            self.n_q, self.n_heads, self.splits, self.scale * triton_kernels.LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *ks_strides, *out.stride(), *pm.stride(),
            GROUP=self.group, HEAD_DIM=self.d, D_PAD=self.d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            SPLIT=split, SCALED=scaled, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split:
            triton_kernels._tree_attn_merge[(self.n_q * self.n_heads,)](
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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
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
                                 config=config, validate=validate, k_scale=k_scale, v_scale=v_scale)
    return launch.run(q, k, v, out, k_scale=k_scale, v_scale=v_scale)


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tree-masked attention (Triton): pack the mask, then :func:`tree_attention_packed`.

    q ``[n_q, n_heads, D]``; k, v ``[n_k, n_kv_heads, D]``; tree_mask bool
    ``[n_q, n_k - prefix_len]``. Fully masked rows (possible only when prefix_len == 0) are
    rejected by the packing step, which syncs once; per-layer callers should pack once and
    call :func:`tree_attention_packed`.
    """
    check_qkv(q, k, v, prefix_len, k_scale, v_scale)
    n_tree = k.shape[0] - prefix_len
    check_tree_mask(tree_mask, q.shape[0], n_tree, q.device)
    packed = pack_tree_mask(tree_mask, prefix_len)
    return tree_attention_packed(q, k, v, packed, prefix_len, n_tree, scale, out=out, num_splits=num_splits,
                                 config=config, k_scale=k_scale, v_scale=v_scale)


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
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
                                 num_splits=num_splits, config=config, k_scale=k_scale, v_scale=v_scale)
    return launch.run(q, k, v, out, k_scale=k_scale, v_scale=v_scale)
