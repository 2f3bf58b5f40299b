"""``f32_linear_native``: a float32 weight times a few rows on the CPU (``sxc_f32_linear`` in
``csrc/f32_cpu.h``), with the layer ops around it fused (the reference: ``reference``).

A float32 decode step reads every weight once, so its matmuls are bound by memory; the kernel
streams the weight rows in order with software prefetch, and runs RMSNorm, SiLU * up and the
residual add inside the same call (each is otherwise an eager PyTorch op, several microseconds
apiece). ``model/ops.py`` sends CPU float32 passes of up to ``MAX_ROWS`` rows here when the
native library is loaded; larger ones go to BLAS, which wins once the weights are reused across
rows. See docs/DESIGN.md ("CPU float32 path") for the measurements.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .. import cpu_native
from ..linear_checks import check_linear_inputs

# Rows up to which ops.py takes the native kernel (above: the transposed BLAS GEMM, which reuses
# each weight across rows better past ~24 on a 2-core EPYC, see docs/DESIGN.md; 24 covers the
# 17-row verification of a budget-16 tree).
MAX_ROWS = 24

cpu_native.declare({
    "sxc_f32_linear": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
                                      ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int]),
})


def serves(x: torch.Tensor, w: torch.Tensor, width: int) -> bool:
    """Whether the native kernel takes ``x`` (``[M, width]``) times the dense ``w``: CPU float32,
    contiguous, at most ``MAX_ROWS`` rows, K a multiple of 16, the library loaded. Cheapest
    checks first (this runs ~120 times per decode step)."""
    return (x.is_cpu and x.dtype is torch.float32 and x.dim() == 2 and x.shape[0] <= MAX_ROWS
            and w.dtype is torch.float32 and w.is_cpu and w.dim() == 2 and x.shape[1] == width
            and w.shape[1] % 16 == 0 and x.is_contiguous() and w.is_contiguous()
            and cpu_native.library() is not None)


def run_f32_native(x: torch.Tensor, w: torch.Tensor, residual: Optional[torch.Tensor] = None,
                   norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0, swiglu: bool = False,
                   isa_level: Optional[int] = None, threads: Optional[int] = None) -> torch.Tensor:
    """The native call without checks (``serves`` has checked): ``residual`` float32 ``[M, N]``
    and ``norm_weight`` float32 ``[K]``, contiguous, or None."""
    lib = cpu_native.library()
    m, (n, k) = x.shape[0], w.shape
    y = torch.empty(m, n)
    if m:
        rc = lib.sxc_f32_linear(x.data_ptr(), m, x.stride(0), w.data_ptr(), n, k, y.data_ptr(),
                                0 if residual is None else residual.data_ptr(),
                                0 if norm_weight is None else norm_weight.data_ptr(), eps, 1 if swiglu else 0,
                                threads or torch.get_num_threads(),
                                cpu_native.isa() if isa_level is None else isa_level)
        if rc != 0:
            raise RuntimeError(f"sxc_f32_linear failed: {cpu_native.ERRORS.get(rc, rc)}")
    return y


def f32_linear_native(x: torch.Tensor, w: torch.Tensor, residual: Optional[torch.Tensor] = None,
                      norm: Optional[tuple] = None, swiglu: bool = False, isa: Optional[str] = None,
                      threads: Optional[int] = None) -> torch.Tensor:
    """``residual + f(x) @ w.T`` float32 ``[M, N]`` as one native call, for CPU float32 ``x``
    ``[M, K]`` (``[M, 2K]`` = ``[gate | up]`` with ``swiglu``) and ``w`` ``[N, K]``, K a multiple
    of 16. ``f``: SiLU(gate) * up with ``swiglu``, then RMSNorm with ``norm = (weight, eps)``.
    Any M works (``ops`` uses it up to ``MAX_ROWS``). Raises RuntimeError without the library."""
    if cpu_native.library() is None:
        raise RuntimeError(f"native CPU library unavailable: {cpu_native.unavailable_reason()}")
    if w.dim() != 2 or w.dtype != torch.float32 or not w.is_cpu or w.shape[1] % 16:
        raise ValueError(f"f32_linear_native: w must be a CPU float32 [N, K] tensor with K a multiple of 16, "
                         f"got {w.dtype} {list(w.shape)} on {w.device}")
    n, k = w.shape
    width = 2 * k if swiglu else k
    check_linear_inputs("f32_linear_native", x, width, n, k, residual, norm)
    level = cpu_native.isa_level(isa)
    if x.stride(1) != 1:
        x = x.contiguous()
    return run_f32_native(x, w.contiguous(), None if residual is None else residual.contiguous(),
                          None if norm is None else norm[0].contiguous(), 0.0 if norm is None else float(norm[1]),
                          swiglu, level, threads)
