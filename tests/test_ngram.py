"""Prompt-lookup (n-gram) drafts: the index and the trie, the grafted tree, and the engine with
``draft="ngram"`` alone and with ``ngram=True`` merged into a draft model's trees: greedy output
equals the target's, sampled output follows its distribution (chi-square, and a broken walk
fails it), and on text that repeats itself the lookup pays."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import greedy_decode
from specexec_rt.speculative import tree as tree_mod
from specexec_rt.speculative.drafts import layer_dropped_draft
from specexec_rt.speculative.engine import Engine
from specexec_rt.speculative.ngram import (BIN_BASE, Candidates, LookupSettings, NgramIndex, PromptLookup,
                                           path_probabilities)
from specexec_rt.speculative.request import Request
from specexec_rt.speculative.sampling import SamplingParams, process_logits
from specexec_rt.speculative.tree import DraftTree
from test_engine import _walk_follows_draft, make_pair
from test_sampling import chi2_pvalue
from test_shared_cache import token_pair_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def bigram(target):
    """``target`` with its attention outputs zeroed: each token's logits depend on that token
    alone, so greedy text soon cycles and earlier text predicts later text, as in a summary."""
    for lw in target.weights.layers:
        lw.wo = torch.zeros_like(lw.wo)
    return target


@pytest.fixture(scope="module")
def pair():
    target, draft = make_pair(noise=0.3)
    return bigram(target), draft


# ---------------------------------------------------------------------- the index and the trie
def test_index_finds_the_longest_earlier_suffix_most_recent_first():
    idx = NgramIndex(2, 3)
    text = [5, 1, 2, 9, 1, 2, 7, 4, 1, 2]
    assert idx.matches(text, 8) == (2, [5, 2])          # (1, 2) ended at 5 and 2; the suffix itself excluded
    text += [7]
    assert idx.matches(text, 8) == (3, [6])             # (1, 2, 7) is longer and occurred once
    assert idx.matches(text, 8)[1] == [6] and idx.indexed == len(text)
    assert idx.matches([3, 4, 5], 8) == (0, [])
    assert NgramIndex(2, 3).matches(text, 1) == (3, [6])


def _request(tokens, remaining=100, temperature=0.0):
    r = Request(list(tokens), SamplingParams(temperature), 0, remaining, None, torch.device("cpu"))
    return r


def test_matches_that_agree_share_a_path_and_disagreements_branch():
    lookup = PromptLookup(LookupSettings(min_n=2, max_n=2, max_matches=8, max_tokens=3))
    #            match ----> 7 8 9     match ----> 7 8 4     the suffix
    text = [1, 2, 7, 8, 9, 0, 1, 2, 7, 8, 4, 0, 0, 0, 1, 2]
    cand = lookup.propose(_request(text), max_depth=10)
    assert cand.tokens == [7, 8, 4, 9]            # most recent match first: 7 8 4, then 9 branches off 8
    assert cand.parents == [-1, 0, 1, 1]
    shares = [(b - BIN_BASE) // lookup.n_depth % 3 for b in cand.bins]
    assert shares == [2, 2, 1, 1]                 # 7 and 8: every match; 4 and 9: half each
    assert all(lq < 0 for lq in cand.logq)
    assert lookup.propose(_request(text), max_depth=2).tokens == [7, 8]     # the tokens left cap the depth
    assert len(lookup.propose(_request([1, 2, 3, 4]), 10)) == 0


# ---------------------------------------------------------------------- the grafted tree
def test_graft_builds_what_add_children_would():
    cand = Candidates(parents=[-1, 0, 1, -1], tokens=[7, 8, 9, 4], logq=[-0.1, -0.2, -0.3, -1.0],
                      bins=[BIN_BASE] * 4)
    t = DraftTree(16, "cpu", 3)
    t.graft(0, cand)
    assert t.n_nodes == 5 and t.levels == 3
    assert t.parents[1:5].tolist() == [0, 1, 2, 0] and t.depths[1:5].tolist() == [1, 2, 3, 1]
    torch.testing.assert_close(t.scores[1:5], torch.tensor([-0.1, -0.3, -0.6, -1.0]))
    anc = t.anc[:5, :5]
    assert anc[3].tolist() == [True, True, True, True, False] and anc[4].tolist() == [True, False, False, False, True]
    # Only children of expanded nodes are candidates: the root's, once it is expanded.
    t.mark_expanded(torch.tensor([0]))
    cands = t.candidates(torch.tensor(float("-inf")), 10)
    assert (cands > float("-inf")).tolist() == [False, True, False, False, True]
    # The draft proposes 7 (the grafted twin) and 5 under the root: 7 is not created twice, and the
    # twin keeps the better score (-0.05 > -0.1); 5 is new.
    new = t.add_children(torch.tensor([0]), torch.tensor([[7, 5]]), torch.tensor([[-0.05, -2.0]]))
    assert t.alive[new].tolist() == [False, True] and float(t.scores[1]) == pytest.approx(-0.05)
    vt = t.compact(t.alive_nodes())
    assert sorted(vt.tokens.tolist()) == [3, 4, 5, 7, 8, 9]


# ---------------------------------------------------------------------- the engine, greedy
PROMPTS = [[1, 5, 9], [5, 6, 7], [2], [3, 4, 3, 4]]
NEW = 40


@pytest.fixture(scope="module")
def expected(pair):
    return [greedy_decode(pair[0], p, NEW) for p in PROMPTS]


def _tokens_per_pass(results) -> float:
    return sum(r.stats.new_tokens for r in results) / sum(r.stats.target_passes for r in results)


ENGINES = {
    "ngram b8": dict(draft="ngram", budget=8),
    "ngram b2": dict(draft="ngram", budget=2),
    "ngram auto": dict(draft="ngram", budget="auto", max_budget=16),
    "ngram softmax": dict(draft="ngram", budget=8, tree="softmax", ngram_min=1, ngram_max=3, ngram_tokens=4),
    "draft b8": dict(budget=8, max_depth=6),
    "merged b8": dict(budget=8, max_depth=6, ngram=True),
    "merged auto": dict(budget="auto", max_budget=16, max_depth=6, ngram=True),       # chains + lookup passes (CPU)
    "merged auto trees": dict(budget="auto", max_budget=16, max_depth=6, ngram=True, auto_shapes="trees"),
    "merged shared": dict(budget=8, max_depth=6, ngram=True, shared=True),
    "merged static": dict(budget=8, max_depth=6, ngram=True, static_draft=True),
}


def _engine(pair, name, max_batch=1):
    target, draft = pair
    kw = dict(ENGINES[name])
    if kw.pop("shared", False):
        draft = layer_dropped_draft(target, [0])           # reads the target's cache
    kw.setdefault("draft", draft)
    return Engine(target, kw.pop("draft"), method="specexec", max_batch=max_batch, **kw)


# Static draft steps serve one request per pass.
GREEDY_CASES = [(name, b) for name in ENGINES for b in (1, 3) if b == 1 or "static" not in name]


@pytest.mark.parametrize("name,max_batch", GREEDY_CASES)
def test_greedy_equals_the_target(pair, expected, name, max_batch):
    engine = _engine(pair, name, max_batch)
    for _ in range(2):           # the second round with what the lookup learned in the first
        results = [h.result() for h in [engine.submit(p, NEW) for p in PROMPTS]]
        assert [r.token_ids for r in results] == expected


def test_the_lookup_pays_on_text_that_repeats_and_merging_keeps_the_better(pair):
    """On cycling text, the lookup alone accepts several tokens a pass without a draft call, and
    the merged tree is at least the better of its two sources (tokens per pass, same budget)."""
    rates = {}
    for name in ("ngram b8", "draft b8", "merged b8"):
        engine = _engine(pair, name)
        for _ in range(2):
            results = [engine.generate(p, NEW) for p in PROMPTS]
        rates[name] = _tokens_per_pass(results)
        if name == "ngram b8":
            assert sum(r.stats.draft_calls for r in results) == 0
    assert rates["ngram b8"] > 2.5, rates
    assert rates["merged b8"] >= max(rates["ngram b8"], rates["draft b8"]), rates


def test_the_lookup_learns_its_acceptance(pair):
    engine = _engine(pair, "ngram b8")
    lookup = engine.decoder.lookup
    before = list(lookup.model(SamplingParams(0.0)).log_accept)
    for p in PROMPTS:
        engine.generate(p, NEW)
    model = lookup.model(SamplingParams(0.0))
    assert sum(model.counts) > 20
    seen = [b for b, c in enumerate(model.counts) if c > 5]
    assert seen and all(model.log_accept[b] != before[b] for b in seen)
    # Cycling text: the agreeing matches' continuations are accepted nearly always.
    agree = [b for b in seen if b // lookup.n_depth % 3 == 2]
    assert agree and max(model.log_accept[b] for b in agree) > -0.2


# ---------------------------------------------------------------------- auto: chains or the lookup
def test_path_probabilities_multiply_along_the_path():
    cand = Candidates([-1, 0, 1, 0], [5, 6, 7, 8], [-0.1, -0.2, -0.3, -1.0], [BIN_BASE] * 4)
    want = [torch.tensor(x).exp().item() for x in (-0.1, -0.3, -0.6, -1.1)]
    assert path_probabilities(cand) == pytest.approx(want)


def test_shadow_evidence_is_what_verifying_the_trie_would_find():
    lookup = PromptLookup(LookupSettings(min_n=2, max_n=2, max_matches=8, max_tokens=3))
    text = [1, 2, 7, 8, 9, 0, 1, 2, 7, 8, 4, 0, 0, 0, 1, 2]      # the trie 7 -> 8 -> {4, 9}
    params = SamplingParams(0.0)
    cand = lookup.propose(_request(text), max_depth=10)
    model = lookup.model(params)
    lookup.shadow_update(params, cand, [7, 8, 4, 5])
    # 7 and 8 seen and hit; under 8 both 4 (hit) and 9 (miss) seen: 4 observations, 3 hits
    assert sum(model.counts) == pytest.approx(4) and sum(model.hits) == pytest.approx(3)
    lookup.shadow_update(params, cand, [3])                       # the root's child missed: 1 more
    assert sum(model.counts) == pytest.approx(0.97 * 4 + 1) and sum(model.hits) == pytest.approx(0.97 * 3)
    lookup.shadow_update(params, cand, [7])                       # depth 2 not reached: 7 alone
    assert sum(model.counts) == pytest.approx(0.97 * (0.97 * 4 + 1) + 1)


def test_a_trie_is_built_once_per_text_and_rescored_with_what_was_learned():
    lookup = PromptLookup(LookupSettings(min_n=2, max_n=2, max_matches=8, max_tokens=3))
    params = SamplingParams(0.0)
    r = _request([1, 2, 7, 8, 9, 0, 1, 2, 7, 8, 4, 0, 0, 0, 1, 2])
    first = lookup.propose(r, max_depth=10)
    lookup.shadow_update(params, first, [7, 8, 4])
    again = lookup.propose(r, max_depth=10)
    assert again.parents is first.parents and again.tokens == first.tokens
    assert again.logq != first.logq                                 # the estimates moved
    r.committed.append(7)
    assert lookup.propose(r, max_depth=10).parents is not first.parents


def _fix_lookup_estimate(engine, p_accept, monkeypatch):
    """Hold the lookup's acceptance estimate at ``p_accept`` for every bin (no learning)."""
    lookup = engine.decoder.lookup
    model = lookup.model(SamplingParams(0.0))
    model.log_accept[:] = [math.log(p_accept)] * len(model.log_accept)
    monkeypatch.setattr(lookup, "update", lambda params, packet: None)


def _chain_cost(b, n, calls):
    """Seconds of a pass as a CPU has them (draft calls a quarter of a one-row verification,
    verification growing with its rows), the same on every run."""
    return 0.25 * calls, 1.0 + 0.1 * b


def test_auto_chains_take_the_lookup_where_it_promises_more(pair, expected, monkeypatch):
    """budget="auto" with chains: a lookup pass (its trie alone, no draft call) replaces the
    planned chain or plain pass exactly when the lookup's estimate beats it; the text stays the
    target's either way."""
    assert _engine(pair, "ngram auto").auto_shapes == "trees"       # no draft model to grow chains
    sure = _engine(pair, "merged auto")
    assert sure.auto_shapes == "chains"
    sure.budget_controller.cost_model = _chain_cost
    _fix_lookup_estimate(sure, 0.999, monkeypatch)
    results = [sure.generate(p, NEW) for p in PROMPTS]
    assert [r.token_ids for r in results] == expected
    modes = [m for r in results for m in r.stats.modes]
    assert modes.count("lookup") > len(modes) // 2, modes
    never = _engine(pair, "merged auto")
    never.budget_controller.cost_model = _chain_cost
    _fix_lookup_estimate(never, 1e-4, monkeypatch)
    results = [never.generate(p, NEW) for p in PROMPTS]
    assert [r.token_ids for r in results] == expected
    assert "lookup" not in [m for r in results for m in r.stats.modes]


def test_auto_chains_learn_the_lookup_from_passes_that_do_not_use_it(pair, expected):
    """On cycling text the lookup's estimates start at their prior, grow from the chains'
    committed tokens (shadow evidence), and auto then turns to lookup passes: fewer draft calls
    per token than the chains alone, same text."""
    merged, alone = _engine(pair, "merged auto"), Engine(pair[0], pair[1], budget="auto", max_budget=16, max_depth=6)
    calls = {}
    for name, engine in (("merged", merged), ("alone", alone)):
        engine.budget_controller.cost_model = _chain_cost
        for _ in range(2):
            results = [engine.generate(p, NEW) for p in PROMPTS]
            assert [r.token_ids for r in results] == expected
        calls[name] = sum(r.stats.draft_calls for r in results) / sum(r.stats.new_tokens for r in results)
        if name == "merged":
            assert "lookup" in [m for r in results for m in r.stats.modes]
            model = merged.decoder.lookup.model(SamplingParams(0.0))
            assert max(model.log_accept) > math.log(0.9)
    assert calls["merged"] < calls["alone"], calls


# ---------------------------------------------------------------------- sampling
VOCAB = 16
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]          # the lookup proposes 3 1 2 3 ... from the first pass on
N_RUNS = 800


@pytest.fixture(scope="module")
def sampling_pair():
    return make_pair(vocab=VOCAB, noise=0.8, max_len=64, head_scale=0.15)


def exact_first_two(target, params: SamplingParams) -> torch.Tensor:
    v, n = VOCAB, len(PROMPT)
    cache = target.new_cache()
    p1 = process_logits(target.forward(torch.tensor(PROMPT), torch.arange(n), cache, 0)[-1], params)
    p2 = process_logits(target.forward(torch.arange(v), torch.full((v,), n), cache, n,
                                       tree_mask=torch.eye(v, dtype=torch.bool)), params)
    return (p1[:, None] * p2).reshape(-1).double()


def first_two_counts(engine, params: SamplingParams, concurrent: int = 1) -> torch.Tensor:
    return token_pair_counts(engine, PROMPT, 0, VOCAB, N_RUNS, params, concurrent)


SAMPLED = {
    "ngram": dict(draft="ngram", budget=6, ngram_min=1),
    "merged": dict(budget=6, beams_per_step=4, branch_width=4, max_depth=3, ngram=True, ngram_min=1),
    "merged uncoupled": dict(budget=6, beams_per_step=4, branch_width=4, max_depth=3, ngram=True, ngram_min=1,
                             coupled=False),
    "merged shared": dict(budget=6, max_depth=3, ngram=True, ngram_min=1, shared=True),
    "merged auto": dict(budget="auto", max_budget=6, max_depth=3, ngram=True, ngram_min=1),
}


def _sampling_engine(pair, name, max_batch=1):
    target, draft = pair
    kw = dict(SAMPLED[name])
    if kw.pop("shared", False):
        draft = layer_dropped_draft(target, [1])
    kw.setdefault("draft", draft)
    return Engine(target, kw.pop("draft"), method="specexec", max_batch=max_batch, **kw)


@pytest.mark.parametrize("name,concurrent", [("ngram", 1), ("merged", 1), ("merged uncoupled", 1),
                                             ("merged shared", 1), ("merged", 3), ("merged auto", 1)])
def test_sampling_matches_the_target(sampling_pair, name, concurrent):
    params = SamplingParams(0.8, 0.9)
    engine = _sampling_engine(sampling_pair, name, concurrent)
    counts = first_two_counts(engine, params, concurrent)
    assert chi2_pvalue(counts, exact_first_two(sampling_pair[0], params)) > 1e-3


def test_a_broken_walk_fails_the_same_check(sampling_pair, monkeypatch):
    params = SamplingParams(1.0, 1.0)
    monkeypatch.setitem(tree_mod.__dict__, "_real_walk", tree_mod.walk_accept)
    monkeypatch.setattr(tree_mod, "walk_accept", _walk_follows_draft)
    counts = first_two_counts(_sampling_engine(sampling_pair, "ngram"), params)
    assert chi2_pvalue(counts, exact_first_two(sampling_pair[0], params)) < 1e-6


def test_a_seed_fixes_the_sampled_text(pair):
    target, draft = pair
    ar = Engine(target, None, method="autoregressive")
    for name in ("ngram b8", "merged b8", "merged auto"):
        engine = _engine(pair, name)
        for seed in range(3):
            want = ar.generate(PROMPTS[seed], NEW, temperature=0.9, top_p=0.95, seed=seed).token_ids
            assert engine.generate(PROMPTS[seed], NEW, temperature=0.9, top_p=0.95, seed=seed).token_ids == want


# ---------------------------------------------------------------------- settings
def test_bad_settings_are_named(pair):
    target, draft = pair
    for kw, match in [(dict(draft="ngram", method="chain"), "method='specexec'"),
                      (dict(draft="ngrams"), "'ngram' for prompt-lookup"),
                      (dict(draft="ngram", ngram=False), "contradicts"),
                      (dict(draft=draft, ngram_max=5), "ngram=True"),
                      (dict(draft=draft, ngram=True, ngram_min=4, ngram_max=2), "ngram_min=4 > ngram_max=2"),
                      (dict(draft=draft, ngram=True, ngram_tokens=0), "ngram_tokens must be a positive int"),
                      (dict(draft=draft, ngram="yes"), "ngram must be True or False"),
                      (dict(draft=draft, ngram=True, tree="sequoia"), "static shape"),
                      (dict(draft="ngram", budget="auto", auto_shapes="chains"), "auto_shapes='trees'")]:
        with pytest.raises(ValueError, match=match):
            Engine(target, kw.pop("draft"), **{"method": "specexec", **kw})
    with pytest.raises(TypeError, match="ngram"):
        Engine(target, draft, method="chain", ngram=True)
