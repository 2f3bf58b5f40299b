"""Coupled sampling: a seed fixes the sampled text whatever the engine does, and coupled drafts
are accepted as often as the draft agrees with the target.

Every pass of every walk-verified method (plain decoding, coupled chains and SpecInfer,
SpecExec trees under every policy, coupled or not) draws the target's token at position t as
argmax(p_t / E_t) with E_t a function of (seed, t) alone, so the text equals autoregressive
sampling's for that seed: across budgets, tree policies, coupling, batch arrangements, repeated
runs and budget="auto"'s mode switches. The distribution itself is tested by chi-square in
test_engine.py and test_batching.py.
"""
from __future__ import annotations

import pytest

from specexec_rt.model import Transformer
from specexec_rt.speculative.budget import BudgetController
from specexec_rt.speculative.engine import Engine
from test_engine import make_pair

PROMPTS = [[1, 2, 3], [4, 9], [7, 7, 1, 0, 5]]
NEW = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    return make_pair(noise=0.3)


@pytest.fixture(scope="module")
def sampled_reference(pair):
    """Autoregressive sampled text per (prompt index, seed, temperature, top_p, top_k)."""
    ar = Engine(pair[0], None, method="autoregressive")
    cache = {}

    def ref(i, seed, temperature=1.0, top_p=0.9, top_k=0):
        key = (i, seed, temperature, top_p, top_k)
        if key not in cache:
            cache[key] = ar.generate(PROMPTS[i], NEW, temperature=temperature, top_p=top_p, top_k=top_k,
                                     seed=seed).token_ids
        return cache[key]
    return ref


TREE = dict(method="specexec", max_depth=6)
ENGINES = {
    "specexec b4": dict(TREE, budget=4),
    "specexec b16": dict(TREE, budget=16),
    "specexec b16 uncoupled": dict(TREE, budget=16, coupled=False),
    "softmax b16": dict(TREE, budget=16, tree="softmax"),
    "softmax b16 uncoupled": dict(TREE, budget=16, tree="softmax", coupled=False),
    "sequoia b16": dict(TREE, budget=16, tree="sequoia"),
    "chain k1": dict(method="chain", k=1),
    "chain k5": dict(method="chain", k=5),
    "specinfer 3x3": dict(method="specinfer", n=3, depth=3),
}


@pytest.mark.parametrize("name", list(ENGINES))
@pytest.mark.parametrize("max_batch", [1, 3])
def test_same_seed_same_text_for_every_engine_and_batch(pair, sampled_reference, name, max_batch):
    target, draft = pair
    engine = Engine(target, draft, max_batch=max_batch, **ENGINES[name])
    settings = [dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_p=1.0, top_k=5)]
    requests = [(i, seed, settings[(i + seed) % 2]) for seed in (0, 1) for i in range(len(PROMPTS))]
    handles = [(i, seed, kw, engine.submit(PROMPTS[i], NEW, seed=seed, **kw)) for i, seed, kw in requests]
    passes = 0
    for i, seed, kw, h in handles:
        res = h.result()
        assert res.token_ids == sampled_reference(i, seed, **kw), (i, seed, kw)
        passes += res.stats.target_passes
    assert passes < len(handles) * NEW      # the draft was used


@pytest.mark.parametrize("shapes", ["chains", "trees"])
def test_auto_mode_switches_keep_the_seeded_text(pair, sampled_reference, monkeypatch, shapes):
    """budget="auto" switching between plain passes, chains or trees of every size mid-request
    (scripted here; in use the costs decide): the text is the seed's own, request after request."""
    target, draft = pair
    script = [0, 3, 1, 0, 0, 8, 2, 5, 0, 4]
    step = [0]

    def plan(self, cap, catch_up=0):
        b = min(script[step[0] % len(script)], cap)
        step[0] += 1
        return b, (b if self.chains else min(b, 4))

    monkeypatch.setattr(BudgetController, "plan", plan)
    engine = Engine(target, draft, budget="auto", max_budget=8, max_depth=6, auto_shapes=shapes)
    for seed in (0, 1):
        for i in range(2):
            res = engine.generate(PROMPTS[i], NEW, temperature=1.0, top_p=0.9, seed=seed)
            assert res.token_ids == sampled_reference(i, seed)
            assert {"autoregressive", "chain" if shapes == "chains" else "specexec"} <= set(res.stats.modes)


@pytest.mark.parametrize("max_batch", [1, 3])
def test_auto_reproduces_the_seeded_text_run_after_run(pair, sampled_reference, max_batch):
    """Unscripted auto (its choices follow measured costs, so they differ between runs): the same
    seed gives the same text every run, alone or sharing passes with other requests."""
    target, draft = pair
    engine = Engine(target, draft, budget="auto", max_budget=16, max_depth=6, max_batch=max_batch)
    for _ in range(2):
        handles = [(i, seed, engine.submit(PROMPTS[i], NEW, temperature=1.0, top_p=0.9, seed=seed))
                   for seed in (0, 1) for i in range(2)]
        for i, seed, h in handles:
            assert h.result().token_ids == sampled_reference(i, seed)


def _self_draft(target: Transformer) -> Transformer:
    """The target's own weights with a KV cache of its own: a draft that is always right."""
    return Transformer(target.config, target.weights, target.max_len, target.device, target.dtype)


@pytest.mark.parametrize("coupled", [True, False])
def test_a_perfect_draft_is_accepted_to_the_depth_cap(pair, coupled):
    """With the target as its own draft, a coupled tree's first-ranked path is the target's own
    draws, so at temperature 0.7 every pass accepts it to the depth cap (5 tokens a pass at
    max_depth 4). Uncoupled growth ranks children by q alone and misses whenever the target's
    draw is not the draft's most likely token, which the test must catch."""
    target, _ = pair
    engine = Engine(target, _self_draft(target), method="specexec", budget=8, max_depth=4, tree="sequoia",
                    acceptance=[0.9, 0.05], coupled=coupled)
    hist = {}
    for seed in range(4):
        res = engine.generate(PROMPTS[seed % len(PROMPTS)], 40, temperature=0.7, seed=seed)
        for k, v in res.stats.tokens_per_pass_histogram.items():
            hist[k] = hist.get(k, 0) + v
    if coupled:
        assert hist == {5: 32}
    else:
        assert hist != {5: 32} and sum(hist.values()) > 32 + 8


def test_coupled_parameter_is_checked(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="coupled must be True or False"):
        Engine(target, draft, method="specexec", coupled="yes")
    with pytest.raises(ValueError, match="coupled must be True or False"):
        Engine(target, draft, method="chain", coupled=1)
    with pytest.raises(TypeError, match="coupled"):
        Engine(target, None, method="autoregressive", coupled=True)


@pytest.mark.cuda
def test_auto_keeps_the_seeded_text_on_cuda():
    """The GPU path: trees under auto (the CUDA default), noise rows made on the device."""
    import torch

    from specexec_rt.model.weights import replace_leaves

    target, draft = make_pair(noise=0.3)
    cuda = torch.device("cuda")
    moved = [Transformer(m.config, replace_leaves(m.weights, lambda _, x: x.to(cuda)), m.max_len, cuda, m.dtype)
             for m in (target, draft)]
    ar = Engine(moved[0], None, method="autoregressive")
    engine = Engine(moved[0], moved[1], budget="auto", max_budget=16, max_depth=6, max_batch=2)
    for _ in range(2):
        handles = [(i, seed, engine.submit(PROMPTS[i], NEW, temperature=1.0, top_p=0.9, seed=seed))
                   for seed in (0, 1) for i in range(2)]
        for i, seed, h in handles:
            want = ar.generate(PROMPTS[i], NEW, temperature=1.0, top_p=0.9, seed=seed).token_ids
            assert h.result().token_ids == want


def test_a_seeded_request_gets_one_text_through_the_server():
    """The same seeded request sent three times to a server running budget="auto" (whose choices
    follow measured costs) gets the same text, the target's own sampled text for that seed."""
    import http.client
    import json

    from conftest import build_tiny_model
    from server_harness import MAX_LEN, TIMEOUT, running
    from tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    engine = Engine(build_tiny_model(seed=0, max_len=MAX_LEN), build_tiny_model(seed=1, max_len=MAX_LEN),
                    tokenizer=tok, budget="auto", max_budget=8, max_depth=4)
    want = Engine(build_tiny_model(seed=0, max_len=MAX_LEN), None, method="autoregressive", tokenizer=tok).generate(
        "w2 w4 w6", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=77).text
    body = json.dumps({"model": "tiny", "prompt": "w2 w4 w6", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9,
                       "seed": 77})
    with running(engine) as server:
        texts = []
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
            try:
                conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                assert resp.status == 200
                texts.append(json.loads(resp.read())["choices"][0]["text"])
            finally:
                conn.close()
    assert texts == [want] * 3
