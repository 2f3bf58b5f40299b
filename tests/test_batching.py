"""Several requests per pass: lossless for every method and every batching arrangement.

Each request's greedy output equals its solo output and the target's own greedy decoding,
whatever else shares its passes (other prompts and lengths, requests joining mid-flight,
finishing early or cancelled, prompts prefilled in chunks, many threads, interleaved
streams); sampled output under batching follows the target's distribution (chi-square), and
a deliberately broken acceptance rule fails the same check.
"""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import greedy_decode
from specexec_rt.model import Segment
from specexec_rt.speculative import tree as tree_mod
from specexec_rt.speculative.engine import Engine
from specexec_rt.speculative.sampling import SamplingParams
from test_engine import (SAMPLING_ENGINES, SAMPLING_VOCAB, _walk_follows_draft, exact_first_two, make_pair,
                         sampling_pair)  # noqa: F401 (fixture)
from test_sampling import chi2_pvalue
from tiny_tokenizer import tiny_tokenizer, words

PROMPTS = [[1, 5, 9, 2], [7], [3, 3, 8, 1, 4, 6, 2, 9, 11], [12, 2], [5, 6, 7, 8, 9, 10]]
NEW = [24, 9, 31, 4, 17]
METHOD_PARAMS = {
    "autoregressive": dict(),
    "chain": dict(budget=4, k=4),
    "specinfer": dict(budget=6, n=2, depth=3),
    "specexec": dict(budget=12, beams_per_step=4, branch_width=3, max_depth=6),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    return make_pair(noise=0.2, max_len=96)


@pytest.fixture(scope="module")
def expected(pair):
    target, _ = pair
    return [greedy_decode(target, p, n) for p, n in zip(PROMPTS, NEW)]


def _engine(pair, method, max_batch, **kw):
    target, draft = pair
    return Engine(target, None if method == "autoregressive" else draft, method=method, max_batch=max_batch,
                  **{**METHOD_PARAMS[method], **kw})


@pytest.mark.parametrize("method", list(METHOD_PARAMS))
@pytest.mark.parametrize("b", [1, 2, 3, 5])
def test_batched_greedy_equals_solo_and_target(pair, expected, method, b):
    eng = _engine(pair, method, b)
    handles = [eng.submit(p, n) for p, n in zip(PROMPTS, NEW)]
    results = [h.result() for h in handles]
    for res, exp in zip(results, expected):
        assert res.token_ids == exp
        s = res.stats
        assert s.new_tokens == len(exp) and len(s.batch_sizes) == s.target_passes
        assert max(s.batch_sizes) <= b
    if b > 1:   # the requests did share passes
        assert max(max(r.stats.batch_sizes) for r in results) > 1
    # syncs per pass do not grow with the batch: one per draft step + tree sizes + results
    depth = METHOD_PARAMS[method].get("max_depth", 1)
    assert max(r.stats.max_syncs_per_pass for r in results) <= depth + 2


@pytest.mark.parametrize("method", ["specexec", "chain"])
def test_join_midflight_finish_early_and_cancel(pair, expected, method):
    eng = _engine(pair, method, 3)
    a = eng.submit(PROMPTS[0], NEW[0])
    b = eng.submit(PROMPTS[1], NEW[1])          # finishes early
    doomed = eng.submit(PROMPTS[3], 40)
    stream_a = a.stream()
    next(stream_a)                              # one pass with a, b and doomed
    doomed.cancel()                             # freed at the next pass
    c = eng.submit(PROMPTS[2], NEW[2])          # joins mid-flight, into the freed region
    rest = list(stream_a)
    assert a.result().token_ids == expected[0] and b.result().token_ids == expected[1]
    assert c.result().token_ids == expected[2]
    # The stream yields one piece per verification pass of its request ("" without a tokenizer).
    assert 1 + len(rest) == a.result().stats.target_passes and set(rest) <= {""}
    res = doomed.result()
    assert res.stats.finish_reason == "cancelled" and res.token_ids == greedy_decode(pair[0], PROMPTS[3], 40)[
        :len(res.token_ids)]
    # a fresh request after all that is still exact
    assert eng.generate(PROMPTS[4], NEW[4]).token_ids == expected[4]


def test_chunked_prefill_rides_with_other_requests(pair, expected):
    """Prompts longer than prefill_chunk are prefilled over several passes that also verify
    the other requests' trees; nothing changes in anyone's output."""
    eng = _engine(pair, "specexec", 3, prefill_chunk=3)
    hs = [eng.submit(p, n) for p, n in zip(PROMPTS, NEW)]
    results = [h.result() for h in hs]
    assert [r.token_ids for r in results] == expected
    assert results[2].stats.prefill_seconds > 0          # the 9-token prompt took prompt-only passes


def test_threads_share_one_engine(pair, expected):
    eng = _engine(pair, "specexec", 2)
    out = {}

    def worker(i):
        out[i] = eng.generate(PROMPTS[i], NEW[i]).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert [out[i] for i in range(len(PROMPTS))] == expected


def test_interleaved_streams_and_stale_generators_keep_their_own_text(pair, expected):
    """Two streams advanced alternately in one thread, and a stream resumed after another
    generate call on the same engine: each yields its own request's text (max_batch 1 included:
    the second waits for the first)."""
    target, draft = pair
    for max_batch in (1, 2):
        eng = Engine(target, draft, method="specexec", budget=8, tokenizer=tiny_tokenizer(32), max_batch=max_batch)
        s1 = eng.stream(words(PROMPTS[0]), max_new_tokens=NEW[0])
        s2 = eng.stream(words(PROMPTS[2]), max_new_tokens=NEW[2])
        t1, t2, done = [], [], [False, False]
        while not all(done):
            for i, (s, t) in enumerate(((s1, t1), (s2, t2))):
                if not done[i]:
                    try:
                        t.append(next(s))
                    except StopIteration:
                        done[i] = True
        assert "".join(t1) == words(expected[0]) and "".join(t2) == words(expected[2])
        stale = eng.stream(words(PROMPTS[4]), max_new_tokens=NEW[4])
        first = next(stale)
        assert eng.generate(PROMPTS[1], NEW[1]).token_ids == expected[1]
        assert first + "".join(stale) == words(expected[4])


def test_cancelled_while_queued_and_engine_stays_usable(pair, expected):
    eng = _engine(pair, "specexec", 1)
    h = eng.submit(PROMPTS[0], NEW[0])
    h2 = eng.submit(PROMPTS[1], NEW[1])         # queued behind h (one region)
    h2.cancel()                                 # cancelled before it ever ran
    res = h2.result()
    assert res.token_ids == [] and res.stats.finish_reason == "cancelled"
    assert h.result().token_ids == expected[0]
    assert eng.generate(PROMPTS[1], NEW[1]).token_ids == expected[1]


def test_forward_batch_equals_solo_forwards(pair):
    """The model level: one ragged forward over three requests' trees, each in its own region,
    gives each the logits (and cache writes) of its solo forward."""
    target, _ = pair
    g = torch.Generator().manual_seed(0)
    region = 40
    pool = target.new_cache(3 * region)
    segs, toks, poss, solo = [], [], [], []
    for i, (plen, n) in enumerate(((7, 5), (0, 3), (12, 9))):
        prompt = torch.randint(0, target.vocab_size, (plen,), generator=g)
        if plen:
            target.forward_batch(prompt, torch.arange(plen), pool, [Segment(plen, i * region, 0)])
        anc = torch.tril(torch.rand(n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
        ids = torch.randint(0, target.vocab_size, (n,), generator=g)
        pos = plen + torch.arange(n)
        segs.append(Segment(n, i * region, plen, tree_mask=anc))
        toks.append(ids)
        poss.append(pos)
        fresh = target.new_cache(region)
        if plen:
            target.forward(prompt, torch.arange(plen), fresh, 0)
        solo.append((target.forward(ids, pos, fresh, plen, tree_mask=anc), fresh, plen + n))
    batched = target.forward_batch(torch.cat(toks), torch.cat(poss), pool, segs)
    row = 0
    for i, (logits, fresh, used) in enumerate(solo):
        n = logits.shape[0]
        torch.testing.assert_close(batched[row:row + n], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool.k[:, i * region:i * region + used], fresh.k[:, :used], atol=1e-5, rtol=1e-4)
        row += n


# ---------------------------------------------------------------------- sampling under batching
N_RUNS = 600


def _batched_first_two(engine: Engine, params: SamplingParams, concurrent: int) -> torch.Tensor:
    """First two tokens of N_RUNS seeded requests, ``concurrent`` of them sharing each pass."""
    counts = torch.zeros(SAMPLING_VOCAB ** 2, dtype=torch.long)
    for start in range(0, N_RUNS, concurrent):
        hs = [engine.submit([1, 2, 3], 2, temperature=params.temperature, top_p=params.top_p, seed=seed)
              for seed in range(start, min(N_RUNS, start + concurrent))]
        for h in hs:
            ids = h.result().token_ids
            counts[ids[0] * SAMPLING_VOCAB + ids[1]] += 1
    return counts


@pytest.mark.parametrize("method,concurrent", [("specexec", 3), ("chain", 2), ("specinfer", 3)])
def test_batched_sampling_matches_target_distribution(sampling_pair, method, concurrent):  # noqa: F811
    target, draft = sampling_pair
    params = SamplingParams(0.7, 0.9)
    eng = Engine(target, draft, method=method, max_batch=concurrent, **SAMPLING_ENGINES[method])
    counts = _batched_first_two(eng, params, concurrent)
    assert chi2_pvalue(counts, exact_first_two(target, params)) > 1e-3


def test_batched_broken_acceptance_is_caught(sampling_pair, monkeypatch):  # noqa: F811
    target, draft = sampling_pair
    params = SamplingParams(1.0, 1.0)
    monkeypatch.setitem(tree_mod.__dict__, "_real_walk", tree_mod.walk_accept)
    monkeypatch.setattr(tree_mod, "walk_accept", _walk_follows_draft)
    eng = Engine(target, draft, method="specexec", max_batch=3, **SAMPLING_ENGINES["specexec"])
    counts = _batched_first_two(eng, params, 3)
    assert chi2_pvalue(counts, exact_first_two(target, params)) < 1e-6


def test_serving_loop_with_step_and_callbacks(pair, expected):
    """What a server does: one loop thread calls step(); requests report through on_update."""
    eng = _engine(pair, "specexec", 2)
    got = {i: [] for i in range(3)}
    done = threading.Event()
    finished = []

    def cb(i):
        def on_update(piece, is_done):
            got[i].append(piece)
            if is_done:
                finished.append(i)
                if len(finished) == 3:
                    done.set()
        return on_update

    handles = [eng.submit(PROMPTS[i], NEW[i], on_update=cb(i)) for i in range(3)]
    assert eng.pending_requests == (0, 3)
    while not done.is_set():
        assert eng.step(timeout=1.0) > 0
    assert sorted(finished) == [0, 1, 2]
    assert [h.result().token_ids for h in handles] == expected[:3]
    assert eng.step(timeout=0.01) == 0 and eng.pending_requests == (0, 0)
