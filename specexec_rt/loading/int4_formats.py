"""Converters from 4-bit checkpoint formats to ``Int4Weight`` (no fp16 weight materialised).

- GPTQ (AutoGPTQ / optimum / GPTQModel, "gptq" v1 and "gptq_v2" checkpoint formats),
  including act-order (``desc_act``) ``g_idx`` via a K permutation applied to activations.
- AWQ (AutoAWQ "gemm" checkpoints): nibbles packed along N in the order 0,2,4,6,1,3,5,7,
  ``w = (q - z) * s``.
- GGUF Q4_0 and Q4_1 raw blocks: their nibble order is ``Int4Weight``'s, so the nibble
  bytes are copied as-is and only d (and m) become scales/mins.
- GGUF Q4_K (the 4-bit tensors of llama.cpp's Q4_K_S/Q4_K_M files): 256-weight super-blocks of
  eight 32-weight sub-blocks with 6-bit scales and mins, ``w = d*sc*q - dmin*m``; that is
  group 32 asymmetric, so it converts exactly (nibbles reordered to ``Int4Weight``'s layout).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
import torch

from ..kernels.int4.weight import Int4Weight, pack_nibbles

__all__ = ["from_gptq", "from_awq", "from_gguf_q4_0", "from_gguf_q4_1", "from_gguf_q4_k"]

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble j of an int32 at bits 4j


def _unpack_int32_nibbles(words: torch.Tensor, dim: int) -> torch.Tensor:
    """Split each int32 into its 8 nibbles (nibble j at bits 4j) along ``dim``: uint8."""
    shifts = _SHIFTS.to(words.device)
    if dim == 0:  # [R, C] -> [8R, C], word i holds rows 8i..8i+7
        q = (words[:, None, :] >> shifts[None, :, None]) & 0xF
        return q.reshape(words.shape[0] * 8, words.shape[1]).to(torch.uint8)
    q = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [R, C] -> [R, 8C]
    return q.reshape(words.shape[0], words.shape[1] * 8).to(torch.uint8)


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor] = None,
    sym: Optional[bool] = None,
    checkpoint_format: str = "gptq",
    bits: int = 4,
    scale_dtype: torch.dtype = torch.float16,
) -> Tuple[Int4Weight, Optional[torch.Tensor]]:
    """GPTQ tensors -> ``(Int4Weight [N, K], perm)``.

    qweight int32 ``[K/8, N]`` (8 nibbles along K), qzeros int32 ``[K/G, N/8]`` (8 zero
    points along N), scales ``[K/G, N]``, g_idx int32 ``[K]`` or None. ``"gptq"`` (v1)
    stores zero - 1, ``"gptq_v2"`` the zero itself. ``w[k, n] = s[g, n] * (q[k, n] - z[g, n])``.

    ``perm`` is None when groups are contiguous (``g_idx[k] == k // G``); otherwise an int64
    ``[K]`` permutation (rows sorted by g_idx) such that ``x[..., perm] @ W.T`` equals the
    original ``x @ W_gptq``: the caller permutes activations (or the previous layer's rows).
    ``sym=True`` checks that every zero is 8, which catches a v1/v2 mix-up.
    ``mins = -z * s`` is rounded to ``scale_dtype`` (fp16: error <= 2**-11 * |z * s|, under
    1% of a step; pass torch.float32 for an exact copy at 2x the scale bytes).
    The layer's bias, if any, is unchanged by this conversion: the caller keeps it as is.
    """
    if bits != 4:
        raise ValueError(f"from_gptq: only 4-bit GPTQ is supported, got bits={bits}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"from_gptq: checkpoint_format must be 'gptq' or 'gptq_v2', "
                         f"got {checkpoint_format!r}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise TypeError(f"from_gptq: {name} must be a 2-D int32 tensor, got "
                            f"{t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2 or not scales.is_floating_point():
        raise TypeError(f"from_gptq: scales must be a 2-D float tensor, got {scales.dtype}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    n_groups = scales.shape[0]
    if scales.shape[1] != n or k % n_groups:
        raise ValueError(f"from_gptq: scales {tuple(scales.shape)} do not fit qweight "
                         f"{tuple(qweight.shape)} (K={k}, N={n})")
    if tuple(qzeros.shape) != (n_groups, (n + 7) // 8):
        raise ValueError(f"from_gptq: qzeros {tuple(qzeros.shape)} != ({n_groups}, {(n + 7) // 8})")
    group = k // n_groups

    q = _unpack_int32_nibbles(qweight, dim=0)  # [K, N]
    z = _unpack_int32_nibbles(qzeros, dim=1)[:, :n].to(torch.float32)  # [K/G, N]
    if checkpoint_format == "gptq":
        z = z + 1
    if sym and not bool((z == 8).all()):
        raise ValueError("from_gptq: sym=True but zero points are not all 8: wrong "
                         "checkpoint_format (v1 stores 7, v2 stores 8)?")

    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64).reshape(-1)
        if g_idx.numel() != k:
            raise ValueError(f"from_gptq: g_idx has {g_idx.numel()} entries, expected K={k}")
        trivial = torch.arange(k, device=g_idx.device) // group
        if not torch.equal(g_idx, trivial):
            counts = torch.bincount(g_idx, minlength=n_groups)
            if g_idx.min() < 0 or counts.numel() != n_groups or not bool((counts == group).all()):
                raise ValueError("from_gptq: g_idx must assign exactly group_size rows to each group")
            perm = torch.sort(g_idx, stable=True).indices
            q = q[perm]

    s = scales.to(torch.float32)
    mins = -z * s
    w = Int4Weight(
        qweight=pack_nibbles(q.T.contiguous()),
        scales=s.to(scale_dtype).contiguous(),
        mins=mins.to(scale_dtype).contiguous(),
        out_features=n,
        in_features=k,
        group_size=group,
    )
    return w, perm


# AutoAWQ's GEMM packing: nibble i of a word holds column 8c + _AWQ_ORDER[i] of its 8.
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNDO = tuple(_AWQ_ORDER.index(t) for t in range(8))    # column t sits at nibble _AWQ_UNDO[t]


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` packed along the columns in AWQ order -> uint8 ``[R, 8C]`` natural order."""
    nib = _unpack_int32_nibbles(words, dim=1).view(words.shape[0], words.shape[1], 8)
    return nib[..., list(_AWQ_UNDO)].reshape(words.shape[0], words.shape[1] * 8)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32) -> Int4Weight:
    """AutoAWQ GEMM tensors -> ``Int4Weight [N, K]``.

    qweight int32 ``[K, N/8]`` and qzeros int32 ``[K/G, N/8]``, both packed along N in AWQ's
    nibble order; scales ``[K/G, N]``; ``w[k, n] = (q[k, n] - z[g, n]) * s[g, n]``.
    ``mins = -z * s`` is exact in fp32 (the default); fp16 rounds it like ``from_gptq``.
    """
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise TypeError(f"from_awq: {name} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2 or not scales.is_floating_point():
        raise TypeError(f"from_awq: scales must be a 2-D float tensor, got {scales.dtype}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    n_groups = scales.shape[0]
    if scales.shape[1] != n or n_groups == 0 or k % n_groups:
        raise ValueError(f"from_awq: scales {tuple(scales.shape)} do not fit qweight {tuple(qweight.shape)} "
                         f"(K={k}, N={n})")
    if tuple(qzeros.shape) != (n_groups, n // 8):
        raise ValueError(f"from_awq: qzeros {tuple(qzeros.shape)} != ({n_groups}, {n // 8})")
    q = _unpack_awq(qweight)                                       # [K, N]
    z = _unpack_awq(qzeros).to(torch.float32)                      # [K/G, N]
    s = scales.to(torch.float32)
    return Int4Weight(
        qweight=pack_nibbles(q.T.contiguous()),
        scales=s.to(scale_dtype).contiguous(),
        mins=(-z * s).to(scale_dtype).contiguous(),
        out_features=n, in_features=k, group_size=k // n_groups,
    )


def _gguf_blocks(raw, shape, block_bytes: int, name: str, block: int = 32) -> Tuple[torch.Tensor, int, int]:
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2):
        raise ValueError(f"{name}: shape must be (out_features, in_features), got {shape!r}")
    n, k = int(shape[0]), int(shape[1])
    if k % block:
        raise ValueError(f"{name}: in_features ({k}) must be a multiple of {block}")
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # a read-only memmap of the file: only read, then copied
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(raw))
    else:
        t = raw
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise TypeError(f"{name}: raw blocks must be a uint8 numpy array or tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    expected = n * (k // block) * block_bytes
    if t.numel() != expected:
        raise ValueError(f"{name}: {t.numel()} bytes for shape {(n, k)}, expected {expected}")
    return t.reshape(n, k // block, block_bytes), n, k


def _fp16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start:start + 2].contiguous().view(torch.float16).squeeze(-1)


def from_gguf_q4_0(raw_blocks, shape) -> Int4Weight:
    """GGUF Q4_0 (18-byte blocks: fp16 d, 16 nibble bytes; ``w = d * (q - 8)``)."""
    blocks, n, k = _gguf_blocks(raw_blocks, shape, 18, "from_gguf_q4_0")
    d = _fp16_field(blocks, 0)
    if not torch.isfinite(d * -8).all():  # |d| > 8188 overflows -8d in fp16: keep fp32
        d = d.float()
    return Int4Weight(
        qweight=blocks[..., 2:18].reshape(n, k // 2).contiguous(),
        scales=d.T.contiguous(),
        mins=(d * -8).T.contiguous(),  # exact: power-of-two multiple
        out_features=n, in_features=k, group_size=32,
    )


def from_gguf_q4_1(raw_blocks, shape) -> Int4Weight:
    """GGUF Q4_1 (20-byte blocks: fp16 d, fp16 m, 16 nibble bytes; ``w = d * q + m``)."""
    blocks, n, k = _gguf_blocks(raw_blocks, shape, 20, "from_gguf_q4_1")
    return Int4Weight(
        qweight=blocks[..., 4:20].reshape(n, k // 2).contiguous(),
        scales=_fp16_field(blocks, 0).T.contiguous(),
        mins=_fp16_field(blocks, 2).T.contiguous(),
        out_features=n, in_features=k, group_size=32,
    )


def _compact(t: torch.Tensor) -> torch.Tensor:
    """fp16 when every value survives the round trip (half the scale bytes to stream), else fp32."""
    h = t.to(torch.float16)
    return h if torch.equal(h.float(), t) else t


def from_gguf_q4_k(raw_blocks, shape) -> Int4Weight:
    """GGUF Q4_K (144-byte super-blocks of 256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit
    sub-block scales and mins, 128 nibble bytes). Sub-block j (32 weights) has
    ``w = (d * sc[j]) * q - (dmin * m[j])``: group 32, exact in fp32 (fp16 when exact there).

    Within each 64-weight chunk the 32 bytes hold sub-block 2c in their low nibbles and 2c+1
    in their high nibbles; ``Int4Weight`` wants elements 0-15 / 16-31 of each 32, so the
    nibbles are unpacked to natural order and repacked (1 byte per weight, transiently).
    """
    blocks, n, k = _gguf_blocks(raw_blocks, shape, 144, "from_gguf_q4_k", block=256)
    nb = k // 256
    d = _fp16_field(blocks, 0).float()                            # [n, nb]
    dmin = _fp16_field(blocks, 2).float()
    sc_bytes = blocks[..., 4:16].long().reshape(n, nb, 3, 4)
    lo6, hi6, mix = sc_bytes[..., 0, :], sc_bytes[..., 1, :], sc_bytes[..., 2, :]
    # llama.cpp's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and
    # 4-7 (mins); sub-blocks 4-7 take 4 bits from bytes 8-11 and their top 2 from bytes 0-7.
    sc = torch.cat([lo6 & 63, (mix & 0xF) | ((lo6 >> 6) << 4)], dim=-1)     # [n, nb, 8]
    mn = torch.cat([hi6 & 63, (mix >> 4) | ((hi6 >> 6) << 4)], dim=-1)
    scales = (d[..., None] * sc.float()).reshape(n, nb * 8)
    mins = -(dmin[..., None] * mn.float()).reshape(n, nb * 8)
    qs = blocks[..., 16:144].reshape(n, nb, 4, 32)                # 4 chunks of 64 weights
    q = torch.stack([qs & 0xF, qs >> 4], dim=3).reshape(n, k)     # natural order
    if not (torch.isfinite(scales).all() and torch.isfinite(mins).all()):
        raise ValueError("from_gguf_q4_k: non-finite super-block scales")
    scales, mins = _compact(scales), _compact(mins)
    if scales.dtype != mins.dtype:
        scales, mins = scales.float(), mins.float()
    return Int4Weight(
        qweight=pack_nibbles(q),
        scales=scales.T.contiguous(),
        mins=mins.T.contiguous(),
        out_features=n, in_features=k, group_size=32,
    )
