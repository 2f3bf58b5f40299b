"""``int4_matmul_cpu``: ``x @ W.T`` for an ``Int4Weight`` on the CPU.

Uses ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (bf16 activations, its only vectorised
variant), or the dequantising reference for shapes that op rejects.
"""
from __future__ import annotations

from typing import Optional

import torch

from .int4_weight import Int4Weight, check_matmul_inputs, int4_matmul_reference

# On CPU, convert activations to this dtype for the aten int4 op: its bf16 kernel is
# vectorised, its fp32/fp16 kernels are ~30-100x slower (measured, torch 2.13, AVX-512).
CPU_COMPUTE_DTYPE = torch.bfloat16


def _cpu_op_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(
        ops, "_convert_weight_to_int4pack_for_cpu")


def _cpu_pack(w: Int4Weight, dtype: torch.dtype):
    """Lazily convert ``w`` for aten's CPU int4 op; cached on the instance (not a field)."""
    cache = w.__dict__.setdefault("_cpu_cache", {})
    if "packed" not in cache:
        cache["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            w.unpack().to(torch.int32).contiguous(), 1)
    if dtype not in cache:
        # aten's convention: W = (q - 8) * scale + zero  =>  zero = min + 8 * scale.
        s = w.scales.float()
        zero = w.mins.float() + 8 * s
        cache[dtype] = torch.stack([s, zero], -1).contiguous().to(dtype)  # [K/G, N, 2]
    return cache["packed"], cache[dtype]


def _cpu_op_supports(w: Int4Weight) -> bool:
    return (_cpu_op_available() and w.group_size in (32, 64, 128, 256)
            and w.out_features % 16 == 0)


def int4_matmul_cpu(x: torch.Tensor, w: Int4Weight,
                    compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """CPU ``x @ W.T`` ``[..., N]`` in x's dtype.

    Uses ``aten._weight_int4pack_mm_for_cpu`` with activations, scales and zeros in
    ``compute_dtype`` (default ``CPU_COMPUTE_DTYPE`` = bf16: the only vectorised variant;
    results carry bf16 rounding, ~2**-8 relative, far below the 4-bit error). Pass
    ``torch.float32`` for fp32-exact results at ~30x the cost. Shapes the op rejects
    (N % 16 != 0, group size not in 32/64/128/256) dequantise per call.
    """
    check_matmul_inputs(x, w)
    if x.device.type != "cpu":
        raise ValueError("int4_matmul_cpu: tensors must be on the CPU")
    cdt = compute_dtype or CPU_COMPUTE_DTYPE
    lead = x.shape[:-1]
    if not _cpu_op_supports(w) or x.numel() == 0:
        return int4_matmul_reference(x, w)  # natural K order: dequantize() undoes perm
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    x2 = x.reshape(-1, w.in_features)
    packed, sz = _cpu_pack(w, cdt)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2.to(cdt).contiguous(), packed, w.group_size, sz)
    return y.to(x.dtype).reshape(*lead, w.out_features)
