"""``rope_attention_cpu``: one layer's attention for a CPU float32 pass as one native call
(``sxc_rope_attention`` in ``csrc/attn_cpu.h``), with RoPE and the KV-cache write folded in, and
its PyTorch reference.

A CPU decode step is op-bound around attention: RoPE, two cache writes, views, permutes and
SDPA are a dozen eager PyTorch ops per layer, ~0.3 ms of a small model's layer. The native call
does all of it for every pass shape the runtime makes (a decode step, a draft tree level, a
verification tree, several requests' segments in one pass): each row sees the committed slots
of its segment and the tree slots its mask row allows. A row's result depends only on the keys
it sees, in a fixed order, so it is the same whether the row is computed alone or with others.
The cache may be float32, float16, bfloat16 or int8 (``kv.py``): the kernel stores the new K/V
in that format and reads each chunk of keys once per KV head, converted to float32, for every
query of the pass that sees it (``csrc/attn_cpu.h``).

Plan once per forward (``plan_rows``), run per layer (``run_rope_attention``). The reference is
``reference.rope_attention_reference``.
"""
from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch

from .. import cpu_native
from .inputs import Segments
from .kv import KV_DTYPES, NATIVE_CODES

MAX_HEAD_DIM = 256  # csrc/attn_cpu.h SXC_ATTN_MAX_D

cpu_native.declare({
    "sxc_rope_attention": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                                          ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_void_p, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p,
                                          ctypes.c_int, ctypes.c_int]),
})


def plan_rows(segments: Segments) -> torch.Tensor:
    """int32 ``[n_q, 3]``: each query row's ``(base, prefix, n_tree)`` from its segment."""
    rows = []
    for nq, b, p, t in zip(*segments):
        rows.extend([(b, p, t)] * nq)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 3)


def serves(head_dim: int) -> bool:
    """Whether the native call can take a CPU float32 pass with this head size."""
    return head_dim % 2 == 0 and head_dim <= MAX_HEAD_DIM and cpu_native.library() is not None


def exp_native(x: torch.Tensor, isa: Optional[str] = None) -> torch.Tensor:
    """``exp(x)`` as the native library computes it inside the softmax and SiLU (``exp_fixed`` in
    ``csrc/cpu_common.h``: one fixed sequence of float operations, the same bits on every ISA path,
    within an ulp of the exact value; 0 below -87.336, inf above 88.376). For the tests."""
    if cpu_native.library() is None:
        raise RuntimeError(f"native CPU library unavailable: {cpu_native.unavailable_reason()}")
    level = cpu_native.isa_level(isa)
    x = x.detach().to(torch.float32).contiguous()
    y = torch.empty_like(x)
    rc = cpu_native.library().sxc_exp(x.data_ptr(), x.numel(), y.data_ptr(), level)
    if rc != 0:
        raise RuntimeError(f"sxc_exp failed ({rc})")
    return y


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def run_rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                       cache_v: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                       n_heads: int, n_kv_heads: int, head_dim: int, scale: float,
                       isa_level: Optional[int] = None, threads: Optional[int] = None,
                       k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The native call without checks (the hot path of ``model/ops.py``): ``qkv`` float32
    ``[n, (n_heads + 2 n_kv_heads) head_dim]`` with unit column stride; ``cos``/``sin`` float32
    contiguous ``[n, head_dim]`` (any shape with those elements); ``cache_k``/``cache_v``
    contiguous ``[max_len, n_kv_heads, head_dim]`` in a ``kv.KV_DTYPES`` storage dtype, with
    contiguous float32 ``k_scale``/``v_scale`` ``[max_len, n_kv_heads]`` for int8; ``slots`` int64
    ``[n]``; ``rows`` int32 ``[n, 3]`` (``plan_rows``); ``mask`` bool ``[n, width]``, all contiguous.
    Returns ``[n, n_heads * head_dim]``."""
    lib = cpu_native.library()
    n = qkv.shape[0]
    out = torch.empty(n, n_heads * head_dim)
    rc = lib.sxc_rope_attention(qkv.data_ptr(), n, qkv.stride(0), n_heads, n_kv_heads, head_dim, cos.data_ptr(),
                                sin.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), _ptr(k_scale), _ptr(v_scale),
                                NATIVE_CODES[cache_k.dtype], cache_k.shape[0], slots.data_ptr(), rows.data_ptr(),
                                mask.data_ptr(), mask.shape[1], scale, out.data_ptr(), threads or torch.get_num_threads(),
                                cpu_native.isa() if isa_level is None else isa_level)
    if rc != 0:
        raise RuntimeError(f"sxc_rope_attention failed: {cpu_native.ERRORS.get(rc, rc)} (a cache slot or a "
                           f"segment outside the cache of {cache_k.shape[0]} slots, or inconsistent shapes)")
    return out


def _check(qkv, cos, sin, cache_k, cache_v, slots, tree_mask, segments, n_heads, n_kv_heads, k_scale, v_scale):
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}")
    if cache_k.dim() != 3 or cache_k.shape != cache_v.shape or cache_k.shape[1] != n_kv_heads:
        raise ValueError(f"cache_k and cache_v must both be [max_len, {n_kv_heads}, head_dim], got "
                         f"{list(cache_k.shape)} and {list(cache_v.shape)}")
    d = cache_k.shape[2]
    n = qkv.shape[0] if qkv.dim() == 2 else -1
    if qkv.dim() != 2 or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * d:
        raise ValueError(f"qkv must be [n, {(n_heads + 2 * n_kv_heads) * d}] ((n_heads + 2 n_kv_heads) "
                         f"head_dim), got {list(qkv.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.numel() != n * d:
            raise ValueError(f"{name} must hold [{n}, {d}] (one row per new token), got {list(t.shape)}")
    for name, t in (("qkv", qkv), ("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or not t.is_cpu:
            raise ValueError(f"{name} must be a CPU float32 tensor, got {t.dtype} on {t.device}")
    if cache_k.dtype not in NATIVE_CODES or cache_v.dtype != cache_k.dtype or not (cache_k.is_cpu and cache_v.is_cpu):
        raise ValueError(f"cache_k and cache_v must be CPU tensors of one KV storage dtype "
                         f"({', '.join(KV_DTYPES)}), got {cache_k.dtype} and {cache_v.dtype}")
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()):
        raise ValueError("cache_k and cache_v must be contiguous (the kernel writes them in place)")
    if (cache_k.dtype is torch.int8) != (k_scale is not None and v_scale is not None):
        raise ValueError("k_scale and v_scale go with an int8 cache, and only with one")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != tuple(cache_k.shape[:2])
                              or not t.is_contiguous() or not t.is_cpu):
            raise ValueError(f"{name} must be a contiguous CPU float32 [{cache_k.shape[0]}, {n_kv_heads}] tensor")
    if tuple(slots.shape) != (n,):
        raise ValueError(f"slots must be [{n}], got {list(slots.shape)}")
    if segments.total_q != n:
        raise ValueError(f"the segments hold {segments.total_q} query rows, qkv {n}")
    if tree_mask.dim() != 2 or tree_mask.shape[0] != n or tree_mask.shape[1] < segments.max_tree:
        raise ValueError(f"tree_mask must be [{n}, >= {segments.max_tree}], got {list(tree_mask.shape)}")
    if d % 2 or d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={d} must be even and at most {MAX_HEAD_DIM}")


def rope_attention_cpu(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                       cache_v: torch.Tensor, slots: torch.Tensor, tree_mask: torch.Tensor, segments: Segments,
                       n_heads: int, n_kv_heads: int, scale: Optional[float] = None, isa: Optional[str] = None,
                       threads: Optional[int] = None, *, k_scale: Optional[torch.Tensor] = None,
                       v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write RoPE'd K and V of the new tokens to ``slots`` of the cache, then attend.

    ``qkv`` float32 ``[n, (n_heads + 2 n_kv_heads) head_dim]`` (q heads, k heads, v heads of
    each new token, before RoPE); ``cos``/``sin`` ``[n, head_dim]`` (the tables' rows at the
    tokens' positions, rotate-half layout); ``cache_k``/``cache_v`` ``[max_len, n_kv_heads, head_dim]``
    in a storage dtype of ``kv.KV_DTYPES`` (int8 with float32 ``k_scale``/``v_scale``
    ``[max_len, n_kv_heads]``), written in place (``kv.encode``'s bits); ``slots`` ``[n]``; ``segments`` and
    ``tree_mask`` as for ``tree_attention_ragged`` (row ``i`` of segment
    ``s`` sees slots ``base + j`` for ``j < prefix`` and tree slot ``t`` where
    ``tree_mask[i, t]``). Returns float32 ``[n, n_heads * head_dim]``. ``isa`` and ``threads``
    as for the other native kernels. Raises ValueError on bad input, RuntimeError without the
    library."""
    if cpu_native.library() is None:
        raise RuntimeError(f"native CPU library unavailable: {cpu_native.unavailable_reason()}")
    _check(qkv, cos, sin, cache_k, cache_v, slots, tree_mask, segments, n_heads, n_kv_heads, k_scale, v_scale)
    level = cpu_native.isa_level(isa)
    d = cache_k.shape[2]
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return run_rope_attention(qkv, cos.contiguous(), sin.contiguous(), cache_k, cache_v,
                              slots.to(torch.int64).contiguous(), plan_rows(segments),
                              tree_mask.to(torch.bool).contiguous(), n_heads, n_kv_heads, d, scale, level, threads,
                              k_scale, v_scale)
