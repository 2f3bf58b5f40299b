"""The Triton kernels of ``int4_matmul`` (launched by ``gemm``): the GEMV (M = 1), the
tensor-core tile (``out.T = W @ x.T``), the dequantiser of the large-M path, and the split-K
sum. Launchers call them through this module (``triton_kernels._int4_gemv_kernel``), so one
patch reaches them all. Layouts: ``weight``'s module docstring."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still get the CPU paths
    triton = None
    tl = None

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
