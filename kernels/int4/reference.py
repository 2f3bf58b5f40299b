"""PyTorch references of the int4 matmuls: ``int4_matmul_reference`` (the dequantised weight, the
oracle of every path) and the native CPU kernel's own arithmetic (int8-quantized activations,
exact integer block dots), which the tests compare bit-exactly or to float32 rounding."""
from __future__ import annotations

from typing import Optional

import torch

from .weight import PACK, Int4Weight, check_matmul_inputs


def int4_matmul_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """``x @ W.T`` in fp32 from the dequantised weight, cast to x's dtype. ``[..., N]``."""
    check_matmul_inputs(x, w)
    return (x.float() @ w.dequantize(torch.float32).T).to(x.dtype)


def quantize_activations_q8(x: torch.Tensor, w: Int4Weight):
    """Quantize ``x`` ``[M, K]`` as the native kernel does (bit-exact): after the act-order
    gather, per row and 32-block ``d = amax / 127``, ``xq = round_half_even(x * (1 / d))``
    (0 where d = 0); ``xs[:, g]`` = sum over the group's blocks, in order, of ``d * sum(xq)``.
    Returns ``(xq int8 [M, K], d [M, K/32], xs [M, K/G])``."""
    x = x.to(torch.float32)
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    m, k = x.shape
    xb = x.reshape(m, k // PACK, PACK)
    amax = xb.abs().amax(-1)
    d = torch.div(amax, torch.full_like(amax, 127.0))           # tensor / tensor: IEEE division
    inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))
    xq = torch.round(xb * inv[..., None])                        # half to even, as the kernel
    sums = xq.sum(-1)                                            # exact: integers below 2**24
    bpg = w.group_size // PACK
    xs = torch.zeros(m, k // w.group_size)
    for j in range(bpg):                                         # the kernel's summation order
        xs = xs + d[:, j::bpg] * sums[:, j::bpg]
    return xq.to(torch.int8).reshape(m, k), d, xs


def int4_matmul_q8_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """The native kernel's result in PyTorch, ``[..., N]`` fp32: ``Wdeq @ xhat`` with ``xhat``
    the int8-quantized activations, computed as the kernel does (exact integer block dots, then
    ``sum_b isum * (scale * d) + min * xs`` per group) up to fp32 rounding order."""
    check_matmul_inputs(x, w)
    lead = x.shape[:-1]
    k, n, g = w.in_features, w.out_features, w.group_size
    x2 = x.reshape(-1, k)
    xq, d, xs = quantize_activations_q8(x2, w)
    m, nb, bpg = x2.shape[0], k // PACK, g // PACK
    q = w.unpack().to(torch.float32).view(n, nb, PACK)              # stored K order
    isum = torch.einsum("mbi,nbi->mbn", xq.to(torch.float32).view(m, nb, PACK), q)  # exact integers
    s, mn = w.scales.float(), w.mins.float()                        # [K/G, N]
    acc = torch.zeros(m, n)
    for b in range(nb):
        acc = acc + isum[:, b] * (s[b // bpg][None, :] * d[:, b, None])
        if b % bpg == bpg - 1:
            acc = acc + mn[b // bpg][None, :] * xs[:, b // bpg, None]
    return acc.reshape(*lead, n)


def int4_linear_q8_reference(x: torch.Tensor, w: Int4Weight, residual: Optional[torch.Tensor] = None,
                             norm: Optional[tuple] = None, swiglu: bool = False) -> torch.Tensor:
    """``int4_linear_native`` in PyTorch: the prologue with torch ops (SiLU, HF's RMSNorm), then
    ``int4_matmul_q8_reference``, then the residual."""
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    if norm is not None:
        nw, eps = norm
        x = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    y = int4_matmul_q8_reference(x, w)
    return y if residual is None else y + residual
