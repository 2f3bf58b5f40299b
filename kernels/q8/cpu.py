"""``q8_linear``: a ``Q8Weight`` times float32 activations on the CPU through the native kernel
(``sxc_q8_linear`` in ``csrc/q8_cpu.h``), with RMSNorm and a residual fused, or through BLAS on
the dequantized weight; the references are in ``reference``."""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .. import cpu_native
from ..linear_checks import check_linear_inputs
from .reference import dequantized, q8_linear_reference, rms_norm
from .weight import Q8Weight

# Rows up to which float activations take the native kernel; above, BLAS on a dequantized copy
# (made on first use) reuses each weight across rows better. SmolLM2's head, 2 threads, 2-core
# EPYC: 32 rows 34 ms native vs 49-53 ms transposed BLAS, 48 rows 51-53 vs 55-61, 64 rows 67-70
# vs 45-63, 128 rows 151-170 vs 119-125. The int8-activation path stays native at any M.
FLOAT_NATIVE_ROWS = 48


class SxcQ8Weight(ctypes.Structure):
    """Mirror of ``sxc_q8weight`` in csrc/q8_cpu.h: one Q8Weight as pointers."""

    _fields_ = [("q", ctypes.c_void_p), ("d", ctypes.c_void_p), ("n", ctypes.c_int32), ("k", ctypes.c_int32)]


cpu_native.declare({
    "sxc_q8_linear": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(SxcQ8Weight),
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_int]),
})


def native_weight(w: Q8Weight):
    """The ``SxcQ8Weight`` for ``w``, cached on the instance (rebuilt if a field was replaced)."""
    c = w.__dict__.get("_native_cpu")
    if c is not None and c[0] is w.qweight and c[1] is w.scales:
        return c[2]
    q, s = w.qweight.contiguous(), w.scales.contiguous()
    st = SxcQ8Weight(q.data_ptr(), s.data_ptr(), w.out_features, w.in_features)
    ref = ctypes.pointer(st)
    w.__dict__["_native_cpu"] = (w.qweight, w.scales, ref, (q, s, st))
    return ref


def native_serves(x: torch.Tensor, w) -> bool:
    """Whether ``q8_linear`` takes the native kernel for this call: a ``Q8Weight`` on the CPU,
    a contiguous float32 ``[M, K]`` input, and the library loaded."""
    return (isinstance(w, Q8Weight) and x.is_cpu and x.dtype is torch.float32 and x.dim() == 2
            and x.is_contiguous() and w.qweight.is_cpu and cpu_native.library() is not None)


def run_q8_native(x: torch.Tensor, w: Q8Weight, residual: Optional[torch.Tensor] = None,
                  norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
                  isa_level: Optional[int] = None, threads: Optional[int] = None) -> torch.Tensor:
    """The native call without checks (``model/ops.py`` has checked with ``native_serves``):
    ``residual`` float32 ``[M, N]`` and ``norm_weight`` float32 ``[K]``, contiguous, or None."""
    lib = cpu_native.library()
    m = x.shape[0]
    y = torch.empty(m, w.out_features)
    if m:
        rc = lib.sxc_q8_linear(x.data_ptr(), m, x.stride(0), native_weight(w), y.data_ptr(),
                               0 if residual is None else residual.data_ptr(),
                               0 if norm_weight is None else norm_weight.data_ptr(), eps,
                               1 if w.int8_activations else 0, threads or torch.get_num_threads(),
                               cpu_native.isa() if isa_level is None else isa_level)
        if rc != 0:
            raise RuntimeError(f"sxc_q8_linear failed: {cpu_native.ERRORS.get(rc, rc)}")
    return y


def q8_linear_native(x: torch.Tensor, w: Q8Weight, residual: Optional[torch.Tensor] = None,
                     norm: Optional[tuple] = None, isa: Optional[str] = None,
                     threads: Optional[int] = None) -> torch.Tensor:
    """``residual + f(x) @ W.T`` (``f`` as in ``q8_linear_reference``) as one native call, float32
    ``[M, N]`` for a CPU float32 ``x`` ``[M, K]``. ``isa``: one of ``cpu_native.supported_isas()``
    (default the CPU's best or ``SPECEXEC_CPU_ISA``); ``threads``: default
    ``torch.get_num_threads()``. Raises RuntimeError without the native library."""
    if cpu_native.library() is None:
        raise RuntimeError(f"native CPU library unavailable: {cpu_native.unavailable_reason()}")
    if not isinstance(w, Q8Weight) or not w.qweight.is_cpu:
        raise ValueError("q8_linear_native: w must be a Q8Weight on the CPU")
    n, k = w.shape
    check_linear_inputs("q8_linear_native", x, k, n, k, residual, norm)
    if x.stride(1) != 1:
        x = x.contiguous()
    level = cpu_native.isa_level(isa)
    return run_q8_native(x, w, None if residual is None else residual.contiguous(),
                         None if norm is None else norm[0].contiguous(), 0.0 if norm is None else float(norm[1]),
                         level, threads)


def q8_linear(x: torch.Tensor, w: Q8Weight, residual: Optional[torch.Tensor] = None,
              norm: Optional[tuple] = None) -> torch.Tensor:
    """``residual + f(x) @ W.T`` for ``x`` ``[..., K]``: the native kernel where it serves (float
    activations: up to ``FLOAT_NATIVE_ROWS`` rows), else the dequantized weight (cached)."""
    x2 = x.reshape(-1, w.in_features) if x.dim() != 2 else x
    if native_serves(x2, w) and (w.int8_activations or x2.shape[0] <= FLOAT_NATIVE_ROWS):
        res = None if residual is None else residual.reshape(-1, w.out_features).float().contiguous()
        nw = None if norm is None else (norm[0].float().contiguous(), norm[1])
        y = run_q8_native(x2, w, res, None if nw is None else nw[0], 0.0 if nw is None else float(nw[1]))
        return y.reshape(*x.shape[:-1], w.out_features)
    if x2.is_cpu and x2.dtype is torch.float32 and x2.shape[0] > 1:
        # Many rows: BLAS on the dequantized copy, weight rows as the long side (see
        # ops.dense_linear for why that orientation).
        xn = x2 if norm is None else rms_norm(x2, norm[0], norm[1])
        y = torch.mm(dequantized(w, torch.float32), xn.t()).t().contiguous()
        y = y.reshape(*x.shape[:-1], w.out_features)
        return y if residual is None else residual + y
    return q8_linear_reference(x, w, residual, norm)
