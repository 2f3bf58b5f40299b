"""Running the draft model for the requests of one pass: one draft call per tree level for all
of them (their new tokens concatenated, each attending to its own cache region).

- ``root``: every request's pending chain (the tokens its draft cache has not seen yet,
  ending with the root: the whole prompt for a new request) as one batched causal forward;
  returns each request's root logits. The root's K/V land in slot 0 of its tree region.
- ``step``: the nodes each request expands at this level, as one batched tree forward
  (each node sees its request's committed prefix and its own ancestors).

A pass with one request in an engine of one cache region may run its steps through the
static-shape runner (``draft_graph.StaticDraftStep``: a CUDA graph on a GPU).
"""
from __future__ import annotations

import torch

from ..model import Segment, forward_segments


class Drafter:
    """The draft side of one pass. ``requests[i]`` owns ``trees[i]`` (a ``DraftTree`` rooted at
    its root token, made by the method before ``root``); ``bases[i]`` is the first slot of its
    region in ``cache``. ``runner``: None, or ``runner(m)`` -> the static draft step serving a
    step of ``m`` nodes (or None)."""

    def __init__(self, model, cache, requests: list, bases: list, region_len: int, stats: list, runner=None):
        self.model = model
        self.cache = cache
        self.requests = requests
        self.trees: list = []
        self.bases = bases
        self.region_len = region_len
        self.stats = stats            # each request's GenerationStats (draft calls are charged to all)
        self.runner = runner
        self.device = model.device
        self.calls = 0                # draft calls of this pass

    def root(self) -> torch.Tensor:
        """Feed every request's pending chain; returns root logits ``[B, V]``."""
        dev = self.device
        tokens, positions, segs, last = [], [], [], []
        row = 0
        for r, base in zip(self.requests, self.bases):
            pend = r.pending
            n = len(pend)
            tokens += pend
            positions.append(torch.arange(r.dp, r.dp + n, device=dev))
            segs.append(Segment(n, base, r.dp))
            row += n
            last.append(row - 1)
        toks = torch.tensor(tokens, device=dev)
        pos = torch.cat(positions) if len(positions) > 1 else positions[0]
        rows = torch.tensor(last, device=dev)
        logits = forward_segments(self.model, toks, pos, self.cache, segs, logits_rows=rows)
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        for r, tree in zip(self.requests, self.trees):
            r.dp += len(r.pending) - 1
            r.pending = []
            tree.mark_expanded(zero)
        self._count()
        return logits

    def _count(self, static: bool = False) -> None:
        self.calls += 1
        for s in self.stats:
            s.draft_calls += 1
            s.static_draft_calls += static

    def room(self, i: int) -> int:
        """Draft tree-region slots request ``i`` can still use this pass."""
        return self.region_len - self.requests[i].dp - self.trees[i].n_draft_slots

    def step(self, parts: list) -> torch.Tensor:
        """One draft call over ``parts``: ``(i, nodes)`` pairs (request index, int64 node indices
        of its tree, host-known length), in request order. Returns logits ``[sum m, V]`` in the
        same row order."""
        if len(parts) == 1 and self.runner is not None:
            i, nodes = parts[0]
            r, tree = self.requests[i], self.trees[i]
            slots = tree.mark_expanded(nodes)
            runner = self.runner(int(nodes.shape[0]))
            if runner is not None and runner.fits(r.dp, tree.n_draft_slots):
                logits = runner(tree.tokens[nodes], r.dp + tree.depths[nodes], r.dp + slots,
                                tree.draft_mask(nodes), r.dp)
                self._count(static=True)
                return logits
            return self._forward([(i, nodes, slots)])
        return self._forward([(i, nodes, self.trees[i].mark_expanded(nodes)) for i, nodes in parts])

    def _forward(self, parts: list) -> torch.Tensor:
        tokens, positions, segs = [], [], []
        for i, nodes, slots in parts:
            r, tree, base = self.requests[i], self.trees[i], self.bases[i]
            tokens.append(tree.tokens[nodes])
            positions.append(r.dp + tree.depths[nodes])
            segs.append(Segment(int(nodes.shape[0]), base, r.dp, tree_mask=tree.draft_mask(nodes),
                                cache_slots=base + r.dp + slots))
        if len(segs) > 1:
            tokens, positions = [torch.cat(tokens)], [torch.cat(positions)]
        logits = forward_segments(self.model, tokens[0], positions[0], self.cache, segs)
        self._count()
        return logits
