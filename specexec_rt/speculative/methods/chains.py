"""Chain and SpecInfer: ``n`` root candidates, each continued as a chain of ``depth`` draft tokens.

- ``Chain``: classic speculative decoding, ``k`` draft tokens per pass (``n = 1``).
- ``SpecInfer``: ``n`` root candidates, each continued as a chain of ``depth``.
"""
from __future__ import annotations

import torch

from .. import sampling
from ..memory import PassShape
from ..sampling import argmax_rows, noise_ring_rows, process_logits
from ..tree import NEG_INF, ChainTree, DraftTree, VerifyTree
from .base import Method, PassContext


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
