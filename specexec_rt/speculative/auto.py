"""``budget="auto"`` in one place: before every pass the scheduler asks ``AutoBudget.plan`` for the
pass's method, budget and depth; after it, ``AutoBudget.observe`` hands the pass's costs and
acceptance to the ``BudgetController`` (budget.py: the host arithmetic of the choice).

What a pass can be: a SpecExec tree of the planned budget, a coupled chain of ``k`` draft tokens
(``auto_shapes="chains"``), or plain decoding (budget 0: no draft call) while drafting does not
pay; the method says which object grows each (``Method.auto_method``). The ceiling is the
engine's ``max_budget`` after memory fitting, and per pass the smallest of the requests' own caps
(``Request.auto_cap``: what their caches leave free).

With the prompt lookup on (``ngram=True``), trees take its candidates into their one budget
(methods/specexec.py). Chains cannot, so with chains the lookup is a fourth kind of pass: its trie
alone, no draft call (``SpecExec.lookup_pass``), run instead of the planned chain or plain pass
when its expected tokens per second are higher (its verification times are fitted apart from the
chains', budget.py). Its expected tokens come from the lookup's own
acceptance estimates (ngram.py), which keep learning from the passes that do not use it
(``PromptLookup.shadow_update``): the gate follows each text's measured lookup hit rate, so a
summary that paraphrases keeps its draft chains and a code edit that copies switches to the
lookup.
"""
from __future__ import annotations

from typing import Optional

from .budget import BudgetController
from .ngram import path_probabilities

# auto_shapes= -> whether the speculative passes are draft chains (else SpecExec trees).
AUTO_SHAPES = {"trees": False, "chains": True}
# Sizes (nodes per request) a lookup pass is scored at.
LOOKUP_SIZES = (1, 2, 4, 8, 16, 32)
# A lookup pass must promise this much more than the planned pass: the cost fits extrapolate
# to sizes the chains never ran, and a near-tie is not worth leaving the measured mode.
LOOKUP_MARGIN = 1.1


class AutoBudget:
    """The per-pass choice for an engine whose ``method`` supports auto (SpecExec).

    max_budget: the largest tree; device: the target's (on the CPU a pass's cost grows with its
    tree, so the first trees are small and chains are the default shape); drafting: whether a
    draft model is loaded (else only plain passes); shapes: ``"trees"``, ``"chains"`` or None
    (the device's default); draft_region_len: the draft cache slots of one request."""

    def __init__(self, method, max_budget: int, device, drafting: bool, shapes: Optional[str],
                 draft_region_len: int):
        self.method = method
        self.max_depth = method.params["max_depth"]
        self.draft_region_len = draft_region_len
        self.shapes = shapes or ("chains" if device.type == "cpu" else "trees")
        # Plain decoding (budget 0) and trees down to one node are candidates too: auto never
        # keeps drafting when drafting does not pay on this device. On the CPU a pass's cost
        # grows with its tree (draft steps and verification are compute-bound), so the first
        # trees are small and grow only while they pay; an offloaded GPU pass costs the same for
        # 1..1000 tokens, so it starts at 16.
        self.controller = BudgetController(max_budget, min_budget=1, prior_budget=4 if device.type == "cpu" else 16,
                                           max_depth=self.max_depth, allow_autoregressive=drafting,
                                           chains=AUTO_SHAPES[self.shapes], max_chain=min(8, self.max_depth))
        # The prompt lookup as a pass of its own: with chains only (trees merge its candidates).
        self.lookup = getattr(method, "lookup", None) if self.controller.chains else None
        self._shadowed: list = []           # (request, trie, committed length) the last pass did not verify

    def plan(self, reqs: list, catch_up: int, context: int = 0) -> tuple:
        """(method, budget, depth) of a pass verifying ``reqs``' trees; ``catch_up``: the longest
        chain a draft must read before drafting; ``context``: their mean prefix length (the
        costs are those of that context: budget.py)."""
        ctl = self.controller
        ctl.at_context(context)
        tree_cap = min(r.auto_cap for r in reqs)
        cap = tree_cap
        if ctl.chains:
            # A chain of k draft tokens takes k slots of the draft's cache after what it has yet
            # to read (a SpecExec tree just grows less near the end of it).
            cap = min([cap] + [self.draft_region_len - r.dp - len(r.pending) + 1 for r in reqs])
        self._learn_lookup()
        budget, depth = ctl.plan(cap, catch_up) if cap >= 1 else (0, 0)
        if self.lookup is not None and tree_cap >= 1:
            size = self._lookup_size(reqs, budget, tree_cap)
            if size:
                self._shadowed = []          # its own verification teaches the lookup this time
                return self.method.lookup_pass(), size, self.max_depth
        return self.method.auto_method(budget, ctl.chains), budget, depth

    def _learn_lookup(self) -> None:
        """Score the tries the last pass did not verify against what it committed."""
        for r, cand, n in self._shadowed:
            if len(r.committed) > n:
                self.lookup.shadow_update(r.params, cand, r.committed[n:])
        self._shadowed = []

    def _lookup_size(self, reqs: list, budget: int, cap: int) -> int:
        """Nodes per request of a lookup pass that beats the planned pass (a chain of ``budget``
        draft tokens, or plain decoding at 0) in expected tokens per second, the best such;
        0 when none does (the tries are then kept to learn from after the pass)."""
        ctl = self.controller
        cands = [self.lookup.propose(r, r.remaining) for r in reqs]
        self._shadowed = [(r, c, len(r.committed)) for r, c in zip(reqs, cands) if len(c)]
        probs = sorted((p for c in cands for p in path_probabilities(c)), reverse=True)
        # Not before a verification has been timed: a 32-node pass would look free.
        if not probs or not len(ctl.target_cost):
            return 0
        n_req = len(reqs)
        planned = ctl.score_chain(budget) if budget > 0 else ctl.score(0)
        best, best_score = 0, LOOKUP_MARGIN * planned
        for size in LOOKUP_SIZES:
            if size > cap:
                break
            tokens = 1.0 + sum(probs[:size * n_req]) / n_req
            t = ctl.lookup_seconds(size)
            score = tokens / t if t > 0 else tokens
            if score > best_score:
                best, best_score = size, score
            if size * n_req >= len(probs):
                break
        return best

    def observe(self, out, run, accepted: list) -> None:
        """Record the pass ``out`` (scheduler.SchedulerOutput) as ``run`` (runner.RunnerOutput)
        measured it; ``accepted``: the draft tokens each finite request accepted. Call after the
        requests' progress is counted (a pass cut short by the tokens left is not news)."""
        if getattr(out.method, "lookup_only", False):
            # A lookup pass: only its verification cost is news (its acceptance went to the
            # lookup's own estimates), at the size plan() chose and will price again.
            self.controller.at_context(out.context)
            self.controller.observe_lookup(out.budget, run.n_verified,
                                           None if out.carries_prompt else run.target_seconds)
            return
        # A pass that carried a prompt (or a draft's prompt prefill) says nothing about the cost
        # of a tree: its times are left out of the fits. Nor does a draft catching up on tokens
        # it skipped in plain passes.
        catch_up = out.catch_up > self.max_depth + 2
        points, values = run.curve if run.curve is not None else ([], [])
        self.controller.at_context(out.context)
        self.controller.observe(
            out.budget, run.n_verified, run.draft_calls,
            None if out.first_trees or catch_up else run.draft_seconds,
            None if out.carries_prompt else run.target_seconds, points, values,
            # Per request, as the curve (its mass is averaged over the pass's trees) and the
            # costs (a plain pass decodes the same requests) are: the mean, not the luckiest.
            sum(accepted) / len(accepted),
            truncated=out.budget > 0 and any(r.remaining < out.depth for r in out.tree_requests),
            catch_up=(out.catch_up, run.draft_seconds) if catch_up and run.draft_calls else None)
