"""PyTorch references of tree attention (the oracles of the kernel tests, and the CPU
runtime's attention where the native call does not serve): one-request and ragged forms, the
masks they use (built once per forward), the mask-free decode step through SDPA, and
``rope_attention_reference`` for the native CPU call of ``attention.cpu``."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .inputs import Segments, check_qkv, check_rows_visible, check_tree_mask
from .kv import KVView


def reference_mask(tree_mask: torch.Tensor | None, prefix_len: int, group: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The reference path's mask, built once per forward and reused by every layer.

    Additive (0 / -inf) ``[group * n_q, prefix_len + n_tree]`` with the query heads of a KV
    group folded into the rows (row ``g * n_q + i`` is query ``i``); ``None`` when every query
    sees every key (``tree_mask`` None or all True), which lets SDPA skip masking entirely.
    """
    if tree_mask is None or (tree_mask.device.type == "cpu" and bool(tree_mask.all())):
        return None
    n_q, n_tree = tree_mask.shape
    visible = torch.ones(n_q, prefix_len + n_tree, dtype=torch.bool, device=tree_mask.device)
    visible[:, prefix_len:] = tree_mask
    return _additive(visible, group, dtype)


def reference_mask_device_prefix(tree_mask: torch.Tensor, bound: int, prefix_dev: torch.Tensor,
                                 group: int) -> torch.Tensor:
    """``reference_mask`` when the prefix length is a device value (static-shape passes):
    ``[group * n_q, bound + n_tree]``, key j visible if ``j < prefix`` or
    ``tree_mask[i, j - prefix]``; device ops only, no sync."""
    n_q, n_tree = tree_mask.shape
    rel = torch.arange(bound + n_tree, device=tree_mask.device) - prefix_dev.long()
    in_tree = (rel >= 0) & (rel < n_tree)
    visible = tree_mask[:, rel.clamp(0, max(0, n_tree - 1))] & in_tree if n_tree else in_tree[None].expand(n_q, -1)
    return _additive(visible | (rel < 0)[None, :], group, torch.float32)


def _additive(visible: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """bool ``[n_q, n_k]`` -> additive 0 / -inf mask with the GQA group folded into the rows."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    return mask.repeat(group, 1) if group > 1 else mask


def tree_attention_reference_prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """The reference with a mask from ``reference_mask`` (no validation: the hot CPU path).

    The query heads of a KV group are folded into the query axis (q viewed as
    ``[n_kv, group * n_q, D]``) so K/V are never repeated per query head; SDPA runs once.
    Computes in q's dtype when it is float32 (the CPU runtime), else upcasts to float32.
    """
    n_q, n_heads, d = q.shape
    n_k, n_kv, _ = k.shape
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # [n_q, n_kv, group, D] -> [1, n_kv, group * n_q, D]: row index = g * n_q + i.
    qg = q.float().view(n_q, n_kv, group, d).permute(1, 2, 0, 3).reshape(1, n_kv, group * n_q, d)
    kf = k.float().permute(1, 0, 2).unsqueeze(0)
    vf = v.float().permute(1, 0, 2).unsqueeze(0)
    if mask is not None:
        mask = mask.to(qg.dtype)
    o = torch.nn.functional.scaled_dot_product_attention(qg, kf, vf, attn_mask=mask, scale=scale)
    o = o.view(n_kv, group, n_q, d).permute(2, 0, 1, 3).reshape(n_q, n_heads, d)
    return o.to(q.dtype)


def prefix_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """Attention where every query sees every key: PyTorch SDPA, no mask, in q's dtype.

    This is the one-token decode step (autoregressive decoding, chain drafting): the new
    token sees the whole prefix and itself, so there is nothing to mask. There the tree
    kernel's time is its launch cost (host checks, Triton launch, split-K merge: ~0.12 ms on
    an H100 at n_q=1 against 0.015-0.05 ms for flash SDPA), and flash SDPA is the floor.
    Same layout as :func:`tree_attention_reference_prepared` but no upcast and no copy of
    K/V: the query heads of a KV group are folded into the query axis (q viewed as
    ``[1, n_kv, group * n_q, D]``) and K/V go in as permuted views of the cache slice, so
    they are neither repeated per query head nor made contiguous. No validation (hot path).

    q ``[n_q, n_heads, D]``; k, v ``[n_k, n_kv_heads, D]`` (unit stride on D, e.g. a slice
    of a ``[max_len, n_kv_heads, D]`` cache). Returns a new ``[n_q, n_heads, D]`` tensor.
    """
    n_q, n_heads, d = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    # Row index of the folded query axis = g * n_q + i (a view when n_q == 1).
    qg = q.reshape(n_q, n_kv, group, d).permute(1, 2, 0, 3).reshape(1, n_kv, group * n_q, d)
    o = torch.nn.functional.scaled_dot_product_attention(
        qg, k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0), scale=scale)
    return o.view(n_kv, group, n_q, d).permute(2, 0, 1, 3).reshape(n_q, n_heads, d)


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    prefix_len: int,
    scale: float | None = None,
    *,
    validate: bool = True,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch tree attention in float32 (the oracle of the kernel tests); same contract, K/V in
    any KV storage dtype (decoded first: ``kv.decode``).

    ``reference_mask`` + ``tree_attention_reference_prepared``, with the inputs checked.
    ``validate`` rejects fully masked rows when prefix_len == 0 (a sync on CUDA).
    """
    check_qkv(q, k, v, prefix_len, k_scale, v_scale)
    k, v = KVView(k, v, k_scale, v_scale).values(torch.float32)
    n_q, n_heads, _ = q.shape
    n_k, n_kv, _ = k.shape
    check_tree_mask(tree_mask, n_q, n_k - prefix_len, q.device)
    if validate and prefix_len == 0:
        check_rows_visible(tree_mask)
    mask = reference_mask(tree_mask, prefix_len, n_heads // n_kv) if n_k - prefix_len > 0 else None
    return tree_attention_reference_prepared(q, k, v, mask, scale)


def ragged_reference_masks(tree_mask: torch.Tensor, segments: Segments, group: int) -> list:
    """Per segment, the reference path's additive mask (``reference_mask``; None where the
    segment's rows see all their keys), built once per forward; ``tree_mask`` as for
    :func:`tree_attention_ragged`."""
    masks, q0 = [], 0
    for nq, p, t in zip(segments.n_q, segments.prefix, segments.n_tree):
        masks.append(reference_mask(tree_mask[q0:q0 + nq, :t], p, group) if t else None)
        q0 += nq
    return masks


def tree_attention_ragged_reference_prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: list,
                                             segments: Segments, scale: float | None = None) -> torch.Tensor:
    """The ragged reference with masks from :func:`ragged_reference_masks`: one SDPA per
    segment over its own slice of the cache (the CPU runtime's path)."""
    if len(segments.n_q) == 1 and segments.base[0] == 0:
        n = segments.prefix[0] + segments.n_tree[0]
        return tree_attention_reference_prepared(q, k[:n], v[:n], masks[0], scale)
    out, q0 = [], 0
    for nq, b, p, t, mask in zip(*segments, masks):
        out.append(tree_attention_reference_prepared(q[q0:q0 + nq], k[b:b + p + t], v[b:b + p + t], mask, scale))
        q0 += nq
    return torch.cat(out, 0)


def tree_attention_ragged_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor,
                                    segments: Segments, scale: float | None = None, *,
                                    k_scale: torch.Tensor | None = None,
                                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch oracle of :func:`tree_attention_ragged`: each segment through
    :func:`tree_attention_reference` on its own slice of the cache. Same contract."""
    check_qkv(q, k, v, 0, k_scale, v_scale)
    k, v = KVView(k, v, k_scale, v_scale).values(torch.float32)
    segments.check(q.shape[0], k.shape[0])
    if tree_mask.shape[0] != q.shape[0] or tree_mask.shape[1] < segments.max_tree:
        raise ValueError(f"tree_mask shape {tuple(tree_mask.shape)} must be [{q.shape[0]}, >= {segments.max_tree}]")
    out, q0 = [], 0
    for nq, b, p, t in zip(*segments):
        out.append(tree_attention_reference(q[q0:q0 + nq], k[b:b + p + t], v[b:b + p + t], tree_mask[q0:q0 + nq, :t],
                                            p, scale))
        q0 += nq
    return torch.cat(out, 0)


def rope_attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                             cache_v: torch.Tensor, slots: torch.Tensor, tree_mask: torch.Tensor,
                             segments: Segments, n_heads: int, n_kv_heads: int,
                             scale: Optional[float] = None, *, k_scale: Optional[torch.Tensor] = None,
                             v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``rope_attention_cpu`` in PyTorch ops (same contract; writes the cache the same way, in its
    storage dtype: ``kv.encode``)."""
    d = cache_k.shape[2]
    n = qkv.shape[0]
    c, s = cos.reshape(n, 1, d), sin.reshape(n, 1, d)
    qk = qkv[:, :(n_heads + n_kv_heads) * d].reshape(n, n_heads + n_kv_heads, d)
    half = d // 2
    qk = qk * c + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * s
    cache = KVView(cache_k, cache_v, k_scale, v_scale)
    cache.write(slots, qk[:, n_heads:], qkv[:, (n_heads + n_kv_heads) * d:].reshape(n, n_kv_heads, d))
    k, v = cache.values(torch.float32)
    out = tree_attention_ragged_reference(qk[:, :n_heads], k, v, tree_mask, segments, scale)
    return out.reshape(n, n_heads * d)
