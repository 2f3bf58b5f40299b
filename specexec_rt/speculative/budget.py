"""budget="auto": pick SpecExec's tree budget (and depth) before every iteration.

Objective (docs/ALGORITHM.md, "Choosing the budget every pass"): maximise expected emitted tokens per second,

    (1 + r * E[b]) / (t_draft(b) + t_target(b))

- ``E[b]``: the expected number of accepted draft tokens of the best-``b`` tree, predicted by the
  last tree itself: sum of ``exp(score)`` over its ``b`` best nodes (a node is accepted iff its
  whole path is, and a calibrated draft gives that path probability ``exp(score)``). The best-b
  set of a best-first tree is ancestor-closed, so ``E`` at every candidate ``b`` is one prefix sum
  of the sorted node probabilities. The engine evaluates it on device at a few sizes and reads
  them with the acceptance packet (no extra sync). Beyond the created nodes ``E`` is extrapolated
  logarithmically (the last doubling's gain per doubling).
- ``r``: calibration, realised accepted tokens / predicted, exponentially weighted over passes.
- ``t_draft``, ``t_target``: ``a + c * b`` least squares over a sliding window of measured passes.
- depth: each tree level costs one draft call. The last tree reports the expected accepted tokens
  at each depth (with the calibrated tree policy, its scores are calibrated acceptance
  probabilities), and a level is kept iff it is expected to add at least the tokens a draft call
  costs at the current rate, ``seconds per call / seconds per emitted token``. When the deepest
  allowed level still paid, the next pass goes as deep as the levels' geometric decay says still
  pays (at most half as deep again, up to ``max_depth``).
  A budget measured in the window is priced at its own recent mean. Until the window has held
  two budgets far enough apart the slope is 0 (the offloaded target, where a pass costs the same
  for 1..1000 tokens, is the main case); after that, while it holds one, the last slope measured
  (``LinearCost``); the controller starts small (``prior_budget``: the engine gives 4 on the CPU,
  16 elsewhere) and climbs at most 2x per pass, and a growing cost (a CPU target) shows up as a
  slope or a measured price that pulls it back.

Chains instead of trees (``chains=True``; the engine's choice on the CPU): the speculative
candidates are draft chains of ``k = 1..max_chain`` tokens, scored as

    (1 + a + ... + a^k) / (k * t_call + t_target(k))

with ``a`` the measured per-token acceptance along a chain (decayed counts of accepted draft
tokens over tokens tried: a chain stops at its first rejection), ``t_call`` the measured seconds
per draft call of a chain pass (one call per token, host work included) and ``t_target`` the
same fit as for trees (``k + 1`` rows). On a CPU both a draft call and a verification cost
grow with their rows, and a chain's calls are one row each: there chains of 2-3 beat every tree
(bench/results/, docs/DESIGN.md).

Context length: what a draft call and a verification cost depends on how long the text already
is (every row attends to the whole prefix; at ~1500 tokens SmolLM2's float32 KV is as many bytes
as its int4 draft's weights), so the cost fits are kept per context bucket (half-octaves of the
prefix length: ``context_bucket``), and a pass is planned with the fits of the context at hand
(``at_context``). A bucket not measured yet borrows the nearest measured bucket's fits until its
own window holds ``MIN_OWN_PASSES`` passes. The acceptance side (calibration, depth mass, chain
acceptance) is shared by all contexts.

Everything here is host arithmetic on a handful of numbers per pass.
"""
from __future__ import annotations

import inspect
import math
from collections import deque
from typing import Callable, Optional, Sequence


# Context buckets: below CONTEXT_BASE tokens one bucket, then one per factor of sqrt(2).
CONTEXT_BASE = 128
MIN_OWN_PASSES = 2         # a bucket's own fits decide once its target fit holds this many passes


def context_bucket(tokens: int) -> int:
    """The cost bucket of a context of ``tokens`` prefix tokens: 0 below ``CONTEXT_BASE``, then
    half-octaves (128-180 -> 1, 181-255 -> 2, 256-361 -> 3, ..., 1448-2047 -> 8)."""
    if tokens < CONTEXT_BASE:
        return 0
    return 1 + int(2 * math.log2(tokens / CONTEXT_BASE))


def candidate_budgets(max_budget: int, min_budget: int = 4) -> list:
    """Powers of two from ``min_budget`` up to ``max_budget``, plus ``max_budget`` itself."""
    if max_budget < 1:
        raise ValueError(f"max_budget must be >= 1, got {max_budget}")
    out, b = [], max(1, min_budget)
    while b < max_budget:
        out.append(b)
        b *= 2
    out.append(max_budget)
    return out


class LinearCost:
    """``t(b) = a + c * b`` over the last ``window`` observations, ``a, c >= 0``. With fewer than
    two distinct budgets (max / min < ``min_spread``) the slope is the last one measured, or
    ``prior_slope`` before any: a window holding only the budget a controller settled on says
    nothing about the slope, and forgetting it priced every other budget at that one's cost (a
    chain controller that settled on k then saw longer chains as free)."""

    def __init__(self, window: int = 24, prior_slope: float = 0.0, min_spread: float = 1.5):
        self.obs: deque = deque(maxlen=window)
        self.prior_slope = prior_slope
        self.min_spread = min_spread
        self.measured_slope: Optional[float] = None

    def add(self, b: float, t: float) -> None:
        if math.isfinite(t) and t >= 0:
            self.obs.append((float(b), float(t)))
            # Every window with spread sets the slope, whether or not a fit reads it then.
            slope = self._window_slope()
            if slope is not None:
                self.measured_slope = slope

    def __len__(self) -> int:
        return len(self.obs)

    def _window_slope(self) -> Optional[float]:
        """The least-squares slope of the window, or None when its budgets are too close."""
        xs = [x for x, _ in self.obs]
        if not xs or max(xs) < self.min_spread * min(xs):
            return None
        mx, mt = sum(xs) / len(xs), sum(t for _, t in self.obs) / len(xs)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx <= 0:
            return None
        return max(0.0, sum((x - mx) * (t - mt) for x, t in self.obs) / sxx)

    def fit(self) -> tuple[float, float]:
        if not self.obs:
            return 0.0, self.prior_slope
        c = self.prior_slope if self.measured_slope is None else self.measured_slope
        mx = sum(x for x, _ in self.obs) / len(self.obs)
        mt = sum(t for _, t in self.obs) / len(self.obs)
        return max(0.0, mt - c * mx), c

    def measured(self, b: float) -> Optional[float]:
        """The mean of the last (up to 4) times measured at ``b``, None when the window has none."""
        at = [t for x, t in self.obs if x == b]
        return sum(at[-4:]) / len(at[-4:]) if at else None

    def __call__(self, b: float) -> float:
        """Measured mean at ``b`` when the window has it (real costs are often superlinear:
        the CPU int4 path at 64 tokens costs far more than a line through 8 and 16 says), else
        the line, never below what a smaller measured budget costs."""
        at = self.measured(b)
        if at is not None:
            return at
        a, c = self.fit()
        means: dict = {}
        for x, t in self.obs:
            if x < b:
                means.setdefault(x, []).append(t)
        return max([a + c * b] + [sum(v) / len(v) for v in means.values()])


class PassCosts:
    """What passes cost at one context bucket: the draft's and the target's ``LinearCost`` fits
    and the EWMAs of seconds per draft call, per emitted token and per chain draft call."""

    def __init__(self, window: int):
        self.draft_cost = LinearCost(window)
        self.target_cost = LinearCost(window)
        self.call_seconds: Optional[float] = None
        self.token_seconds: Optional[float] = None
        self.chain_call_seconds: Optional[float] = None
        # Verification times of prompt-lookup passes (auto.py), apart: their sizes (up to 32)
        # lie past the chains' (up to 8), and the chains' line must not bend to them.
        self.lookup_cost = LinearCost(window)


class BudgetController:
    """Chooses ``(budget, max_depth)`` per pass; learns from ``observe`` after each pass.

    max_budget: the largest tree (capped further per request by the caches).
    prior_budget: the first pass's budget. max_depth: the depth cap.
    cost_model: optional ``f(budget, n_verified, draft_calls) -> (draft_s, target_s)`` that
    replaces measured times (simulating other hardware with real acceptance: bench/adaptive.py);
    it may take a fourth argument, the pass's context length (``at_context``).
    allow_autoregressive: budget 0 (plain decoding, no draft call) is a candidate too, priced at
    the measured cost of a one-token target pass; while it wins, a speculative pass is still
    tried every ``probe_every`` passes (doubling while the probes keep losing, up to
    ``max_probe_gap``), so a draft that starts to pay is noticed. A probe is dear beyond its
    tree: the draft first catches up on every token decoded since it last ran (on a 2-core CPU
    ~2 ms per token, 5% of a plain step), so a long losing streak probes rarely, and a due probe
    waits until its catch-up (``plan``'s ``catch_up`` tokens at the measured seconds per
    catch-up token) costs at most ``probe_share`` of the plain decoding time since the last
    probe: at a request's first pass the draft has only the prompt to read, later also every
    token decoded since, so probes move to the starts of requests (in one long request they
    wait up to 4 x ``max_probe_gap`` passes).
    """

    def __init__(self, max_budget: int, min_budget: int = 4, prior_budget: int = 16, max_depth: int = 16,
                 window: int = 24, calibration_decay: float = 0.3, max_step: float = 2.0,
                 cost_model: Optional[Callable] = None, allow_autoregressive: bool = False,
                 probe_every: int = 8, max_probe_gap: int = 256, probe_share: float = 0.03,
                 chains: bool = False, max_chain: int = 8, prior_chain: int = 3, chain_decay: float = 0.95,
                 prior_accept: float = 0.6):
        if max_budget < 1:
            raise ValueError(f"max_budget must be >= 1, got {max_budget}")
        self.max_budget = int(max_budget)
        self.candidates = candidate_budgets(self.max_budget, min(min_budget, self.max_budget))
        self.prior_budget = min(prior_budget, self.max_budget)
        self.max_depth = int(max_depth)
        self.decay = calibration_decay
        self.max_step = max_step
        self.cost_model = cost_model
        self.window = window
        self._costs: dict = {}                   # context bucket -> PassCosts
        self.context = 0                         # the prefix length of the pass at hand (at_context)
        self.curve: Optional[dict] = None       # size -> predicted E[accepted] of the last tree
        self.curve_n = 0                         # non-root nodes the last tree created
        self._acc = 1.0                          # EWMA of accepted tokens (prior: calibrated)
        self._pred = 1.0                         # EWMA of predicted accepted tokens
        self.recent_accepted: deque = deque(maxlen=8)
        self.last_budget: Optional[int] = None
        self.allow_autoregressive = allow_autoregressive
        self.probe_every = probe_every
        self.max_probe_gap = max(probe_every, max_probe_gap)
        self._probe_gap = probe_every
        self._ar_streak = 0
        self.probe_share = probe_share
        self._ar_seconds = 0.0                   # plain decoding seconds since the last probe
        self.catch_up_seconds: Optional[float] = None  # EWMA of draft seconds per catch-up token
        self.depth_mass: Optional[list] = None   # expected accepted tokens per depth, last tree
        self.last_depth = self.max_depth         # the depth cap the last tree was grown with
        # Chains (see the module docstring): the mode of the last plan ("plain", "chain", "tree").
        self.chains = bool(chains)
        self.max_chain = max(1, int(max_chain))
        self.prior_chain = max(1, int(prior_chain))
        self.chain_decay = chain_decay
        self._chain_hits = 2.0 * prior_accept    # decayed accepted draft tokens (prior: 2 tries)
        self._chain_tries = 2.0                  # decayed draft tokens tried
        self.mode = "chain" if self.chains else "tree"

    # ------------------------------------------------------------------ costs per context
    def at_context(self, tokens: int) -> None:
        """Plan and observe the next passes at a context of ``tokens`` prefix tokens (the mean
        over the pass's requests): their costs are read from and written to that bucket."""
        self.context = max(0, int(tokens))

    @property
    def own_costs(self) -> PassCosts:
        """The current context bucket's own costs (what ``observe`` records)."""
        b = context_bucket(self.context)
        if b not in self._costs:
            self._costs[b] = PassCosts(self.window)
        return self._costs[b]

    @property
    def costs(self) -> PassCosts:
        """The costs decisions read: the current bucket's, or while it has fewer than
        ``MIN_OWN_PASSES`` measured passes the nearest bucket's that has more."""
        b = context_bucket(self.context)
        own = self._costs.get(b)
        if own is not None and len(own.target_cost) >= MIN_OWN_PASSES:
            return own
        measured = [k for k, c in self._costs.items() if len(c.target_cost) >= MIN_OWN_PASSES]
        if not measured:
            return own if own is not None else self.own_costs
        return self._costs[min(measured, key=lambda k: (abs(k - b), -k))]

    @property
    def measured_buckets(self) -> list:
        """The context buckets whose costs have been observed, ascending."""
        return sorted(k for k, c in self._costs.items() if len(c.target_cost))

    @property
    def draft_cost(self) -> LinearCost:
        return self.costs.draft_cost

    @property
    def target_cost(self) -> LinearCost:
        return self.costs.target_cost

    @property
    def call_seconds(self) -> Optional[float]:
        """EWMA of seconds per draft call (at this context)."""
        return self.costs.call_seconds

    @property
    def token_seconds(self) -> Optional[float]:
        """EWMA of pass seconds per emitted token (at this context)."""
        return self.costs.token_seconds

    @property
    def chain_call_seconds(self) -> Optional[float]:
        """EWMA of seconds per chain draft call (at this context)."""
        return self.costs.chain_call_seconds

    def _ewma(self, old: Optional[float], new: float) -> float:
        return new if old is None else old + self.decay * (new - old)

    # ------------------------------------------------------------------ prediction
    @property
    def calibration(self) -> float:
        return min(4.0, max(0.05, self._acc / max(self._pred, 1e-6)))

    def eval_points(self, budget: int, n_created: int) -> list:
        """Tree sizes at which the engine evaluates the prefix sums of sorted node probabilities."""
        pts = {min(c, n_created) for c in self.candidates} | {min(budget, n_created), n_created,
                                                               max(1, n_created // 2)}
        return sorted(p for p in pts if p >= 1)

    def expected(self, size: int) -> float:
        """Predicted accepted draft tokens (before calibration) of the best ``size`` nodes."""
        if not self.curve:
            return 0.0
        n = self.curve_n
        if size in self.curve:
            return self.curve[size]
        if size < n:    # between evaluated sizes: the next one up (the curve is increasing)
            return self.curve[min(p for p in self.curve if p >= size)]
        half = max(1, n // 2)
        gain = max(0.0, self.curve[n] - self.curve.get(half, 0.0)) if half < n else 0.0
        return self.curve[n] + gain * math.log2(size / n)

    def score(self, b: int) -> float:
        """Expected emitted tokens per second at budget ``b`` (0: plain decoding, no draft)."""
        if b == 0:
            t = self.target_cost(0)
            return 1.0 / t if t > 0 else 1.0
        t = self.draft_cost(b) + self.target_cost(b)
        tokens = 1.0 + self.calibration * self.expected(b)
        return tokens / t if t > 0 else tokens

    @property
    def chain_accept(self) -> float:
        """Measured per-token acceptance along a draft chain (a prior of 2 tries until measured)."""
        return min(0.999, max(0.0, self._chain_hits / self._chain_tries))

    def score_chain(self, k: int) -> float:
        """Expected emitted tokens per second of a chain of ``k`` draft tokens."""
        a = self.chain_accept
        tokens = (1.0 - a ** (k + 1)) / (1.0 - a)
        t = k * (self.chain_call_seconds or 0.0) + self.target_cost(k)
        return tokens / t if t > 0 else tokens

    # ------------------------------------------------------------------ decisions
    def plan(self, cap: int, catch_up: int = 0) -> tuple[int, int]:
        """(budget, max_depth) for the next pass; ``cap``: the largest budget the caches allow;
        ``catch_up``: tokens the draft must read before it can draft (decoded since it last ran).
        Budget 0 (only with ``allow_autoregressive``): decode one token without drafting."""
        cap = max(1, min(cap, self.max_budget))
        if self.chains:
            cap = min(cap, self.max_chain)
            measured = self.chain_call_seconds is not None and len(self.target_cost) > 0
            if not measured:
                b = min(self.prior_chain, cap)
            else:
                last = self.last_budget or self.prior_chain
                allowed = range(1, max(1, min(cap, int(self.max_step * last))) + 1)
                b = max(allowed, key=lambda k: (self.score_chain(k), -k))
            self.last_budget = b
            spec_score = self.score_chain(b) if measured else None
        else:
            cands = [c for c in self.candidates if c <= cap] or [cap]
            if self.curve is None or not len(self.target_cost):
                b = max([c for c in cands if c <= self.prior_budget] or [cands[0]])
            else:
                last = self.last_budget or self.prior_budget
                allowed = [c for c in cands if c <= self.max_step * last] or [cands[0]]
                b = max(allowed, key=lambda c: (self.score(c), -c))
            self.last_budget = b
            spec_score = self.score(b) if self.curve is not None and len(self.target_cost) else None
        self.mode = "chain" if self.chains else "tree"
        if self.allow_autoregressive and spec_score is not None and self.score(0) > spec_score:
            self._ar_streak += 1
            if self._ar_streak < self._probe_gap or not self._probe_affordable(catch_up):
                self.mode = "plain"
                return 0, 0
            # A probe: one speculative pass to refresh the draft's cost and acceptance. Each
            # probe that loses again waits twice as long for the next one.
            self._ar_streak = 0
            self._ar_seconds = 0.0
            self._probe_gap = min(self.max_probe_gap, 2 * self._probe_gap)
        else:
            self._ar_streak, self._probe_gap = 0, self.probe_every
        self.last_depth = b if self.chains else self._depth(b)
        return b, self.last_depth

    def _probe_affordable(self, catch_up: int) -> bool:
        """Whether the draft's catch-up before a probe costs at most ``probe_share`` of the plain
        decoding time since the last probe (always, until a catch-up has been measured). In one
        long request the catch-up grows as fast as that time, so after 4 x ``max_probe_gap``
        passes a probe goes ahead anyway (the draft may have started to pay)."""
        if self.catch_up_seconds is None or self._ar_streak >= 4 * self.max_probe_gap:
            return True
        return catch_up * self.catch_up_seconds <= self.probe_share * self._ar_seconds

    def level_threshold(self) -> Optional[float]:
        """Expected accepted tokens a tree level must add to pay for its draft call (None until
        both costs are measured)."""
        if self.call_seconds is None or not self.token_seconds:
            return None
        return self.call_seconds / self.token_seconds

    def _depth(self, b: int) -> int:
        """The deepest level of the last tree that paid for its draft call (half as deep again
        when even the cap paid). Before costs are measured: the longest recently accepted path
        plus margin (the cap at first)."""
        need = self.level_threshold()
        mass = self.depth_mass
        if need is not None and mass:
            paying = [d for d, m in enumerate(mass, 1) if m >= need]
            d = max(paying) if paying else 1
            if d >= self.last_depth and d >= 2 and mass[d - 2] > 0:
                # The cap cut a level that still paid: extrapolate the levels' geometric decay to
                # the depth where they stop paying (at most half as deep again).
                ratio = min(0.99, mass[d - 1] / mass[d - 2])
                extra = math.floor(math.log(need / mass[d - 1]) / math.log(ratio)) if ratio > 0 else 0
                d += max(0, min(extra, d // 2))
        elif not self.recent_accepted:
            d = self.max_depth
        else:
            d = math.ceil(1.5 * max(self.recent_accepted)) + 2
        return max(1, min(self.max_depth, b, max(4, d)))

    def _model_costs(self, budget: int, n_verified: int, draft_calls: int) -> tuple:
        """``cost_model``'s times for a pass, with the context when it takes a fourth argument."""
        try:
            takes_context = len(inspect.signature(self.cost_model).parameters) >= 4
        except (TypeError, ValueError):      # a callable without a signature: the three arguments
            takes_context = False
        if takes_context:
            return self.cost_model(budget, n_verified, draft_calls, self.context)
        return self.cost_model(budget, n_verified, draft_calls)

    def observe_lookup(self, size: int, n_verified: int, target_seconds: Optional[float]) -> None:
        """Record a pass of prompt-lookup candidates alone, ``size`` nodes per request (auto.py):
        no draft call, so only its verification time is news (kept apart from the chains')."""
        if self.cost_model is not None:
            target_seconds = self._model_costs(size, n_verified, 0)[1]
        if target_seconds is not None:
            self.own_costs.lookup_cost.add(size, target_seconds)

    def lookup_seconds(self, size: int) -> float:
        """A lookup pass of ``size`` nodes per request: its measured time at this context, else
        the verification line of the planned passes at that size."""
        t = self.costs.lookup_cost.measured(size)
        return t if t is not None else self.target_cost(size)

    def observe(self, budget: int, n_verified: int, draft_calls: int, draft_seconds: Optional[float],
                target_seconds: Optional[float], points: Sequence[int], values: Sequence[float], accepted: float,
                truncated: bool = False, catch_up: Optional[tuple] = None) -> None:
        """Record one pass: the measured times (None: not representative, e.g. the draft time
        included the draft's prompt prefill, or the target pass carried a prompt), the tree's
        prediction curve at ``points`` (``values`` may continue with the expected accepted tokens
        per depth 1, 2, ...) and the draft tokens actually accepted (per request: the mean over
        the pass's requests). A ``truncated``
        pass (its depth cut short by the tokens left to generate) says nothing about the next
        one and is ignored. ``catch_up``: ``(tokens, draft seconds)`` of a pass whose draft first
        read many tokens decoded without it (the probe's catch-up, priced per token)."""
        if catch_up is not None and catch_up[0] > 0 and catch_up[1] is not None:
            self.catch_up_seconds = self._ewma(self.catch_up_seconds, catch_up[1] / catch_up[0])
        if truncated:
            return
        if self.cost_model is not None:
            draft_seconds, target_seconds = self._model_costs(budget, n_verified, draft_calls)
        own = self.own_costs
        if budget == 0:       # a plain decoding pass: only the target's one-token cost is news
            if target_seconds is not None:
                own.target_cost.add(0, target_seconds)
                self._ar_seconds += target_seconds
            return
        if self.chains:       # a chain of `budget` draft tokens, `accepted` of them accepted
            d = self.chain_decay
            hit = max(0.0, min(float(budget), accepted))
            self._chain_hits = d * self._chain_hits + hit
            self._chain_tries = d * self._chain_tries + hit + (1.0 if hit < budget else 0.0)
            if draft_seconds is not None and draft_calls > 0:
                own.chain_call_seconds = self._ewma(own.chain_call_seconds, draft_seconds / draft_calls)
            if target_seconds is not None:
                own.target_cost.add(budget, target_seconds)
            return
        if draft_seconds is not None:
            own.draft_cost.add(budget, draft_seconds)
            if draft_calls > 0:
                own.call_seconds = self._ewma(own.call_seconds, draft_seconds / draft_calls)
            if target_seconds is not None:
                own.token_seconds = self._ewma(own.token_seconds, (draft_seconds + target_seconds) / (1 + accepted))
        if target_seconds is not None:
            own.target_cost.add(budget, target_seconds)
        values = list(values)
        if len(values) > len(points):
            self.depth_mass = values[len(points):]
            values = values[:len(points)]
        curve = dict(zip(points, values))
        if curve:
            used = min(budget, max(curve))
            predicted = curve.get(used, 0.0)
            self._acc += self.decay * (accepted - self._acc)
            self._pred += self.decay * (predicted - self._pred)
            self.curve, self.curve_n = curve, max(curve)
        self.recent_accepted.append(accepted)
