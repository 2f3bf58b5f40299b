"""The KV cache's storage formats, as every attention path writes and reads them.

A cache layer holds K and V ``[slots, n_kv_heads, head_dim]`` in one of ``KV_DTYPES``:

- ``float32``: the computation's own values;
- ``float16`` / ``bfloat16``: rounded to nearest (even), as ``Tensor.to`` rounds;
- ``int8``: each (token, head) row of ``head_dim`` values quantized symmetrically with its own
  float32 scale ``amax / 127`` (``[slots, n_kv_heads]`` beside the data): ``q = round(x / scale)``
  computed as ``round(x * (1 / scale))``, half to even, dequantized as ``q * scale``. A row with a
  non-finite value stores zeros and a NaN scale, so what reads it sees NaN, never a silently
  finite number.

Every path (the native CPU call, the Triton kernel, the PyTorch references) writes the same bits
(``encode``) and reads the same values (``decode``); only the attention arithmetic around them
differs by path. ``KVView`` is one layer's cache as the attention backends receive it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
# The native CPU library's codes for them (csrc/attn_cpu.h SXC_KV_*).
NATIVE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
INT8_MAX = 127


def kv_dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in KV_DTYPES.items() if d is dtype)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., D]`` -> int8 ``[..., D]`` and float32 scales ``[...]`` (see the module docstring;
    the native library's ``kv_store_int8`` computes the same bits)."""
    x = x.float()
    finite = torch.isfinite(x).all(-1)
    scale = x.abs().amax(-1) / INT8_MAX
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    inv = torch.where(finite & (scale != 0), 1.0 / scale, torch.zeros_like(scale))
    q = (x * inv[..., None]).round().clamp_(-INT8_MAX, INT8_MAX)
    q = torch.where(finite[..., None], q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def encode(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Values ``[..., D]`` in the storage ``dtype``: (data, scales or None)."""
    if dtype is torch.int8:
        return quantize_int8(x)
    return (x if x.dtype is dtype else x.to(dtype)), None   # no op at all in the model's own dtype


def decode(data: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Stored ``data`` ``[..., D]`` (with ``scale`` ``[...]`` for int8) as ``dtype`` values."""
    if data.dtype is torch.int8:
        return (data.float() * scale[..., None]).to(dtype)
    return data if data.dtype is dtype else data.to(dtype)


class KVView(NamedTuple):
    """One layer's K and V as an attention backend reads them: ``k``, ``v`` ``[slots, H_kv, D]`` in
    the storage dtype (any row stride, unit stride on D), and for int8 their float32 scales
    ``k_scale``, ``v_scale`` ``[slots, H_kv]`` (None otherwise)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def first(self, n: int) -> "KVView":
        """The first ``n`` slots (views)."""
        return KVView(self.k[:n], self.v[:n], None if self.k_scale is None else self.k_scale[:n],
                      None if self.v_scale is None else self.v_scale[:n])

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``[n, H_kv, D]`` (compute dtype) at ``slots`` (int64 ``[n]``)."""
        kd, ks = encode(k, self.k.dtype)
        vd, vs = encode(v, self.v.dtype)
        self.k.index_copy_(0, slots, kd)
        self.v.index_copy_(0, slots, vd)
        if ks is not None:
            self.k_scale.index_copy_(0, slots, ks)
            self.v_scale.index_copy_(0, slots, vs)

    def values(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as ``dtype`` values (the stored tensors themselves when no conversion is needed)."""
        return decode(self.k, self.k_scale, dtype), decode(self.v, self.v_scale, dtype)
