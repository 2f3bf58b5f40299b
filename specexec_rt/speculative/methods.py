"""The decoding methods: how each grows the trees of a pass's requests and accepts from them.

Every method verifies through the same target pass and commits the same way (engine.py);
what differs is here, one small class each:

- ``Autoregressive``: the tree is the root alone; no draft.
- ``Chain``: classic speculative decoding, ``k`` draft tokens per pass.
- ``SpecInfer``: ``n`` root candidates, each continued as a chain of ``depth``.
- ``SpecExec``: a parallel best-first tree under a token budget (docs/ALGORITHM.md), one
  best-first search over all requests of the pass so the budget goes where acceptance is likely.

A method gives its defaults and sizes (``verify_rows``, ``draft_slots``, ``pass_shape`` for
the memory estimate), ``grow`` (the trees of a pass) and ``accept`` (the accepted path of one
request's tree given the target's processed distributions).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.argmax import argmax_rows
from . import sampling
from . import tree as _tree
from . import tree_policy
from .memory import PassShape
from .sampling import noise_ring_rows, process_logits
from .tree import NEG_INF, ChainTree, DraftTree, VerifyTree, prune_forest

CURVE_SCALE = 1e6     # budget="auto": prediction-curve values travel as int64 micro-tokens


class PassContext:
    """What ``grow`` needs about the pass: its requests (each with ``params``, ``gen``,
    ``remaining``), the ``Drafter`` (None without a draft), the host-read function (counts
    the pass's syncs), the pass's budget and depth (SpecExec) and, for ``budget="auto"``, the
    controller whose prediction curve the tree fills in."""

    def __init__(self, requests: list, drafter, host, device, budget: int = 0, depth: int = 0,
                 controller=None):
        self.requests = requests
        self.drafter = drafter
        self.host = host
        self.device = device
        self.budget = budget
        self.depth = depth
        self.controller = controller
        self.curve: Optional[tuple] = None     # (sizes, device int64 values), set by SpecExec under auto


class Method:
    name = ""
    needs_draft = True
    param_names: tuple = ()
    other_params: tuple = ()      # parameters that are not positive ints (checked by ``defaults``)

    def __init__(self, budget: int, given: dict):
        self.params = self.defaults(budget, dict(given))
        for k, v in self.params.items():
            if k in self.other_params:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{self.name} parameter {k} must be a positive int, got {v!r}")
        if not isinstance(self.params.get("coupled", True), bool):
            raise ValueError(f"{self.name} parameter coupled must be True or False, got {self.params['coupled']!r}")

    @property
    def coupled(self) -> bool:
        """Sampled drafts are coupled to the target's draws (the draft ranks candidates by
        ``q / E`` with the request's position noise ``E``; see ``sampling.coupled_children``)."""
        return bool(self.params.get("coupled", False))

    def defaults(self, budget: int, p: dict) -> dict:
        return p

    def verify_rows(self, budget: int) -> int:
        """Most tokens one request's verification writes (the root included)."""
        raise NotImplementedError

    def draft_slots(self) -> int:
        """Most draft tree-region slots one request uses per pass (what its draft cache must
        hold past the text)."""
        raise NotImplementedError

    def pass_shape(self, budget: int, n_requests: int = 1) -> PassShape:
        raise NotImplementedError

    def settings(self) -> tuple[str, str]:
        """(this method's size settings, what to lower), for error messages."""
        return "", "load the model with a smaller max_len"

    def grow(self, ctx: PassContext) -> list:
        """The ``(VerifyTree, extra)`` of each request of the pass (``extra`` is what ``accept``
        needs besides the tree, or None)."""
        raise NotImplementedError

    def accept(self, tree: VerifyTree, extra, p: torch.Tensor, gen, params, noise=None) -> tuple:
        """(deepest accepted row, bonus token, the target's draw at every row or None), the
        first two 0-dim int64 on the device, the draws int64 ``[n]``. ``p``: the target's
        processed distributions of the tree's rows ``[n, V]`` (greedy: its logits, whose argmax
        is the same). The SpecExec walk is exact for any tree; with greedy decoding every method
        reduces to it. ``noise``: for a sampled walk, float ``[n, V]`` Exp(1) noise, each row's
        the noise of the position its draw fills (sampling.PositionNoise: the text does not
        depend on the tree); None: draw with ``gen``."""
        if params.greedy:
            draws = argmax_rows(p)
        elif noise is not None:
            draws = sampling.sample_with_noise(p, noise)
        else:
            draws = sampling.sample(p, gen)
        last = _tree.walk_accept(tree, draws)   # module lookup: tests swap in a broken walk
        return last, draws[last], draws


class Autoregressive(Method):
    name = "autoregressive"
    needs_draft = False

    def verify_rows(self, budget: int) -> int:
        return 1

    def draft_slots(self) -> int:
        return 0

    def pass_shape(self, budget: int, n_requests: int = 1) -> PassShape:
        return PassShape(1, n_requests=n_requests, noise_rows=noise_ring_rows(1))

    def grow(self, ctx: PassContext) -> list:
        return [(ChainTree(1, ctx.device, r.root).compact(), None) for r in ctx.requests]


class _Chains(Method):
    """Chain and SpecInfer: ``n`` root candidates, each continued to a chain of ``depth``.
    Node of chain j at depth i (1-based) is ``1 + (i - 1) * n + j``.

    Greedy: the draft's top-n, continued by its argmax. Sampled, ``coupled=True``: the top-n of
    the exponential race ``q / E`` with the request's position noise (the first is the draft's
    own draw coupled to the target's), continued by ``argmax(q / E)``; verified by the SpecExec
    walk with the same noise, so the text is the target's own sampled text for the seed.
    Sampled, ``coupled=False``: candidates drawn without replacement from ``q`` with the
    request's generator and chains sampled from ``q``, verified by (multi-candidate) rejection
    sampling (Leviathan / Chen; SpecInfer)."""

    def defaults(self, budget: int, p: dict) -> dict:
        p.setdefault("coupled", True)
        return p

    def _n_depth(self) -> tuple[int, int]:
        raise NotImplementedError

    def verify_rows(self, budget: int) -> int:
        n, depth = self._n_depth()
        return 1 + n * depth

    def draft_slots(self) -> int:
        n, depth = self._n_depth()
        return 1 + n * (depth - 1)

    def pass_shape(self, budget: int, n_requests: int = 1) -> PassShape:
        n, depth = self._n_depth()
        rows = 1 + n * depth
        return PassShape(rows, n, rows, keeps_draft_probs=not self.coupled, n_requests=n_requests,
                         coupled=self.coupled, noise_rows=noise_ring_rows(depth + 1))

    def grow(self, ctx: PassContext) -> list:
        dev, drafter = ctx.device, ctx.drafter
        n_cfg, depth_cfg = self._n_depth()
        n = min(n_cfg, drafter.model.vocab_size)
        depths = [min(depth_cfg, r.remaining) for r in ctx.requests]
        # One candidate per level: a chain, whose structure is known in advance (ChainTree).
        tree_cls = ChainTree if n == 1 else DraftTree
        drafter.trees = [tree_cls(1 + n * d, dev, r.root) for r, d in zip(ctx.requests, depths)]
        root_logits = drafter.root()
        vocab = root_logits.shape[-1]
        coupled = [self.coupled and not r.params.greedy for r in ctx.requests]
        for r, d, c in zip(ctx.requests, depths, coupled):
            if c:      # the noise rows of the chain's positions, made once per position
                r.noise.ensure(r.root_pos + 1, d, vocab)
        out, tips = [], []
        zero_root = torch.zeros(1, dtype=torch.long, device=dev)
        for i, r in enumerate(ctx.requests):
            depth = depths[i]
            tree = drafter.trees[i]
            q_rows = None
            valid = torch.ones(n, dtype=torch.bool, device=dev)
            if r.params.greedy:
                cands = argmax_rows(root_logits[i]).view(1) if n == 1 else root_logits[i].topk(n).indices
            elif coupled[i]:
                q = process_logits(root_logits[i:i + 1], r.params)
                logk, cands = sampling.coupled_children(q, r.noise.at(r.root_pos + 1, zero_root), n)
                cands, valid = cands[0], logk[0] > NEG_INF
            else:
                q_rows = torch.zeros(1 + n * depth, vocab, device=dev)
                q_rows[0] = process_logits(root_logits[i], r.params)
                cands, valid = sampling.sample_without_replacement(q_rows[0], n, r.gen)
            if n == 1:
                tips.append(tree.add_children(zero_root, cands[None], None))   # a chain keeps no scores
            else:
                zero = torch.zeros(1, n, device=dev)
                tips.append(tree.add_children(zero_root, cands[None],
                                              torch.where(valid[None], zero, zero - float("inf"))))
            # Rejection sampling needs the draft's distributions and candidates; greedy and
            # coupled trees are verified by the walk.
            out.append((q_rows, cands, valid, n, depth) if q_rows is not None else None)
        for level in range(1, max(depths)):
            live = [i for i, d in enumerate(depths) if d > level]
            logits = drafter.step([(i, tips[i]) for i in live])
            for i, lg in zip(live, logits.split(n)):
                r, tree = ctx.requests[i], drafter.trees[i]
                if r.params.greedy:
                    nxt = argmax_rows(lg)
                elif coupled[i]:
                    # Every chain's tip at this level fills the same position: one noise row.
                    e = r.noise.at(r.root_pos + 1, torch.full((1,), level, dtype=torch.long, device=dev))
                    nxt = argmax_rows(process_logits(lg, r.params) / e)
                else:
                    q = process_logits(lg, r.params)
                    out[i][0][tips[i]] = q
                    nxt = sampling.sample(q, r.gen)
                tips[i] = tree.add_children(tips[i], nxt[:, None], None if n == 1 else torch.zeros(n, 1, device=dev))
        result = []
        for i, tree in enumerate(drafter.trees):
            vt = tree.compact() if n == 1 else tree.compact(torch.arange(tree.n_nodes, device=dev))
            result.append((vt, out[i]))
        return result

    def accept(self, tree: VerifyTree, extra, p: torch.Tensor, gen, params, noise=None) -> tuple:
        if extra is None:
            return super().accept(tree, extra, p, gen, params, noise)
        # Multi-candidate rejection at the root, then chain rejection along the accepted
        # candidate's chain (n = 1 is classic speculative sampling). Device-only.
        q_rows, cands, valid, n, depth = extra
        dev = p.device
        acc_j, p_root = sampling.multi_candidate_accept(p[0], q_rows[0], cands, valid, gen)
        rows = 1 + torch.arange(depth, device=dev) * n + acc_j.clamp_min(0)
        n_acc, tok = sampling.chain_accept(p[rows], q_rows[rows[:-1]], tree.tokens[rows[1:]], gen)
        rejected = acc_j < 0
        last = torch.where(rejected, torch.zeros_like(n_acc), rows[n_acc])
        bonus = torch.where(rejected, sampling.sample(p_root, gen), tok)
        return last, bonus, None


class Chain(_Chains):
    name = "chain"
    param_names = ("k", "coupled")
    other_params = ("coupled",)

    def defaults(self, budget: int, p: dict) -> dict:
        p.setdefault("k", min(budget, 8))
        return super().defaults(budget, p)

    def _n_depth(self) -> tuple[int, int]:
        return 1, self.params["k"]

    def settings(self) -> tuple[str, str]:
        return f"k={self.params['k']}", "lower k"


class SpecInfer(_Chains):
    name = "specinfer"
    param_names = ("n", "depth", "coupled")
    other_params = ("coupled",)

    def defaults(self, budget: int, p: dict) -> dict:
        p.setdefault("n", min(budget, 8))
        p.setdefault("depth", max(1, budget // p["n"]))
        return super().defaults(budget, p)

    def _n_depth(self) -> tuple[int, int]:
        return self.params["n"], self.params["depth"]

    def settings(self) -> tuple[str, str]:
        return f"n={self.params['n']}, depth={self.params['depth']}", "lower n or depth"


class SpecExec(Method):
    """Parallel best-first growth (docs/ALGORITHM.md, step 1); deterministic given the draft
    and the tree policy's state (tree_policy.py: ``calibrated`` ranks nodes by the acceptance
    learned from verification, ``softmax`` by the draft's path probability, ``sequoia`` grows
    Sequoia's optimal static shape). With several requests in a pass, one search runs over all
    their trees: each step expands the best ``beams_per_step`` unexpanded nodes of any tree, and
    the pass keeps the best ``budget x requests`` nodes of all trees together (every root
    always), so the budget goes to the requests whose drafts are most likely to be accepted."""

    name = "specexec"
    param_names = ("beams_per_step", "branch_width", "max_depth", "coupled") + tree_policy.POLICY_PARAMS
    other_params = tree_policy.POLICY_PARAMS + ("coupled",)

    def __init__(self, budget: int, given: dict, auto: bool = False, device="cpu"):
        self.auto = auto
        self.user_beams = "beams_per_step" in given
        self.max_budget = budget
        super().__init__(budget, given)
        p = self.params
        self.policy = tree_policy.TreePolicy(p["tree"], device, p["branch_width"], p["growth_temperature"],
                                             p["acceptance"])

    def defaults(self, budget: int, p: dict) -> dict:
        p.setdefault("beams_per_step", min(budget, 32))
        p.setdefault("branch_width", 8)
        p.setdefault("coupled", True)
        return tree_policy.set_defaults(p)     # tree, max_depth, growth_temperature, acceptance

    def beams(self, budget: int) -> int:
        """Nodes expanded per draft step at this budget (auto follows the budget)."""
        if self.auto and not self.user_beams:
            return min(budget, 32)
        return self.params["beams_per_step"]

    def static_beams(self, budget: int, m: int) -> int:
        """Rows of the static draft step that serves a step of ``m`` nodes: the beams, or for
        Sequoia (whose levels vary and are re-planned as the acceptance vector is learned) ``m``
        padded to a power of two, so re-planned shapes reuse the same runners."""
        if self.params["tree"] == "sequoia":
            return 1 << max(0, m - 1).bit_length()
        return self.beams(budget)

    def verify_rows(self, budget: int) -> int:
        return 1 + budget

    def draft_slots(self) -> int:
        # SpecExec grows a smaller tree when the draft's cache runs short; it needs one slot.
        return 1

    def pass_shape(self, budget: int, n_requests: int = 1) -> PassShape:
        p = self.params
        beams = self.beams(budget)
        capacity = 1 + p["max_depth"] * beams * p["branch_width"]
        if p["tree"] == "sequoia":
            # A static shape expands each of its <= budget + 1 nodes at most once, but one level
            # (one draft step) may hold up to budget nodes.
            beams, capacity = budget, 1 + (budget + 1) * p["branch_width"]
        return PassShape(1 + budget, beams, capacity, n_requests=n_requests, coupled=self.coupled,
                         noise_rows=noise_ring_rows(p["max_depth"] + 1))

    def settings(self) -> tuple[str, str]:
        p = self.params
        setting = (f"budget={'auto' if self.auto else self.max_budget}"
                   + (f" (max_budget={self.max_budget})" if self.auto else "")
                   + f", beams_per_step={p['beams_per_step']}, branch_width={p['branch_width']}, "
                     f"max_depth={p['max_depth']}")
        fix = ("lower the budget, or beams_per_step x branch_width x max_depth (the draft tree holds "
               "1 + their product nodes and a bool matrix of that size squared)")
        return setting, fix

    def grow(self, ctx: PassContext) -> list:
        dev, drafter, policy = ctx.device, ctx.drafter, self.policy
        reqs = ctx.requests
        budget = ctx.budget * len(reqs)
        beams, width = self.beams(ctx.budget), self.params["branch_width"]
        depth_cap = [min(r.remaining, ctx.depth) for r in reqs]
        plans = None
        if policy.name == "sequoia":
            plans = [policy.sequoia_plan(r.params, ctx.budget, d) for r, d in zip(reqs, depth_cap)]
            trees = [DraftTree(pl.capacity, dev, r.root) for r, pl in zip(reqs, plans)]
        else:
            trees = [DraftTree(1 + d * beams * width, dev, r.root) for r, d in zip(reqs, depth_cap)]
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
        each level against the cost of its draft call); scaled to integers so they ride in the
        acceptance packet (budget.py). Values are per request: with B trees, the best
        ``B * size`` nodes of all of them, divided by B."""
        b = len(trees)
        scores = torch.cat([t.scores[1:t.n_nodes] for t in trees]) if b > 1 else trees[0].scores[1:trees[0].n_nodes]
        n = int(scores.shape[0]) // b
        pts = controller.eval_points(budget, n)
        if not pts:
            return None
        prob = scores.exp()
        cum = prob.sort(descending=True).values.cumsum(0)
        vals = cum[torch.tensor([b * p - 1 for p in pts], device=dev)] / b
        depths = torch.cat([t.depths[1:t.n_nodes] for t in trees]) if b > 1 else trees[0].depths[1:trees[0].n_nodes]
        alive = torch.cat([t.alive[1:t.n_nodes] for t in trees]) if b > 1 else trees[0].alive[1:trees[0].n_nodes]
        at_depth = torch.zeros(max_depth + 1, device=dev).index_add_(
            0, depths.clamp_max(max_depth), prob * alive)[1:] / b
        return pts, (torch.cat([vals, at_depth]) * CURVE_SCALE).round().long()


METHODS = {m.name: m for m in (Autoregressive, Chain, SpecInfer, SpecExec)}
