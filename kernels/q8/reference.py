"""PyTorch references of the Q8_0 matmul: the dequantized weight through ``F.linear`` (the
fallback path too) and the native kernel's ``int8_activations`` arithmetic."""
from __future__ import annotations

from typing import Optional

import torch

from ..int4.reference import quantize_activations_q8
from .weight import BLOCK, Q8Weight


def dequantized(w: Q8Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight, cached per dtype on the instance."""
    cache = w.__dict__.setdefault("_dense_cache", {})
    if dtype not in cache:
        cache[dtype] = w.dequantize(dtype)
    return cache[dtype]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def q8_linear_reference(x: torch.Tensor, w: Q8Weight, residual: Optional[torch.Tensor] = None,
                        norm: Optional[tuple] = None) -> torch.Tensor:
    """``residual + f(x) @ W.T`` with the dequantized weight in x's dtype; ``f`` is HF Llama's
    RMSNorm with ``norm = (weight, eps)``, else the identity. Float activations whatever
    ``w.int8_activations`` says (the fallback path)."""
    if norm is not None:
        x = rms_norm(x, norm[0], norm[1])
    y = torch.nn.functional.linear(x, dequantized(w, x.dtype).to(x.device))
    return y if residual is None else residual + y


def q8_linear_q8_reference(x: torch.Tensor, w: Q8Weight, residual: Optional[torch.Tensor] = None,
                           norm: Optional[tuple] = None) -> torch.Tensor:
    """The native kernel's ``int8_activations`` arithmetic in PyTorch (float32, ``[M, N]`` for
    ``x`` ``[M, K]``): activations quantized per 32-block as ``int4.reference.quantize_activations_q8``
    (bit-exact), exact integer block dots, then ``sum_b isum_b * (scale_b * d_x_b)`` up to
    float32 rounding order."""
    if norm is not None:
        x = rms_norm(x.float(), norm[0].float(), norm[1])
    m, (n, k) = x.shape[0], w.shape
    xq, d, _ = quantize_activations_q8(x.float(), _Blocks32())
    nb = k // BLOCK
    isum = torch.einsum("mbi,nbi->mbn", xq.float().view(m, nb, BLOCK), w.qweight.float().view(n, nb, BLOCK))
    y = (isum * (w.scales.float().T[None] * d[:, :, None])).sum(1)  # [M, N]
    return y if residual is None else y + residual


class _Blocks32:
    """What ``quantize_activations_q8`` reads from a weight: natural K order, 32-wide groups."""

    perm = None
    group_size = BLOCK
