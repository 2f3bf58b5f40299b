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

from . import sampling
from . import tree as _tree
from .memory import PassShape
from .sampling import process_logits
from .tree import NEG_INF, DraftTree, VerifyTree, prune_forest

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

    def __init__(self, budget: int, given: dict):
        self.params = self.defaults(budget, dict(given))
        for k, v in self.params.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{self.name} parameter {k} must be a positive int, got {v!r}")

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

    def accept(self, tree: VerifyTree, extra, p: torch.Tensor, gen, params) -> tuple:
        """(deepest accepted row, bonus token), both 0-dim int64 on the device. ``p``: the
        target's processed distributions of the tree's rows ``[n, V]``. The SpecExec walk is
        exact for any tree; with greedy decoding every method reduces to it."""
        draws = p.argmax(-1) if params.greedy else sampling.sample(p, gen)
        last = _tree.walk_accept(tree, draws)   # module lookup: tests swap in a broken walk
        return last, draws[last]


class Autoregressive(Method):
    name = "autoregressive"
    needs_draft = False

    def verify_rows(self, budget: int) -> int:
        return 1

    def draft_slots(self) -> int:
        return 0

    def pass_shape(self, budget: int, n_requests: int = 1) -> PassShape:
        return PassShape(1, n_requests=n_requests)

    def grow(self, ctx: PassContext) -> list:
        zero = torch.zeros(1, dtype=torch.long, device=ctx.device)
        return [(DraftTree(1, ctx.device, r.root).compact(zero), None) for r in ctx.requests]


class _Chains(Method):
    """Chain and SpecInfer: ``n`` root candidates (greedy: the draft's top-n; sampling: drawn
    without replacement from the processed draft distribution), each continued to a chain.
    Node of chain j at depth i (1-based) is ``1 + (i - 1) * n + j``."""

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
        return PassShape(rows, n, rows, keeps_draft_probs=True, n_requests=n_requests)

    def grow(self, ctx: PassContext) -> list:
        dev, drafter = ctx.device, ctx.drafter
        n_cfg, depth_cfg = self._n_depth()
        n = min(n_cfg, drafter.model.vocab_size)
        depths = [min(depth_cfg, r.remaining) for r in ctx.requests]
        drafter.trees = [DraftTree(1 + n * d, dev, r.root) for r, d in zip(ctx.requests, depths)]
        root_logits = drafter.root()
        out, tips = [], []
        zero_root = torch.zeros(1, dtype=torch.long, device=dev)
        for i, r in enumerate(ctx.requests):
            depth = depths[i]
            tree = drafter.trees[i]
            q_rows = None
            if r.params.greedy:
                cands, valid = root_logits[i].topk(n).indices, torch.ones(n, dtype=torch.bool, device=dev)
            else:
                q_rows = torch.zeros(1 + n * depth, root_logits.shape[-1], device=dev)
                q_rows[0] = process_logits(root_logits[i], r.params)
                cands, valid = sampling.sample_without_replacement(q_rows[0], n, r.gen)
            zero = torch.zeros(1, n, device=dev)
            tips.append(tree.add_children(zero_root, cands[None], torch.where(valid[None], zero, zero - float("inf"))))
            out.append([q_rows, cands, valid, n, depth])
        for level in range(1, max(depths)):
            live = [i for i, d in enumerate(depths) if d > level]
            logits = drafter.step([(i, tips[i]) for i in live])
            for i, lg in zip(live, logits.split(n)):
                r, tree, q_rows = ctx.requests[i], drafter.trees[i], out[i][0]
                if r.params.greedy:
                    nxt = lg.argmax(-1)
                else:
                    q = process_logits(lg, r.params)
                    q_rows[tips[i]] = q
                    nxt = sampling.sample(q, r.gen)
                tips[i] = tree.add_children(tips[i], nxt[:, None], torch.zeros(n, 1, device=dev))
        result = []
        for i, tree in enumerate(drafter.trees):
            vt = tree.compact(torch.arange(tree.n_nodes, device=dev))
            result.append((vt, tuple(out[i])))
        return result

    def accept(self, tree: VerifyTree, extra, p: torch.Tensor, gen, params) -> tuple:
        if params.greedy:
            return super().accept(tree, extra, p, gen, params)
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
        return last, bonus


class Chain(_Chains):
    name = "chain"
    param_names = ("k",)

    def defaults(self, budget: int, p: dict) -> dict:
        p.setdefault("k", min(budget, 8))
        return p

    def _n_depth(self) -> tuple[int, int]:
        return 1, self.params["k"]

    def settings(self) -> tuple[str, str]:
        return f"k={self.params['k']}", "lower k"


class SpecInfer(_Chains):
    name = "specinfer"
    param_names = ("n", "depth")

    def defaults(self, budget: int, p: dict) -> dict:
        p.setdefault("n", min(budget, 8))
        p.setdefault("depth", max(1, budget // p["n"]))
        return p

    def _n_depth(self) -> tuple[int, int]:
        return self.params["n"], self.params["depth"]

    def settings(self) -> tuple[str, str]:
        return f"n={self.params['n']}, depth={self.params['depth']}", "lower n or depth"


class SpecExec(Method):
    """Parallel best-first growth (docs/ALGORITHM.md, step 1); deterministic given the draft.
    With several requests in a pass, one search runs over all their trees: each step expands
    the best ``beams_per_step`` unexpanded nodes of any tree, and the pass keeps the best
    ``budget x requests`` nodes of all trees together (every root always), so the budget goes
    to the requests whose drafts are most likely to be accepted."""

    name = "specexec"
    param_names = ("beams_per_step", "branch_width", "max_depth")

    def __init__(self, budget: int, given: dict, auto: bool = False):
        self.auto = auto
        self.user_beams = "beams_per_step" in given
        self.max_budget = budget
        super().__init__(budget, given)

    def defaults(self, budget: int, p: dict) -> dict:
        p.setdefault("beams_per_step", min(budget, 32))
        p.setdefault("branch_width", 8)
        p.setdefault("max_depth", 16)
        return p

    def beams(self, budget: int) -> int:
        """Nodes expanded per draft step at this budget (auto follows the budget)."""
        if self.auto and not self.user_beams:
            return min(budget, 32)
        return self.params["beams_per_step"]

    def verify_rows(self, budget: int) -> int:
        return 1 + budget

    def draft_slots(self) -> int:
        # SpecExec grows a smaller tree when the draft's cache runs short; it needs one slot.
        return 1

    def max_draft_slots(self) -> int:
        p = self.params
        return 1 + (p["max_depth"] - 1) * p["beams_per_step"]

    def pass_shape(self, budget: int, n_requests: int = 1) -> PassShape:
        p = self.params
        beams = self.beams(budget)
        capacity = 1 + p["max_depth"] * beams * p["branch_width"]
        return PassShape(1 + budget, beams, capacity, n_requests=n_requests)

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
        dev, drafter = ctx.device, ctx.drafter
        reqs = ctx.requests
        budget = ctx.budget * len(reqs)
        beams, width = self.beams(ctx.budget), self.params["branch_width"]
        depth_cap = [min(r.remaining, ctx.depth) for r in reqs]
        drafter.trees = trees = [DraftTree(1 + d * beams * width, dev, r.root) for r, d in zip(reqs, depth_cap)]
        temps = [r.params.temperature if r.params.temperature > 0 else 1.0 for r in reqs]
        same_temp = len(set(temps)) == 1

        def expand(parts, logits):
            if same_temp:
                logq = torch.log_softmax(logits.float() / temps[0], dim=-1)
            else:
                t = torch.tensor([temps[i] for i, nodes in parts for _ in range(int(nodes.shape[0]))], device=dev)
                logq = torch.log_softmax(logits.float() / t[:, None], dim=-1)
            vals, toks = logq.topk(min(width, logq.shape[-1]), dim=-1)
            row = 0
            for i, nodes in parts:
                m = int(nodes.shape[0])
                trees[i].add_children(nodes, toks[row:row + m], vals[row:row + m])
                row += m
            return prune_forest(trees, budget)

        zero = torch.zeros(1, dtype=torch.long, device=dev)
        root_logits = drafter.root()
        threshold = expand([(i, zero) for i in range(len(reqs))], root_logits)
        for step in range(1, max(depth_cap)):
            # Near the end of a draft cache the tree just grows less (still exact).
            rooms = [drafter.room(i) for i in range(len(reqs))]
            if len(reqs) == 1:
                if rooms[0] <= 0:
                    break
                cand = trees[0].candidates(threshold, depth_cap[0])
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
                cands = [trees[i].candidates(threshold, depth_cap[i]) for i in live]
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
        # One read for every tree's size: then each tree's alive nodes without another sync.
        alive = [t.alive[:t.n_nodes] for t in trees]
        counts = ctx.host(torch.stack([a.sum() for a in alive]))
        if self.auto and ctx.controller is not None:
            ctx.curve = self.prediction_curve(trees, ctx.controller, ctx.budget, dev)
        out = []
        for t, a, c in zip(trees, alive, counts):
            nodes = torch.argsort((~a).to(torch.int8), stable=True)[:c]   # alive first, in index order
            out.append((t.compact(nodes), None))
        return out

    @staticmethod
    def prediction_curve(trees: list, controller, budget: int, dev):
        """(sizes, device int64 values): the expected accepted draft tokens of the best ``size``
        nodes created (sum of their path probabilities), at the controller's sizes; scaled to
        integers so they ride in the acceptance packet (budget.py). Sizes and values are per
        request: with B trees, the best ``B * size`` nodes of all of them, divided by B."""
        b = len(trees)
        scores = torch.cat([t.scores[1:t.n_nodes] for t in trees]) if b > 1 else trees[0].scores[1:trees[0].n_nodes]
        n = int(scores.shape[0]) // b
        pts = controller.eval_points(budget, n)
        if not pts:
            return None
        cum = scores.exp().sort(descending=True).values.cumsum(0)
        vals = cum[torch.tensor([b * p - 1 for p in pts], device=dev)] / b
        return pts, (vals * CURVE_SCALE).round().long()


METHODS = {m.name: m for m in (Autoregressive, Chain, SpecInfer, SpecExec)}
