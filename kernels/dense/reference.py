"""PyTorch reference of the native float32 few-row matmul (``cpu.f32_linear_native``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def f32_linear_reference(x: torch.Tensor, w: torch.Tensor, residual: Optional[torch.Tensor] = None,
                         norm: Optional[tuple] = None, swiglu: bool = False) -> torch.Tensor:
    """``f32_linear_native`` in PyTorch ops."""
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm is not None:
        nw, eps = norm
        x = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    y = F.linear(x, w)
    return y if residual is None else y + residual
