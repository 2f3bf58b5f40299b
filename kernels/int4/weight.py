"""The 4-bit weight format: ``Int4Weight``, ``quantize_int4`` and the input checks of its matmuls.

Format (``Int4Weight``), for a weight ``W`` ``[N, K]`` = ``[out_features, in_features]``:

- ``qweight`` uint8 ``[N, K/2]``: along K, every 32 weights are 16 bytes whose low nibbles
  hold elements 0-15 and high nibbles elements 16-31 (exactly GGUF's Q4_0/Q4_1 nibble
  order, so those blocks copy straight in). The kernels never interleave nibbles: they load
  the low and the high halves as two separate operands and pair them with the matching
  activation columns.
- ``scales``, ``mins`` ``[K/G, N]`` (fp16 or fp32): ``W[n, k] = q[n, k] * scales[g, n] +
  mins[g, n]`` with ``g = k // G``. GGUF's ``d*q + m`` and GPTQ's ``s*(q - z)``
  (``mins = -z*s``) both fit without re-quantising. Group-major so a tile's scales are
  one coalesced row segment (GPTQ's own orientation).
- ``perm`` (optional, GPTQ act-order): the stored K order; activations are gathered with it.

The matmuls over this format live in ``gemm`` (Triton, CUDA) and ``cpu`` (CPU), their
references in ``reference``; checkpoint converters (GPTQ, AWQ, GGUF) in
``specexec_rt.loading.int4_formats``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

PACK = 32  # weights per nibble block along K (low nibbles 0-15, high nibbles 16-31)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PackedMatrix:
    """What every packed weight dataclass (``Int4Weight``, ``q8.Q8Weight``) answers like a
    tensor: ``shape`` ``(out_features, in_features)``, ``device`` and ``nbytes`` (its tensors')."""

    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor))


@dataclasses.dataclass
class Int4Weight(PackedMatrix):
    """A 4-bit weight ``[out_features, in_features]``; see the module docstring for layout.

    Only tensor fields and ints: the offload streamer flattens ``dataclasses.fields`` and
    rebuilds with ``dataclasses.replace``. Caches (the CPU op's packing) live in
    non-field attributes, which ``replace`` drops.
    """

    qweight: torch.Tensor  # uint8 [N, K/2]
    scales: torch.Tensor  # fp16/fp32 [K/G, N]
    mins: torch.Tensor  # same dtype and shape as scales
    out_features: int
    in_features: int
    group_size: int
    # GPTQ act-order: int64 [K], the stored K order; activations are gathered x[..., perm] so
    # groups stay contiguous for the kernels. None: natural order.
    perm: Optional[torch.Tensor] = None

    def __post_init__(self):
        n, k, g = self.out_features, self.in_features, self.group_size
        check_group_size(k, g)
        if self.qweight.dtype != torch.uint8 or tuple(self.qweight.shape) != (n, k // 2):
            raise ValueError(
                f"Int4Weight.qweight must be uint8 [{n}, {k // 2}], got "
                f"{self.qweight.dtype} {tuple(self.qweight.shape)}"
            )
        for name in ("scales", "mins"):
            t = getattr(self, name)
            if t.dtype not in (torch.float16, torch.float32) or tuple(t.shape) != (k // g, n):
                raise ValueError(
                    f"Int4Weight.{name} must be fp16/fp32 [{k // g}, {n}], got "
                    f"{t.dtype} {tuple(t.shape)}"
                )
        if self.mins.dtype != self.scales.dtype:
            raise ValueError("Int4Weight.scales and mins must share a dtype")
        if self.perm is not None and (self.perm.dtype != torch.int64 or tuple(self.perm.shape) != (k,)):
            raise ValueError(f"Int4Weight.perm must be int64 [{k}], got {self.perm.dtype} "
                             f"{tuple(self.perm.shape)}")

    def to(self, device, non_blocking: bool = False) -> "Int4Weight":
        return dataclasses.replace(
            self,
            qweight=self.qweight.to(device, non_blocking=non_blocking),
            scales=self.scales.to(device, non_blocking=non_blocking),
            mins=self.mins.to(device, non_blocking=non_blocking),
            perm=None if self.perm is None else self.perm.to(device, non_blocking=non_blocking),
        )

    def unpack(self) -> torch.Tensor:
        """Return the nibbles as uint8 ``[N, K]`` in natural K order."""
        n, k = self.shape
        b = self.qweight.view(n, k // PACK, PACK // 2)
        return torch.cat([b & 0xF, b >> 4], dim=-1).reshape(n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return ``W`` as ``[out_features, in_features]`` in ``dtype`` (computed in fp32)."""
        n, k = self.shape
        g = self.group_size
        q = self.unpack().view(n, k // g, g).to(torch.float32)
        w = q * self.scales.float().T[..., None] + self.mins.float().T[..., None]
        w = w.reshape(n, k)
        if self.perm is not None:  # stored column j is original column perm[j]
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    @staticmethod
    def concat_out_features(weights: Sequence["Int4Weight"]) -> "Int4Weight":
        """Stack along out_features (fused q/k/v, gate/up); all must share K and G."""
        if len(weights) == 0:
            raise ValueError("concat_out_features needs at least one Int4Weight")
        k, g = weights[0].in_features, weights[0].group_size
        perm = weights[0].perm
        for w in weights:
            if (w.perm is None) != (perm is None) or (perm is not None and not torch.equal(w.perm, perm)):
                raise ValueError("concat_out_features: act-order permutations differ")
            if not isinstance(w, Int4Weight):
                raise TypeError(f"concat_out_features takes Int4Weight, got {type(w).__name__}")
            if (w.in_features, w.group_size) != (k, g):
                raise ValueError(
                    f"concat_out_features: in_features/group_size {(w.in_features, w.group_size)}"
                    f" != {(k, g)}"
                )
        # Mixed scale dtypes promote to fp32 so no source loses precision.
        sdt = torch.float16 if all(w.scales.dtype == torch.float16 for w in weights) else torch.float32
        return Int4Weight(
            qweight=torch.cat([w.qweight for w in weights], 0),
            scales=torch.cat([w.scales.to(sdt) for w in weights], 1),
            mins=torch.cat([w.mins.to(sdt) for w in weights], 1),
            out_features=sum(w.out_features for w in weights),
            in_features=k,
            group_size=g,
            perm=perm,
        )


def check_group_size(in_features: int, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % PACK:
        raise ValueError(f"group_size must be a positive multiple of {PACK}, got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"in_features ({in_features}) must be a multiple of group_size ({group_size})"
        )


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8/int ``[N, K]`` with values 0..15 (natural K order) -> packed uint8 ``[N, K/2]``."""
    n, k = q.shape
    q = q.to(torch.uint8).view(n, k // PACK, PACK)
    half = PACK // 2
    return (q[..., :half] | (q[..., half:] << 4)).reshape(n, k // 2).contiguous()


# ----------------------------------------------------------------------------------------
# Quantisation


# ----------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int = 128,
                  scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """Group-wise asymmetric (min/max) 4-bit quantisation of ``w`` ``[N, K]`` along K.

    Scales and mins are rounded to ``scale_dtype`` *before* the nibbles are chosen, so
    every element is within half a step (plus the rounding of the min) of ``w``.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError("quantize_int4 expects a 2-D weight tensor [out_features, in_features]")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_int4: weight dtype must be floating, got {w.dtype}")
    if scale_dtype not in (torch.float16, torch.float32):
        raise TypeError(f"quantize_int4: scale_dtype must be fp16 or fp32, got {scale_dtype}")
    n, k = w.shape
    check_group_size(k, group_size)
    wf = w.detach().float().reshape(n, k // group_size, group_size)
    if not torch.isfinite(wf).all():
        raise ValueError("quantize_int4: weight has non-finite values")
    lo = wf.amin(-1)
    hi = wf.amax(-1)
    mins = lo.to(scale_dtype).float()
    scale = ((hi - mins) / 15).to(scale_dtype).float()
    # Rounding the scale down could leave the group's max outside the 16 levels: bump it.
    too_small = mins + 15 * scale < hi
    scale = torch.where(too_small, torch.nextafter(scale.to(scale_dtype),
                                                   torch.tensor(math.inf, dtype=scale_dtype, device=wf.device)).float(),
                        scale)
    tiny = torch.finfo(scale_dtype).tiny
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: q = 0
    scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny))
    q = torch.round((wf - mins[..., None]) / safe[..., None]).clamp_(0, 15)
    return Int4Weight(
        qweight=pack_nibbles(q.reshape(n, k)),
        scales=scale.to(scale_dtype).T.contiguous(),
        mins=mins.to(scale_dtype).T.contiguous(),
        out_features=n,
        in_features=k,
        group_size=group_size,
    )


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------
def check_matmul_inputs(x: torch.Tensor, w: Int4Weight) -> None:
    if not isinstance(w, Int4Weight):
        raise TypeError(f"int4_matmul: w must be an Int4Weight, got {type(w).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"int4_matmul: x must be a fp16/bf16/fp32 tensor, got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.dim() < 1 or x.shape[-1] != w.in_features:
        raise ValueError(
            f"int4_matmul: x has {x.shape[-1] if x.dim() else 0} features, "
            f"weight expects in_features={w.in_features}"
        )
    if x.device != w.qweight.device:
        raise ValueError(f"int4_matmul: x on {x.device}, weight on {w.qweight.device}")
