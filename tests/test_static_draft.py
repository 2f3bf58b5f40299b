"""Static-shape SpecExec draft steps (specexec_rt/speculative/draft_graph.py): the same logits and cache
writes as the dynamic pass, the same trees and lossless output through the engine, a fallback
near the end of the cache; on CUDA, captured once as a graph, verified, and replayed."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import build_tiny_model, greedy_decode
from specexec_rt.model import ops
from specexec_rt.speculative.draft_graph import StaticDraftStep
from specexec_rt.speculative.engine import Engine
from test_engine import make_pair

interpreting = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs Triton's interpreter (TRITON_INTERPRET=1)")


pytestmark = pytest.mark.usefixtures("one_thread")


def draft_step_inputs(prefix: int, gen: torch.Generator, m: int = 3, n_slots: int = 7):
    """A step of ``m`` new nodes in a tree region of ``n_slots`` slots whose first slots hold
    the root and earlier nodes (random ancestor rows, each node seeing the root and itself)."""
    mask = torch.rand(m, n_slots, generator=gen) < 0.4
    mask[:, 0] = True
    mask[torch.arange(m), n_slots - m + torch.arange(m)] = True
    mask[:, n_slots - m:] &= torch.eye(m, dtype=torch.bool)
    tokens = torch.randint(0, 64, (m,), generator=gen)
    positions = prefix + torch.randint(1, 5, (m,), generator=gen)
    slots = prefix + n_slots - m + torch.arange(m)
    return tokens, positions, slots, mask


def filled_model(seed: int, head_dim: int, max_len: int = 128):
    """A tiny model whose cache holds a prefix and an earlier part of a tree (random K/V)."""
    model = build_tiny_model(seed=seed, max_len=max_len, head_dim=head_dim)
    g = torch.Generator().manual_seed(seed + 1)
    model.cache.k.copy_(torch.randn(model.cache.k.shape, generator=g))
    model.cache.v.copy_(torch.randn(model.cache.v.shape, generator=g))
    return model


def check_step_matches_dynamic(head_dim: int, tol: float):
    gen = torch.Generator().manual_seed(0)
    for prefix in (0, 5, 40):
        dyn, sta = filled_model(0, head_dim), filled_model(0, head_dim)
        tokens, positions, slots, mask = draft_step_inputs(prefix, gen)
        want = dyn.forward(tokens, positions, dyn.cache, prefix, tree_mask=mask, cache_slots=slots)
        runner = StaticDraftStep(sta, beams=4, width=12)
        got = runner(tokens, positions, slots, mask, prefix)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        # The same K/V landed in the same slots; the padding row wrote only its scratch slot.
        for cache_dyn, cache_sta in ((dyn.cache.k, sta.cache.k), (dyn.cache.v, sta.cache.v)):
            torch.testing.assert_close(cache_sta[:, :sta.max_len - 4], cache_dyn[:, :dyn.max_len - 4],
                                       atol=tol, rtol=tol)


def test_static_step_matches_the_dynamic_pass_reference_path():
    check_step_matches_dynamic(head_dim=8, tol=1e-5)


@interpreting
def test_static_step_matches_the_dynamic_pass_kernel_path(monkeypatch):
    """Through the Triton kernel (interpreted): the prefix length read on the device."""
    monkeypatch.setattr(ops, "use_triton", lambda device: True)
    check_step_matches_dynamic(head_dim=16, tol=1e-4)


def test_step_outside_the_static_region_is_refused():
    model = build_tiny_model(seed=0, max_len=64)
    runner = StaticDraftStep(model, beams=4, width=12)
    assert runner.bound == 64 - 4 - 12
    gen = torch.Generator().manual_seed(1)
    tokens, positions, slots, mask = draft_step_inputs(runner.bound + 1, gen)
    with pytest.raises(ValueError, match="prefixes <= 48"):
        runner(tokens, positions, slots, mask, runner.bound + 1)
    with pytest.raises(ValueError, match="max_len"):
        StaticDraftStep(model, beams=32, width=40)


CASES = [(32, dict(beams_per_step=4, branch_width=3)), (64, dict()),
         ("auto", dict(max_budget=64, auto_shapes="trees")), (128, dict(beams_per_step=16, branch_width=8, max_depth=6))]


@pytest.mark.parametrize("budget,params", CASES, ids=[str(c[0]) for c in CASES])
def test_engine_static_draft_is_lossless_and_grows_the_same_trees(budget, params):
    target, draft = make_pair(noise=0.3, max_len=640)   # the default tree region is 481 slots
    prompt = [1, 2, 3, 4, 5]
    want = greedy_decode(target, prompt, 40)
    results = {}
    for static in (False, True):
        eng = Engine(target, draft, method="specexec", budget=budget, static_draft=static, **params)
        results[static] = eng.generate(prompt, max_new_tokens=40)
        assert results[static].token_ids == want
    s_dyn, s_sta = results[False].stats, results[True].stats
    assert s_sta.static_draft_calls > 0 and s_dyn.static_draft_calls == 0
    # every draft step but each tree's root runs static; auto may decode some passes plainly (no draft call)
    tree_passes = sum(1 for m in s_sta.modes if m != "autoregressive")
    assert len(s_sta.modes) == s_sta.target_passes
    assert s_sta.static_draft_calls == s_sta.draft_calls - tree_passes
    if budget != "auto":   # auto sizes trees from measured times: not reproducible run to run
        assert s_sta.tokens_per_pass_histogram == s_dyn.tokens_per_pass_histogram
        assert s_sta.tree_tokens == s_dyn.tree_tokens


@interpreting
def test_engine_static_draft_through_the_kernel(monkeypatch):
    """The whole engine with the Triton path on (interpreted): static steps read the prefix
    length on the device; output equals the target's greedy decoding, trees equal the dynamic."""
    monkeypatch.setattr(ops, "use_triton", lambda device: True)
    target = build_tiny_model(seed=0, max_len=160, head_dim=16)
    draft = build_tiny_model(seed=0, max_len=160, head_dim=16)
    g = torch.Generator().manual_seed(5)
    for lw in draft.weights.layers:
        lw.w_down.add_(0.3 * lw.w_down.std() * torch.randn(lw.w_down.shape, generator=g))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want = greedy_decode(target, prompt, 16)
    stats = {}
    for static in (False, True):
        out = Engine(target, draft, method="specexec", budget=16, beams_per_step=4, branch_width=3, max_depth=5,
                     static_draft=static).generate(prompt, max_new_tokens=16)
        assert out.token_ids == want
        stats[static] = out.stats
    assert stats[True].static_draft_calls > 0
    assert stats[True].tree_tokens == stats[False].tree_tokens


def test_engine_falls_back_near_the_end_of_the_cache():
    """Once the committed prefix passes max_len - beams - width, steps run dynamically."""
    target, draft = make_pair(noise=0.3, max_len=96)
    prompt = [i % 31 + 1 for i in range(39)]
    eng = Engine(target, draft, method="specexec", budget=8, beams_per_step=2, branch_width=2, max_depth=8,
                 static_draft=True)
    out = eng.generate(prompt, max_new_tokens=45)
    assert out.token_ids == greedy_decode(target, prompt, 45)
    runner = eng.static_draft_steps[0]
    assert 0 < out.stats.static_draft_calls < out.stats.draft_calls - out.stats.target_passes
    assert runner.bound == 96 - 2 - (1 + 7 * 2)


def test_static_draft_defaults():
    target, draft = make_pair()
    assert not Engine(target, draft, method="specexec", budget=8).static_draft      # CPU: off
    assert not Engine(target, draft, method="chain", budget=4, static_draft=True).static_draft  # SpecExec only


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_draft_is_lossless_captured_and_replayed(dtype):
    from conftest import random_weights, tiny_config
    from specexec_rt.model import Transformer
    from specexec_rt.model.weights import replace_leaves

    dev = torch.device("cuda")
    cfg = tiny_config(vocab_size=256, n_layers=3, hidden_size=128, intermediate_size=256, n_heads=4,
                      n_kv_heads=2, head_dim=32)

    def model(seed, noise=0.0):
        w = random_weights(cfg, 0, scale=0.6)
        if noise:
            g = torch.Generator().manual_seed(seed)
            w = replace_leaves(w, lambda _, x: x + noise * x.std() * torch.randn(x.shape, generator=g))
        return Transformer(cfg, replace_leaves(w, lambda _, x: x.to(dev, dtype)), 512, dev, dtype)

    target, draft = model(0), model(1, noise=0.2)
    prompt = list(range(1, 30))
    want = greedy_decode(target, prompt, 48)
    eng = Engine(target, draft, method="specexec", budget=64)
    assert eng.static_draft
    out = eng.generate(prompt, max_new_tokens=48)
    assert out.token_ids == want
    runner = eng.static_draft_steps[0]
    assert runner.graph is not None and runner.verified and runner.replays > 0
    assert out.stats.static_draft_calls > 0
    # Same trees as the eager dynamic pass.
    eager = Engine(target, draft, method="specexec", budget=64, static_draft=False).generate(prompt, max_new_tokens=48)
    assert eager.token_ids == want and eager.stats.tree_tokens == out.stats.tree_tokens


class FakeCuda:
    """Stands in for torch.cuda's stream and graph API on the CPU, so the runner's capture,
    verification and fallback logic runs in CI: ``capture`` executes the pass eagerly (as
    a real capture would record it) and ``replay`` re-runs the runner's pass, optionally
    corrupted, or capture raises."""

    def __init__(self, runner, mode="ok"):
        self.runner, self.mode, self.replays = runner, mode, 0
        fake = self

        class Stream:
            def __init__(self, *a, **k):
                pass

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                fake.replays += 1
                with torch.inference_mode():   # the captured pass wrote inference tensors
                    out = fake.runner._forward()
                    fake.runner.graph_logits.copy_(out if fake.mode != "wrong" else out + 1.0)

        class GraphContext:
            def __init__(self, graph, capture_error_mode="global"):
                assert capture_error_mode == "thread_local"
                if fake.mode == "capture-fails":
                    raise RuntimeError("operation not permitted when stream is capturing")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        self.Stream, self.CUDAGraph, self.graph = Stream, CUDAGraph, GraphContext

    def install(self, monkeypatch):
        import contextlib

        monkeypatch.setattr(torch.cuda, "Stream", self.Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: self.Stream())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", self.graph)


@pytest.mark.parametrize("mode", ["ok", "wrong", "capture-fails"])
def test_capture_verify_and_fallback_logic(monkeypatch, mode):
    """First call: eager warm-up (its result) + capture; second: replay checked against eager;
    later: replays only. A replay that disagrees, or a capture that fails, leaves the runner
    eager with a warning, and every call still returns the dynamic pass's logits."""
    gen = torch.Generator().manual_seed(2)
    dyn, sta = filled_model(3, 8), filled_model(3, 8)
    runner = StaticDraftStep(sta, beams=4, width=12, capture=True)
    fake = FakeCuda(runner, mode)
    fake.install(monkeypatch)
    for call in range(4):
        tokens, positions, slots, mask = draft_step_inputs(10 + call, gen)
        want = dyn.forward(tokens, positions, dyn.cache, 10 + call, tree_mask=mask, cache_slots=slots)
        if (mode == "wrong" and call == 1) or (mode == "capture-fails" and call == 0):
            with pytest.warns(RuntimeWarning, match="eagerly"):
                got = runner(tokens, positions, slots, mask, 10 + call)
        else:
            got = runner(tokens, positions, slots, mask, 10 + call)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if mode == "ok":
        assert runner.verified and runner.graph is not None and fake.replays == 3 and runner.replays == 3
    else:
        assert runner.graph is None and not runner.capture and not runner.verified
        assert fake.replays == (1 if mode == "wrong" else 0)
