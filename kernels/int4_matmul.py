"""4-bit weight-only matmul: ``Int4Weight``, ``quantize_int4``, ``int4_matmul`` + reference.

Format (``Int4Weight``), for a weight ``W`` ``[N, K]`` = ``[out_features, in_features]``:

- ``qweight`` uint8 ``[N, K/2]``: along K, every 32 weights are 16 bytes whose low nibbles
  hold elements 0-15 and high nibbles elements 16-31 (exactly GGUF's Q4_0/Q4_1 nibble
  order, so those blocks copy straight in). The kernel never interleaves nibbles: it loads
  the low and the high halves as two separate operands and pairs them with the matching
  activation columns.
- ``scales``, ``mins`` ``[K/G, N]`` (fp16 or fp32): ``W[n, k] = q[n, k] * scales[g, n] +
  mins[g, n]`` with ``g = k // G``. GGUF's ``d*q + m`` and GPTQ's ``s*(q - z)``
  (``mins = -z*s``) both fit without re-quantising. Group-major so a tile's scales are
  one coalesced row segment (GPTQ's own orientation).

Dispatch (``int4_matmul``):

- CUDA, M == 1: GEMV kernel (fp32 accumulator tile, reduced once at the end), split-K so
  that a skinny N still fills the GPU; nibbles become floats with the 2**23 magic-number
  trick because int->float conversion runs at 1/8 rate and would cap the bandwidth.
- CUDA, 2 <= M < ``DEQUANT_MIN_M``: tensor-core kernel computing ``out.T = W @ x.T`` (the
  dequantised weight tile is the *left* operand: on Hopper only wgmma's A may come from
  registers, and N-tiles of 64+ rows keep the MMA full when M is 16), split-K as above.
- CUDA, M >= ``DEQUANT_MIN_M``: dequantise into a reused scratch buffer, then cuBLAS: at
  these sizes the product is compute-bound and the dequantisation is a small extra pass.
- CPU: ``int4_matmul_cpu`` (``torch.ops.aten._weight_int4pack_mm_for_cpu`` in bf16),
  unless ``TRITON_INTERPRET=1``, when CPU tensors run the Triton kernels (that is how the
  kernels are tested without a GPU).

Split-K writes fp32 partials ``[S, M, N]`` summed afterwards (deterministic, no atomics).

Each CUDA call runs an ``Int4Plan`` (path, tiles, warps, K splits). The defaults above are
guesses; ``int4_tuning`` measures ``candidate_plans`` on the actual GPU per weight shape and M
bucket (``specexec-rt tune-int4``), and ``plan_for`` prefers those measured plans. GEMV
candidates include tiles of 2-4 whole groups (``BLOCK_K`` 256/512 for group 128: 128-256
contiguous bytes per weight row per iteration instead of 64).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import NamedTuple, Optional, Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still get the CPU paths
    triton = None
    tl = None

__all__ = [
    "Int4Weight",
    "quantize_int4",
    "int4_matmul",
    "int4_matmul_reference",
    "int4_matmul_cpu",
    "from_gptq",
    "from_awq",
    "from_gguf_q4_0",
    "from_gguf_q4_1",
    "from_gguf_q4_k",
    "DEQUANT_MIN_M",
    "Int4Plan",
    "default_plan",
    "candidate_plans",
    "plan_for",
    "run_plan",
]

# At or above this many rows, CUDA calls dequantise into scratch and use cuBLAS.
DEQUANT_MIN_M = 256
# Software-pipelining stages of the K loops. 1 is the safe default: LLVM crashed when
# pipelining loops over bit-packed weights in some Triton versions (KERNEL-NOTES).
K_LOOP_STAGES = 1
# The scratch buffer of the dequantise path is split along N above this many elements,
# so a fused 70B gate/up matrix (470M weights) takes two chunks (H100: N-chunks of 2340 rows
# for the 70B down projection ran 3x slower than fp16; whole-matrix chunks are 1-2).
SCRATCH_MAX_ELEMENTS = 256 * 1024 * 1024
# On CPU, convert activations to this dtype for the aten int4 op: its bf16 kernel is
# vectorised, its fp32/fp16 kernels are ~30-100x slower (measured, torch 2.13, AVX-512).
CPU_COMPUTE_DTYPE = torch.bfloat16

_PACK = 32  # weights per nibble block along K (low nibbles 0-15, high nibbles 16-31)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------
# The weight container
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Int4Weight:
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
        _check_group_size(k, g)
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
        b = self.qweight.view(n, k // _PACK, _PACK // 2)
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


def _check_group_size(in_features: int, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % _PACK:
        raise ValueError(f"group_size must be a positive multiple of {_PACK}, got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"in_features ({in_features}) must be a multiple of group_size ({group_size})"
        )


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8/int ``[N, K]`` with values 0..15 (natural K order) -> packed uint8 ``[N, K/2]``."""
    n, k = q.shape
    q = q.to(torch.uint8).view(n, k // _PACK, _PACK)
    half = _PACK // 2
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
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_int4: weight dtype must be floating, got {w.dtype}")
    if scale_dtype not in (torch.float16, torch.float32):
        raise TypeError(f"quantize_int4: scale_dtype must be fp16 or fp32, got {scale_dtype}")
    n, k = w.shape
    _check_group_size(k, group_size)
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
        qweight=_pack_nibbles(q.reshape(n, k)),
        scales=scale.to(scale_dtype).T.contiguous(),
        mins=mins.to(scale_dtype).T.contiguous(),
        out_features=n,
        in_features=k,
        group_size=group_size,
    )


# ----------------------------------------------------------------------------------------
# Reference and validation
# ----------------------------------------------------------------------------------------
def _check_inputs(x: torch.Tensor, w: Int4Weight) -> None:
    if not isinstance(w, Int4Weight):
        raise TypeError(f"int4_matmul: w must be an Int4Weight, got {type(w).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
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


def int4_matmul_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """``x @ W.T`` in fp32 from the dequantised weight, cast to x's dtype. ``[..., N]``."""
    _check_inputs(x, w)
    return (x.float() @ w.dequantize(torch.float32).T).to(x.dtype)


# ----------------------------------------------------------------------------------------
# CPU fast path
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

    Uses ``aten._weight_int4pack_mm_for_cpu`` with activations, scales and zeros in
    ``compute_dtype`` (default ``CPU_COMPUTE_DTYPE`` = bf16: the only vectorised variant;
    results carry bf16 rounding, ~2**-8 relative, far below the 4-bit error). Pass
    ``torch.float32`` for fp32-exact results at ~30x the cost. Shapes the op rejects
    (N % 16 != 0, group size not in 32/64/128/256) dequantise per call.
    """
    _check_inputs(x, w)
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


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _nibbles_to_f32(b, FAST: tl.constexpr):
        """uint8 tile -> (low, high) nibbles as fp32, without int->float conversions.

        I2F runs at a fraction of FMA rate and would bound the GEMV, so the nibble is
        OR-ed into a float's mantissa. FAST: ``0x44800000 | q << 13`` is ``1024 + q`` (two
        integer ops, the caller folds the 1024 into the per-group terms). Exact mode:
        ``0x4B000000 | q`` is ``2**23 + q`` and subtracting 2**23 is exact (for fp32 x,
        where folding 1024 would cost ~1e-5 relative precision).
        """
        bi = b.to(tl.int32)
        if FAST:
            lo = (((bi << 13) & 0x1E000) | 0x44800000).to(tl.float32, bitcast=True)
            hi = (((bi << 9) & 0x1E000) | 0x44800000).to(tl.float32, bitcast=True)
        else:
            lo = ((bi & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            hi = ((bi >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return lo, hi

    @triton.jit
    def _int4_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, m_ptr, out_ptr,
        N, K, stride_xm, stride_om, stride_os, K_PER_SPLIT,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUPS_PER_TILE: tl.constexpr, STAGES: tl.constexpr, FAST: tl.constexpr,
    ):
        """One x row per program (grid dim 2) times BLOCK_N weight rows, one K split.

        x ``[M, K]``, qweight ``[N, K/2]``, scales/mins ``[K/G, N]``, out ``[S, M, N]``
        (or ``[M, N]`` when S == 1). A tile spans one group (BLOCK_K divides GROUP) or
        GROUPS_PER_TILE whole groups (longer contiguous row reads: 64 bytes per row per
        group of 128 is short for HBM). Scale and min apply per row per group, not per
        weight: ``sum_k (q s + m) x = s * sum_k q x + m * sum_k x``.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        HALF: tl.constexpr = BLOCK_K // 2
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        rj = tl.arange(0, HALF)
        # Byte j of a tile holds elements 32*(j//16) + j%16 (low) and that + 16 (high), so a
        # group's bytes are contiguous: GROUP/2 of them.
        k_lo = (rj // 16) * 32 + (rj % 16)
        qw_rows = qw_ptr + rn.to(tl.int64)[:, None] * (K // 2)
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_begin = pid_s * K_PER_SPLIT
        k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
        for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
            b = tl.load(qw_rows + (k0 // 2 + rj)[None, :], mask=mask_n[:, None], other=0)
            xl = tl.load(x_row + k0 + k_lo).to(tl.float32)
            xh = tl.load(x_row + k0 + k_lo + 16).to(tl.float32)
            lo, hi = _nibbles_to_f32(b, FAST)
            if GROUPS_PER_TILE == 1:
                g_off = (k0 // GROUP) * N
                s = tl.load(s_ptr + g_off + rn, mask=mask_n, other=0.0).to(tl.float32)
                m = tl.load(m_ptr + g_off + rn, mask=mask_n, other=0.0).to(tl.float32)
                qx = tl.sum(lo * xl[None, :] + hi * xh[None, :], axis=1)
                sx = tl.sum(xl + xh, axis=0)
                if FAST:
                    m = m - 1024.0 * s
                acc += s * qx + m * sx
            else:
                G2: tl.constexpr = GROUP // 2
                qx = tl.sum(tl.reshape(lo * xl[None, :] + hi * xh[None, :],
                                       (BLOCK_N, GROUPS_PER_TILE, G2)), axis=2)
                sx = tl.sum(tl.reshape(xl + xh, (GROUPS_PER_TILE, G2)), axis=1)
                gi = k0 // GROUP + tl.arange(0, GROUPS_PER_TILE)
                sm_off = gi[None, :] * N + rn[:, None]  # [BLOCK_N, GROUPS_PER_TILE]
                s = tl.load(s_ptr + sm_off, mask=mask_n[:, None], other=0.0).to(tl.float32)
                m = tl.load(m_ptr + sm_off, mask=mask_n[:, None], other=0.0).to(tl.float32)
                if FAST:
                    m = m - 1024.0 * s
                acc += tl.sum(s * qx + m * sx[None, :], axis=1)
        out = out_ptr + pid_s.to(tl.int64) * stride_os + pid_m.to(tl.int64) * stride_om + rn
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _int4_mm_kernel(
        x_ptr, qw_ptr, s_ptr, m_ptr, out_ptr,
        M, N, K, stride_xm, stride_om, stride_os, K_PER_SPLIT,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr, FAST: tl.constexpr,
    ):
        """Tensor-core tile: ``out.T[BLOCK_N, BLOCK_M] = W_tile @ x_tile.T`` over one K split.

        Same layouts as the GEMV kernel. The low and high nibble halves are two dots of
        depth BLOCK_K/2 against the matching x columns (no nibble interleaving).
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        HALF: tl.constexpr = BLOCK_K // 2
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_n = rn < N
        mask_m = rm < M
        rj = tl.arange(0, HALF)
        k_lo = (rj // 16) * 32 + (rj % 16)
        qw_rows = qw_ptr + rn.to(tl.int64)[:, None] * (K // 2)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_begin = pid_s * K_PER_SPLIT
        k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
        for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
            b = tl.load(qw_rows + (k0 // 2 + rj)[None, :], mask=mask_n[:, None], other=0)
            g_off = (k0 // GROUP) * N
            s = tl.load(s_ptr + g_off + rn, mask=mask_n, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + g_off + rn, mask=mask_n, other=0.0).to(tl.float32)
            if FAST:  # lo/hi are 1024 + q: fold the offset into the per-row constant
                m = m - 1024.0 * s
            # x tiles [BLOCK_M, HALF] are loaded along K (coalesced), transposed for the dot.
            xl = tl.load(x_rows + (k0 + k_lo)[None, :], mask=mask_m[:, None], other=0.0)
            xh = tl.load(x_rows + (k0 + k_lo + 16)[None, :], mask=mask_m[:, None], other=0.0)
            lo, hi = _nibbles_to_f32(b, FAST)
            wl = (lo * s[:, None] + m[:, None]).to(x_ptr.dtype.element_ty)
            wh = (hi * s[:, None] + m[:, None]).to(x_ptr.dtype.element_ty)
            if UPCAST_DOT:  # Triton's interpreter computes bf16 dots wrongly (3.9)
                wl, wh = wl.to(tl.float32), wh.to(tl.float32)
                xl, xh = xl.to(tl.float32), xh.to(tl.float32)
            acc = tl.dot(wl, tl.trans(xl), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(wh, tl.trans(xh), acc, input_precision=DOT_PRECISION)
        out = (out_ptr + pid_s.to(tl.int64) * stride_os + rm.to(tl.int64)[None, :] * stride_om
               + rn[:, None])
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])

    @triton.jit
    def _int4_dequant_kernel(
        qw_ptr, s_ptr, m_ptr, out_ptr, N_TOTAL, ROWS, K, n_offset,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        FAST: tl.constexpr,
    ):
        """Rows ``[n_offset, n_offset + ROWS)`` of W into ``out`` ``[ROWS, K]`` (x's dtype)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        HALF: tl.constexpr = BLOCK_K // 2
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < ROWS
        src = n_offset + rn
        rj = tl.arange(0, HALF)
        k0 = pid_k * BLOCK_K
        k_lo = k0 + (rj // 16) * 32 + (rj % 16)
        b = tl.load(qw_ptr + src.to(tl.int64)[:, None] * (K // 2) + (k0 // 2 + rj)[None, :],
                    mask=mask_n[:, None], other=0)
        g_off = (k0 // GROUP) * N_TOTAL
        s = tl.load(s_ptr + g_off + src, mask=mask_n, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + g_off + src, mask=mask_n, other=0.0).to(tl.float32)
        if FAST:
            m = m - 1024.0 * s
        lo, hi = _nibbles_to_f32(b, FAST)
        dst = out_ptr + rn.to(tl.int64)[:, None] * K + k_lo[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(dst, (lo * s[:, None] + m[:, None]).to(ty), mask=mask_n[:, None])
        tl.store(dst + 16, (hi * s[:, None] + m[:, None]).to(ty), mask=mask_n[:, None])

    @triton.jit
    def _sum_splits_kernel(part_ptr, out_ptr, S, MN, BLOCK: tl.constexpr):
        """out ``[MN]`` (any float dtype) = sum over S of fp32 partials ``[S, MN]``, in order."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(S):
            acc += tl.load(part_ptr + i * MN + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------
# Bucketed M (next power of two) -> (BLOCK_M, BLOCK_N, max BLOCK_K, num_warps) of the default
# plan. BLOCK_M == 1 selects the GEMV kernel. Guesses for H100; measured plans (int4_tuning)
# replace them per GPU model and shape.
_CONFIGS = {
    1: (1, 64, 128, 4),
    2: (16, 64, 128, 4),
    4: (16, 64, 128, 4),
    8: (16, 64, 128, 4),
    16: (16, 64, 128, 4),
    32: (32, 64, 128, 4),
    64: (64, 64, 128, 4),
    128: (64, 128, 64, 8),
    256: (64, 128, 64, 8),
}
_MAX_BUCKET = max(_CONFIGS)
# Plans are tuned per power-of-two M bucket up to this one; larger M shares its plan.
MAX_TUNED_BUCKET = 4096
PATHS = ("gemv", "mma", "dequant")


def m_bucket(m: int) -> int:
    """The power of two >= m (capped at MAX_TUNED_BUCKET) whose plan serves M = m."""
    return min(1 << max(0, (m - 1).bit_length()), MAX_TUNED_BUCKET)


def _config(m: int):
    return _CONFIGS[min(m_bucket(m), _MAX_BUCKET)]


def _block_k(group_size: int, cap: int) -> int:
    """Largest of 128/64/32 that is <= cap and divides the group (one group per tile)."""
    for bk in (128, 64, 32):
        if bk <= cap and group_size % bk == 0:
            return bk
    return 32


@dataclasses.dataclass(frozen=True)
class Int4Plan:
    """How one int4_matmul call runs on a GPU (or in the interpreter).

    ``path``: ``"gemv"`` (the GEMV kernel, one x row per program), ``"mma"`` (tensor-core
    tiles of ``block_m`` rows) or ``"dequant"`` (dequantise into scratch, then cuBLAS; the
    tile fields are unused). ``block_k`` divides the group or is a multiple of it (GEMV only).
    ``split_k``: 0 chooses the number of K splits from the grid size; n > 0 asks for n.
    """

    path: str
    block_m: int = 1
    block_n: int = 64
    block_k: int = 128
    warps: int = 4
    split_k: int = 0

    def problem(self, k: int, group_size: int) -> Optional[str]:
        """Why this plan cannot run K = k with this group size (None when it can)."""
        if self.path not in PATHS:
            return f"unknown path {self.path!r}"
        if self.path == "dequant":
            return None
        bk, g = self.block_k, group_size
        if bk < 32 or bk & (bk - 1) or self.block_n < 16 or self.block_n & (self.block_n - 1):
            return "block_k and block_n must be powers of two (block_k >= 32, block_n >= 16)"
        if self.warps not in (1, 2, 4, 8, 16) or self.split_k < 0:
            return "warps must be 1..16 (a power of two) and split_k >= 0"
        if self.path == "gemv":
            if self.block_m != 1:
                return "the GEMV path takes block_m = 1"
            if g % bk and (bk % g or k % bk):
                return f"block_k {bk} neither divides the group {g} nor tiles K = {k} in whole groups"
            return None
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            return "tensor-core tiles need block_m >= 16, a power of two"
        if g % bk:
            return f"the tensor-core path needs block_k dividing the group ({bk} vs {g})"
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Int4Plan":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@functools.lru_cache(maxsize=1024)
def default_plan(m: int, k: int, group_size: int, dequant: bool = True) -> Int4Plan:
    """The untuned choice: GEMV at M = 1, tensor cores below ``DEQUANT_MIN_M``, dequantise +
    cuBLAS from there (``dequant=False``, as in the interpreter, keeps the Triton kernels)."""
    if dequant and m >= DEQUANT_MIN_M:
        return Int4Plan("dequant")
    bm, bn, bk_cap, warps = _config(m)
    return Int4Plan("gemv" if bm == 1 else "mma", bm, bn, _block_k(group_size, bk_cap), warps)


def candidate_plans(m: int, k: int, group_size: int, dequant: bool = True) -> list[Int4Plan]:
    """The small set the tuner measures for M's bucket (the default plan first)."""
    bucket = m_bucket(m)
    plans = [default_plan(bucket, k, group_size, dequant)]
    if bucket == 1:
        for bn in (32, 64, 128):
            for bk in (64, 128, 256, 512):
                for warps in (4, 8):
                    for split in (0, 1, 2, 4, 8, 16):
                        plans.append(Int4Plan("gemv", 1, bn, bk, warps, split))
    else:
        bms = sorted({min(max(16, bucket), 64), 16} | ({128} if bucket >= 256 else set()))
        for bm in bms:
            for bn in (64, 128):
                for bk in (32, 64, 128):
                    for warps in (4, 8):
                        for split in ((0, 1) if bucket < 256 else (1,)):
                            plans.append(Int4Plan("mma", bm, bn, bk, warps, split))
        if dequant and bucket >= 16:
            plans.append(Int4Plan("dequant"))
    seen, out = set(), []
    for p in plans:
        if p not in seen and p.problem(k, group_size) is None:
            seen.add(p)
            out.append(p)
    return out


# Measured plans: (device name, x dtype, N, K, group size, M bucket) -> Int4Plan. Filled by
# int4_tuning (from its JSON file on first use, or by tuning in this process).
_TUNED: dict = {}
_TUNED_LOADED = False


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tuned_key(device: torch.device, dtype: torch.dtype, n: int, k: int, group_size: int, m: int):
    return (device_name(device), _dtype_name(dtype), n, k, group_size, m_bucket(m))


def plan_for(x2: torch.Tensor, w: Int4Weight) -> Int4Plan:
    """The plan ``int4_matmul`` runs for x2 ``[M, K]``: the measured one if this GPU model and
    shape were tuned (see int4_tuning), else ``default_plan``."""
    global _TUNED_LOADED
    if not _TUNED_LOADED:
        _TUNED_LOADED = True
        from . import int4_tuning

        int4_tuning.load_tuning()
    m = x2.shape[0]
    plan = _TUNED.get(tuned_key(x2.device, x2.dtype, w.out_features, w.in_features, w.group_size, m))
    return plan or default_plan(m, w.in_features, w.group_size, dequant=x2.device.type == "cuda")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so tiny test shapes still exercise split-K


def _split_k(n_tiles: int, k_blocks: int, sm_count: int, per_sm: int) -> int:
    """Splits of K (a power of two) so the grid has >= ``per_sm`` programs per SM, each
    with >= 2 K blocks: a memory-bound kernel needs many loads in flight per SM (Little's
    law: ~2 MB across an H100) and the K loop is not software-pipelined by default."""
    target = per_sm * sm_count
    split = 1
    while n_tiles * split < target and k_blocks // (split * 2) >= 2:
        split *= 2
    return split


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _FusedLaunch(NamedTuple):
    """Everything about one fused-kernel call that depends only on (plan, M, N, K, group,
    x dtype, device): computed once and cached, so a call's host work is two allocations and
    the launch itself (the per-call arithmetic and checks cost ~15 us of Python per linear
    layer, which is most of a small-M call's time on a launch-bound draft)."""

    gemv: bool
    grid: tuple
    split_k: int
    k_per_split: int
    consts: dict          # constexpr kwargs and num_warps
    sum_grid: tuple


@functools.lru_cache(maxsize=4096)
def _fused_launch(plan: "Int4Plan", m: int, n: int, k: int, group_size: int, dtype: torch.dtype,
                  device: torch.device) -> _FusedLaunch:
    why = plan.problem(k, group_size)
    if why is not None or plan.path == "dequant":
        raise ValueError(f"int4 plan {plan} cannot run the fused kernels here: {why or 'dequant path'}")
    bm, bn, bk, warps = plan.block_m, plan.block_n, plan.block_k, plan.warps
    gemv = bm == 1
    n_tiles = triton.cdiv(n, bn) * (m if gemv else triton.cdiv(m, bm))
    k_blocks = k // bk
    split_k = plan.split_k or _split_k(n_tiles, k_blocks, _sm_count(device), 8 if gemv else 4)
    k_per_split = triton.cdiv(k_blocks, min(split_k, k_blocks)) * bk
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    fast = dtype != torch.float32  # fp32 x keeps the exact nibble conversion
    if gemv:
        grid = (triton.cdiv(n, bn), split_k, m)
        consts = dict(GROUP=group_size, BLOCK_N=bn, BLOCK_K=bk, GROUPS_PER_TILE=max(1, bk // group_size),
                      STAGES=K_LOOP_STAGES, FAST=fast, num_warps=warps)
    else:
        grid = (triton.cdiv(n, bn), split_k, triton.cdiv(m, bm))
        consts = dict(GROUP=group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=K_LOOP_STAGES,
                      DOT_PRECISION="ieee" if dtype == torch.float32 or _interpreting() else "tf32",
                      UPCAST_DOT=_interpreting() and dtype == torch.bfloat16, FAST=fast, num_warps=warps)
    return _FusedLaunch(gemv, grid, split_k, k_per_split, consts, (triton.cdiv(m * n, 1024),))


def _launch_fused(x2: torch.Tensor, w: Int4Weight, split_k: Optional[int] = None,
                  cfg=None, out: Optional[torch.Tensor] = None,
                  plan: Optional[Int4Plan] = None) -> torch.Tensor:
    """Run the GEMV/tensor-core kernel on x2 ``[M, K]`` (contiguous rows) -> ``[M, N]``.

    ``plan`` (a gemv/mma ``Int4Plan``) or the older ``cfg`` tuple ``(BLOCK_M, BLOCK_N, max
    BLOCK_K, warps)``; ``split_k`` overrides the plan's.
    """
    m, k = x2.shape
    n = w.out_features
    if plan is None:
        if cfg is not None:
            bm, bn, bk_cap, warps = cfg
            plan = Int4Plan("gemv" if bm == 1 else "mma", bm, bn, _block_k(w.group_size, bk_cap), warps)
        else:
            plan = default_plan(m, k, w.group_size, dequant=False)
    if split_k is not None and split_k != plan.split_k:
        plan = dataclasses.replace(plan, split_k=split_k)
    launch = _fused_launch(plan, m, n, k, w.group_size, x2.dtype, x2.device)
    if out is None:
        out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    split = launch.split_k
    dst = out if split == 1 else torch.empty((split, m, n), device=x2.device, dtype=torch.float32)
    stride_os = 0 if split == 1 else m * n
    if launch.gemv:
        _int4_gemv_kernel[launch.grid](x2, w.qweight, w.scales, w.mins, dst, n, k, x2.stride(0), n, stride_os,
                                       launch.k_per_split, **launch.consts)
    else:
        _int4_mm_kernel[launch.grid](x2, w.qweight, w.scales, w.mins, dst, m, n, k, x2.stride(0), n, stride_os,
                                     launch.k_per_split, **launch.consts)
    if split > 1:  # one launch: sum the fp32 partials in split order, cast to x's dtype
        _sum_splits_kernel[launch.sum_grid](dst, out, split, m * n, BLOCK=1024, num_warps=4)
    return out


def run_plan(x2: torch.Tensor, w: Int4Weight, plan: Int4Plan,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2 ``[M, K]`` @ W.T with an explicit plan (what the tuner times)."""
    if plan.path == "dequant":
        return _dequant_matmul(x2, w, out)
    return _launch_fused(x2, w, out=out, plan=plan)


_scratch: dict = {}


def _get_scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A per-(device, dtype) buffer reused across calls; grows, never shrinks."""
    key = (device, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, device=device, dtype=dtype)
        _scratch[key] = buf
    return buf[:numel]


def dequantize_into(w: Int4Weight, out: torch.Tensor, row_start: int = 0) -> torch.Tensor:
    """Dequantise rows ``[row_start, row_start + out.shape[0])`` of W into ``out`` ``[rows, K]``."""
    rows, k = out.shape
    if k != w.in_features or not out.is_contiguous() or row_start + rows > w.out_features:
        raise ValueError("dequantize_into: out must be contiguous [rows, in_features] within W")
    bn, bk = 32, _block_k(w.group_size, 128)
    grid = (triton.cdiv(rows, bn), k // bk)
    _int4_dequant_kernel[grid](w.qweight, w.scales, w.mins, out, w.out_features, rows, k,
                               row_start, GROUP=w.group_size, BLOCK_N=bn, BLOCK_K=bk,
                               FAST=out.dtype != torch.float32, num_warps=4)
    return out


def _dequant_matmul(x2: torch.Tensor, w: Int4Weight,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Large-M path: dequantise (chunks of) W into scratch, then cuBLAS. ``[M, N]``."""
    m, k = x2.shape
    n = w.out_features
    rows = max(1, min(n, SCRATCH_MAX_ELEMENTS // k))
    if rows >= n:
        wd = dequantize_into(w, _get_scratch(x2.device, x2.dtype, n * k).view(n, k))
        return torch.mm(x2, wd.T) if out is None else torch.mm(x2, wd.T, out=out)
    if out is None:
        out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    buf = _get_scratch(x2.device, x2.dtype, rows * k)
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        wd = dequantize_into(w, buf[: r * k].view(r, k), r0)
        out[:, r0:r0 + r] = x2 @ wd.T
    return out


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------
def _check_out(out: torch.Tensor, x: torch.Tensor, w: Int4Weight) -> None:
    want = (*x.shape[:-1], w.out_features)
    if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"int4_matmul: out must be {x.dtype} {want} on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("int4_matmul: out must be contiguous")


def int4_matmul(x: torch.Tensor, w: Int4Weight,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T`` for x ``[..., in_features]`` -> ``[..., out_features]`` in x's dtype.

    ``out`` (optional, contiguous, x's dtype) receives the result, e.g. a static buffer
    under CUDA graphs.
    """
    _check_inputs(x, w)
    if out is not None:
        _check_out(out, x, w)
    if x.device.type == "cpu" and not _interpreting():
        y = int4_matmul_cpu(x, w)
        return y if out is None else out.copy_(y)
    if triton is None:
        raise RuntimeError("int4_matmul: Triton is required for non-CPU tensors")
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    flat = x.dim() == 2         # the runtime's case: no reshapes on the way in or out
    x2 = x if flat else x.reshape(-1, w.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out2 = None if out is None else (out if flat else out.view(-1, w.out_features))
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], w.out_features) if out is None else out
    y = run_plan(x2, w, plan_for(x2, w), out2)
    if out is not None:
        return out
    return y if flat else y.reshape(*x.shape[:-1], w.out_features)


# Converters live in their own module; re-exported here as the documented entry points.
from .int4_formats import from_awq, from_gguf_q4_0, from_gguf_q4_1, from_gguf_q4_k, from_gptq  # noqa: E402
