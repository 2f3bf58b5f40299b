"""``int4_matmul_cpu``: ``x @ W.T`` for an ``Int4Weight`` on the CPU (references: ``reference``).

Paths, fastest first:
- the native kernel (``csrc/int4_cpu.h`` through ``cpu_native``; ``int4_matmul_native``):
  activations quantized per row and 32-block to int8 (llama.cpp's Q8 scheme), integer dot
  products against the nibbles, the weight's min folded in through the activations' group
  sums. ``reference.int4_matmul_q8_reference`` is the same arithmetic in PyTorch, for the tests.
- ``torch.ops.aten._weight_int4pack_mm_for_cpu`` in ``CPU_COMPUTE_DTYPE`` (bf16 unless set),
  used when the native library is unavailable, when ``CPU_COMPUTE_DTYPE`` is set (float32 gives
  results exact to fp32 rounding) or when a ``compute_dtype`` is passed;
- the dequantizing reference, for shapes the aten op rejects.
See docs/DESIGN.md ("CPU int4 path") for why the native kernel quantizes activations.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from .. import cpu_native
from ..linear_checks import check_linear_inputs
from .reference import int4_matmul_reference
from .weight import PACK, Int4Weight, check_matmul_inputs

# None: the native kernel where it is available, else the aten op in bf16 (its only vectorised
# variant; its fp32/fp16 kernels are ~30-100x slower, measured, torch 2.13, AVX-512). A dtype:
# always the aten op in that dtype (tests set float32 for results exact to fp32 rounding).
CPU_COMPUTE_DTYPE: Optional[torch.dtype] = None
ATEN_DEFAULT_DTYPE = torch.bfloat16
# Whether native weights carry the streaming layout (csrc/int4_cpu.h, sxc_int4_pack); read when a
# weight is first used natively (tests compare both layouts).
STREAM_LAYOUT = os.environ.get("SPECEXEC_INT4_STREAM", "1") != "0"


class SxcWeight(ctypes.Structure):
    """Mirror of ``sxc_weight`` in csrc/int4_cpu.h: one Int4Weight as pointers."""

    _fields_ = [("q", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("perm", ctypes.c_void_p), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
                ("group", ctypes.c_int32), ("scale_f16", ctypes.c_int32), ("pk", ctypes.c_void_p)]


_WP = ctypes.POINTER(SxcWeight)
cpu_native.declare({
    "sxc_int4_linear": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, _WP, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int]),
    "sxc_quantize_q8": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, _WP, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p]),
    "sxc_int4_pack_bytes": (ctypes.c_size_t, [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]),
    "sxc_int4_pack": (ctypes.c_int, [_WP, ctypes.c_void_p]),
})


# ----------------------------------------------------------------------------------------
# Native kernel
# ----------------------------------------------------------------------------------------
def native_weight(w: Int4Weight):
    """The ``SxcWeight`` for ``w`` (cached on the instance, not a field; rebuilt if a tensor field
    was replaced). Tensors are used in place; only non-contiguous ones are copied. With fp16
    scales it also carries the streaming layout (``sxc_int4_pack``, built once: the AVX2 kernels
    read it instead, ~1.4x faster at one row on weights out of cache) unless ``STREAM_LAYOUT``
    is off; the copy costs as many bytes as the weight."""
    c = w.__dict__.get("_native_cpu")
    if c is not None and c[0] is w.qweight and c[1] is w.scales and c[2] is w.mins and c[3] is w.perm:
        return c[4]
    q, s, m = w.qweight.contiguous(), w.scales.contiguous(), w.mins.contiguous()
    perm = None if w.perm is None else w.perm.contiguous()
    st = SxcWeight(q.data_ptr(), s.data_ptr(), m.data_ptr(), 0 if perm is None else perm.data_ptr(),
                              w.out_features, w.in_features, w.group_size, int(s.dtype == torch.float16), None)
    packed = None
    lib = cpu_native.library()
    if STREAM_LAYOUT and lib is not None and s.dtype == torch.float16:
        nbytes = lib.sxc_int4_pack_bytes(w.out_features, w.in_features, w.group_size)
        packed = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes == 0 or lib.sxc_int4_pack(ctypes.byref(st), packed.data_ptr()) != 0:
            raise RuntimeError(f"sxc_int4_pack failed for a {w.out_features}x{w.in_features} weight "
                               f"(group {w.group_size})")
        st.pk = packed.data_ptr()
    ref = ctypes.pointer(st)
    w.__dict__["_native_cpu"] = (w.qweight, w.scales, w.mins, w.perm, ref, (q, s, m, perm, st, packed))
    return ref


def native_active() -> bool:
    """Whether ``int4_matmul_cpu`` takes the native kernel (library loaded, no aten override)."""
    return CPU_COMPUTE_DTYPE is None and cpu_native.library() is not None


def int4_linear_native(x: torch.Tensor, w: Int4Weight, residual: Optional[torch.Tensor] = None,
                       norm: Optional[tuple] = None, swiglu: bool = False, isa: Optional[str] = None,
                       threads: Optional[int] = None) -> torch.Tensor:
    """``residual + f(x) @ W.T`` as one native call, fp32 ``[M, N]``, for a 2-D fp32 ``x``.

    ``f``: with ``swiglu``, ``x`` is ``[M, 2K]`` = ``[gate | up]`` and the input is
    ``silu(gate) * up``; with ``norm = (weight [K], eps)``, the input is then RMS-normalised
    (HF Llama's ``rms_norm``). The input is quantized to int8 per 32-block as in
    ``int4_matmul_native``; ``int4_linear_q8_reference`` is the same in PyTorch.
    ``residual``: ``[M, N]`` or None. ``isa``/``threads``: as ``int4_matmul_native``.
    """
    if cpu_native.library() is None:
        raise RuntimeError(f"native CPU library unavailable: {cpu_native.unavailable_reason()}")
    k, n = w.in_features, w.out_features
    width = 2 * k if swiglu else k
    check_linear_inputs("int4_linear_native", x, width, n, k, residual, norm)
    if x.stride(1) != 1:
        x = x.contiguous()
    return run_native_linear(x, w, residual, None if norm is None else norm[0].contiguous(),
                             0.0 if norm is None else float(norm[1]), swiglu, cpu_native.isa_level(isa), threads)


def run_native_linear(x: torch.Tensor, w: Int4Weight, residual: Optional[torch.Tensor],
                      norm_weight: Optional[torch.Tensor], eps: float, swiglu: bool,
                      isa_level: Optional[int] = None, threads: Optional[int] = None) -> torch.Tensor:
    """``int4_linear_native`` without its checks: the hot path of ``model/ops.py``, which already
    knows ``x`` is CPU float32 ``[M, K]`` (``[M, 2K]`` with ``swiglu``) with unit column stride,
    ``residual`` float32 ``[M, N]`` and ``norm_weight`` float32 ``[K]`` (both contiguous) or None.
    Each tensor attribute read costs a fraction of a microsecond, and a decode step makes
    ~120 of these calls."""
    lib = cpu_native.library()
    m = x.shape[0]
    y = torch.empty(m, w.out_features)
    if m:
        rc = lib.sxc_int4_linear(
            x.data_ptr(), m, x.stride(0), native_weight(w), y.data_ptr(),
            0 if residual is None else residual.data_ptr(), 0 if norm_weight is None else norm_weight.data_ptr(),
            eps, 1 if swiglu else 0, threads or torch.get_num_threads(),
            cpu_native.isa() if isa_level is None else isa_level)
        if rc != 0:
            raise RuntimeError(f"sxc_int4_linear failed: {cpu_native.ERRORS.get(rc, rc)}")
    return y


def int4_matmul_native(x: torch.Tensor, w: Int4Weight, isa: Optional[str] = None,
                       threads: Optional[int] = None) -> torch.Tensor:
    """``x @ W.T`` ``[..., N]`` in x's dtype through the native kernel (computed in fp32 with
    int8-quantized activations: equal to ``int4_matmul_q8_reference`` up to fp32 rounding).

    ``isa``: one of ``cpu_native.supported_isas()`` (default: the CPU's best or
    ``SPECEXEC_CPU_ISA``); ``threads``: default ``torch.get_num_threads()``. Raises
    RuntimeError when the library is unavailable (check ``cpu_native.library()`` first).
    """
    check_matmul_inputs(x, w)
    if x.device.type != "cpu":
        raise ValueError("int4_matmul_native: tensors must be on the CPU")
    x2 = x if x.dim() == 2 else x.reshape(-1, w.in_features)
    if x2.dtype != torch.float32:
        x2 = x2.to(torch.float32)
    y = int4_linear_native(x2, w, isa=isa, threads=threads)
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], w.out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def quantize_activations_native(x: torch.Tensor, w: Int4Weight, isa: Optional[str] = None):
    """The native kernel's activation quantization of ``x`` ``[M, K]`` (fp32) for ``w``:
    ``(xq int8 [M, K], d fp32 [M, K/32], xs fp32 [M, K/G])``; compared bit-exactly with
    ``quantize_activations_q8`` by the tests."""
    lib = cpu_native.library()
    if lib is None:
        raise RuntimeError(f"native CPU library unavailable: {cpu_native.unavailable_reason()}")
    x = x.to(torch.float32).contiguous()
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8)
    d = torch.empty(m, k // PACK)
    xs = torch.empty(m, k // w.group_size)
    rc = lib.sxc_quantize_q8(x.data_ptr(), m, native_weight(w), cpu_native.isa_level(isa), xq.data_ptr(), d.data_ptr(),
                             xs.data_ptr())
    if rc != 0:
        raise RuntimeError(f"sxc_quantize_q8 failed: {cpu_native.ERRORS.get(rc, rc)}")
    return xq, d, xs


# ----------------------------------------------------------------------------------------
# aten fallback
# ----------------------------------------------------------------------------------------
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

    Default: the native kernel (int8 activations; see the module docstring). With a
    ``compute_dtype`` (or ``CPU_COMPUTE_DTYPE`` set), or without the native library:
    ``aten._weight_int4pack_mm_for_cpu`` with activations, scales and zeros in that dtype
    (default bf16: results carry bf16 rounding, ~2**-8 relative; float32 is exact to fp32
    rounding at ~30x the cost). Shapes the op rejects (N % 16 != 0, group size not in
    32/64/128/256) dequantise per call.
    """
    check_matmul_inputs(x, w)
    if x.device.type != "cpu":
        raise ValueError("int4_matmul_cpu: tensors must be on the CPU")
    cdt = compute_dtype or CPU_COMPUTE_DTYPE
    if cdt is None and cpu_native.library() is not None:
        return int4_matmul_native(x, w)
    cdt = cdt or ATEN_DEFAULT_DTYPE
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
