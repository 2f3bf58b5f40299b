"""The input checks every fused native CPU linear makes (``f32_linear_native``,
``q8_linear_native``, ``int4_linear_native``): one place, so the three ops refuse the same
inputs with the same messages, each naming its op."""
from __future__ import annotations

from typing import Optional

import torch


def check_linear_inputs(op: str, x: torch.Tensor, width: int, n: int, k: int,
                        residual: Optional[torch.Tensor], norm: Optional[tuple]) -> None:
    """``x`` CPU float32 ``[M, width]``; ``residual`` float32 ``[M, n]`` or None; ``norm`` None or
    ``(weight float32 [k], eps)``. Raises ValueError naming ``op`` and the argument."""
    if x.dim() != 2 or x.shape[1] != width or x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"{op}: x must be a CPU float32 [M, {width}] tensor, got {x.dtype} "
                         f"{list(x.shape)} on {x.device}")
    m = x.shape[0]
    if residual is not None and (tuple(residual.shape) != (m, n) or residual.dtype != torch.float32):
        raise ValueError(f"{op}: residual must be float32 [{m}, {n}], got {residual.dtype} "
                         f"{list(residual.shape)}")
    if norm is not None and (tuple(norm[0].shape) != (k,) or norm[0].dtype != torch.float32):
        raise ValueError(f"{op}: norm weight must be float32 [{k}], got {norm[0].dtype} "
                         f"{list(norm[0].shape)}")
