"""budget="auto": the controller on synthetic costs and acceptance, losslessness through the
engine, the Engine/CLI surface; plus the engine's per-pass streaming and encode()."""
from __future__ import annotations

import math
import re

import pytest

from conftest import build_tiny_model
from specexec_rt.speculative.budget import BudgetController, LinearCost, candidate_budgets, context_bucket
from specexec_rt.speculative.engine import Engine
from specexec_rt.errors import ContextLengthError
from tiny_tokenizer import tiny_tokenizer

MAX_LEN = 192


# ======================================================================== controller (host only)
def curve_points(ctrl, budget, n_created, e_of):
    pts = ctrl.eval_points(budget, n_created)
    return pts, [e_of(p) for p in pts]


def drive(ctrl, passes, cost, e_of, accepted_of, cap=1024):
    """Run plan/observe ``passes`` times with synthetic costs ``cost(b) -> (draft_s, target_s)``,
    a tree prediction curve ``e_of(size)`` (tree created 8x the budget) and realised acceptance
    ``accepted_of(b)``. Returns the chosen budgets."""
    chosen = []
    for _ in range(passes):
        b, depth = ctrl.plan(cap)
        assert 1 <= depth <= ctrl.max_depth and b <= cap
        chosen.append(b)
        d, t = cost(b)
        pts, vals = curve_points(ctrl, b, 8 * b, e_of)
        ctrl.observe(b, b + 1, depth, d, t, pts, vals, accepted_of(b))
    return chosen


def test_candidates_and_linear_cost():
    assert candidate_budgets(128) == [4, 8, 16, 32, 64, 128]
    assert candidate_budgets(100) == [4, 8, 16, 32, 64, 100]
    assert candidate_budgets(3) == [3]
    lc = LinearCost()
    lc.add(10, 1.0)
    assert lc.fit() == (1.0, 0.0)           # one budget: flat prior
    assert lc(1000) == 1.0
    for b in (10, 20, 40, 80):
        lc.add(b, 0.5 + 0.01 * b)
    a, c = lc.fit()
    assert c > 0 and lc(160) > lc(80) > lc(10)
    with pytest.raises(ValueError, match="max_budget"):
        BudgetController(0)


def test_flat_target_cost_picks_a_large_budget():
    """Offloaded target: a pass costs 1.4 s whatever its size, drafting is cheap; the tree keeps
    finding more accepted tokens as it grows -> climb to the largest budget."""
    ctrl = BudgetController(1024)
    chosen = drive(ctrl, 12, lambda b: (0.02 + 1e-5 * b, 1.4),
                   e_of=lambda s: 1.2 * math.log2(1 + s), accepted_of=lambda b: round(1.2 * math.log2(1 + b)))
    assert chosen[0] == 16                  # a cheap, sensible first pass
    assert chosen[1] == 32                  # climbs at most 2x per pass
    assert chosen[-3:] == [1024] * 3


def test_linear_cost_and_poor_acceptance_pick_a_small_budget():
    """CPU target whose pass cost grows with the tree, and a draft that almost never agrees."""
    ctrl = BudgetController(1024)
    chosen = drive(ctrl, 12, lambda b: (0.002 * b, 0.05 + 0.01 * b),
                   e_of=lambda s: 0.3 * (1 - 0.5 ** s), accepted_of=lambda b: 0)
    assert chosen[-4:] == [4] * 4, chosen


def test_adapts_when_the_history_shifts():
    """Good acceptance -> a large budget; then the text turns hard for the draft (the tree still
    predicts a lot, but nothing is accepted) -> the calibration drops and the budget shrinks."""
    ctrl = BudgetController(1024)
    cost = lambda b: (0.01 + 2e-4 * b, 0.2 + 1e-3 * b)   # noqa: E731
    e_of = lambda s: 1.5 * math.log2(1 + s)              # noqa: E731
    good = drive(ctrl, 15, cost, e_of, accepted_of=lambda b: round(1.5 * math.log2(1 + b)))
    assert good[-1] >= 64, good
    cal_before = ctrl.calibration
    bad = drive(ctrl, 15, cost, e_of, accepted_of=lambda b: 0)
    assert ctrl.calibration < 0.2 * cal_before
    assert bad[-1] <= good[-1] // 4, (good, bad)


def depth_run(call_s: float, target_s: float, passes: int = 10, max_depth: int = 32) -> list:
    """Depths chosen when level d of the tree carries 0.9**d expected accepted tokens and a pass
    costs ``call_s`` per draft call (one per level) plus ``target_s``."""
    ctrl = BudgetController(64, max_depth=max_depth)
    chosen = []
    for _ in range(passes):
        b, depth = ctrl.plan(64)
        chosen.append(depth)
        mass = [0.9 ** d if d <= depth else 0.0 for d in range(1, max_depth + 1)]
        pts = ctrl.eval_points(b, 8 * b)
        curve = [2 * math.log2(1 + p) for p in pts]          # big trees pay: the budget climbs to 64
        ctrl.observe(b, b + 1, depth, call_s * depth, target_s, pts, curve + mass, round(sum(mass)))
    return chosen


def test_depth_weighs_each_level_against_a_draft_call():
    """A level is kept iff the tokens it is expected to add pay for its draft call: cheap calls
    next to an expensive target pass (an offloaded target) keep deep trees, expensive calls (a
    CPU draft as costly as the target) make them shallow."""
    cheap = depth_run(call_s=0.025, target_s=1.4)
    costly = depth_run(call_s=0.3, target_s=0.5)
    assert cheap[0] == costly[0] == 16                   # before costs are measured: the cap (<= budget)
    assert cheap[-1] >= 18 and costly[-1] <= 8, (cheap, costly)
    ctrl = BudgetController(64)
    assert ctrl.level_threshold() is None


def test_cost_model_override_replaces_measured_times():
    seen = []
    ctrl = BudgetController(64, cost_model=lambda b, n, calls: (seen.append((b, n, calls)) or (0.0, 1.0)))
    ctrl.observe(16, 17, 3, 99.0, 99.0, [4, 8, 16], [1.0, 2.0, 3.0], 2)
    assert seen == [(16, 17, 3)] and ctrl.target_cost(16) == 1.0 and ctrl.draft_cost(16) == 0.0


def _alternating_contexts(aware: bool, passes: int = 80) -> dict:
    """Requests of 100 and 3000 prefix tokens take turns (4 passes each). Every draft row and
    every verified row reads its prefix, so both costs per row grow with the context. Returns the
    budgets chosen at each context."""
    def cost(b, context):
        per_row = 1 + context / 500
        return 0.0004 * b * per_row, 0.05 + 0.0004 * b * per_row

    def e_of(size):
        return 1.2 * math.log2(1 + size)

    ctrl = BudgetController(256)
    chosen = {100: [], 3000: []}
    for i in range(passes):
        context = 100 if (i // 4) % 2 == 0 else 3000
        if aware:
            ctrl.at_context(context)
        b, depth = ctrl.plan(256)
        chosen[context].append(b)
        pts = ctrl.eval_points(b, 8 * b)
        ctrl.observe(b, b + 1, depth, *cost(b, context), pts, [e_of(p) for p in pts], round(e_of(b)))
    return chosen


def test_trees_are_sized_for_the_context_at_hand():
    """The best tree under these costs is 16 nodes at 100 tokens of context and 4 at 3000. Costs
    kept per context bucket find both, each request at its own context; one set of fits for both
    (a controller never told the context) prices the short requests' trees at the long ones'
    costs and keeps them small too."""
    aware, blind = _alternating_contexts(True), _alternating_contexts(False)
    assert aware[3000][-8:] == [4] * 8, aware
    assert max(aware[100][-8:]) == 16 and aware[100][-8:].count(16) >= 6, aware
    assert max(blind[100][-8:]) < 16, blind
    assert context_bucket(100) == 0 < context_bucket(200) < context_bucket(1500) < context_bucket(3000)


def test_a_new_context_borrows_the_nearest_measured_costs():
    ctrl = BudgetController(64)
    for context, t in ((100, 0.1), (3000, 0.5)):
        ctrl.at_context(context)
        for _ in range(3):
            ctrl.observe(8, 9, 2, 0.01, t, [4, 8], [1.0, 1.5], 1)
    ctrl.at_context(2500)                       # not measured yet: the nearest measured bucket (3000)
    assert ctrl.target_cost(8) == pytest.approx(0.5)
    ctrl.at_context(120)
    assert ctrl.target_cost(8) == pytest.approx(0.1)
    seen = []
    ctrl.cost_model = lambda b, n, calls, context: seen.append(context) or (0.0, 1.0)
    ctrl.observe(8, 9, 2, 99.0, 99.0, [4, 8], [1.0, 1.5], 1)
    assert seen == [120]


# ============================================================================ through the engine
def test_the_engine_plans_each_pass_at_its_requests_context(models):
    """A short request and a long one: auto's costs are recorded in each one's context bucket."""
    target, draft = models
    engine = Engine(target, draft, budget="auto", max_budget=8, auto_shapes="trees")
    engine.generate([5, 9, 2, 7], max_new_tokens=12)
    engine.generate([(3 * i) % 60 + 1 for i in range(150)], max_new_tokens=12)
    assert engine.budget_controller.measured_buckets == [0, context_bucket(155)]


@pytest.fixture(scope="module")
def models():
    return build_tiny_model(seed=0, max_len=MAX_LEN), build_tiny_model(seed=1, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def reference(models):
    return Engine(models[0], None, method="autoregressive").generate([5, 9, 2, 7], max_new_tokens=30).token_ids


SHAPES = {"trees": "specexec", "chains": "chain"}     # auto_shapes -> the mode name its passes record


@pytest.mark.parametrize("shapes", list(SHAPES))
def test_auto_is_greedy_lossless_and_records_budgets(models, reference, shapes):
    target, draft = models
    engine = Engine(target, draft, budget="auto", max_budget=64, auto_shapes=shapes)
    assert engine.budget == "auto" and engine.auto_shapes == shapes
    for _ in range(2):      # the second request starts from what the first one learned
        res = engine.generate([5, 9, 2, 7], max_new_tokens=30)
        assert res.token_ids == reference
        s = res.stats
        assert len(s.budgets) == s.target_passes and all(0 <= b <= 64 for b in s.budgets)
        assert s.modes == ["autoregressive" if b == 0 else SHAPES[shapes] for b in s.budgets]
        # No extra sync: the curve rides the acceptance read (one per draft step + count + result).
        assert s.max_syncs_per_pass <= 2 + engine.params["max_depth"]
    assert res.stats.as_dict()["budgets"] == s.budgets


def test_auto_sampling_runs_and_is_seeded(models):
    target, draft = models
    engine = Engine(target, draft, budget="auto", max_budget=32)
    a = engine.generate([5, 9, 2, 7], max_new_tokens=12, temperature=1.0, seed=4)
    assert len(a.token_ids) == 12 and len(a.stats.budgets) == a.stats.target_passes


def test_auto_validation_and_cache_cap(models):
    target, draft = models
    with pytest.raises(ValueError, match="specexec"):
        Engine(target, draft, method="chain", budget="auto")
    with pytest.raises(ValueError, match="budget"):
        Engine(target, draft, budget="automatic")
    with pytest.raises(TypeError, match="max_budget"):
        Engine(target, draft, budget=16, max_budget=64)
    with pytest.raises(ContextLengthError, match="max_len"):
        Engine(target, draft, budget="auto", max_budget=4 * MAX_LEN)
    with pytest.raises(ContextLengthError, match=r"budget=\d+.*max_len"):
        Engine(target, draft, budget=4 * MAX_LEN)
    # Default ceiling fits the cache; a long request just gets smaller trees.
    engine = Engine(target, draft, budget="auto")
    prompt = [(3 * i) % 60 + 2 for i in range(MAX_LEN - 40)]
    res = engine.generate(prompt, max_new_tokens=20)
    assert max(res.stats.budgets) <= MAX_LEN - len(prompt) - 20 - 1
    want = Engine(target, None, method="autoregressive").generate(prompt, max_new_tokens=20).token_ids
    assert res.token_ids == want


def test_cli_accepts_budget_auto(models, monkeypatch, capsys):
    from specexec_rt import loading
    from specexec_rt.serving import cli

    target, draft = models
    tok = tiny_tokenizer()
    monkeypatch.setattr(loading, "load_model", lambda src, **kw: target if src == "T" else draft)
    monkeypatch.setattr(loading, "resolve_source", lambda src: src)
    monkeypatch.setattr(Engine, "tokenizer", property(lambda self: tok))
    built = []
    real_build = cli.build_engine
    monkeypatch.setattr(cli, "build_engine", lambda args: built.append(real_build(args)) or built[-1])
    rc = cli.main(["generate", "--model", "T", "--draft", "D", "--budget", "auto", "--raw", "--device", "cpu",
                   "--prompt", "w5 w9 w2 w7", "--max-new-tokens", "30"])
    assert rc == 0
    out = capsys.readouterr()
    engine = built[0]
    assert engine.budget == "auto" and engine.budget_controller is not None
    assert out.out.strip() == " ".join(f"w{i}" for i in reference_ids(target))
    assert len(engine.last_result.stats.budgets) == engine.last_result.stats.target_passes


def test_cli_compare_prints_both_speeds_and_the_ratio(models, monkeypatch, capsys):
    from specexec_rt import loading
    from specexec_rt.serving import cli

    target, draft = models
    tok = tiny_tokenizer()
    monkeypatch.setattr(loading, "load_model", lambda src, **kw: target if src == "T" else draft)
    monkeypatch.setattr(loading, "resolve_source", lambda src: src)
    monkeypatch.setattr(Engine, "tokenizer", property(lambda self: tok))
    rc = cli.main(["generate", "--model", "T", "--draft", "D", "--budget", "8", "--raw", "--device", "cpu",
                   "--prompt", "w5 w9 w2 w7", "--max-new-tokens", "30", "--compare"])
    assert rc == 0
    out = capsys.readouterr()
    assert out.out.strip() == " ".join(f"w{i}" for i in reference_ids(target))
    line = [ln for ln in out.err.splitlines() if "compare:" in ln][-1]
    m = re.search(r"specexec ([\d.]+) tok/s vs autoregressive ([\d.]+) tok/s on this machine: ([\d.]+)x \(same text\)",
                  line)
    assert m, line
    assert abs(float(m.group(1)) / float(m.group(2)) - float(m.group(3))) < 0.02 * float(m.group(3)) + 0.01


def reference_ids(target):
    return Engine(target, None, method="autoregressive").generate([5, 9, 2, 7], max_new_tokens=30).token_ids


# ================================================================ per-pass stream and encode()
def test_stream_yields_after_every_pass(models):
    target, draft = models
    engine = Engine(target, draft, budget=8)
    pieces = list(engine.stream([5, 9, 2, 7], max_new_tokens=20))     # no tokenizer: all ""
    assert pieces and all(p == "" for p in pieces)
    assert len(pieces) == engine.last_result.stats.target_passes
    engine = Engine(target, draft, budget=8, tokenizer=tiny_tokenizer())
    pieces = list(engine.stream("w5 w9 w2 w7", max_new_tokens=20, stop=["w999"]))
    assert len(pieces) == engine.last_result.stats.target_passes
    assert "".join(pieces) == engine.last_result.text
    # Closing after the first pass stops the engine there.
    gen = engine.stream("w5 w9 w2 w7", max_new_tokens=20)
    next(gen)
    gen.close()
    assert engine.encode("w5 w9 w2 w7") == [5, 9, 2, 7]
    with pytest.raises(TypeError, match="str"):
        engine.encode([5, 9])


def test_nan_draft_keeps_target_text(models, reference):
    target, _ = models
    bad = build_tiny_model(seed=1, max_len=MAX_LEN)
    bad.weights.lm_head[:] = float("nan")
    for budget in (8, "auto"):
        res = Engine(target, bad, budget=budget).generate([5, 9, 2, 7], max_new_tokens=30)
        assert res.token_ids == reference
        assert res.stats.tokens_per_pass == 1.0     # nothing drafted survives; only speed is lost


# ============================================================================ plain decoding as a mode
def _engine_with_costs(models, cost, max_budget=32, shapes="trees"):
    target, draft = models
    eng = Engine(target, draft, budget="auto", max_budget=max_budget, auto_shapes=shapes)
    eng.budget_controller.cost_model = cost
    return eng


@pytest.mark.parametrize("shapes", list(SHAPES))
def test_auto_decodes_plainly_when_drafting_never_pays(models, reference, shapes):
    """A draft that costs 10x a target pass per call: auto runs plain passes (no draft call),
    probing a tree (or a chain) now and then, and the output is the target's own."""
    seen = []      # (budget, draft calls) of every pass the controller observed

    def cost(b, n, calls):
        seen.append((b, calls))
        return 10.0 * max(calls, 1), 1.0 + 0.01 * n

    eng = _engine_with_costs(models, cost, shapes=shapes)
    res = eng.generate([5, 9, 2, 7], max_new_tokens=30)
    assert res.token_ids == reference
    assert all(calls == 0 for b, calls in seen if b == 0) and any(b == 0 for b, _ in seen)
    modes = res.stats.modes
    assert modes.count("autoregressive") >= 20 and modes[-1] == "autoregressive"


def test_losing_probes_grow_rarer_up_to_the_cap():
    """While plain decoding wins, a probe comes 8, 16, 32, ... passes after the last, then every
    max_probe_gap: each probe makes the draft catch up on every token since it last ran."""
    from specexec_rt.speculative.budget import BudgetController

    ctl = BudgetController(16, min_budget=1, prior_budget=4, allow_autoregressive=True, max_probe_gap=64,
                           cost_model=lambda b, n, calls: (10.0 * max(calls, 1), 1.0))
    probes = []
    for i in range(400):
        b, _ = ctl.plan(16)
        if b:
            probes.append(i)
            ctl.observe(b, b, 2, None, None, [1, b], [0.3, 0.5], accepted=0.0)
        else:
            ctl.observe(0, 1, 0, None, None, [], [], accepted=0.0)
    gaps = [b - a for a, b in zip(probes, probes[1:])]      # passes from one probe to the next
    assert gaps[:3] == [8, 16, 32] and set(gaps[3:]) == {64}, (probes, gaps)


def test_a_due_probe_waits_for_a_cheap_catch_up():
    """Plain passes cost 1 s, the draft's catch-up 0.1 s per token. At a request's first pass
    the draft has only its 10-token prompt to read; later also every token decoded since. Once
    a catch-up has been priced, a due probe waits for the next request's start instead of paying
    for the tokens decoded since. In one long request the catch-up never gets cheaper, and
    probes come every 4 x max_probe_gap."""
    from specexec_rt.speculative.budget import BudgetController

    def run(request_len):
        ctl = BudgetController(16, min_budget=1, prior_budget=4, allow_autoregressive=True, max_probe_gap=64,
                               cost_model=lambda b, n, calls: (10.0 * max(calls, 1), 1.0))
        probes, since = [], 10         # since: tokens the draft must read before it can draft
        for i in range(1200):
            if i % request_len == 0:
                since = 10
            b, _ = ctl.plan(16, since)
            if b:
                probes.append(i)
                ctl.observe(b, b, 2, None, None, [1, b], [0.3, 0.5], accepted=0.0,
                            catch_up=(since, 0.1 * since) if since > 1 else None)
                since = 1
            else:
                ctl.observe(0, 1, 0, None, None, [], [], accepted=0.0)
                since += 1
        return probes

    # Pass 0 is the first tree (nothing measured yet); its catch-up (the prompt) sets the price.
    short = run(100)
    assert len(short) == 12 and all(i % 100 == 0 for i in short), short
    long = run(10 ** 6)
    assert long[0] == 0 and [b - a for a, b in zip(long, long[1:])] == [256] * (len(long) - 1), long


@pytest.mark.parametrize("shapes", list(SHAPES))
def test_auto_grows_trees_when_drafting_pays(models, reference, shapes):
    """An offloaded-target-like cost (a pass costs the same for any tree, the draft is nearly
    free): auto keeps growing trees (or chains)."""
    eng = _engine_with_costs(models, lambda b, n, calls: (1e-4 * calls, 1.0), shapes=shapes)
    res = eng.generate([5, 9, 2, 7], max_new_tokens=30)
    assert res.token_ids == reference
    assert res.stats.modes.count(SHAPES[shapes]) == len(res.stats.modes)


def test_auto_shapes_default_and_validation(models):
    target, draft = models
    assert Engine(target, draft, budget="auto").auto_shapes == "chains"     # a CPU target
    with pytest.raises(ValueError, match="auto_shapes"):
        Engine(target, draft, budget="auto", auto_shapes="bushes")
    with pytest.raises(ValueError, match="needs budget='auto'"):
        Engine(target, draft, budget=8, auto_shapes="chains")


def drive_chains(ctl, passes, t_call, t_target, accept, cap=64, seed=0):
    """plan/observe with a chain draft whose tokens are each accepted with probability
    ``accept`` (a chain stops at its first rejection), a draft call costing ``t_call`` and a
    verification of r rows ``t_target(r)``. Returns the plans."""
    import random

    rng = random.Random(seed)
    plans = []
    for _ in range(passes):
        k, depth = ctl.plan(cap)
        plans.append((ctl.mode, k))
        if k == 0:
            ctl.observe(0, 1, 0, None, t_target(1), [], [], accepted=0.0)
            continue
        assert depth == k and ctl.mode == "chain"
        acc = 0
        while acc < k and rng.random() < accept:
            acc += 1
        ctl.observe(k, k + 1, k, k * t_call, t_target(k + 1), [], [], accepted=float(acc))
    return plans


def test_chain_controller_picks_the_chain_length_the_costs_favour():
    """Chains scored by (1 + a + ... + a^k) / (k t_call + t_target(k + 1)), a measured."""
    def best_k(a, t_call, t_target, kmax=8):
        score = {k: sum(a ** i for i in range(k + 1)) / (k * t_call + t_target(k + 1)) for k in range(1, kmax + 1)}
        return max(score, key=score.get), score

    cpu_like = lambda r: 1.0 + 0.06 * (r - 1)          # noqa: E731 (a verification row costs 6%)
    ctl = BudgetController(64, allow_autoregressive=True, chains=True, max_chain=8)
    plans = drive_chains(ctl, 200, 0.22, cpu_like, 0.66)
    want, score = best_k(0.66, 0.22, cpu_like)
    assert want == 2 and score[want] > 1.3             # plain decoding scores 1.0
    # The score is flat near its best (k = 1, 2, 3 within 4%): the chosen chains are near-best.
    last = [k for _, k in plans[-100:]]
    assert all(k > 0 for k in last) and sum(score[k] >= 0.95 * score[want] for k in last) >= 90, plans
    assert abs(ctl.chain_accept - 0.66) < 0.1
    # A nearly free draft and a flat verification: the longest chain.
    ctl = BudgetController(64, allow_autoregressive=True, chains=True, max_chain=8)
    assert drive_chains(ctl, 60, 1e-4, lambda r: 1.0, 0.9)[-5:] == [("chain", 8)] * 5
    # A dear draft: plain decoding, with a probe now and then.
    ctl = BudgetController(64, allow_autoregressive=True, chains=True, max_chain=8)
    plans = drive_chains(ctl, 100, 2.0, cpu_like, 0.66)
    assert [m for m, _ in plans[-60:]].count("plain") >= 55, plans


def test_linear_cost_keeps_its_slope_when_one_budget_fills_the_window():
    cost = LinearCost(window=4)
    for b, t in ((2, 1.2), (8, 1.8), (2, 1.2), (8, 1.8)):
        cost.add(b, t)
    assert cost(4) == pytest.approx(1.4)
    for _ in range(4):
        cost.add(3, 1.3)                                # only the budget the controller settled on
    assert cost(8) == pytest.approx(1.8) and cost(3) == pytest.approx(1.3)


@pytest.mark.parametrize("shapes", list(SHAPES))
def test_mode_switches_are_lossless_greedy_and_resume_drafting(models, reference, shapes):
    """Costs that flip mid-generation: plain passes while drafting is dear, trees (or chains)
    again once it is cheap (the draft catches up on the tokens it skipped), output unchanged
    throughout."""
    passes = []

    def cost(b, n, calls):
        passes.append(b)
        dear = 8 <= len(passes) < 20
        return (50.0 * max(calls, 1) if dear else 1e-4 * calls), 1.0

    eng = _engine_with_costs(models, cost, shapes=shapes)
    res = eng.generate([5, 9, 2, 7] * 3, max_new_tokens=60)
    target = models[0]
    from conftest import greedy_decode
    assert res.token_ids == greedy_decode(target, [5, 9, 2, 7] * 3, 60)
    modes = res.stats.modes
    first_plain = modes.index("autoregressive")
    assert SHAPES[shapes] in modes[first_plain:], modes       # it resumed drafting


@pytest.mark.parametrize("shapes", list(SHAPES))
def test_mode_switches_keep_the_sampled_distribution(monkeypatch, shapes):
    """Sampling across switches: every other pass plain, the first two tokens still follow the
    target's exact distribution (chi-square), and the draft stays consistent."""
    from specexec_rt.speculative.budget import BudgetController
    from specexec_rt.speculative.sampling import SamplingParams
    from test_engine import exact_first_two, first_two_counts, make_pair
    from test_sampling import chi2_pvalue

    target, draft = make_pair(vocab=16, noise=0.8, max_len=64, head_scale=0.15)
    eng = Engine(target, draft, budget="auto", max_budget=8, max_depth=3, auto_shapes=shapes)
    flip = [0]

    def plan(self, cap, catch_up=0):
        flip[0] += 1
        return (0, 0) if flip[0] % 2 else (8, 3)

    monkeypatch.setattr(BudgetController, "plan", plan)
    params = SamplingParams(0.7, 0.9)
    counts = first_two_counts(eng, params, runs=600)
    assert chi2_pvalue(counts, exact_first_two(target, params)) > 1e-3


def test_lookup_passes_are_fitted_apart_from_the_chains():
    """A prompt-lookup pass's verification time goes to its own fit: the chains' line keeps its
    points, and a lookup size not measured yet is priced by that line."""
    ctrl = BudgetController(64, chains=True, max_chain=8)
    for k in (1, 2, 4):
        ctrl.observe(k, k + 1, k, 0.01 * k, 1.0 + 0.1 * k, [], [], float(k))
    before = [ctrl.target_cost(b) for b in (1, 2, 4, 16, 32)]
    ctrl.observe_lookup(32, 33, 9.0)
    assert [ctrl.target_cost(b) for b in (1, 2, 4, 16, 32)] == before
    assert ctrl.lookup_seconds(32) == 9.0
    assert ctrl.lookup_seconds(16) == ctrl.target_cost(16)
    ctrl.observe_lookup(16, 17, None)            # a pass that carried a prompt: not news
    assert ctrl.lookup_seconds(16) == ctrl.target_cost(16)
