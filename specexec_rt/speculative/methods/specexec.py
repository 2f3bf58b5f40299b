"""SpecExec: a parallel best-first tree under a token budget (docs/ALGORITHM.md), one best-first
search over all requests of the pass so the budget goes where acceptance is likely. Which tree
the budget buys is the tree policy's (tree_policy.py); ``budget="auto"`` sizes every pass and may
switch it to a coupled chain, to plain decoding (``auto_method``) or, between chains, to a tree of
prompt-lookup candidates alone (``lookup_pass``, auto.py).

With ``ngram=True`` every tree also starts from the request's prompt-lookup trie (ngram.py),
grafted under the root: the draft model's search then competes with it for the same budget
(the lookup's nodes raise the bar a draft node must clear, and the draft expands a lookup node
only when it ranks among the best), and without a draft model (``draft="ngram"``) the trie
pruned to the budget is the tree.
"""
from __future__ import annotations

import copy

import torch

from .. import sampling
from .. import tree_policy
from ..ngram import LOOKUP_PARAMS, PromptLookup, lookup_settings
from ..memory import PassShape
from ..sampling import noise_ring_rows, process_logits
from ..tree import NEG_INF, DraftTree, prune_forest
from .autoregressive import Autoregressive
from .base import Method, PassContext
from .chains import Chain


class SpecExec(Method):
    """Parallel best-first growth (docs/ALGORITHM.md, step 1); deterministic given the draft
    and the tree policy's state (tree_policy.py: ``calibrated`` ranks nodes by the acceptance
    learned from verification, ``softmax`` by the draft's path probability, ``sequoia`` grows
    Sequoia's optimal static shape). With several requests in a pass, one search runs over all
    their trees: each step expands the best ``beams_per_step`` unexpanded nodes of any tree, and
    the pass keeps the best ``budget x requests`` nodes of all trees together (every root
    always), so the budget goes to the requests whose drafts are most likely to be accepted."""

    name = "specexec"
    param_names = ("beams_per_step", "branch_width", "max_depth", "coupled") + tree_policy.POLICY_PARAMS \
        + LOOKUP_PARAMS
    other_params = tree_policy.POLICY_PARAMS + ("coupled", "ngram")

    supports_auto = True
    static_draft = True
    lookup_only = False                   # True on lookup_pass()'s copy

    def __init__(self, budget: int, given: dict, auto: bool = False, device="cpu"):
        self.user_beams = "beams_per_step" in given
        super().__init__(budget, given, auto, device)
        p = self.params
        self.policy = tree_policy.make_policy(p["tree"], device, p["branch_width"], p["growth_temperature"],
                                              p["acceptance"])
        self.lookup = PromptLookup(self._lookup) if self._lookup is not None else None
        if self.lookup is not None and self.policy.static_shapes:
            raise ValueError(f"ngram=True grafts lookup candidates into a searched tree: use tree='calibrated' or "
                             f"'softmax', not {p['tree']!r} (a static shape)")
        self._plain = Autoregressive(1, {})
        self._chains: dict = {}           # k -> Chain (auto's chain passes)
        self._lookup_pass = None          # auto's lookup passes (lookup_pass)

    def defaults(self, budget: int, p: dict) -> dict:
        p.setdefault("beams_per_step", min(budget, 32))
        p.setdefault("branch_width", 8)
        p.setdefault("coupled", True)
        self._lookup = lookup_settings(p)       # ngram, ngram_min, ngram_max, ngram_tokens
        return tree_policy.set_defaults(p)     # tree, max_depth, growth_temperature, acceptance

    @property
    def grows_without_draft(self) -> bool:
        return self.lookup is not None

    def beams(self, budget: int) -> int:
        """Nodes expanded per draft step at this budget (auto follows the budget)."""
        if self.auto and not self.user_beams:
            return min(budget, 32)
        return self.params["beams_per_step"]

    def static_beams(self, budget: int, m: int) -> int:
        """Rows of the static draft step that serves a step of ``m`` nodes: the beams, or what
        the tree policy pads a step to (Sequoia's levels vary)."""
        return self.policy.static_beams(self.beams(budget), m)

    def auto_method(self, budget: int, chains: bool) -> Method:
        """Plain decoding at budget 0 (drafting does not pay now), a chain of ``budget`` draft
        tokens when auto plans chains, else this tree."""
        if budget == 0:
            return self._plain
        if not chains:
            return self
        if budget not in self._chains:
            # Coupled: every pass draws position t's token from (seed, t) alone, whichever mode
            # auto picked, so a seed fixes the text.
            self._chains[budget] = Chain(budget, {"k": budget, "coupled": True})
        return self._chains[budget]

    def lookup_pass(self) -> "SpecExec":
        """The method of auto's lookup passes (auto.py): this one's trees of prompt-lookup
        candidates alone, no draft call (``needs_draft`` False, so the runner makes no drafter),
        sharing its lookup and what the lookup learns; named "lookup" in ``stats.modes``."""
        if self._lookup_pass is None:
            m = copy.copy(self)
            m.name, m.needs_draft, m.auto, m.lookup_only = "lookup", False, False, True
            self._lookup_pass = m
        return self._lookup_pass

    def verify_rows(self, budget: int) -> int:
        return 1 + budget

    def draft_slots(self) -> int:
        # SpecExec grows a smaller tree when the draft's cache runs short; it needs one slot.
        return 1

    def pass_shape(self, budget: int, n_requests: int = 1) -> PassShape:
        p = self.params
        beams = self.beams(budget)
        beams, capacity = self.policy.pass_size(budget, beams, 1 + p["max_depth"] * beams * p["branch_width"])
        capacity += self.lookup.settings.max_nodes if self.lookup is not None else 0
        return PassShape(1 + budget, beams, capacity, n_requests=n_requests, coupled=self.coupled,
                         noise_rows=noise_ring_rows(p["max_depth"] + 1))

    def settings(self) -> tuple[str, str]:
        p = self.params
        setting = (self.size_setting() + f", beams_per_step={p['beams_per_step']}, "
                   f"branch_width={p['branch_width']}, max_depth={p['max_depth']}")
        fix = ("lower the budget, or beams_per_step x branch_width x max_depth (the draft tree holds "
               "1 + their product nodes and a bool matrix of that size squared)")
        return setting, fix

    def size_setting(self) -> str:
        return f"budget={'auto' if self.auto else self.max_budget}" + \
            (f" (max_budget={self.max_budget})" if self.auto else "")

    def grow(self, ctx: PassContext) -> list:
        dev, drafter, policy = ctx.device, ctx.drafter, self.policy
        reqs = ctx.requests
        budget = ctx.budget * len(reqs)
        beams, width = self.beams(ctx.budget), self.params["branch_width"]
        depth_cap = [min(r.remaining, ctx.depth) for r in reqs]
        plans = policy.shape_plans([r.params for r in reqs], ctx.budget, depth_cap)
        if plans is not None:
            trees = [DraftTree(pl.capacity, dev, r.root) for r, pl in zip(reqs, plans)]
        else:
            trees = self._trees(reqs, [1 + d * beams * width if drafter is not None else 1 for d in depth_cap], dev)
        if drafter is None:          # prompt lookup alone: each trie, pruned to the budget, is the tree
            prune_forest(trees, budget)
            return self._compact(ctx, trees)
        drafter.trees = trees
        coupled = [self.coupled and not r.params.greedy for r in reqs]
        temps = [policy.draft_temperature(r.params) for r in reqs]
        same_temp = len(set(temps)) == 1

        def children(parts, logits):
            """Each part's top-``width`` children: (log-scores before the policy, tokens), both
            ``[m, width]``. Coupled requests rank by the exponential race ``q / E`` with their own
            noise at each child's position; the others by the draft's softmax at the policy's
            temperature (one batched softmax when all parts share it)."""
            if not any(coupled[i] for i, _ in parts):
                if same_temp:
                    logq = torch.log_softmax(logits.float() / temps[0], dim=-1)
                else:
                    t = torch.tensor([temps[i] for i, nodes in parts for _ in range(int(nodes.shape[0]))],
                                     device=dev)
                    logq = torch.log_softmax(logits.float() / t[:, None], dim=-1)
                vals, toks = logq.topk(min(width, logq.shape[-1]), dim=-1)
                sizes = [int(nodes.shape[0]) for _, nodes in parts]
                return list(zip(vals.split(sizes), toks.split(sizes)))
            out, row = [], 0
            for i, nodes in parts:
                m = int(nodes.shape[0])
                lg = logits[row:row + m]
                row += m
                r = reqs[i]
                if coupled[i]:
                    # Children of a node at depth d fill position root + d + 1: noise row d.
                    r.noise.ensure(r.root_pos + 1, trees[i].levels + 1, lg.shape[-1])
                    out.append(sampling.coupled_children(process_logits(lg, r.params),
                                                         r.noise.at(r.root_pos + 1, trees[i].depths[nodes]), width))
                else:
                    logq = torch.log_softmax(lg.float() / temps[i], dim=-1)
                    out.append(logq.topk(min(width, logq.shape[-1]), dim=-1))
            return out

        def expand(parts, logits, shape_masks=None):
            for j, ((i, nodes), (vals, toks)) in enumerate(zip(parts, children(parts, logits))):
                # The policy's child scores (calibrated log-acceptance or the draft's log-prob)
                # and the acceptance model's feature bins.
                scores, feats = policy.child_scores(vals, reqs[i].params, coupled[i])
                if shape_masks is not None:     # Sequoia: children outside the shape are created dead
                    keep = shape_masks[j][:, :scores.shape[1]]
                    scores = torch.where(keep, scores, torch.full_like(scores, NEG_INF))
                trees[i].add_children(nodes, toks, scores, feats)
            return prune_forest(trees, budget)

        zero = torch.zeros(1, dtype=torch.long, device=dev)
        root_logits = drafter.root()
        if plans is not None:
            self._grow_shapes(plans, root_logits, expand, drafter)
        else:
            threshold = expand([(i, zero) for i in range(len(reqs))], root_logits)
            self._grow_best_first(ctx, trees, depth_cap, beams, expand, threshold)
        return self._compact(ctx, trees)

    def _trees(self, reqs: list, capacities: list, dev) -> list:
        """Each request's DraftTree with room for ``capacities[i]`` draft nodes, its prompt-lookup
        trie grafted under the root when the lookup is on (ngram.py)."""
        if self.lookup is None:
            return [DraftTree(c, dev, r.root) for r, c in zip(reqs, capacities)]
        trees = []
        for r, c in zip(reqs, capacities):
            cand = self.lookup.propose(r, r.remaining)
            tree = DraftTree(c + len(cand), dev, r.root)
            tree.graft(0, cand)
            trees.append(tree)
        return trees

    def _compact(self, ctx: PassContext, trees: list) -> list:
        """Each tree's alive nodes as its VerifyTree; auto's prediction curve of the trees."""
        dev = ctx.device
        # One read for every tree's size: then each tree's alive nodes without another sync.
        alive = [t.alive[:t.n_nodes] for t in trees]
        counts = ctx.host(torch.stack([a.sum() for a in alive]))
        if self.auto and ctx.controller is not None:
            ctx.curve = self.prediction_curve(trees, ctx.controller, ctx.budget, dev, self.params["max_depth"])
        out = []
        for t, a, c in zip(trees, alive, counts):
            nodes = torch.argsort((~a).to(torch.int8), stable=True)[:c]   # alive first, in index order
            out.append((t.compact(nodes), None))
        return out

    def evidence(self, tree, p, params, last, draws):
        """The tree policy's evidence, then the prompt lookup's (``learn`` splits them)."""
        ev = super().evidence(tree, p, params, last, draws)
        if self.lookup is None or tree.proposed is None:
            return ev
        lk = self.lookup.observations(tree, p, draws)
        return lk if ev is None else torch.cat([ev, lk])

    def learn(self, params, evidence: list) -> None:
        if self.lookup is None:
            return super().learn(params, evidence)
        k = self.lookup.packet_size
        if len(evidence) > k:
            super().learn(params, evidence[:-k])
        self.lookup.update(params, evidence[-k:])

    def _grow_best_first(self, ctx: PassContext, trees: list, depth_cap: list, beams: int, expand,
                         threshold: torch.Tensor) -> None:
        """The parallel best-first search: each draft call expands the best ``beams`` candidates
        of all trees; ``threshold``: the budget-th best score after the root's expansion."""
        reqs, drafter, dev = ctx.requests, ctx.drafter, ctx.device
        # A node whose score plus the best child's log-acceptance cannot beat the budget-th
        # best node has no child worth creating: it is not expanded.
        margins = [self.policy.candidate_margin(r.params) for r in reqs]
        floor = self.policy.expand_floor()
        for step in range(1, max(depth_cap)):
            # Near the end of a draft cache the tree just grows less (still exact).
            rooms = [drafter.room(i) for i in range(len(reqs))]
            if len(reqs) == 1:
                if rooms[0] <= 0:
                    break
                cand = trees[0].candidates((threshold - margins[0]).clamp_min(floor), depth_cap[0])
                vals, idx = cand.topk(min(beams, trees[0].n_nodes, rooms[0]))
                n_valid = ctx.host((vals > NEG_INF).sum())
                if n_valid == 0:
                    break
                parts = [(0, idx[:n_valid])]
            else:
                # A request whose cache could not take a whole step sits this step out.
                live = [i for i in range(len(reqs)) if rooms[i] >= beams]
                if not live:
                    break
                cands = [trees[i].candidates((threshold - margins[i]).clamp_min(floor), depth_cap[i]) for i in live]
                offsets = [0]
                for c in cands:
                    offsets.append(offsets[-1] + int(c.shape[0]))
                cat = torch.cat(cands)
                vals, idx = cat.topk(min(beams, int(cat.shape[0])))
                idx = torch.where(vals > NEG_INF, idx, torch.full_like(idx, offsets[-1]))
                idx = idx.sort().values            # grouped by request (concatenation order)
                bounds = torch.searchsorted(idx, torch.tensor(offsets, device=dev))
                counts = ctx.host(bounds)
                if counts[-1] == 0:
                    break
                parts = []
                for j, i in enumerate(live):
                    if counts[j + 1] > counts[j]:
                        parts.append((i, idx[counts[j]:counts[j + 1]] - offsets[j]))
            threshold = expand(parts, drafter.step(parts))

    @staticmethod
    def _grow_shapes(plans: list, root_logits, expand, drafter) -> None:
        """Sequoia: fill each request's ``plan`` (tree_policy.ShapePlan) level by level, one
        draft call per level for all requests, no host reads."""
        n = len(plans)
        expand([(i, plans[i].levels[0][0]) for i in range(n)], root_logits,
               [plans[i].levels[0][1] for i in range(n)])
        for level in range(1, max(len(pl.levels) for pl in plans)):
            # Near the end of a draft cache a tree just stops growing (still exact).
            parts, masks = [], []
            for i, pl in enumerate(plans):
                if level < len(pl.levels) and drafter.room(i) >= int(pl.levels[level][0].shape[0]):
                    parts.append((i, pl.levels[level][0]))
                    masks.append(pl.levels[level][1])
            if not parts:
                break
            expand(parts, drafter.step(parts), masks)

    @staticmethod
    def prediction_curve(trees: list, controller, budget: int, dev, max_depth: int):
        """(sizes, device int64 values): the expected accepted draft tokens of the best ``size``
        nodes created (sum of their path acceptance), at the controller's sizes, then the expected
        accepted tokens at each depth 1..max_depth of the trees verified (the controller weighs
        each level against the cost of its draft call); the runner reads them with the
        acceptance result (budget.py). Values are per request: with B trees, the best
        ``B * size`` nodes of all of them, divided by B."""
        b = len(trees)
        scores = torch.cat([t.scores[1:t.n_nodes] for t in trees]) if b > 1 else trees[0].scores[1:trees[0].n_nodes]
        n = int(scores.shape[0]) // b
        pts = controller.eval_points(budget, n) if n else []    # no candidates (a lookup that found none)
        if not pts:
            return None
        prob = scores.exp()
        cum = prob.sort(descending=True).values.cumsum(0)
        vals = cum[torch.tensor([b * p - 1 for p in pts], device=dev)] / b
        depths = torch.cat([t.depths[1:t.n_nodes] for t in trees]) if b > 1 else trees[0].depths[1:trees[0].n_nodes]
        alive = torch.cat([t.alive[1:t.n_nodes] for t in trees]) if b > 1 else trees[0].alive[1:trees[0].n_nodes]
        at_depth = torch.zeros(max_depth + 1, device=dev).index_add_(
            0, depths.clamp_max(max_depth), prob * alive)[1:] / b
        return pts, torch.cat([vals, at_depth])
