"""The transformer: one forward path for prefill, decode, draft-tree growth and tree verification.

A chain is a tree: prefill is a causal chain over the prompt, decode a one-node tree, and both
draft growth and verification pass an explicit ancestor mask over the tree region of the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..kernels.layers import NativeLayers
from . import moe, ops
from .config import ModelConfig
from ..kernels.attention.kv import KVView, kv_dtype_name
from .kv_cache import KVCache, resolve_kv_dtype
from .weights import LayerWeights, ModelWeights, ResidentLayers


@dataclass
class Segment:
    """One request's part of a batched forward (``Transformer.forward_batch``).

    ``n_new`` new tokens attend to the committed slots ``[base, base + prefix_len)`` of the
    request's cache region and to its tree slots ``base + prefix_len + j`` where
    ``tree_mask[i, j]`` (bool ``[n_new, n_tree]``; None: a causal chain over the new tokens,
    ``n_tree = n_new``). Their K/V go to ``cache_slots`` (absolute, int64 ``[n_new]``;
    default: the last ``n_new`` slots of the tree region).
    """

    n_new: int
    base: int = 0
    prefix_len: int = 0
    tree_mask: Optional[torch.Tensor] = None
    cache_slots: Optional[torch.Tensor] = None

    @property
    def n_tree(self) -> int:
        return self.n_new if self.tree_mask is None else int(self.tree_mask.shape[1])


def causal_mask(n: int, device) -> torch.Tensor:
    """The tree mask of a chain: bool ``[n, n]``, lower triangular."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


def forward_segments(model, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                     segments: Sequence[Segment], logits_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``model.forward_batch(...)``, through ``model.forward`` when the batch is one segment at the
    start of the cache (the same result; ``forward`` skips assembling the ragged batch's mask)."""
    if len(segments) == 1 and segments[0].base == 0:
        s = segments[0]
        return model.forward(token_ids, positions, cache, s.prefix_len, s.tree_mask, s.cache_slots, logits_rows)
    return model.forward_batch(token_ids, positions, cache, segments, logits_rows=logits_rows)


def transformer_block(x: torch.Tensor, w: LayerWeights, cfg: ModelConfig, cos: torch.Tensor,
                      sin: torch.Tensor, kv: KVView, slots: torch.Tensor, meta: ops.AttentionPlan) -> torch.Tensor:
    """``x`` ``[n, hidden]`` -> ``[n, hidden]``; writes this layer's K/V for the new tokens into
    ``kv`` (the layer's cache, ``KVCache.layer``)."""
    n = x.shape[0]
    h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qkv = ops.norm_linear(x, w.attn_norm, cfg.rms_norm_eps, w.wqkv, w.bqkv)
    if w.q_norm is not None:  # Qwen3: each q and k head RMS-normalised before RoPE
        qkv = ops.qk_norm(qkv, w.q_norm, w.k_norm, h, hkv, d, cfg.rms_norm_eps)
    if meta.native_rows is not None:  # CPU float32: RoPE, cache write and attention in one call
        attn = ops.rope_attention(qkv, cos, sin, kv, slots, meta, h, hkv, d)
    else:
        # q and k heads rotate together: one RoPE call instead of two (decode is op-bound on CPU).
        qk = ops.apply_rope(qkv[:, :(h + hkv) * d].view(n, h + hkv, d), cos, sin)
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + hkv) * d:]
        kv.write(slots, k, v.view(n, hkv, d))
        attn = ops.attention(q, kv.first(meta.n_k), meta).reshape(n, h * d)
    x = ops.linear(attn, w.wo, w.bo, residual=x)
    if w.moe is not None:
        return moe.moe_mlp(x, w, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.rms_norm_eps)
    gate_up = ops.norm_linear(x, w.ffn_norm, cfg.rms_norm_eps, w.w_gate_up)
    return ops.swiglu_linear(gate_up, w.w_down, residual=x)


class Transformer:
    """A decoder-only Llama-family model with a static KV cache (Llama, Mistral, Qwen2, Qwen3;
    Qwen3-MoE and Mixtral with mixture-of-experts layers: ``transformer_block`` and ``moe.py``).

    ``weights.layers`` are served through ``layer_source`` (resident by default, or an offload
    ``LayerStreamer``); everything else is resident on ``device``.

    ``kv_layers``: the cache layer each of this model's layers reads and writes (None: layer i
    uses cache layer i). A draft that reads its target's cache is made of some of the target's
    layers and uses the target's cache layers of the layers it kept. ``own_cache=False``: the
    model allocates no KV cache (``cache`` is None); every forward is given one.
    """

    def __init__(self, config: ModelConfig, weights: ModelWeights, max_len: int,
                 device: torch.device, dtype: torch.dtype, layer_source=None, kv_dtype=None, cache_factory=None,
                 kv_layers: Optional[Sequence[int]] = None, own_cache: bool = True):
        self.config = config
        self.weights = weights
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_len = int(max_len)
        # The KV caches' storage dtype (kv_cache.resolve_kv_dtype: half precision where the
        # attention kernels read it; float32 is always available).
        self.kv_dtype = resolve_kv_dtype(kv_dtype, dtype, self.device)
        # Makes the KV caches (KVCache's arguments); None: resident ones. The loader passes
        # offload.streamed_cache_factory() for a target whose KV lives in host memory (offload_kv).
        self.cache_factory = cache_factory
        self.layer_source = layer_source if layer_source is not None else ResidentLayers(weights.layers)
        self.cos, self.sin = ops.rope_tables(config.head_dim, config.rope_theta, config.rope_scaling,
                                             self.max_len, self.device)
        if kv_layers is not None:
            kv_layers = tuple(int(i) for i in kv_layers)
            if len(kv_layers) != config.n_layers or min(kv_layers) < 0:
                raise ValueError(f"kv_layers must name one cache layer for each of the {config.n_layers} layers, "
                                 f"got {list(kv_layers)}")
            if kv_layers == tuple(range(config.n_layers)):
                kv_layers = None
        self.kv_layers = kv_layers
        self.own_cache = own_cache
        self._cache: Optional[KVCache] = None
        self.source = None          # where the weights came from (path), set by the loader
        self.quantization = None    # None or "int4"
        # The group size of the checkpoint's 4-bit matrices when it had some (GGUF Q4_*: 32),
        # whether or not they were dequantized on load; the default draft re-quantizes at it.
        self.source_int4_group = None
        self._layers_plan = ((), None)  # (layers it was built from, NativeLayers or None)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def capturable(self) -> bool:
        """Whether a forward can be captured as a CUDA graph: not with mixture-of-experts layers,
        which read each expert's row count on the host (``moe.py``)."""
        return not self.config.is_moe

    @property
    def cache(self) -> Optional[KVCache]:
        """The model's own KV cache of ``max_len`` slots, allocated on first use: an engine that
        serves several requests keeps them in a pool of its own (``Runner``) and never needs it.
        None for a model built with ``own_cache=False`` (a draft that reads its target's cache)."""
        if self._cache is None and self.own_cache:
            self._cache = self.new_cache()
        return self._cache

    @cache.setter
    def cache(self, cache: KVCache) -> None:
        self._cache = cache

    @property
    def cache_allocated(self) -> bool:
        """Whether ``cache`` exists yet or never will (the memory planner counts it until it does)."""
        return self._cache is not None or not self.own_cache

    @property
    def cache_dtype_name(self) -> str:
        """``kv_dtype`` by name (``"float16"``), for messages and stats."""
        return kv_dtype_name(self.kv_dtype)

    @property
    def kv_offload(self) -> bool:
        """Whether this model's KV caches live in host memory, streamed per layer (``offload_kv``)."""
        return self.cache_factory is not None

    def new_cache(self, max_len: Optional[int] = None, kv_dtype=None) -> KVCache:
        """A KV cache of ``max_len`` slots (default the model's) in ``kv_dtype`` (default the model's;
        e.g. float32 for a parity check against another implementation's float32 cache), with one
        layer per cache layer this model uses (``kv_layers``)."""
        c = self.config
        n_layers = c.n_layers if self.kv_layers is None else max(self.kv_layers) + 1
        make = self.cache_factory or KVCache
        kv_dtype = self.kv_dtype if kv_dtype is None else resolve_kv_dtype(kv_dtype, self.dtype, self.device)
        return make(n_layers, max_len or self.max_len, c.n_kv_heads, c.head_dim, self.dtype, self.device,
                    kv_dtype=kv_dtype)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, prefix_len: int,
                tree_mask: Optional[torch.Tensor] = None, cache_slots: Optional[torch.Tensor] = None,
                logits_rows: Optional[torch.Tensor] = None, prefix_dev: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Logits (float32 ``[rows, vocab]``) of new tokens ``token_ids`` at absolute ``positions``.

        New token i attends to every prefix slot ``[0, prefix_len)`` and to tree slot
        ``prefix_len + j`` where ``tree_mask[i, j]``; ``tree_mask=None`` is a causal chain. Its K/V
        go to ``cache_slots`` (default: the last ``n`` slots of the tree region). See docs/DESIGN.md.
        It returns what ``forward_batch`` returns for one segment at the start of the cache, by a
        shorter host path of its own (no ragged mask to assemble); both meet in ``_run``.

        ``prefix_dev`` (int32 ``[1]``, static-shape passes for CUDA graphs): the real prefix
        length, on the device; ``prefix_len`` is then its upper bound, the tree region starts
        at the device value, and ``tree_mask`` and ``cache_slots`` are required. Nothing in the
        pass then depends on the prefix length on the host.
        """
        if cache is None:
            raise ValueError("no KV cache given (a model built with own_cache=False has none of its own)")
        n = int(token_ids.shape[0])
        chain = tree_mask is None
        if prefix_dev is not None and (chain or cache_slots is None):
            raise ValueError("a pass with prefix_dev needs an explicit tree_mask and cache_slots")
        if chain:
            tree_mask = causal_mask(n, self.device)
        n_tree = int(tree_mask.shape[1])
        if tree_mask.shape[0] != n or positions.shape[0] != n:
            raise ValueError(f"token_ids [{n}], positions {list(positions.shape)} and tree_mask "
                             f"{list(tree_mask.shape)} disagree on the number of new tokens")
        cache.check_fits(prefix_len + n_tree)
        if cache_slots is None:
            cache_slots = torch.arange(prefix_len + n_tree - n, prefix_len + n_tree, device=self.device)
        c = self.config
        meta = ops.prepare_attention(tree_mask, prefix_len, c.n_heads // c.n_kv_heads, c.head_dim, chain,
                                     prefix_dev=prefix_dev, native_cpu=self._native_cpu(cache),
                                     kv_dtype=cache.kv_dtype, q_dtype=self.dtype)
        # With the prefix on the device the tree region may start anywhere below the bound (and a
        # static step's scratch slots lie at the cache's end): a streamed cache moves it all.
        spans = ([(0, cache.max_len)], [(0, cache.max_len)]) if prefix_dev is not None else None
        return self._run(token_ids, positions, cache, cache_slots, meta, logits_rows, spans)

    @torch.inference_mode()
    def forward_batch(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                      segments: Sequence[Segment], logits_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One forward over the new tokens of several requests (a ragged batch): the tokens of
        ``segments[0]``, then of ``segments[1]``, ... Each segment attends only to its own region
        of the cache (its committed prefix and its own tree slots), so the result for a request
        is what ``forward`` gives it alone; the weights are read once for all of them.
        Returns float32 ``[rows, vocab]`` (``logits_rows`` as in ``forward``)."""
        from ..kernels.attention import Segments

        n = int(token_ids.shape[0])
        if sum(s.n_new for s in segments) != n or positions.shape[0] != n:
            raise ValueError(f"token_ids [{n}], positions {list(positions.shape)} and the segments' "
                             f"{sum(s.n_new for s in segments)} new tokens disagree")
        width = max(s.n_tree for s in segments)
        mask = torch.zeros(n, width, dtype=torch.bool, device=self.device)
        slots, q0 = [], 0
        for s in segments:
            cache.check_fits(s.base + s.prefix_len + s.n_tree)
            mask[q0:q0 + s.n_new, :s.n_tree] = causal_mask(s.n_new, self.device) if s.tree_mask is None else s.tree_mask
            end = s.base + s.prefix_len + s.n_tree
            slots.append(torch.arange(end - s.n_new, end, device=self.device) if s.cache_slots is None
                         else s.cache_slots)
            q0 += s.n_new
        segs = Segments(tuple(s.n_new for s in segments), tuple(s.base for s in segments),
                        tuple(s.prefix_len for s in segments), tuple(s.n_tree for s in segments))
        c = self.config
        meta = ops.prepare_attention(mask, None, c.n_heads // c.n_kv_heads, c.head_dim, segments=segs,
                                     native_cpu=self._native_cpu(cache), kv_dtype=cache.kv_dtype, q_dtype=self.dtype)
        return self._run(token_ids, positions, cache, torch.cat(slots), meta, logits_rows)

    def _native_cpu(self, cache: KVCache) -> bool:
        """Whether a pass may take the native CPU attention (float32 on the CPU, a contiguous CPU
        cache of any KV storage dtype; a streamed cache's slots are)."""
        return (self.device.type == "cpu" and self.dtype is torch.float32 and cache.k.is_cpu
                and cache.k.is_contiguous() and cache.v.is_contiguous())

    def _native_layers(self, rows: int) -> Optional[NativeLayers]:
        """The one-call plan of the resident layers (built once per set of layer objects), if
        it serves a pass of ``rows`` tokens; None: the per-op path."""
        if not isinstance(self.layer_source, ResidentLayers):
            return None
        layers, plan = self._layers_plan
        current = self.layer_source.layers
        if len(layers) != len(current) or any(a is not b for a, b in zip(layers, current)):
            plan = NativeLayers.build(current)
            self._layers_plan = (tuple(current), plan)
        return plan if plan is not None and plan.serves(rows) else None

    def _run(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, cache_slots: torch.Tensor,
             meta: ops.AttentionPlan, logits_rows: Optional[torch.Tensor], spans: Optional[list] = None
             ) -> torch.Tensor:
        cos, sin = ops.rope_rows(self.cos, self.sin, positions, self.dtype)
        if meta.native_rows is not None and (cache_slots.dtype is not torch.int64 or not cache_slots.is_contiguous()):
            cache_slots = cache_slots.to(torch.int64).contiguous()
        x = self.weights.embed[token_ids].to(self.dtype)
        # The one-call layer stack walks the cache's layers in order: a model on other cache
        # layers (kv_layers) runs layer by layer, as a pass over a streamed cache does.
        native = meta.native_rows is not None and cache.resident and self.kv_layers is None
        plan = self._native_layers(int(token_ids.shape[0])) if native else None
        if plan is not None:  # every layer in one native call (same calls as transformer_block)
            c = self.config
            x = plan.run(x.contiguous(), cos, sin, cache.k, cache.v, cache_slots, meta.native_rows, meta.native_mask,
                         c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size, c.rms_norm_eps,
                         k_scale=cache.k_scale, v_scale=cache.v_scale)
        else:
            if spans is None:  # what each segment reads (its region's keys) and writes (its tree region)
                seg = meta.segments
                spans = ([(b, b + p + t) for b, p, t in zip(seg.base, seg.prefix, seg.n_tree)],
                         [(b + p, b + p + t) for b, p, t in zip(seg.base, seg.prefix, seg.n_tree)])
            cache.begin_pass(*spans)
            cache_layers = self.kv_layers or range(self.config.n_layers)
            # The layer source first: zip then runs its generator to the end, where a streamer
            # prefetches the next pass's first layers.
            for layer, i in zip(self.layer_source.iter_layers(), cache_layers):
                x = transformer_block(x, layer, self.config, cos, sin, cache.layer(i), cache_slots, meta)
                cache.layer_done(i)
        if logits_rows is not None:
            x = x[logits_rows]
        return ops.norm_linear(x, self.weights.final_norm, self.config.rms_norm_eps, self.weights.lm_head).float()

    __call__ = forward

    def prefill(self, token_ids: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Run the prompt as a chain from slot 0; returns the last token's logits ``[vocab]``."""
        cache = cache if cache is not None else self.cache
        n = int(token_ids.shape[0])
        positions = torch.arange(n, device=self.device)
        last = torch.tensor([n - 1], device=self.device)
        return self.forward(token_ids, positions, cache, 0, logits_rows=last)[0]
