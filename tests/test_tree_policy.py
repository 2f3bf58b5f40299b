"""SpecExec tree policies through the engine (specexec_rt/speculative/tree_policy.py): with a draft
that is always right, calibrated and Sequoia trees become chains as deep as allowed, while the
softmax ranking spends the budget on siblings; the acceptance model learns from every pass with
no extra host read; Sequoia follows its acceptance vector."""
from __future__ import annotations

import pytest
import torch

from conftest import greedy_decode, random_weights, tiny_config
from specexec_rt.model import Transformer
from specexec_rt.speculative.engine import Engine
from specexec_rt.speculative import tree_policy
from specexec_rt.speculative.sampling import SamplingParams
from test_engine import make_pair

CPU = torch.device("cpu")
PROMPT = [1, 5, 9, 2]
GREEDY = SamplingParams()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def identical_pair():
    """Target and draft with the same weights (separate caches): every greedy proposal along
    the draft's top path is accepted."""
    cfg = tiny_config(vocab_size=32, n_layers=2)
    w = random_weights(cfg, 0, scale=0.6)
    return Transformer(cfg, w, 512, CPU, torch.float32), Transformer(cfg, w, 512, CPU, torch.float32)


def run(engine, n_new, requests=2):
    """The last of ``requests`` identical requests (the earlier ones train the policy)."""
    for _ in range(requests):
        res = engine.generate(PROMPT, max_new_tokens=n_new)
    return res


@pytest.mark.parametrize("tree", ["calibrated", "sequoia"])
def test_identical_draft_grows_chains(identical_pair, tree):
    target, draft = identical_pair
    depth = 12
    want = greedy_decode(target, PROMPT, 4 * (depth + 1))
    # Budget == depth: the only tree that can accept `depth` tokens is the chain itself.
    engine = Engine(target, draft, method="specexec", budget=depth, max_depth=depth, tree=tree)
    res = run(engine, 4 * (depth + 1))
    assert res.token_ids == want
    assert res.stats.tokens_per_pass_histogram == {depth + 1: 4}
    # The rates are known by construction (greedy: the top child always, the others never), and
    # the model learned them through the engine.
    vec = engine.tree_policy.model(GREEDY).rank_acceptance(4)
    assert vec[0] > 0.95 and max(vec[1:]) < 0.05, vec
    # A larger budget still puts the chain first: the target's "0.9 x (depth limit + 1)".
    engine = Engine(target, draft, method="specexec", budget=64, max_depth=16, tree=tree)
    res = run(engine, 5 * 17)
    assert res.token_ids == greedy_decode(target, PROMPT, 5 * 17)
    assert res.stats.tokens_per_pass >= 0.9 * 17


def test_calibrated_search_does_not_expand_hopeless_nodes(identical_pair, monkeypatch):
    """Budget 64 with depth 16: the chain holds 16 nodes and the rest of the budget can only
    go to siblings that are (almost) never accepted. The search does not expand a node whose
    path acceptance is below tree_policy.EXPAND_FLOOR, so a trained engine runs fewer draft
    rows than with no floor, for the same tokens per pass and the same output."""
    target, draft = identical_pair
    want = greedy_decode(target, PROMPT, 5 * 17)
    rows, tpp = {}, {}
    default = tree_policy.EXPAND_FLOOR
    for floor in (default, 0.0):
        monkeypatch.setattr(tree_policy, "EXPAND_FLOOR", floor)
        engine = Engine(target, draft, method="specexec", budget=64, max_depth=16, tree="calibrated")
        run(engine, 40)
        seen = []
        orig = draft._run

        def counting(token_ids, *a, **k):
            seen.append(int(token_ids.shape[0]))
            return orig(token_ids, *a, **k)

        draft._run = counting
        try:
            res = engine.generate(PROMPT, max_new_tokens=5 * 17)
        finally:
            del draft._run
        assert res.token_ids == want
        rows[floor], tpp[floor] = sum(seen), res.stats.tokens_per_pass
    assert tpp[default] == tpp[0.0] >= 0.9 * 17, tpp
    assert rows[default] < 0.5 * rows[0.0], rows      # measured 269 vs 1120


def test_softmax_ranking_spends_the_budget_on_siblings(identical_pair):
    """The motivating case: the draft's softmax underestimates how often its top token is
    accepted, so the same budget gives far fewer tokens per pass than the calibrated search."""
    target, draft = identical_pair
    tpp = {}
    for tree in ("softmax", "calibrated"):
        engine = Engine(target, draft, method="specexec", budget=32, max_depth=16, tree=tree)
        tpp[tree] = run(engine, 60).stats.tokens_per_pass
    assert tpp["calibrated"] >= 1.5 * tpp["softmax"], tpp


def test_evidence_is_learned_without_extra_host_reads():
    target, draft = make_pair(noise=0.3)
    engine = Engine(target, draft, method="specexec", budget=16, max_depth=8)
    res = engine.generate(PROMPT, max_new_tokens=30)
    model = engine.tree_policy.model(GREEDY)
    assert model.passes == res.stats.target_passes
    # Every proposed child of a verified parent is one observation.
    assert sum(model.counts) > 8 * res.stats.target_passes * 0.5
    assert res.stats.max_syncs_per_pass <= 8 + 2        # one per draft step + alive count + result
    # Sampling is learned separately from greedy decoding.
    engine.generate(PROMPT, max_new_tokens=10, temperature=0.8, seed=0)
    assert set(engine.tree_policy.models) == {GREEDY, SamplingParams(0.8)}


def test_sequoia_uses_the_given_vector_and_learns_otherwise():
    target, draft = make_pair(noise=0.3)
    fixed = Engine(target, draft, method="specexec", budget=16, tree="sequoia", acceptance=[1.0], max_depth=8)
    res = fixed.generate(PROMPT, max_new_tokens=20)
    assert res.token_ids == greedy_decode(target, PROMPT, 20)
    # Only rank 1 can be accepted: the optimal tree is the 8-deep chain (a 9-token pass; the
    # last passes are shorter, cut to the tokens left).
    plan = fixed.tree_policy.sequoia_plan(GREEDY, 16, 8)
    assert [int(nodes.shape[0]) for nodes, _ in plan.levels] == [1] * 8
    assert all(alive.sum().item() == 1 and alive[0, 0] for _, alive in plan.levels)
    assert res.stats.tree_tokens <= 9 * res.stats.target_passes
    learned = Engine(target, draft, method="specexec", budget=16, tree="sequoia", max_depth=8, branch_width=4)
    learned.generate(PROMPT, max_new_tokens=20)
    vec = learned.tree_policy.vector(GREEDY)
    assert len(vec) == 4 and learned.tree_policy.model(GREEDY).passes > 0
    assert vec[0] > vec[1] and sum(vec) <= 1.0 + 1e-9


def test_margin_feature_separates_a_dominant_top_token_from_a_near_tie():
    """The acceptance model reads each child's probability re-normalised over its siblings at
    T = 0.5: the same q = 0.5 reads near 1 when the runner-up is far behind, near 0.5 in a tie."""
    from specexec_rt.speculative.tree_policy import margin_feature

    q = torch.tensor([[0.5, 0.05, 0.05, 0.05], [0.5, 0.45, 0.02, 0.01]])
    x = margin_feature(q.log()).exp()
    assert x[0, 0] > 0.95 and 0.5 < x[1, 0] < 0.6
    torch.testing.assert_close(x.sum(-1), torch.ones(2))
    assert (x[:, :-1] >= x[:, 1:]).all()          # rank order kept


def test_a_pass_with_non_finite_logits_teaches_nothing():
    """A target that produces NaN logits raises (test_robustness.py); the evidence of that pass
    must not reach the acceptance model, which outlives the request."""
    from specexec_rt.errors import NonFiniteLogitsError

    target, draft = make_pair(noise=0.3)
    target.weights.lm_head[7] = float("nan")
    engine = Engine(target, draft, method="specexec", budget=16, max_depth=6)
    with pytest.raises(NonFiniteLogitsError):
        engine.generate(PROMPT, max_new_tokens=10)
    model = engine.tree_policy.model(GREEDY)
    assert model.passes == 0 and sum(model.counts) == 0 and sum(model.sums) == 0
