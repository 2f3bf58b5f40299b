"""Mixture-of-experts layers (Qwen3-MoE, Mixtral) in the one forward path.

- The layer against HF's own sparse blocks: top-1, top-2, top-k = every expert, with and
  without ``norm_topk_prob``, Mixtral's routing, and a layer whose tokens all choose one expert.
- Grouped, never token by token: one gate/up matmul per expert that received tokens, over all of
  them; with 4-bit experts on the native CPU kernel the grouped result equals running every
  token alone.
- Lossless through the engine for every method, with the default draft (a MoE too) and with a
  dense draft, in ragged batches with chunked prefill; offloaded equals resident.
- What the runtime cannot serve is refused by name; the CPU whole-layer native path refuses
  q/k norms and experts with a logged reason instead of computing something else.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import torch
import transformers

from conftest import build_tiny_model, greedy_decode
from hf_models import make_hf_model
from specexec_rt import load_model
from specexec_rt.errors import UnsupportedModelError
from specexec_rt.kernels.int4.weight import Int4Weight, quantize_int4
from specexec_rt.kernels.layers.cpu import NativeLayers, unserved_fields
from specexec_rt.model import Segment, moe, ops
from specexec_rt.model.weights import MoEWeights, replace_leaves, tensor_leaves
from specexec_rt.speculative.drafts import default_draft, int4_draft
from specexec_rt.speculative.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")
HIDDEN, INTER = 64, 32


# ---------------------------------------------------------------------- the layer against HF's blocks

def hf_block(family: str, n_experts: int, top_k: int, norm_topk_prob: bool, seed: int):
    """HF's sparse MoE block with random weights, and the same weights as our ``MoEWeights``."""
    if family == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=n_experts,
                                         num_experts_per_tok=top_k)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=n_experts,
                                          num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob)
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        block.gate.weight.mul_(5)       # decisive, varied routing
    ours = MoEWeights(router=block.gate.weight.detach().clone(),
                      gate_up=[w.detach().clone() for w in block.experts.gate_up_proj],
                      down=[w.detach().clone() for w in block.experts.down_proj])
    return block.eval(), ours


def ours_forward(x, w: MoEWeights, top_k, renormalize):
    weights, experts = moe.route(x, w.router, top_k, renormalize)
    return moe.experts_forward(x, weights, experts, w)


@pytest.mark.parametrize("family,n_experts,top_k,norm", [
    ("qwen3_moe", 8, 1, False), ("qwen3_moe", 8, 2, False), ("qwen3_moe", 8, 2, True), ("qwen3_moe", 4, 4, True),
    ("qwen3_moe", 6, 6, False), ("mixtral", 8, 2, True), ("mixtral", 4, 1, True)])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_layer_matches_hf_block(family, n_experts, top_k, norm, rows):
    block, w = hf_block(family, n_experts, top_k, norm, seed=rows + top_k)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        ref = block(x[None])[0]
    torch.testing.assert_close(ours_forward(x, w, top_k, norm), ref, atol=1e-5, rtol=1e-5)


def test_all_tokens_to_one_expert():
    """A router that sends every token to expert 3 (top-1): the layer is that expert's MLP."""
    block, w = hf_block("qwen3_moe", 8, 1, True, seed=0)
    d = torch.zeros(HIDDEN)
    d[0] = 1.0
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[3] = 40 * d
    w.router = block.gate.weight.detach().clone()
    x = torch.randn(23, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.1 + 3 * d
    weights, experts = moe.route(x, w.router, 1, True)
    assert bool((experts == 3).all()) and bool((weights == 1).all())
    got = moe.experts_forward(x, weights, experts, w)
    gate, up = (x @ w.gate_up[3].T).chunk(2, dim=-1)
    torch.testing.assert_close(got, (torch.nn.functional.silu(gate) * up) @ w.down[3].T, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(got, block(x[None])[0], atol=1e-5, rtol=1e-5)


def test_experts_run_grouped(monkeypatch):
    """One gate/up matmul per expert that received tokens, over all of its rows at once."""
    _, w = hf_block("qwen3_moe", 8, 2, True, seed=3)
    x = torch.randn(30, HIDDEN, generator=torch.Generator().manual_seed(2))
    weights, experts = moe.route(x, w.router, 2, True)
    calls = []
    real = ops.linear
    monkeypatch.setattr(ops, "linear", lambda a, m, *r, **k: calls.append((id(m), a.shape[0])) or real(a, m, *r, **k))
    moe.experts_forward(x, weights, experts, w)
    counts = torch.bincount(experts.reshape(-1), minlength=8).tolist()
    assert calls == [(id(w.gate_up[e]), c) for e, c in enumerate(counts) if c]
    assert sum(c for _, c in calls) == 60 and len(calls) < 30


def test_int4_experts_on_the_native_kernel_equal_token_by_token():
    """4-bit experts take the native int4 kernel over each expert's rows; a row's result does not
    depend on the rows beside it, so the grouped layer equals running each token alone."""
    from specexec_rt.kernels import cpu_native

    if cpu_native.library() is None:
        pytest.skip(f"native CPU library unavailable: {cpu_native.unavailable_reason()}")
    _, w = hf_block("qwen3_moe", 8, 2, True, seed=5)
    w4 = MoEWeights(router=w.router, gate_up=[quantize_int4(m, group_size=32) for m in w.gate_up],
                    down=[quantize_int4(m, group_size=32) for m in w.down])
    x = torch.randn(33, HIDDEN, generator=torch.Generator().manual_seed(4))
    weights, experts = moe.route(x, w4.router, 2, True)
    grouped = moe.experts_forward(x, weights, experts, w4)
    alone = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(2):
            e = int(experts[t, j])
            y = ops.swiglu_linear(ops.linear(x[t:t + 1], w4.gate_up[e]), w4.down[e])
            alone[t] += weights[t, j] * y[0]
    torch.testing.assert_close(grouped, alone, atol=1e-5, rtol=1e-5)
    dense = MoEWeights(router=w.router, gate_up=[m.dequantize() for m in w4.gate_up], down=[m.dequantize() for m in w4.down])
    ref = moe.experts_forward(x, weights, experts, dense)     # the same weights in float32
    assert (grouped - ref).abs().max() < 0.05 * ref.abs().max()


# ---------------------------------------------------------------------- through the engine

@pytest.fixture(scope="module")
def moe_target():
    return build_tiny_model("qwen3_moe", seed=0, vocab_size=48)


def perturbed(target, noise=0.1, seed=1):
    from specexec_rt.model import Transformer

    g = torch.Generator().manual_seed(seed)
    w = replace_leaves(target.weights, lambda _, t: t + noise * t.std() * torch.randn(t.shape, generator=g))
    return Transformer(target.config, w, target.max_len, target.device, target.dtype)


PROMPT = [1, 5, 9, 2, 7]
METHODS = [("autoregressive", 1, {}), ("chain", 4, dict(k=3)), ("specinfer", 8, dict(n=2, depth=3)),
           ("specexec", 16, {}), ("specexec", 32, dict(tree="softmax", beams_per_step=4)),
           ("specexec", 16, dict(tree="sequoia"))]


@pytest.mark.parametrize("method,budget,params", METHODS)
def test_every_method_is_lossless(moe_target, method, budget, params):
    expected = greedy_decode(moe_target, PROMPT, 32)
    draft = None if method == "autoregressive" else perturbed(moe_target)
    res = Engine(moe_target, draft, method=method, budget=budget, **params).generate(PROMPT, max_new_tokens=32)
    assert res.token_ids == expected


def test_default_draft_is_an_int4_moe_and_lossless(moe_target):
    draft = default_draft(moe_target)
    for i, (t, d) in enumerate(zip(moe_target.weights.layers, draft.weights.layers)):
        assert (d.moe is None) == (t.moe is None), i
        if d.moe is not None:
            assert all(isinstance(m, Int4Weight) for m in d.moe.gate_up + d.moe.down)
            assert d.moe.router is t.moe.router and d.q_norm is t.q_norm
    assert draft.config.moe_layers == moe_target.config.moe_layers
    expected = greedy_decode(moe_target, PROMPT, 32)
    res = Engine(moe_target, draft, method="specexec", budget=16).generate(PROMPT, max_new_tokens=32)
    assert res.token_ids == expected and res.stats.tokens_per_pass > 1.5


def test_layer_subset_draft_keeps_each_layers_kind(moe_target):
    draft = int4_draft(moe_target, keep=[1, 2], group_size=32)
    assert draft.config.n_layers == 2 and draft.config.moe_layers == (1,)
    assert draft.weights.layers[0].moe is None and draft.weights.layers[1].moe is not None
    draft.forward(torch.tensor(PROMPT), torch.arange(5), draft.new_cache(), 0)
    # It reads the target's cache layers 1 and 2 (drafts.py, share_cache): still exact.
    res = Engine(moe_target, draft, method="specexec", budget=8).generate(PROMPT, max_new_tokens=16)
    assert res.token_ids == greedy_decode(moe_target, PROMPT, 16)


def test_a_dense_draft_of_the_same_vocabulary(moe_target):
    dense = build_tiny_model("llama", seed=4, vocab_size=48)
    expected = greedy_decode(moe_target, PROMPT, 24)
    for method, params in (("specexec", {}), ("chain", dict(k=2))):
        res = Engine(moe_target, dense, method=method, budget=8, **params).generate(PROMPT, max_new_tokens=24)
        assert res.token_ids == expected


def test_sampled_specexec_equals_sampled_autoregressive(moe_target):
    """A seeded sampled request's text depends on the seed and the prompt only."""
    kw = dict(max_new_tokens=24, temperature=0.9, seed=11)
    ar = Engine(moe_target, method="autoregressive").generate(PROMPT, **kw)
    se = Engine(moe_target, perturbed(moe_target), method="specexec", budget=16).generate(PROMPT, **kw)
    assert se.token_ids == ar.token_ids


@pytest.mark.parametrize("method,params", [("specexec", {}), ("chain", dict(k=2))])
def test_ragged_batches_with_chunked_prefill(moe_target, method, params):
    prompts = [PROMPT, [3, 4] * 6, [11, 12, 13]]
    expected = [greedy_decode(moe_target, p, 20) for p in prompts]
    engine = Engine(moe_target, perturbed(moe_target), method=method, budget=8, max_batch=3, prefill_chunk=4,
                    **params)
    assert [r.token_ids for r in engine.generate_batch(prompts, max_new_tokens=20)] == expected


def test_forward_batch_equals_solo_forwards(moe_target):
    g = torch.Generator().manual_seed(0)
    region = 32
    pool = moe_target.new_cache(2 * region)
    segs, toks, poss, solo = [], [], [], []
    for i, (plen, n) in enumerate(((6, 5), (9, 7))):
        prompt = torch.randint(0, 48, (plen,), generator=g)
        moe_target.forward_batch(prompt, torch.arange(plen), pool, [Segment(plen, i * region, 0)])
        anc = torch.tril(torch.rand(n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
        ids = torch.randint(0, 48, (n,), generator=g)
        segs.append(Segment(n, i * region, plen, tree_mask=anc))
        toks.append(ids)
        poss.append(plen + anc.sum(1) - 1)
        fresh = moe_target.new_cache(region)
        moe_target.forward(prompt, torch.arange(plen), fresh, 0)
        solo.append(moe_target.forward(ids, poss[-1], fresh, plen, tree_mask=anc))
    batched = moe_target.forward_batch(torch.cat(toks), torch.cat(poss), pool, segs)
    torch.testing.assert_close(batched, torch.cat(solo), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- offload, memory, capture

@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    make_hf_model("mixtral", d)
    return d


def test_offloaded_moe_equals_resident(mixtral_dir):
    """Every expert streams with its layer (CPU schedule of the layer streamer): same bits."""
    resident = load_model(mixtral_dir, device="cpu", max_len=64)
    offloaded = load_model(mixtral_dir, device="cpu", max_len=64, offload=True, gpu_memory_gb=0)
    streamer = offloaded.layer_source
    assert streamer.n_streamed == resident.config.n_layers
    for layout, layer in zip(streamer.layouts, resident.weights.layers):
        assert len(layout.tensors) == len(list(tensor_leaves(layer)))     # router + 2 x 4 experts + the rest
        assert layout.nbytes >= sum(t.numel() * t.element_size() for _, t in tensor_leaves(layer.moe))
    ids = torch.tensor([3, 8, 1, 9, 4, 4, 7])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    outs = []
    for m in (resident, offloaded):
        a = m.forward(ids, torch.arange(7), m.cache, 0)
        b = m.forward(ids[:3], torch.tensor([7, 8, 8]), m.cache, 7, tree_mask=mask)
        outs.append((a, b, m.cache.k.clone()))
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def test_memory_estimate_counts_the_experts(moe_target):
    from specexec_rt.speculative import memory

    dense = build_tiny_model("llama", vocab_size=48, n_layers=3)
    assert memory.moe_bytes_per_token(moe_target.config, 4) > 0
    more_k = dataclasses.replace(moe_target.config, num_experts_per_tok=4)
    assert memory.moe_bytes_per_token(more_k, 4) > memory.moe_bytes_per_token(moe_target.config, 4)
    per_token = memory.forward_bytes(moe_target, 64, 64) - memory.forward_bytes(dense, 64, 64)
    assert per_token >= 64 * memory.moe_bytes_per_token(moe_target.config, 4) - 64 * 4 * 48


def test_moe_models_are_not_captured_as_cuda_graphs(moe_target):
    assert not moe_target.capturable and build_tiny_model("llama").capturable


# ---------------------------------------------------------------------- the CPU whole-layer path

def test_native_layer_stack_refuses_blocks_it_does_not_compute(moe_target, caplog):
    from specexec_rt.kernels import cpu_native

    if cpu_native.library() is None:
        pytest.skip(f"native CPU library unavailable: {cpu_native.unavailable_reason()}")
    qwen3 = build_tiny_model("qwen3", qk_norm=True)
    llama = build_tiny_model("llama")
    assert NativeLayers.build(llama.weights.layers) is not None
    with caplog.at_level(logging.INFO, logger="specexec_rt.kernels.layers.cpu"):
        assert NativeLayers.build(qwen3.weights.layers) is None
        assert NativeLayers.build(moe_target.weights.layers) is None
    assert "has 'q_norm', 'k_norm', which" in caplog.text and "has 'q_norm', 'k_norm', 'moe'" in caplog.text
    assert "per-op path" in caplog.text
    # The model takes the per-op path and gets its own block's result: dropping the q/k norms
    # (what the native stack computes) changes the logits.
    ids = torch.tensor([1, 2, 3, 4])
    got = qwen3.forward(ids, torch.arange(4), qwen3.cache, 0)
    assert qwen3._layers_plan[1] is None
    plain = build_tiny_model("qwen3", qk_norm=True)
    for lw in plain.weights.layers:
        lw.q_norm = lw.k_norm = None
    plain.config.qk_norm = False
    assert NativeLayers.build(plain.weights.layers) is not None
    assert not torch.allclose(got, plain.forward(ids, torch.arange(4), plain.cache, 0), atol=1e-3)


def test_unserved_fields_names_any_new_layer_field():
    @dataclasses.dataclass
    class Wider:
        attn_norm: object = 1
        wqkv: object = 1
        extra: object = None

    assert unserved_fields(Wider()) == () and unserved_fields(Wider(extra=torch.ones(1))) == ("extra",)


# ---------------------------------------------------------------------- configs the runtime cannot serve

@pytest.mark.parametrize("arch,change,match", [
    ("qwen3_moe", dict(num_experts_per_tok=9), r"num_experts_per_tok=9 must be between 1 and num_experts=8"),
    ("qwen3_moe", dict(num_experts_per_tok=0), r"num_experts_per_tok=0"),
    ("qwen3_moe", dict(moe_intermediate_size=0), r"moe_intermediate_size=0"),
    ("qwen3_moe", dict(decoder_sparse_step=0), r"decoder_sparse_step=0"),
    ("qwen3_moe", dict(shared_expert_intermediate_size=64), r"shared_expert_intermediate_size"),
    ("mixtral", dict(num_experts_per_tok=5), r"num_experts_per_tok=5 must be between 1 and num_experts=4"),
])
def test_moe_configs_it_cannot_serve_are_named(tmp_path_factory, arch, change, match):
    d = tmp_path_factory.mktemp(arch)
    make_hf_model(arch, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").unlink()      # refused before any weight is read
    with pytest.raises(UnsupportedModelError, match=match):
        load_model(d, device="cpu", max_len=32)


def test_expert_count_mismatch_is_named(mixtral_dir, tmp_path):
    for f in mixtral_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_local_experts"] = 5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from specexec_rt.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"mlp\.gate\.weight' has shape \[4, 64\] .*experts 5 x 96"):
        load_model(tmp_path, device="cpu", max_len=32)
