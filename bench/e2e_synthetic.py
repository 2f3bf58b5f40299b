"""End-to-end cost of SpecExec with synthetic 4-bit weights of real shapes (no checkpoint needed).

    python bench/e2e_synthetic.py [--dry] [--json out.json] [--budgets 64,256,1024,2048]

Target: Llama-2-70B-shaped, 4-bit (group 128), every layer streamed from pinned host RAM by the
LayerStreamer (``n_resident=0`` by default, so the whole model crosses PCIe on every pass and the
streaming is measured honestly; ``--resident auto`` keeps as many leading layers on the GPU as
``plan_residency`` allows). Draft: Llama-2-7B-shaped, 4-bit, resident. fp16 activations.

Random weights make acceptance meaningless, so this measures COSTS only, per budget:
- ``draft_s``: one SpecExec tree growth of that budget by the engine's own code
  (``Engine.grow_tree``: best-first, ``beams_per_step`` nodes per draft call), on a 512-token prefix;
- ``target_s``: one target forward over ``budget`` tree tokens with a random valid tree mask on
  top of the prefix (the verification pass);
- ``floor_s``: streamed bytes per pass / pinned H2D bandwidth measured in this run (the higher of
  the streamer's own host block copied with its copy engine and the driver probe), and
  ``target_s / floor_s``;
plus the autoregressive offloaded baseline (target forward of 1 token). Times are medians of
whole passes bracketed by ``torch.cuda.synchronize`` + ``time.perf_counter``. Each timed pass
starts with ``n_slots`` layers already prefetched (the streamer wraps its copies into the next
pass, which the engine overlaps with drafting), so ``target/floor`` may dip below 1 by at most
``n_slots / n_streamed``.

The random 4-bit weights are built directly in packed form (random nibble bytes, fp16 scales
~1/(4.6 sqrt(K)) and mins = -7.5 * scales, i.e. zero-mean weights keeping activations O(1)), on
the GPU one layer at a time, then packed once into the streamer's exact-size host block
(~36 GB for 70B; the per-layer GPU tensors are released as they are packed).

Mixture-of-experts targets (``moe_rows``; ``--moe mixtral-8x7b,qwen3-30b-a3b``, run after the dense
model is released): a Mixtral-8x7B-shaped and a Qwen3-30B-A3B-shaped 4-bit target, every layer
streamed with all its experts, verifying trees of each budget: ``target_s``, the streaming floor,
the experts a pass routed to per layer (random weights route about uniformly: the most spread
case, see ``bench/moe_routing.py``), and ``routed_floor_s``, what streaming only the routed
experts would cost (not implemented: the layer streamer moves whole layers).

``--dry``: tiny shapes on the CPU (the Triton kernels through the interpreter when
SPECEXEC_TRITON_INTERPRET=1 is set before import, as ``gpu_suite.py --dry`` does), seconds.
``run(dry) -> dict`` is what ``bench/gpu_suite.py`` imports.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Optional

if __name__ == "__main__" and "--dry" in sys.argv[1:]:
    # The interpreter switch must be set before Triton (imported by the kernels) loads.
    os.environ.setdefault("SPECEXEC_TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from specexec_rt.model.config import ModelConfig
from specexec_rt.kernels.int4 import Int4Weight  # noqa: E402
from specexec_rt.model import Transformer  # noqa: E402
from specexec_rt.offload import LayerStreamer, layout_layer, plan_residency  # noqa: E402
from specexec_rt.model.weights import LayerWeights, ModelWeights, weights_nbytes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from projection import measured_tokens_per_pass  # noqa: E402  (bench/projection.py)

GROUP = 128
PREFIX = 512
BUDGETS = (64, 256, 1024, 2048)
# Batched rows: concurrent requests per pass, each with this budget (a tree of budget + 1 tokens).
BATCHES = (1, 2, 4, 8)
DRY_BATCHES = (1, 2)
BATCH_BUDGET = 256
DRY_BUDGETS = (8, 32)
DRY_PREFIX = 24


def _cfg(vocab, hidden, inter, layers, heads, kv_heads, head_dim=128) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                       rms_norm_eps=1e-5, max_position_embeddings=4096)


TARGET_70B = _cfg(32000, 8192, 28672, 80, 64, 8)
DRAFT_7B = _cfg(32000, 4096, 11008, 32, 32, 32)
# head_dim 64 is the smallest the tree kernel takes; K multiples of the 128 group.
DRY_TARGET = _cfg(512, 128, 256, 3, 2, 1, head_dim=64)
DRY_DRAFT = _cfg(512, 128, 256, 2, 2, 2, head_dim=64)


def _moe_cfg(model_type, vocab, hidden, inter, layers, heads, kv_heads, experts, top_k, moe_inter, head_dim=128,
             qk_norm=False) -> ModelConfig:
    return ModelConfig(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-6,
                       max_position_embeddings=4096, qk_norm=qk_norm, num_experts=experts, num_experts_per_tok=top_k,
                       moe_intermediate_size=moe_inter, moe_layers=tuple(range(layers)))


MOE_TARGETS = {
    "mixtral-8x7b": _moe_cfg("mixtral", 32000, 4096, 14336, 32, 32, 8, 8, 2, 14336),
    "qwen3-30b-a3b": _moe_cfg("qwen3_moe", 151936, 2048, 6144, 48, 32, 4, 128, 8, 768, qk_norm=True),
}
DRY_MOE_TARGETS = {"tiny-moe": _moe_cfg("qwen3_moe", 512, 128, 256, 2, 2, 1, 8, 2, 128, head_dim=64, qk_norm=True)}
MOE_BUDGETS = (16, 64, 256, 1024)


# ------------------------------------------------------------------ synthetic weights

def random_int4(out_features: int, in_features: int, device, gen: torch.Generator) -> Int4Weight:
    """A random Int4Weight ``[out, in]`` built in packed form (no fp16 weight, no quantisation).

    Nibbles uniform in 0..15, per-group fp16 scales ``s * U(0.8, 1.2)`` with
    ``s = 1 / (4.6 sqrt(in))`` (4.6 = std of ``q - 7.5``), mins ``-7.5 * scales``: zero-mean
    weights whose products keep O(1) activations O(1), so nothing overflows in fp16 over 80 layers.
    """
    q = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, device=device,
                      generator=gen)
    s = 1.0 / (4.6 * math.sqrt(in_features))
    scales = (torch.rand(in_features // GROUP, out_features, device=device, generator=gen) * 0.4 + 0.8) * s
    scales = scales.to(torch.float16)
    return Int4Weight(qweight=q, scales=scales, mins=scales * -7.5, out_features=out_features,
                      in_features=in_features, group_size=GROUP)


def random_layer(cfg: ModelConfig, device, dtype, gen: torch.Generator) -> LayerWeights:
    h = cfg.hidden_size
    return LayerWeights(
        attn_norm=torch.ones(h, dtype=dtype, device=device),
        wqkv=random_int4(cfg.qkv_size, h, device, gen), bqkv=None,
        wo=random_int4(h, cfg.n_heads * cfg.head_dim, device, gen), bo=None,
        ffn_norm=torch.ones(h, dtype=dtype, device=device),
        w_gate_up=random_int4(2 * cfg.intermediate_size, h, device, gen),
        w_down=random_int4(h, cfg.intermediate_size, device, gen))


def random_moe_layer(cfg: ModelConfig, device, dtype, gen: torch.Generator) -> LayerWeights:
    """Attention as ``random_layer``; a router with logits of std ~1 (decisive, about uniform
    over the experts) and ``num_experts`` random 4-bit SwiGLU experts."""
    from specexec_rt.model.weights import MoEWeights

    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    ones = torch.ones(cfg.head_dim, dtype=dtype, device=device) if cfg.qk_norm else None
    router = (torch.randn(cfg.num_experts, h, device=device, generator=gen) / math.sqrt(h)).to(dtype)
    return LayerWeights(
        attn_norm=torch.ones(h, dtype=dtype, device=device),
        wqkv=random_int4(cfg.qkv_size, h, device, gen), bqkv=None,
        wo=random_int4(h, cfg.n_heads * cfg.head_dim, device, gen), bo=None,
        ffn_norm=torch.ones(h, dtype=dtype, device=device), w_gate_up=None, w_down=None, q_norm=ones, k_norm=ones,
        moe=MoEWeights(router=router, gate_up=[random_int4(2 * inter, h, device, gen) for _ in range(cfg.num_experts)],
                       down=[random_int4(h, inter, device, gen) for _ in range(cfg.num_experts)]))


def _progress(it, desc: str, total: int):
    try:
        from tqdm import tqdm
        return tqdm(it, desc=desc, total=total, file=sys.stderr, mininterval=2.0)
    except ImportError:  # tqdm is optional on the GPU box
        print(f"{desc}: {total} layers", file=sys.stderr)
        return it


def random_layers(cfg: ModelConfig, device, dtype, seed: int, desc: str) -> list:
    gen = torch.Generator(device=device).manual_seed(seed)
    make = random_moe_layer if cfg.is_moe else random_layer
    return [make(cfg, device, dtype, gen) for _ in _progress(range(cfg.n_layers), desc, cfg.n_layers)]


def outer_weights(cfg: ModelConfig, device, dtype, seed: int, logit_std: float) -> ModelWeights:
    """Embedding (std 1), final norm, dense fp16 LM head scaled so logits have std ~``logit_std``
    (real LM heads are not 4-bit in GPTQ checkpoints either)."""
    gen = torch.Generator(device=device).manual_seed(seed + 1000)
    h, v = cfg.hidden_size, cfg.vocab_size
    embed = torch.randn(v, h, device=device, generator=gen).to(dtype)
    lm_head = (torch.randn(v, h, device=device, generator=gen) * (logit_std / math.sqrt(h))).to(dtype)
    return ModelWeights(embed=embed, final_norm=torch.ones(h, dtype=dtype, device=device), lm_head=lm_head,
                        layers=[])


def fill_prefix(model: Transformer, prefix_len: int, seed: int) -> None:
    """Random K/V in the first ``prefix_len`` cache slots (attention cost does not depend on
    values; a real prefill of 512 tokens through the streamed 70B would cost a whole pass)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for t in (model.cache.k, model.cache.v):
        t[:, :prefix_len] = torch.randn(t[:, :prefix_len].shape, device=model.device, generator=gen).to(t.dtype)


# ------------------------------------------------------------------ timing helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int, warmup: int = 1) -> tuple[float, list, object]:
    """(median seconds, all seconds, last result) of ``fn()`` run as whole passes."""
    res = None
    for _ in range(warmup):
        res = fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        res = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, res


def random_tree(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ancestor-or-self bool mask ``[n, n]``, depths int64 ``[n]``) of a random tree: node 0 is
    the root, node i's parent uniform in ``[max(0, i - 64), i)`` (deeper than a uniform choice
    over all earlier nodes, closer to drafted trees)."""
    anc = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    anc[0, 0] = True
    for i in range(1, n):
        p = int(torch.randint(max(0, i - 64), i, (1,), generator=gen))
        anc[i] = anc[p]
        anc[i, i] = True
        depth[i] = depth[p] + 1
    return anc, depth


def h2d_bandwidth(streamer: LayerStreamer, device: torch.device, max_bytes: int) -> Optional[float]:
    """GB/s of copying the streamer's own (registered) host block into one device buffer with its
    copy engine: median over layers of CUDA-event-timed copies. None on the CPU."""
    if device.type != "cuda" or not streamer.n_streamed:
        return None
    from specexec_rt.offload import native

    stream = torch.cuda.Stream(device)
    dst = torch.empty(streamer.slot_bytes, dtype=torch.uint8, device=device)
    n = max(2, min(streamer.n_streamed, max_bytes // max(1, streamer.slot_bytes)))
    rates = []
    for k in range(n):
        lay = streamer.layouts[k]
        src = streamer.host_block[lay.offset:lay.offset + lay.nbytes]
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        native.copy_h2d_async(dst[:lay.nbytes], src, stream)
        b.record(stream)
        b.synchronize()
        if k:  # the first copy warms up the engine
            rates.append(lay.nbytes / (a.elapsed_time(b) / 1e3) / 1e9)
    return statistics.median(rates)


def probe_pinned_gbps(device: torch.device, nbytes: int = 1 << 30) -> Optional[float]:
    if device.type != "cuda":
        return None
    from specexec_rt.offload import native

    return nbytes / (statistics.median(native.probe_bandwidth(nbytes, "pinned", "h2d", 5, device)) / 1e3) / 1e9


# ------------------------------------------------------------------ drafting

def _draft_engine(target, draft, budget: int, beams: Optional[int], width: int, max_depth: int,
                  static_draft: Optional[bool] = None, max_batch: int = 1):
    from specexec_rt.speculative.engine import Engine

    kw = dict(branch_width=width, max_depth=max_depth, static_draft=static_draft, max_batch=max_batch)
    if beams:
        kw["beams_per_step"] = beams
    return Engine(target, draft, method="specexec", budget=budget, **kw)


def grow_tree_engine(engine, prefix_len: int, root: int, gen) -> dict:
    """One SpecExec tree growth by the engine's own code on a committed draft prefix
    (``Engine.grow_tree``, the public drafting API)."""
    tree, stats = engine.grow_tree(prefix_len, root)
    return dict(tree_nodes=tree.n, draft_calls=stats.draft_calls, tree_depth=int(tree.depths.max()))


def grow_tree_equivalent(draft: Transformer, prefix_len: int, budget: int, beams: int, gen) -> dict:
    """Fallback when the engine's growth is unavailable: the same draft forwards without the
    search: the root, then ceil(budget / beams) levels of ``beams`` nodes each (a chain of
    levels, every node attending to the prefix and its own ancestors)."""
    dev = draft.device
    levels = math.ceil(budget / beams)
    draft.forward(torch.randint(0, draft.vocab_size, (1,), device=dev, generator=gen),
                  torch.tensor([prefix_len], device=dev), draft.cache, prefix_len)
    n_slots = 1
    for lvl in range(levels):
        ids = torch.randint(0, draft.vocab_size, (beams,), device=dev, generator=gen)
        # ``beams`` parallel chains under the root: node j of a level sees node j of every
        # earlier level, the root and itself.
        mask = torch.zeros(beams, n_slots + beams, dtype=torch.bool, device=dev)
        mask[:, 0] = True
        j = torch.arange(beams, device=dev)
        for earlier in range(lvl + 1):
            mask[j, 1 + earlier * beams + j] = True
        draft.forward(ids, torch.full((beams,), prefix_len + 1 + lvl, device=dev), draft.cache, prefix_len,
                      tree_mask=mask)
        n_slots += beams
    return dict(tree_nodes=1 + levels * beams, draft_calls=1 + levels, tree_depth=levels)


# ------------------------------------------------------------------ the benchmark

def batched_rows(target, draft, prefix: int, batches, budget: int, beams: Optional[int], width: int,
                 max_depth: int, floor: Optional[float], device, reps: int, gen, tree_gen, dry: bool) -> list:
    """B requests per pass: the draft trees of all B grown together by the engine
    (``Engine.grow_trees``, one draft call per level), and one target ``forward_batch`` over the B
    trees, each request in its own region of a pooled cache. The aggregate tokens/s is a
    PROJECTION (random weights accept nothing): our greedy tokens per pass on the SmolLM2 pair
    at this budget, read from the committed acceptance result that ``tpp_label`` names, over
    the measured pass (None where no acceptance result exists)."""
    from specexec_rt.model import Segment

    measured = measured_tokens_per_pass(budget)
    tpp = measured.tokens_per_pass if measured else None
    region = prefix + budget + 8
    rows = []
    for b in batches:
        eng = _draft_engine(target, draft, budget, beams, width, max_depth, static_draft=False, max_batch=b)
        d_s, _, (trees, stats) = timed(lambda: eng.grow_trees([prefix] * b, [1] * b), device, reps)
        pool = target.new_cache(b * region)
        segs, ids, pos = [], [], []
        for i in range(b):
            mask, depths = random_tree(budget + 1, tree_gen)
            segs.append(Segment(budget + 1, i * region, prefix, tree_mask=mask.to(device)))
            ids.append(torch.randint(0, target.vocab_size, (budget + 1,), device=device, generator=gen))
            pos.append(prefix + depths.to(device))
        ids, pos = torch.cat(ids), torch.cat(pos)
        t_s, _, _ = timed(lambda: target.forward_batch(ids, pos, pool, segs), device, reps)
        pool = eng = None     # free both pools before the next B allocates its own
        agg = b * tpp / (d_s + t_s) if tpp else None
        rows.append(dict(requests=b, budget_per_request=budget, draft_s=d_s, draft_calls=stats.draft_calls,
                         tree_nodes=sum(t.n for t in trees), target_s=t_s, floor_s=floor,
                         target_over_floor=t_s / floor if floor else None, pass_s=d_s + t_s,
                         pass_vs_one=(d_s + t_s) / rows[0]["pass_s"] if rows else 1.0,
                         target_vs_one=t_s / rows[0]["target_s"] if rows else 1.0,
                         smollm2_tokens_per_pass=tpp, projected_aggregate_tok_s=agg,
                         tpp_label=measured.label if measured else "no acceptance result found"))
        print(f"batched B={b}: draft {d_s:.4f} s ({stats.draft_calls} calls), target {t_s:.4f} s"
              + (f" ({t_s / floor:.3f}x floor)" if floor else "")
              + f", pass {rows[-1]['pass_vs_one']:.2f}x one request's"
              + (f", projection {agg:.2f} tok/s" if agg else ""), file=sys.stderr, flush=True)
    return rows


def build_models(dry: bool, device: torch.device, dtype: torch.dtype, budgets, resident: str, n_slots: int,
                 draft_max_slots: int, draft_logit_std: float, target_layers: Optional[int]) -> dict:
    tcfg, dcfg = (DRY_TARGET, DRY_DRAFT) if dry else (TARGET_70B, DRAFT_7B)
    if target_layers:
        tcfg = ModelConfig(**{**tcfg.__dict__, "n_layers": target_layers})
    prefix = DRY_PREFIX if dry else PREFIX
    info = dict(target_config=dict(tcfg.__dict__), draft_config=dict(dcfg.__dict__), prefix=prefix)
    t0 = time.perf_counter()
    layers = random_layers(tcfg, device, dtype, seed=1, desc="target layers (random int4)")
    layer_bytes = [layout_layer(l)[1] for l in layers]
    if resident == "auto" and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # The layers sit on the GPU right now (built there), so they count as free afterwards;
        # the reserve is the draft (~3.5 GB), both KV caches and the activations of 2048 tokens.
        n_res = plan_residency(layer_bytes, free + sum(layer_bytes), reserve_bytes=12 << 30, n_slots=n_slots)
    else:
        n_res = int(resident) if resident not in ("auto", None) else 0
    streamer = LayerStreamer(layers, device, n_resident=n_res, n_slots=n_slots, consume=True)
    del layers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    info.update(target_build_s=time.perf_counter() - t0, n_resident=streamer.n_resident,
                n_streamed=streamer.n_streamed, n_slots=streamer.n_slots, host_block_bytes=streamer.host_bytes,
                streamed_bytes_per_pass=streamer.streamed_bytes_per_pass, target_layer_bytes=layer_bytes[0],
                pinned=streamer.pinned)
    max_budget = max(budgets)
    target = Transformer(tcfg, outer_weights(tcfg, device, dtype, 1, logit_std=1.0),
                         prefix + max_budget + 8, device, dtype, layer_source=streamer)
    t0 = time.perf_counter()
    dweights = outer_weights(dcfg, device, dtype, 2, logit_std=draft_logit_std)
    dweights.layers = random_layers(dcfg, device, dtype, seed=2, desc="draft layers (random int4)")
    draft = Transformer(dcfg, dweights, prefix + draft_max_slots + 8, device, dtype)
    info.update(draft_build_s=time.perf_counter() - t0, draft_layer_bytes=weights_nbytes(dweights.layers[0]),
                draft_weight_bytes=sum(weights_nbytes(l) for l in dweights.layers) + weights_nbytes(dweights.embed)
                + weights_nbytes(dweights.lm_head))
    fill_prefix(target, prefix, 3)
    fill_prefix(draft, prefix, 4)
    return dict(target=target, draft=draft, streamer=streamer, prefix=prefix, info=info)


class _RoutedExperts:
    """Records which experts each mixture-of-experts layer ran (wraps ``moe.experts_forward``
    for one untimed pass)."""

    def __init__(self):
        from specexec_rt.model import moe

        self.moe, self.real, self.per_layer = moe, moe.experts_forward, []

    def __enter__(self):
        def spy(x, weights, experts, w):
            self.per_layer.append(torch.unique(experts).tolist())
            return self.real(x, weights, experts, w)
        self.moe.experts_forward = spy
        return self

    def __exit__(self, *exc):
        self.moe.experts_forward = self.real


def moe_rows(dry: bool, device, dtype, names=None, budgets=None, reps: int = 3, n_slots: int = 2,
             bw: Optional[float] = None, deadline_s: Optional[float] = None, t_start: float = 0.0) -> list:
    """Per mixture-of-experts target shape: a streamed 4-bit target (every layer, all its experts),
    one verification pass per budget and the autoregressive pass (see the module docstring)."""
    from specexec_rt.model.weights import tensor_leaves

    table = DRY_MOE_TARGETS if dry else MOE_TARGETS
    budgets = tuple(budgets or ((8, 32) if dry else MOE_BUDGETS))
    prefix = DRY_PREFIX if dry else PREFIX
    rows = []
    for name in table if dry else names or table:
        cfg = table[name]
        if deadline_s is not None and time.perf_counter() - t_start > deadline_s:
            rows.append(dict(shape=name, skipped="deadline"))
            continue
        t0 = time.perf_counter()
        layers = random_layers(cfg, device, dtype, seed=7, desc=f"{name} layers (random int4 experts)")
        expert_bytes = sum(t.numel() * t.element_size() for _, t in tensor_leaves(layers[0].moe.gate_up[0])) + \
            sum(t.numel() * t.element_size() for _, t in tensor_leaves(layers[0].moe.down[0]))
        streamer = LayerStreamer(layers, device, n_resident=0, n_slots=n_slots, consume=True)
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
        target = Transformer(cfg, outer_weights(cfg, device, dtype, 1, logit_std=1.0), prefix + max(budgets) + 8,
                             device, dtype, layer_source=streamer)
        fill_prefix(target, prefix, 3)
        build_s = time.perf_counter() - t0
        try:
            per_pass = streamer.streamed_bytes_per_pass
            floor = per_pass / (bw * 1e9) if bw else None
            non_expert = per_pass - cfg.n_layers * cfg.num_experts * expert_bytes
            gen = torch.Generator(device=device).manual_seed(5)
            tree_gen = torch.Generator().manual_seed(6)
            for b in (1,) + budgets:
                mask, depths = (None, torch.zeros(1, dtype=torch.long)) if b == 1 else random_tree(b, tree_gen)
                ids = torch.randint(0, cfg.vocab_size, (b,), device=device, generator=gen)
                fn = (lambda ids=ids, depths=depths.to(device), mask=None if mask is None else mask.to(device):
                      target.forward(ids, prefix + depths, target.cache, prefix, tree_mask=mask))
                t_s, t_all, _ = timed(fn, device, reps)
                with _RoutedExperts() as routed:
                    fn()
                touched = statistics.fmean(len(e) for e in routed.per_layer)
                routed_floor = (non_expert + cfg.n_layers * touched * expert_bytes) / (bw * 1e9) if bw else None
                rows.append(dict(shape=name, budget=0 if b == 1 else b, tokens=b, target_s=t_s, floor_s=floor,
                                 target_over_floor=t_s / floor if floor else None, experts=cfg.num_experts,
                                 top_k=cfg.num_experts_per_tok, experts_touched_per_layer=touched,
                                 routed_floor_s=routed_floor, streamed_GB_per_pass=per_pass / 1e9,
                                 build_s=build_s, target_all_s=t_all))
                print(f"{name} {'plain decoding' if b == 1 else f'budget {b}'}: target {t_s:.4f} s"
                      + (f" ({t_s / floor:.3f}x floor, routed-only floor {routed_floor:.4f} s)" if floor else "")
                      + f", {touched:.1f}/{cfg.num_experts} experts per layer", file=sys.stderr, flush=True)
        finally:
            streamer.close()
            target = streamer = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def run(dry: bool = False, budgets=None, reps: Optional[int] = None, resident: str = "0", n_slots: int = 2,
        beams_per_step: Optional[int] = None, branch_width: int = 8, max_depth: Optional[int] = None,
        draft_logit_std: float = 4.0, target_layers: Optional[int] = None,
        deadline_s: Optional[float] = None, batches=None, batch_budget: Optional[int] = None,
        moe=None) -> dict:
    """Measure the costs (see module docstring). Returns a JSON-ready dict with ``rows`` (one per
    budget), ``autoregressive``, ``info`` and ``moe`` (``moe_rows``: the shapes named by ``moe``,
    default all; ``()`` for none). ``deadline_s``: stop starting new budgets after this many
    seconds (the skipped budgets are listed in ``skipped_budgets``)."""
    t_start = time.perf_counter()
    if dry:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("e2e_synthetic needs a CUDA GPU (or dry=True)")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.float16
    budgets = tuple(budgets or (DRY_BUDGETS if dry else BUDGETS))
    batches = tuple((DRY_BATCHES if dry else BATCHES) if batches is None else batches)
    reps = reps or (1 if dry else 3)
    max_depth = max_depth or (4 if dry else 16)
    beams_cap = beams_per_step or min(max(budgets), 32)     # the engine's default: min(budget, 32)
    # The tree region, plus beams_cap scratch slots for the static (CUDA-graph) draft step's padding.
    draft_max_slots = max(1 + (max_depth - 1) * beams_cap, 1 + math.ceil(max(budgets) / beams_cap) * beams_cap) \
        + beams_cap
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    m = build_models(dry, device, dtype, budgets, resident, n_slots, draft_max_slots, draft_logit_std,
                     target_layers)
    target, draft, streamer, prefix, info = m["target"], m["draft"], m["streamer"], m["prefix"], m["info"]
    out = dict(dry=dry, device=str(device), dtype=str(dtype).replace("torch.", ""), reps=reps, info=info,
               params=dict(branch_width=branch_width, max_depth=max_depth, beams_per_step=beams_per_step or
                           "engine default min(budget, 32)", draft_logit_std=draft_logit_std,
                           resident=resident),
               rows=[], skipped_budgets=[], notes=[])
    try:
        bw_block = h2d_bandwidth(streamer, device, 8 << 30)
        bw_probe = probe_pinned_gbps(device)
        cands = [b for b in (bw_block, bw_probe) if b]
        bw = max(cands) if cands else None
        out.update(h2d_gbps_host_block=bw_block, h2d_gbps_pinned_probe=bw_probe, h2d_gbps_used=bw)
        floor = streamer.streamed_bytes_per_pass / (bw * 1e9) if bw else None
        gen = torch.Generator(device=device).manual_seed(5)
        tree_gen = torch.Generator().manual_seed(6)

        def target_pass(n, mask, depths):
            ids = torch.randint(0, target.vocab_size, (n,), device=device, generator=gen)
            return lambda: target.forward(ids, prefix + depths, target.cache, prefix, tree_mask=mask)

        # Autoregressive offloaded baseline: one token per target pass.
        ar_fn = target_pass(1, None, torch.zeros(1, dtype=torch.long, device=device))
        ar_s, ar_all, _ = timed(ar_fn, device, reps)
        dec_s, _, _ = timed(lambda: draft.forward(torch.zeros(1, dtype=torch.long, device=device),
                                                  torch.tensor([prefix], device=device), draft.cache, prefix),
                            device, reps)
        out["autoregressive"] = dict(target_s_per_token=ar_s, all_s=ar_all, floor_s=floor,
                                     target_over_floor=ar_s / floor if floor else None, draft_decode_s=dec_s)
        print(f"autoregressive: {ar_s:.4f} s/token (floor {floor or float('nan'):.4f} s), "
              f"draft decode {dec_s * 1e3:.2f} ms", file=sys.stderr, flush=True)

        for b in budgets:
            if deadline_s is not None and time.perf_counter() - t_start > deadline_s:
                out["skipped_budgets"].append(b)
                continue
            mask, depths = random_tree(b, tree_gen)
            t_s, t_all, _ = timed(target_pass(b, mask.to(device), depths.to(device)), device, reps)
            engine_error = None
            eager = {}
            try:
                # dry: force the static steps on the CPU too (eager there), so CI runs that path.
                eng = _draft_engine(target, draft, b, beams_per_step, branch_width, max_depth,
                                    static_draft=True if dry else None)
                d_s, d_all, tree = timed(lambda: grow_tree_engine(eng, prefix, 1, gen), device, reps)
                method = "engine"
                tree["static_draft"] = eng.static_draft
                tree["static_draft_captured"] = eng.captured_draft_graphs > 0
                if eng.static_draft:
                    # Side by side: the same growth with every step eager (the pre-graph engine).
                    eng_eager = _draft_engine(target, draft, b, beams_per_step, branch_width, max_depth,
                                              static_draft=False)
                    e_s, _, _ = timed(lambda: grow_tree_engine(eng_eager, prefix, 1, gen), device, reps)
                    eager = dict(draft_eager_s=e_s, draft_eager_over_static=e_s / d_s)
            except Exception as e:  # noqa: BLE001 - fall back, but say so in the row
                engine_error = f"{type(e).__name__}: {e}"[:300]
                beams = beams_per_step or min(b, 32)
                d_s, d_all, tree = timed(lambda: grow_tree_equivalent(draft, prefix, b, beams, gen), device, reps)
                method = "equivalent-forwards"
            row = dict(budget=b, draft_s=d_s, target_s=t_s, floor_s=floor,
                       target_over_floor=t_s / floor if floor else None, pass_s=d_s + t_s,
                       draft_s_per_call=d_s / max(1, tree["draft_calls"]),
                       breakeven_tokens_per_pass=(d_s + t_s) / ar_s, draft_method=method, **tree,
                       draft_all_s=d_all, target_all_s=t_all, **eager)
            if engine_error:
                row["engine_error"] = engine_error
            out["rows"].append(row)
            print(f"budget {b}: draft {d_s:.4f} s ({tree['draft_calls']} calls, {tree['tree_nodes']} nodes"
                  + (f"; eager {eager['draft_eager_s']:.4f} s" if eager else "") + "), "
                  f"target {t_s:.4f} s, target/floor {row['target_over_floor'] or float('nan'):.3f}",
                  file=sys.stderr, flush=True)
        if batches:
            out["notes"].append("batched rows: projected_aggregate_tok_s is a PROJECTION, requests x our greedy "
                                "tokens per pass on the SmolLM2 pair (tpp_label names the acceptance result) / "
                                "the measured pass")
            out["batched"] = batched_rows(target, draft, prefix, batches, batch_budget or budgets[0],
                                          beams_per_step, branch_width, max_depth, floor, device, reps, gen,
                                          tree_gen, dry)
        # One more pass with the streamer's event timing: how long compute waited for copies.
        if device.type == "cuda" and budgets:
            b = out["rows"][-1]["budget"] if out["rows"] else budgets[0]
            mask, depths = random_tree(b, tree_gen)
            fn = target_pass(b, mask.to(device), depths.to(device))
            streamer.timing = True
            streamer.stats(reset=True)
            fn()
            st = streamer.stats()
            streamer.timing = False
            out["streamer_timing"] = dict(budget=b, copy_s=st.get("copy_s"), compute_wait_s=st.get("wait_s"),
                                          copy_event_gbps=st.get("copy_gbps"))
        if device.type == "cuda":
            out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    finally:
        streamer.close()
    if moe is None or moe:
        target = draft = streamer = m = None     # the dense models' memory goes before the MoE targets come
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["moe"] = moe_rows(dry, device, dtype, names=moe or None, reps=reps, n_slots=n_slots,
                              bw=out.get("h2d_gbps_used"), t_start=t_start,
                              deadline_s=None if dry else deadline_s)     # dry: one tiny shape, seconds
        out["notes"].append("moe: every layer streamed with all its experts; routed_floor_s = the floor if only the "
                            "experts the pass routed to were streamed (not implemented)")
    out["notes"].append("costs only: random weights make acceptance meaningless; breakeven_tokens_per_pass = "
                        "(draft_s + target_s) / autoregressive s per token, the tokens per pass a real draft "
                        "must reach for SpecExec to beat autoregressive offloaded decoding")
    out["notes"].append(f"target: {info['n_resident']} resident layers (resident={resident!r}), "
                        f"{info['n_streamed']} streamed through {info['n_slots']} slots")
    out["elapsed_s"] = time.perf_counter() - t_start
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="tiny CPU shapes (Triton via the interpreter)")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--budgets", default=None, help="comma list (default 64,256,1024,2048)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--resident", default="0", help="target layers kept on the GPU: an int or 'auto'")
    ap.add_argument("--target-layers", type=int, default=None, help="fewer target layers (quick runs)")
    ap.add_argument("--beams-per-step", type=int, default=None)
    ap.add_argument("--max-depth", type=int, default=None)
    ap.add_argument("--batches", default=None, help="concurrent requests of the batched rows (default 1,2,4,8; "
                    "'' for none)")
    ap.add_argument("--batch-budget", type=int, default=None, help=f"budget per request of the batched rows "
                    f"(default {BATCH_BUDGET}; --dry: the first budget)")
    ap.add_argument("--moe", default=None, help=f"mixture-of-experts targets to add ({', '.join(MOE_TARGETS)}; "
                    "default all, '' for none)")
    args = ap.parse_args(argv)
    if args.dry:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry: run with SPECEXEC_TRITON_INTERPRET=1 set before import", file=sys.stderr)
    budgets = tuple(int(b) for b in args.budgets.split(",")) if args.budgets else None
    batches = None if args.batches is None else tuple(int(b) for b in args.batches.split(",") if b)
    res = run(args.dry, budgets, args.reps, args.resident, beams_per_step=args.beams_per_step,
              max_depth=args.max_depth, target_layers=args.target_layers, batches=batches,
              batch_budget=args.batch_budget or (None if args.dry else BATCH_BUDGET),
              moe=None if args.moe is None else tuple(n for n in args.moe.split(",") if n))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
