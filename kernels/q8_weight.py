"""The 8-bit weight format ``Q8Weight`` (llama.cpp's Q8_0), its CPU matmul and the references.

Format, for a weight ``W`` ``[N, K]`` = ``[out_features, in_features]``:

- ``qweight`` int8 ``[N, K]``;
- ``scales`` fp16 ``[N, K/32]``: ``W[n, k] = qweight[n, k] * scales[n, k // 32]``.

GGUF files store tied embeddings / LM heads this way (34-byte blocks: fp16 scale, 32 int8);
``specexec_rt.loading`` keeps such a head 8-bit on the CPU instead of expanding it to float32,
because the head is the largest matrix of a small model and the matmul is bound by the bytes
it reads (SmolLM2's 49152 x 576 head: 113 MB in float32, 30 MB as Q8_0).

Paths:
- the native kernel (``sxc_q8_linear`` in ``csrc/q8_cpu.h``; ``q8_linear_native``): float32
  activations times the int8 weights, the block scale applied per 32 weights, so the result is
  the dequantized weight's up to float32 rounding (no activation quantization, unlike the int4
  kernel); the final RMSNorm and a residual can be fused into the call;
- with ``int8_activations`` set on the weight, the kernel quantizes the activations as the int4
  kernel does (int8 per row and 32-block) and multiplies them exactly in integers, as llama.cpp
  multiplies Q8_0 by Q8_0: several times faster, for targets whose layers already run on int8
  activations (the int4 target); ``q8_linear_q8_reference`` is that arithmetic in PyTorch;
- ``q8_linear_reference``: the dequantized weight through ``torch.nn.functional.linear`` (the
  fallback without the native library, and on other devices; the dequantized copy is cached on
  the instance).
"""
from __future__ import annotations

import ctypes
import dataclasses
from typing import Optional

import torch

from . import cpu_native
from .int4_weight import PackedMatrix

BLOCK = 32  # weights per scale along K
# Rows up to which float activations take the native kernel; above, BLAS on a dequantized copy
# (made on first use) reuses each weight across rows better. SmolLM2's head, 2 threads, 2-core
# EPYC: 32 rows 34 ms native vs 49-53 ms transposed BLAS, 48 rows 51-53 vs 55-61, 64 rows 67-70
# vs 45-63, 128 rows 151-170 vs 119-125. The int8-activation path stays native at any M.
FLOAT_NATIVE_ROWS = 48


@dataclasses.dataclass
class Q8Weight(PackedMatrix):
    """An 8-bit weight ``[out_features, in_features]``; see the module docstring for layout.

    Only tensor fields and ints (the generic weight walks move and count them); caches live in
    non-field attributes, which ``dataclasses.replace`` drops."""

    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # fp16 [N, K/32]
    out_features: int
    in_features: int
    # The native kernel quantizes activations to int8 (faster, not float32-exact); see above.
    int8_activations: bool = False

    def __post_init__(self):
        n, k = self.out_features, self.in_features
        if k % BLOCK:
            raise ValueError(f"Q8Weight: in_features ({k}) must be a multiple of {BLOCK}")
        if self.qweight.dtype != torch.int8 or tuple(self.qweight.shape) != (n, k):
            raise ValueError(f"Q8Weight.qweight must be int8 [{n}, {k}], got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != (n, k // BLOCK):
            raise ValueError(f"Q8Weight.scales must be fp16 [{n}, {k // BLOCK}], got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")

    def to(self, device, non_blocking: bool = False) -> "Q8Weight":
        return dataclasses.replace(self, qweight=self.qweight.to(device, non_blocking=non_blocking),
                                   scales=self.scales.to(device, non_blocking=non_blocking))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W`` ``[out_features, in_features]`` in ``dtype`` (computed in float32: exact)."""
        n, k = self.shape
        w = self.qweight.view(n, k // BLOCK, BLOCK).float() * self.scales.float()[..., None]
        return w.reshape(n, k).to(dtype)


def with_int8_activations(w: Q8Weight, on: bool = True) -> Q8Weight:
    """The same weight (tensors shared) with the activation mode set."""
    return dataclasses.replace(w, int8_activations=on)


def quantize_q8_0(w: torch.Tensor) -> Q8Weight:
    """Quantize a float ``[N, K]`` matrix as llama.cpp's Q8_0, byte for byte: per 32-block
    ``d = amax / 127`` (float32), ``q = round_half_away(w * (1 / d))``, ``d`` stored fp16.
    Re-quantizing a dequantized Q8_0 matrix gives it back."""
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"quantize_q8_0: w must be [N, K] with K a multiple of {BLOCK}, got {list(w.shape)}")
    n, k = w.shape
    b = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = b.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    v = b * inv[..., None]
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp_(-127, 127).to(torch.int8)
    return Q8Weight(q.reshape(n, k).contiguous(), d.to(torch.float16).contiguous(), n, k)


def from_gguf_q8_0(blocks: torch.Tensor, shape) -> Q8Weight:
    """GGUF Q8_0 blocks (uint8 ``[N, K/32, 34]``: fp16 scale, then 32 int8) as a ``Q8Weight``."""
    n, k = int(shape[0]), int(shape[1])
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n, k // BLOCK, 34) or k % BLOCK:
        raise ValueError(f"from_gguf_q8_0: expected uint8 blocks [{n}, {k // BLOCK}, 34] for shape {(n, k)}, "
                         f"got {blocks.dtype} {list(blocks.shape)}")
    scales = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    q = blocks[..., 2:34].contiguous().view(torch.int8).reshape(n, k)
    return Q8Weight(q.contiguous(), scales.contiguous(), n, k)


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------
def _dense(w: Q8Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight, cached per dtype on the instance."""
    cache = w.__dict__.setdefault("_dense_cache", {})
    if dtype not in cache:
        cache[dtype] = w.dequantize(dtype)
    return cache[dtype]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def q8_linear_reference(x: torch.Tensor, w: Q8Weight, residual: Optional[torch.Tensor] = None,
                        norm: Optional[tuple] = None) -> torch.Tensor:
    """``residual + f(x) @ W.T`` with the dequantized weight in x's dtype; ``f`` is HF Llama's
    RMSNorm with ``norm = (weight, eps)``, else the identity. Float activations whatever
    ``w.int8_activations`` says (the fallback path)."""
    if norm is not None:
        x = _rms_norm(x, norm[0], norm[1])
    y = torch.nn.functional.linear(x, _dense(w, x.dtype).to(x.device))
    return y if residual is None else residual + y


def q8_linear_q8_reference(x: torch.Tensor, w: Q8Weight, residual: Optional[torch.Tensor] = None,
                           norm: Optional[tuple] = None) -> torch.Tensor:
    """The native kernel's ``int8_activations`` arithmetic in PyTorch (float32, ``[M, N]`` for
    ``x`` ``[M, K]``): activations quantized per 32-block as ``int4_cpu.quantize_activations_q8``
    (bit-exact), exact integer block dots, then ``sum_b isum_b * (scale_b * d_x_b)`` up to
    float32 rounding order."""
    from .int4_cpu import quantize_activations_q8

    if norm is not None:
        x = _rms_norm(x.float(), norm[0].float(), norm[1])
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


# ----------------------------------------------------------------------------------------
# Native kernel
# ----------------------------------------------------------------------------------------
def _native_weight(w: Q8Weight):
    """The ``SxcQ8Weight`` for ``w``, cached on the instance (rebuilt if a field was replaced)."""
    c = w.__dict__.get("_native_cpu")
    if c is not None and c[0] is w.qweight and c[1] is w.scales:
        return c[2]
    q, s = w.qweight.contiguous(), w.scales.contiguous()
    st = cpu_native.SxcQ8Weight(q.data_ptr(), s.data_ptr(), w.out_features, w.in_features)
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
        rc = lib.sxc_q8_linear(x.data_ptr(), m, x.stride(0), _native_weight(w), y.data_ptr(),
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
    if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"q8_linear_native: x must be a CPU float32 [M, {k}] tensor, got {x.dtype} "
                         f"{list(x.shape)} on {x.device}")
    m = x.shape[0]
    if residual is not None and (tuple(residual.shape) != (m, n) or residual.dtype != torch.float32):
        raise ValueError(f"q8_linear_native: residual must be float32 [{m}, {n}], got {residual.dtype} "
                         f"{list(residual.shape)}")
    if norm is not None and (tuple(norm[0].shape) != (k,) or norm[0].dtype != torch.float32):
        raise ValueError(f"q8_linear_native: norm weight must be float32 [{k}], got {norm[0].dtype} "
                         f"{list(norm[0].shape)}")
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
        xn = x2 if norm is None else _rms_norm(x2, norm[0], norm[1])
        y = torch.mm(_dense(w, torch.float32), xn.t()).t().contiguous()
        y = y.reshape(*x.shape[:-1], w.out_features)
        return y if residual is None else residual + y
    return q8_linear_reference(x, w, residual, norm)
