"""The runner: one pass on the device, as the scheduler decided it (``SchedulerOutput``).

    grow          the pass's method grows every tree request's draft tree (Drafter: one draft
                  call for the pending chains, then one per tree level for all requests)
    verify        one target forward over every prompt chunk, then every tree behind whatever
                  prompt still rides with it (each request sees only its own cache region)
    accept        each request's method accepts exactly from its own tree (its own sampling
                  parameters, generator and position noise)
    read          every request's accepted path, bonus token, finiteness and the method's
                  evidence, and auto's prediction curve: one host sync (``packet.Packet``)
    commit        the accepted paths into both caches, one index copy per cache

It returns one typed ``PassResult`` per tree request (host values) in a ``RunnerOutput`` with the
pass's timings and sync count. The runner owns the device side: the KV caches (one region of
``max_len`` slots per request slot), the static draft steps, and each request's cache
bookkeeping (``tp``, ``t_pending``, ``dp``, ``pending``: request.py).

A draft derived from the target (drafts.py, ``share_cache``) has no cache: the runner hands it
the target's, whose regions it reads (the committed prefix) and whose scratch slots past the
prefix hold its tree until the verification overwrites them (``shares_cache``). Nothing of the
draft's is committed, and a request whose prompt is not in the target cache yet verifies its
root alone (``Request.draft_ready``).

Host syncs per pass: one per draft step of a best-first search (how many nodes it expands),
one for the trees' sizes, one for the packet; ``RunnerOutput.syncs`` counts them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..model import Segment, causal_mask, forward_segments
from .drafting import Drafter
from .drafts import reads_target_cache
from .methods import Autoregressive, Method, PassContext
from .packet import Packet, from_fixed, to_fixed
from .request import Request
from .sampling import process_logits
from .tree import path_rows


class HostReads:
    """Every device -> host read of a pass goes through here, so its syncs are counted."""

    def __init__(self):
        self.count = 0

    def __call__(self, t: torch.Tensor) -> list:
        self.count += 1
        return t.tolist()


@dataclass
class PassResult:
    """What verification decided for one request (host values, from the pass's one read).

    tokens: the accepted path's tokens, the root first (``accepted`` draft tokens follow it);
    bonus: the target's draw where the walk stopped; finite: False when the target's logits of
    the request's tree were NaN or inf (the request fails); tree_size: rows verified; grown:
    False when the pass's method grew no tree for it (its draft was not ready: the root alone)."""

    request: Request
    tokens: list
    bonus: int
    finite: bool
    tree_size: int
    grown: bool = True

    @property
    def accepted(self) -> int:
        """Draft tokens accepted."""
        return len(self.tokens) - 1

    def new_tokens(self) -> list:
        """The tokens the pass adds to the request's text: the accepted draft tokens, then the bonus."""
        return self.tokens[1:] + [self.bonus]


@dataclass
class RunnerOutput:
    """One pass: a ``PassResult`` per tree request (the scheduler output's order), the growth's
    and the verification's seconds (the verification includes acceptance, the read and the
    commits), host syncs, draft calls, rows verified, and ``curve``: auto's prediction curve of
    the trees, ``(sizes, values)`` (``SpecExec.prediction_curve``), or None."""

    results: list
    draft_seconds: float
    target_seconds: float
    syncs: int
    draft_calls: int
    n_verified: int
    curve: Optional[tuple] = None


class Runner:
    """Runs passes for an engine of ``max_batch`` request slots. ``method``: the engine's own
    method (the one static draft steps serve); ``static_draft``: run SpecExec's draft steps
    through static-shape steps (CUDA graphs) when a pass has one request."""

    def __init__(self, target, draft, method: Method, max_batch: int, static_draft: bool):
        self.target, self.draft, self.method = target, draft, method
        self.device = target.device
        self.max_batch = max_batch
        self.static_draft = static_draft
        self.region_len = target.max_len
        # A draft derived from the target reads the target's cache (its regions, its scratch).
        self.shares_cache = reads_target_cache(draft, target)
        self.draft_region_len = 0 if draft is None else self.region_len if self.shares_cache else draft.max_len
        self._pools: dict = {}
        self._static_steps: dict = {}     # beams -> StaticDraftStep (None: the cache is too short)

    # ------------------------------------------------------------------ caches
    @property
    def target_cache(self):
        """The target's KV cache holding every request's region."""
        return self._pool(self.target)

    @property
    def draft_cache(self):
        """The cache the draft runs on: its own (regions of ``draft_region_len`` slots), or the
        target's when it reads the target's cache."""
        if self.draft is None:
            return None
        return self.target_cache if self.shares_cache else self._pool(self.draft)

    def _pool(self, model):
        # One slot: the model's own cache; more: a pool of max_batch regions, allocated once.
        if self.max_batch == 1:
            return model.cache
        if id(model) not in self._pools:
            self._pools[id(model)] = model.new_cache(self.max_batch * model.max_len)
        return self._pools[id(model)]

    @staticmethod
    def _move(cache, src: list, dst: list) -> None:
        # A chain's (and a plain pass's) accepted path is already where it belongs.
        if src == dst:
            return
        if src:
            dev = cache.device
            cache.move(torch.tensor(src, device=dev), torch.tensor(dst, device=dev))

    # ------------------------------------------------------------------ static draft steps
    @property
    def static_steps(self) -> list:
        """The static draft steps made so far (``draft_graph.StaticDraftStep``), one per beams value."""
        return [s for s in self._static_steps.values() if s is not None]

    def _static_step_for(self, n_tree_requests: int, budget: int):
        """``m -> StaticDraftStep`` (or None) for a pass of one request at ``budget``, or None."""
        if not self.static_draft or n_tree_requests != 1:
            return None
        return lambda m: self._static_step(self.method.static_beams(budget, m))

    def _static_step(self, beams: int):
        if beams not in self._static_steps:
            from .draft_graph import StaticDraftStep

            # The tree region of 16 full-beam steps (deeper passes rarely fill every step; a step
            # past the region runs dynamically).
            width = 1 + (min(self.method.params["max_depth"], 16) - 1) * beams
            fits = self.draft.max_len >= beams + width + 1
            self._static_steps[beams] = StaticDraftStep(self.draft, beams, width, cache=self.draft_cache) \
                if fits else None
        return self._static_steps[beams]

    # ------------------------------------------------------------------ growth
    def _drafter(self, reqs: list, method: Method, budget: int, stats: list) -> Optional[Drafter]:
        if self.draft is None or not method.needs_draft:
            return None
        bases = [r.region * self.draft_region_len for r in reqs]
        static = self._static_step_for(len(reqs), budget) if method is self.method else None
        return Drafter(self.draft, self.draft_cache, reqs, bases, self.draft_region_len, stats, static)

    def grow_only(self, reqs: list, budget: int, depth: int, stats) -> tuple[list, int]:
        """The engine's method grows ``reqs``' trees, nothing verified or committed (benchmarks
        of the drafting cost); ``(trees, host syncs)``, draft calls charged to ``stats``."""
        reads = HostReads()
        ctx = PassContext(reqs, self._drafter(reqs, self.method, budget, [stats]), reads, self.device, budget, depth)
        return [vt for vt, _ in self.method.grow(ctx)], reads.count

    # ------------------------------------------------------------------ one pass
    def execute(self, out) -> RunnerOutput:
        """Run the pass ``out`` (scheduler.SchedulerOutput) and commit it."""
        reads = HostReads()
        t0 = time.perf_counter()
        ready = [r.draft_ready for r in out.tree_requests]
        grown, drafter, ctx = self._grow(out, ready, reads)
        t1 = time.perf_counter()
        logits = self._verify(out, grown)
        packet = Packet()
        accepted = self._accept(out, grown, logits, packet)
        curve_at = packet.add(to_fixed(ctx.curve[1])) if ctx is not None and ctx.curve is not None else None
        h = packet.read(reads)
        results = self._commit(out, grown, ready, accepted, h, drafter is not None)
        t2 = time.perf_counter()
        return RunnerOutput(results, t1 - t0, t2 - t1, reads.count, drafter.calls if drafter is not None else 0,
                            sum(res.tree_size for res in results),
                            (ctx.curve[0], from_fixed(h[curve_at])) if curve_at is not None else None)

    def _grow(self, out, ready: list, reads: HostReads) -> tuple:
        """The pass's trees, in ``out.tree_requests``' order: the method grows those whose draft
        is ready (``ready[i]``); the others get what it grows without a draft (prompt lookup), or
        their root alone. Returns ``(grown, drafter or None, the growth's PassContext or None)``."""
        reqs = out.tree_requests
        growing = [r for r, ok in zip(reqs, ready) if ok]
        drafter, ctx, grown = None, None, []
        if growing:
            drafter = self._drafter(growing, out.method, out.budget, [r.stats for r in growing])
            ctx = PassContext(growing, drafter, reads, self.device, out.budget, out.depth, out.controller)
            grown = out.method.grow(ctx)
        if len(growing) == len(reqs):
            return grown, drafter, ctx
        waiting = [r for r, ok in zip(reqs, ready) if not ok]
        if out.method.grows_without_draft:
            rest = iter(out.method.grow(PassContext(waiting, None, reads, self.device, out.budget, out.depth)))
        else:
            rest = iter(Autoregressive.root_trees(waiting, self.device))
        trees = iter(grown)
        return [next(trees) if ok else next(rest) for ok in ready], drafter, ctx

    def _verify(self, out, grown: list) -> torch.Tensor:
        """The target pass: prompt chunks, then each tree (behind whatever prompt still rides
        with it). Returns the logits of the trees' rows, in request order."""
        dev = self.device
        segs, toks, poss, logit_rows, row = [], [], [], [], 0
        for r, c in out.prefill_chunks:
            segs.append(Segment(c, r.region * self.region_len, r.tp))
            toks.append(torch.tensor(r.t_pending[:c], device=dev))
            poss.append(torch.arange(r.tp, r.tp + c, device=dev))
            row += c
        for r, (vt, _) in zip(out.tree_requests, grown):
            base, c, n = r.region * self.region_len, len(r.t_pending), vt.n
            if c:
                mask = torch.zeros(c + n, c + n, dtype=torch.bool, device=dev)
                mask[:c, :c] = causal_mask(c, dev)
                mask[c:, :c] = True
                mask[c:, c:] = vt.mask
                segs.append(Segment(c + n, base, r.tp, tree_mask=mask))
                toks.append(torch.tensor(r.t_pending, device=dev))
                poss.append(torch.arange(r.tp, r.tp + c, device=dev))
            else:
                segs.append(Segment(n, base, r.tp, tree_mask=vt.mask))
            toks.append(vt.tokens)
            poss.append(r.tp + c + vt.depths)
            logit_rows.append(torch.arange(row + c, row + c + n, device=dev))
            row += c + n
        token_ids = torch.cat(toks) if len(toks) > 1 else toks[0]
        positions = torch.cat(poss) if len(poss) > 1 else poss[0]
        rows_t = None
        if out.prefill_chunks or any(r.t_pending for r in out.tree_requests):
            rows_t = torch.cat(logit_rows) if logit_rows else torch.zeros(0, dtype=torch.long, device=dev)
        return forward_segments(self.target, token_ids, positions, self.target_cache, segs, rows_t)

    def _accept(self, out, grown: list, logits: torch.Tensor, packet: Packet) -> list:
        """Exact acceptance for each tree, everything the host needs added to ``packet``: per
        request ``(where its path rides, where its evidence rides or None)``."""
        method, offset, where = out.method, 0, []
        for r, (vt, extra) in zip(out.tree_requests, grown):
            n = vt.n
            lg = logits[offset:offset + n]
            offset += n
            # Greedy acceptance only takes each row's argmax, which the logits give as the one-hot
            # of process_logits does (first index on ties), so the one-hot (~0.1 ms per row of a
            # 49k vocabulary on a CPU, and an argmax over it again) is never built.
            p = lg if r.params.greedy else process_logits(lg, r.params)
            noise = None
            if r.noise is not None and extra is None:
                # Row i draws the token at position root + depth_i + 1, with that position's noise.
                bound = min(vt.depth_bound if vt.depth_bound is not None else n - 1, n - 1)
                r.noise.ensure(r.root_pos + 1, bound + 1, p.shape[-1])
                noise = r.noise.at(r.root_pos + 1, vt.depths)
            last, bonus, draws = method.accept(vt, extra, p, r.gen, r.params, noise)
            path = path_rows(vt, last, n)
            lo, hi = torch.aminmax(lg)          # NaN propagates; one pass, no [n, V] temporary
            bad = (~(torch.isfinite(lo) & torch.isfinite(hi))).long()
            path_at = packet.add_all([bad.view(1), vt.depths[last].view(1), bonus.view(1), vt.tokens[path],
                                      vt.draft_slots[path], path])
            # Greedy and coupled trees learn from the draws themselves (acceptance.py).
            ev = method.evidence(vt, p, r.params, last, draws if r.params.greedy or method.coupled else None)
            where.append((path_at, packet.add(ev) if ev is not None else None))
        return where

    def _commit(self, out, grown: list, ready: list, accepted: list, h: list, drafted: bool) -> list:
        """Read each request's result out of ``h``, let the method learn from its evidence, and
        commit every accepted path (and prompt chunk, already in place) into its region: one
        index copy per cache. Returns the ``PassResult``s."""
        t_src, t_dst, results, draft_paths = [], [], [], []
        for r, (vt, _), ok, (path_at, ev_at) in zip(out.tree_requests, grown, ready, accepted):
            n, row = vt.n, h[path_at]
            bad, m, bonus, rest = row[0], row[1], row[2], row[3:]
            if ev_at is not None and not bad:    # only finite passes teach the method
                out.method.learn(r.params, h[ev_at])
            tokens, dslots, path = rest[:m + 1], rest[n:n + m + 1], rest[2 * n:2 * n + m + 1]
            start = r.region * self.region_len + r.tp + len(r.t_pending)
            t_src += [start + j for j in path]
            t_dst += list(range(start, start + m + 1))
            results.append(PassResult(r, tokens, bonus, not bad, n, ok))
            draft_paths.append(dslots)
        self._move(self.target_cache, t_src, t_dst)
        for r, c in out.prefill_chunks:
            r.tp += c
            del r.t_pending[:c]
            if self.shares_cache:
                r.dp = r.tp
        d_src, d_dst = [], []
        for res, dslots in zip(results, draft_paths):
            r, tokens, bonus = res.request, res.tokens, res.bonus
            r.tp += len(r.t_pending) + len(tokens)
            r.t_pending = []
            if self.draft is None:
                r.pending = [bonus]
                continue
            if self.shares_cache:
                # The draft's prefix is the target's: nothing to commit, nothing to catch up on.
                r.dp, r.pending = r.tp, [bonus]
                continue
            if not drafted:
                # No draft call this pass: the draft's cache stays as it was and catches up on
                # these tokens in its next call (its pending chain).
                r.pending += tokens[1:] + [bonus]
                continue
            k = 0
            while k < len(dslots) and dslots[k] >= 0:
                k += 1
            dbase = r.region * self.draft_region_len
            d_src += [dbase + r.dp + s for s in dslots[:k]]
            d_dst += list(range(dbase + r.dp, dbase + r.dp + k))
            r.dp += k
            r.pending = tokens[k:] + [bonus]
        if self.draft is not None:
            self._move(self.draft_cache, d_src, d_dst)
        return results
