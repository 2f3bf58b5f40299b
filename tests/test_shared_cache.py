"""A draft derived from the target reads the target's KV cache: it allocates no cache of its own,
never prefills the prompt or catches up on committed tokens, its layers read the K/V of the
target's layers they came from, and the output stays exactly the target's (greedy equality,
sampled chi-square, alone and in batches)."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, greedy_decode
from specexec_rt.speculative import tree as tree_mod
from specexec_rt.speculative.drafts import default_draft, int4_draft, layer_dropped_draft
from specexec_rt.speculative.engine import Engine
from specexec_rt.speculative.sampling import SamplingParams, process_logits
from specexec_rt.model import Transformer
from test_engine import _walk_follows_draft
from test_sampling import chi2_pvalue

pytestmark = pytest.mark.usefixtures("one_thread")

# Widths the int4 drafts take (groups of 32 divide 64 and 96).
WIDTHS = dict(hidden_size=64, intermediate_size=96, n_heads=4, n_kv_heads=2, head_dim=16)
PROMPTS = [[1, 5, 9, 2], [7], [3, 3, 8, 1, 4, 6, 2, 9, 11], [12, 2], [5, 6, 7, 8, 9, 10]]
NEW = [24, 9, 31, 4, 17]


def tiny_target(vocab: int = 32, max_len: int = 128, head_scale: float = 1.0, seed: int = 0) -> Transformer:
    target = build_tiny_model(vocab_size=vocab, n_layers=3, max_len=max_len, seed=seed, **WIDTHS)
    target.weights.lm_head = target.weights.lm_head * head_scale
    return target


DRAFTS = {
    "default": lambda t, **kw: default_draft(t, **kw),
    "int4:32, layers 0 and 2": lambda t, **kw: int4_draft(t, keep=[0, 2], group_size=32, **kw),
    "layers 0 and 2": lambda t, **kw: layer_dropped_draft(t, [0, 2], **kw),
}


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def expected(target):
    return [greedy_decode(target, p, n) for p, n in zip(PROMPTS, NEW)]


# ---------------------------------------------------------------------- memory and calls
@pytest.mark.parametrize("kind", list(DRAFTS))
@pytest.mark.parametrize("max_batch", [1, 3])
def test_a_shared_draft_has_no_cache_of_its_own(target, kind, max_batch):
    draft = DRAFTS[kind](target)
    assert draft.cache is None and draft.kv_source is target
    engine = Engine(target, draft, method="specexec", budget=8, max_batch=max_batch)
    runner = engine.runner
    assert runner.shares_cache and runner.draft_cache is runner.target_cache
    engine.generate_batch(PROMPTS[:max_batch], 6)
    # The only cache the engine ever allocated is the target's: max_batch regions of its max_len.
    assert runner.target_cache.k.shape == (3, max_batch * target.max_len, 2, 16)
    assert set(runner._pools) <= {id(target)} and draft.cache is None
    state = engine.last_cache_state()
    assert state.draft_len == state.target_len       # the draft's prefix is the target's

    own = DRAFTS[kind](target, share_cache=False)
    assert own.kv_source is None and own.cache.k.shape == (own.config.n_layers, target.max_len, 2, 16)
    assert Engine(target, own, method="specexec", budget=8).runner.draft_cache is own.cache


def _record_positions(draft):
    """Wrap the draft's forward entry points: the positions every draft call is fed."""
    fed = []
    real_forward, real_batch = draft.forward, draft.forward_batch

    def forward(token_ids, positions, *a, **kw):
        fed.append(positions.tolist())
        return real_forward(token_ids, positions, *a, **kw)

    def forward_batch(token_ids, positions, *a, **kw):
        fed.append(positions.tolist())
        return real_batch(token_ids, positions, *a, **kw)

    draft.forward, draft.forward_batch = forward, forward_batch
    return fed


@pytest.mark.parametrize("share", [True, False])
def test_a_shared_draft_never_prefills_or_catches_up(target, expected, share):
    """The draft is never fed a prompt position or a token it did not propose (a catch-up): its
    root call feeds the root alone. A draft with its own cache (the control) prefills the prompt."""
    draft = default_draft(target, share_cache=share)
    fed = _record_positions(draft)
    engine = Engine(target, draft, method="chain", k=3)
    prompt = PROMPTS[2]
    res = engine.generate(prompt, NEW[2])
    assert res.token_ids == expected[2]
    prompt_positions = [p for call in fed for p in call if p < len(prompt)]
    if share:
        assert prompt_positions == [] and max(len(call) for call in fed) == 1
        assert fed[0] == [len(prompt)]      # the first pass verified the root alone: no draft call
    else:
        assert prompt_positions == list(range(len(prompt)))


# ---------------------------------------------------------------------- the layer map
def test_a_layer_dropped_draft_reads_the_layers_it_kept():
    """Layer 1 of this target adds nothing to the residual stream, so the draft of layers 0 and 2
    computes the target's function; reading the target's cache layer 2 for its second layer it
    gives the target's logits exactly, and every pass accepts its tree to the depth cap. Reading
    cache layer 1 instead (a wrong map) does not."""
    target = tiny_target()
    lw = target.weights.layers[1]
    lw.wo, lw.w_down = torch.zeros_like(lw.wo), torch.zeros_like(lw.w_down)
    draft = layer_dropped_draft(target, [0, 2])
    assert draft.kv_layers == (0, 2) and draft.new_cache().k.shape[0] == 3
    ids = torch.tensor([3, 17, 5, 30, 8])
    target.prefill(ids[:4])
    nxt, pos = ids[4:], torch.tensor([4])
    ref = target.new_cache()
    target.forward(ids[:4], torch.arange(4), ref, 0)
    want = target.forward(nxt, pos, ref, 4)
    got = draft.forward(nxt, pos, target.cache, 4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    wrong = Transformer(draft.config, draft.weights, target.max_len, target.device, target.dtype,
                        kv_layers=[0, 1], own_cache=False)
    assert (wrong.forward(nxt, pos, target.cache, 4) - want).abs().max() > 1e-2

    engine = Engine(target, draft, method="specexec", budget=8, max_depth=4, tree="sequoia", acceptance=[0.9, 0.05])
    res = engine.generate([1, 2, 3], 21)
    assert res.token_ids == greedy_decode(target, [1, 2, 3], 21)
    assert res.stats.tokens_per_pass_histogram == {1: 1, 5: 4}    # the root alone, then 4 full trees


# ---------------------------------------------------------------------- losslessness
ENGINES = {
    "chain": dict(method="chain", k=4),
    "specinfer": dict(method="specinfer", n=2, depth=3),
    "specexec": dict(method="specexec", budget=12, beams_per_step=4, branch_width=3, max_depth=6),
    "specexec static": dict(method="specexec", budget=12, max_depth=6, static_draft=True),
    "auto": dict(method="specexec", budget="auto", max_budget=16, max_depth=6),
    "auto trees": dict(method="specexec", budget="auto", max_budget=16, max_depth=6, auto_shapes="trees"),
}


# Static draft steps serve one request per pass.
GREEDY_CASES = [(name, b) for name in ENGINES for b in (1, 3) if b == 1 or "static" not in name]


@pytest.mark.parametrize("kind", ["default", "layers 0 and 2"])
@pytest.mark.parametrize("name,max_batch", GREEDY_CASES)
def test_shared_draft_greedy_equals_the_target(target, expected, kind, name, max_batch):
    engine = Engine(target, DRAFTS[kind](target), max_batch=max_batch, prefill_chunk=5, **ENGINES[name])
    results = [h.result() for h in [engine.submit(p, n) for p, n in zip(PROMPTS, NEW)]]
    assert [r.token_ids for r in results] == expected
    if "static" in name:
        assert engine.runner.static_steps and sum(r.stats.static_draft_calls for r in results) > 0
    if kind == "default" and "auto" not in name:
        assert sum(r.stats.new_tokens for r in results) > 1.5 * sum(r.stats.target_passes for r in results)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("max_batch", [1, 3])
def test_a_shared_draft_reads_the_cache_in_the_targets_kv_dtype(kv_dtype, max_batch):
    """The draft attends to and writes its tree into the target's cache in whatever storage dtype
    the target keeps it (int8 with its scales): the engine's one cache is the target's, in its
    dtype, the draft's trees are accepted as deeply as with float16 (so it reads the keys right),
    and the output is the target's own greedy text (computed on a cache of the same dtype)."""
    target = build_tiny_model(vocab_size=32, n_layers=3, max_len=128, kv_dtype=kv_dtype, **WIDTHS)
    draft = default_draft(target)
    assert draft.cache is None and draft.kv_dtype == target.kv_dtype
    engine = Engine(target, draft, method="specexec", budget=12, max_depth=6, max_batch=max_batch, prefill_chunk=5)
    results = [h.result() for h in [engine.submit(p, n) for p, n in zip(PROMPTS, NEW)]]
    assert [r.token_ids for r in results] == [greedy_decode(target, p, n) for p, n in zip(PROMPTS, NEW)]
    cache = engine.runner.target_cache
    assert engine.runner.draft_cache is cache and cache.k.dtype == target.kv_dtype
    assert (cache.k_scale is not None) == (kv_dtype == "int8")
    # A draft reading garbage keys would be accepted ~never; the int4 copy of the target nearly always.
    assert sum(r.stats.new_tokens for r in results) > 1.5 * sum(r.stats.target_passes for r in results)


def test_offload_kv_gives_derived_drafts_a_resident_cache_of_their_own():
    """A target whose KV lives in host memory: a derived draft keeps a resident cache of its own by
    default (reading the host cache per draft step would stream the prefix every step), asking
    for the shared cache is a clear error, and the output is still the target's own."""
    from specexec_rt.offload import StreamedKVCache, streamed_cache_factory

    ref = build_tiny_model(vocab_size=32, n_layers=3, max_len=128, kv_dtype="int8", **WIDTHS)
    target = Transformer(ref.config, ref.weights, 128, ref.device, ref.dtype, kv_dtype="int8",
                         cache_factory=streamed_cache_factory())
    for make in (default_draft, lambda t, **kw: layer_dropped_draft(t, [0, 2], **kw)):
        draft = make(target)
        assert draft.kv_source is None and draft.own_cache and not draft.kv_offload
        with pytest.raises(ValueError, match="share_cache=True.*offload_kv"):
            make(target, share_cache=True)
    draft = default_draft(target)
    engine = Engine(target, draft, method="specexec", budget=8, max_depth=4)
    assert not engine.runner.shares_cache and isinstance(engine.runner.target_cache, StreamedKVCache)
    assert engine.runner.draft_cache.resident and engine.runner.draft_cache.kv_dtype is torch.int8
    for p, n in zip(PROMPTS[:3], NEW[:3]):
        assert engine.generate(p, n).token_ids == greedy_decode(ref, p, n)


def test_a_shared_draft_is_refused_beside_another_target(target):
    other = tiny_target(seed=1)
    with pytest.raises(ValueError, match="derived from"):
        Engine(other, default_draft(target))
    with pytest.raises(ValueError, match="share_cache=False"):
        default_draft(target, max_len=64)
    assert default_draft(target, max_len=64, share_cache=False).max_len == 64


# ---------------------------------------------------------------------- sampling
VOCAB = 16
PROMPT = [1, 2, 3]
N_RUNS = 800


@pytest.fixture(scope="module")
def sampling_target():
    return tiny_target(vocab=VOCAB, max_len=64, head_scale=0.6)


def exact_second_third(target: Transformer, params: SamplingParams) -> torch.Tensor:
    """The target's exact distribution of the second and third new tokens, ``[V * V]``: the sum
    over the first token t1 of p(t1) p(t2 | t1) p(t3 | t1, t2), every t1 and (t1, t2) a row of
    one two-level tree."""
    v, n = VOCAB, len(PROMPT)
    cache = target.new_cache(n + v + v * v)
    p1 = process_logits(target.forward(torch.tensor(PROMPT), torch.arange(n), cache, 0)[-1], params)
    tokens = torch.cat([torch.arange(v), torch.arange(v).repeat(v)])
    positions = torch.cat([torch.full((v,), n), torch.full((v * v,), n + 1)])
    mask = torch.zeros(v + v * v, v + v * v, dtype=torch.bool)
    mask[torch.arange(v + v * v), torch.arange(v + v * v)] = True
    mask[v + torch.arange(v * v), torch.arange(v).repeat_interleave(v)] = True      # row (t1, t2) -> row t1
    probs = process_logits(target.forward(tokens, positions, cache, n, tree_mask=mask), params)
    p2, p3 = probs[:v], probs[v:].view(v, v, v)
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0).reshape(-1).double()


def token_pair_counts(engine: Engine, prompt: list, first: int, vocab: int, n_runs: int, params: SamplingParams,
                      concurrent: int = 1) -> torch.Tensor:
    """Counts ``[vocab * vocab]`` of new tokens ``first`` and ``first + 1`` over ``n_runs`` seeded
    requests, ``concurrent`` of them sharing each pass."""
    counts = torch.zeros(vocab ** 2, dtype=torch.long)
    for start in range(0, n_runs, concurrent):
        hs = [engine.submit(prompt, first + 2, temperature=params.temperature, top_p=params.top_p, seed=seed)
              for seed in range(start, min(n_runs, start + concurrent))]
        for h in hs:
            ids = h.result().token_ids
            counts[ids[first] * vocab + ids[first + 1]] += 1
    return counts


def second_third_counts(engine: Engine, params: SamplingParams, concurrent: int = 1) -> torch.Tensor:
    """Tokens 2 and 3 (the first pass verifies the root alone: a shared draft waits for the prompt
    to be in the target's cache; tokens 2 and 3 come from drafted trees)."""
    return token_pair_counts(engine, PROMPT, 1, VOCAB, N_RUNS, params, concurrent)


SAMPLED = {
    "specexec": dict(method="specexec", budget=8, beams_per_step=4, branch_width=4, max_depth=3),
    "chain": dict(method="chain", k=3),
    "auto": dict(method="specexec", budget="auto", max_budget=8, max_depth=3),
}


@pytest.mark.parametrize("name,concurrent", [("specexec", 1), ("chain", 1), ("auto", 1), ("specexec", 3)])
def test_shared_draft_sampling_matches_the_target(sampling_target, name, concurrent):
    params = SamplingParams(0.8, 0.9)
    draft = layer_dropped_draft(sampling_target, [0, 2])
    engine = Engine(sampling_target, draft, max_batch=concurrent, **SAMPLED[name])
    counts = second_third_counts(engine, params, concurrent)
    assert chi2_pvalue(counts, exact_second_third(sampling_target, params)) > 1e-3


def test_a_broken_walk_fails_the_same_check(sampling_target, monkeypatch):
    params = SamplingParams(1.0, 1.0)
    monkeypatch.setitem(tree_mod.__dict__, "_real_walk", tree_mod.walk_accept)
    monkeypatch.setattr(tree_mod, "walk_accept", _walk_follows_draft)
    engine = Engine(sampling_target, layer_dropped_draft(sampling_target, [0, 2]), **SAMPLED["specexec"])
    counts = second_third_counts(engine, params)
    assert chi2_pvalue(counts, exact_second_third(sampling_target, params)) < 1e-6
