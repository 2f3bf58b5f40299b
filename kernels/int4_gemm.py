"""``int4_matmul``: 4-bit weight-only matmul, Triton kernels and their launch.

Dispatch for x ``[M, K]`` and an ``Int4Weight`` ``[N, K]`` (format: ``int4_weight``):

- CUDA, M == 1: GEMV kernel (fp32 accumulator tile, reduced once at the end), split-K so
  that a skinny N still fills the GPU; nibbles become floats with the 2**23 magic-number
  trick because int->float conversion runs at 1/8 rate and would cap the bandwidth.
- CUDA, 2 <= M < ``DEQUANT_MIN_M``: tensor-core kernel computing ``out.T = W @ x.T`` (the
  dequantised weight tile is the *left* operand: on Hopper only wgmma's A may come from
  registers, and N-tiles of 64+ rows keep the MMA full when M is 16), split-K as above.
- CUDA, M >= ``DEQUANT_MIN_M``: dequantise into a reused scratch buffer, then cuBLAS: at
  these sizes the product is compute-bound and the dequantisation is a small extra pass.
- CPU: ``int4_cpu.int4_matmul_cpu``, unless ``TRITON_INTERPRET=1``, when CPU tensors run
  the Triton kernels (that is how the kernels are tested without a GPU).

Split-K writes fp32 partials ``[S, M, N]`` summed afterwards (deterministic, no atomics).
Each CUDA call runs the ``Int4Plan`` that ``int4_plans.plan_for`` picks (measured, or the
default). The reference is ``int4_weight.int4_matmul_reference``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still get the CPU paths
    triton = None
    tl = None

from .int4_cpu import int4_matmul_cpu
from .int4_plans import Int4Plan, block_k_for, default_plan, plan_for
from .int4_weight import Int4Weight, check_matmul_inputs
# Module attributes on purpose: bench/host_overhead.py stands in for the interpreter check.
from .triton_env import interpreting as _interpreting, sm_count as _sm_count

# Software-pipelining stages of the K loops. 1 is the safe default: LLVM crashed when
# pipelining loops over bit-packed weights in some Triton versions.
K_LOOP_STAGES = 1
# The scratch buffer of the dequantise path is split along N above this many elements,
# so a fused 70B gate/up matrix (470M weights) takes two chunks (H100: N-chunks of 2340 rows
# for the 70B down projection ran 3x slower than fp16; whole-matrix chunks are 1-2).
SCRATCH_MAX_ELEMENTS = 256 * 1024 * 1024


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



def _split_k(n_tiles: int, k_blocks: int, sm_count: int, per_sm: int) -> int:
    """Splits of K (a power of two) so the grid has >= ``per_sm`` programs per SM, each
    with >= 2 K blocks: a memory-bound kernel needs many loads in flight per SM (Little's
    law: ~2 MB across an H100) and the K loop is not software-pipelined by default."""
    target = per_sm * sm_count
    split = 1
    while n_tiles * split < target and k_blocks // (split * 2) >= 2:
        split *= 2
    return split


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
            plan = Int4Plan("gemv" if bm == 1 else "mma", bm, bn, block_k_for(w.group_size, bk_cap), warps)
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
    bn, bk = 32, block_k_for(w.group_size, 128)
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
    check_matmul_inputs(x, w)
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


