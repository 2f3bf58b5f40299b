"""The inputs of tree attention, shared by the Triton kernel and the PyTorch reference:
``Segments`` (a ragged batch of requests over one KV cache) and the host-side checks of q, k, v
and the tree mask (no device sync except ``check_rows_visible``)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Segments(NamedTuple):
    """A ragged batch of attention problems over one KV cache (one segment per request).

    Segment ``s`` owns ``n_q[s]`` consecutive query rows (in segment order); its keys are the
    cache rows ``[base[s], base[s] + prefix[s] + n_tree[s])``: ``prefix[s]`` committed keys
    seen by every row of the segment, then ``n_tree[s]`` tree keys seen through the row's
    mask bits (bit ``j`` of a row = tree key ``j`` of its own segment). Host ints: the
    launch is planned from them once per forward.
    """

    n_q: tuple
    base: tuple
    prefix: tuple
    n_tree: tuple

    @staticmethod
    def single(n_q: int, prefix_len: int, n_tree: int) -> "Segments":
        return Segments((int(n_q),), (0,), (int(prefix_len),), (int(n_tree),))

    @property
    def total_q(self) -> int:
        return sum(self.n_q)

    @property
    def max_tree(self) -> int:
        return max(self.n_tree, default=0)

    def check(self, n_q_total: int, n_keys: int) -> None:
        """Host checks: the rows add up and every segment's keys lie inside the cache."""
        if not (len(self.n_q) == len(self.base) == len(self.prefix) == len(self.n_tree)) or not self.n_q:
            raise ValueError("Segments: n_q, base, prefix and n_tree must be non-empty and of one length")
        if self.total_q != n_q_total:
            raise ValueError(f"segments hold {self.total_q} query rows but q has {n_q_total}")
        for i, (nq, b, p, t) in enumerate(zip(*self)):
            if min(nq, b, p, t) < 0:
                raise ValueError(f"segment {i}: negative size in n_q={nq}, base={b}, prefix={p}, n_tree={t}")
            if b + p + t > n_keys:
                raise ValueError(f"segment {i}: keys [{b}, {b + p + t}) exceed the {n_keys} cache rows")


# The dtypes queries come in; K/V may also be in any KV storage dtype (kv.KV_DTYPES).
Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Shape/dtype/device checks shared by the kernel and the reference (host-only, no sync).
    K and V share a dtype: q's, or a KV storage dtype (``kv.KV_DTYPES``) read by converting;
    int8 ones come with float32 ``k_scale``/``v_scale`` ``[n_k, n_kv_heads]``."""
    from .kv import KV_DTYPES

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [n, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head_dim differs: q has {q.shape[2]}, k/v have {k.shape[2]}")
    if k.dtype != v.dtype or (q.dtype != k.dtype and not (q.dtype in Q_DTYPES and k.dtype in KV_DTYPES.values())):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype} (k and v share one dtype: q's, "
                        f"or a KV storage dtype ({', '.join(KV_DTYPES)}) with q in {[str(d) for d in Q_DTYPES]})")
    if (k.dtype is torch.int8) != (k_scale is not None and v_scale is not None):
        raise TypeError(f"an int8 k/v needs k_scale and v_scale, and only int8 takes them (k is {k.dtype}, "
                        f"scales {'given' if k_scale is not None or v_scale is not None else 'missing'})")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != tuple(k.shape[:2]) or t.device != k.device):
            raise ValueError(f"{name} must be float32 {list(k.shape[:2])} on {k.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_kv == 0 or n_heads % n_kv != 0:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(f"prefix_len must be a Python int, got {type(prefix_len).__name__}")
    if not 0 <= prefix_len <= k.shape[0]:
        raise ValueError(f"prefix_len {prefix_len} is outside [0, n_k={k.shape[0]}]")


def check_tree_mask(tree_mask: torch.Tensor, n_q: int, n_tree: int, device) -> None:
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool:
        raise TypeError("tree_mask must be a bool tensor [n_q, n_k - prefix_len]")
    if tuple(tree_mask.shape) != (n_q, n_tree):
        raise ValueError(f"tree_mask shape {tuple(tree_mask.shape)} != (n_q, n_k - prefix_len) = "
                         f"({n_q}, {n_tree})")
    if tree_mask.device != device:
        raise ValueError(f"tree_mask is on {tree_mask.device}, q/k/v on {device}")


def check_rows_visible(tree_mask: torch.Tensor) -> None:
    """With an empty prefix every query must see a tree entry (host sync: call once)."""
    if tree_mask.shape[0] and tree_mask.shape[1] == 0:
        raise ValueError("prefix_len == 0 and no tree entries: every query row is fully masked")
    empty = ~tree_mask.any(dim=1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten()[:8].tolist()
        raise ValueError(f"prefix_len == 0 and tree_mask rows {rows} see no key "
                         "(a tree node must at least see itself)")
