"""The scheduler: which requests a pass serves and how, and what the pass's results mean for them.

It owns the requests: the waiting queue (FIFO), the running requests (each in a cache region of
its own: ``max_batch`` regions), the free regions, and every request's progress, text and end.
Each pass it emits a plain ``SchedulerOutput``:

- admission: queued requests take free regions; cancelled ones leave;
- prefill chunking: at most ``prefill_chunk`` prompt tokens ride in one pass; a request whose
  pending prompt fits the pass's room verifies a tree behind it, the first one that does not
  gets the rest of the room as a prompt chunk and no tree;
- the method, budget and depth of the pass: the engine's own, or ``budget="auto"``'s choice
  (``AutoBudget``).

After the runner has run it (``RunnerOutput``), ``update`` counts each request's stats, adds its
new tokens to its text (stop strings, EOS, ``max_new_tokens``: detok.TextTracker), hands the
text piece to the request's handle or callback, feeds auto's cost fits, and ends the requests
that are done. Threads: ``cond`` guards the queue, the regions and every request's ``pieces``
/ ``done`` / ``error``; everything else is touched only by the thread running the pass.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Optional

from ..errors import NonFiniteLogitsError
from .methods import Method
from .request import GenerationResult, Request


@dataclass
class SchedulerOutput:
    """What one pass runs (host values only; the runner executes it).

    tree_requests: the requests that verify a tree this pass, each with whatever of its prompt
    is not in the target cache yet riding in front of its tree; prefill_chunks: ``(request, n)``
    for a request whose prompt does not fit this pass's room: ``n`` of its prompt tokens are
    prefilled, no tree; method: what grows the trees (the engine's method, or what
    ``budget="auto"`` switched this pass to); budget, depth: the trees' size and depth cap;
    controller: ``budget="auto"``'s ``BudgetController`` (the trees report their prediction
    curve for it), else None. The rest is what auto's cost fits need to know about the pass:
    first_trees (a request's first tree: its draft time includes the prompt's prefill),
    carries_prompt (the target pass carries prompt tokens), catch_up (the longest chain a
    draft reads before drafting), context (the tree requests' mean prefix length: what each
    row of the pass attends to)."""

    tree_requests: list
    prefill_chunks: list
    method: Method
    budget: int
    depth: int
    controller: Optional[object] = None
    first_trees: bool = False
    carries_prompt: bool = False
    catch_up: int = 0
    context: int = 0


class Scheduler:
    """See the module docstring. ``method``: the engine's decoding method; ``max_budget``: its
    trees' budget (auto: the ceiling); ``auto``: the ``AutoBudget`` under ``budget="auto"``."""

    def __init__(self, method: Method, max_batch: int, prefill_chunk: int, max_budget: int, auto=None):
        self.method = method
        self.prefill_chunk = prefill_chunk
        self.max_budget = max_budget
        self.auto = auto
        self.cond = threading.Condition()
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.free = list(range(max_batch))
        self._done_callbacks: list = []    # (on_update, last piece) of requests just finished
        self.last_finished: Optional[Request] = None
        self._pauses = 0                   # no pass starts while any pause() is unmatched

    # ------------------------------------------------------------------ any thread
    def add(self, *reqs: Request) -> None:
        """Queue requests (several at once: all or none, under one lock)."""
        with self.cond:
            self.waiting.extend(reqs)
            self.cond.notify_all()

    def cancel(self, req: Request) -> None:
        """A queued request ends now; a running one at the start of the next pass."""
        with self.cond:
            if req.done:
                return
            req.cancelled = True
            if req in self.waiting:
                self.waiting.remove(req)
                self._finish(req, "cancelled")
            self.cond.notify_all()
        self.deliver()

    @property
    def counts(self) -> tuple[int, int]:
        """(running requests, waiting requests)."""
        with self.cond:
            return len(self.running), len(self.waiting)

    def pause(self) -> None:
        """No pass starts until the matching ``resume`` (the one in flight finishes): what a
        server uses to hold the engine busy. Requests can still be added and cancelled."""
        with self.cond:
            self._pauses += 1

    def resume(self) -> None:
        with self.cond:
            self._pauses -= 1
            self.cond.notify_all()

    def wait_for_work(self, timeout: Optional[float]) -> bool:
        """Whether a pass has requests to serve, waiting up to ``timeout`` seconds (None: forever)
        for one (always False while paused)."""
        with self.cond:
            if self._pauses or not (self.waiting or self.running):
                self.cond.wait(timeout)
            return not self._pauses and bool(self.waiting or self.running)

    def take_news(self, req: Request) -> Optional[tuple[list, bool]]:
        """``req``'s text pieces not yet handed out and whether it is done, or None: nothing new."""
        with self.cond:
            if not (req.pieces or req.done):
                return None
            pieces, req.pieces = req.pieces, []
            return pieces, req.done

    def has_news(self, req: Request) -> bool:
        with self.cond:
            return bool(req.pieces) or req.done

    def wait_for_news(self, req: Request, timeout: float) -> None:
        """Wait (up to ``timeout`` s) for a pass that another thread runs."""
        with self.cond:
            if not (req.pieces or req.done):
                self.cond.wait(timeout)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def deliver(self) -> None:
        """Run the done-callbacks of requests that finished, outside ``cond`` (a callback may take
        locks of its own)."""
        with self.cond:
            calls, self._done_callbacks = self._done_callbacks, []
        for on_update, piece in calls:
            on_update(piece, True)

    # ------------------------------------------------------------------ the pass thread
    def admit(self) -> list:
        """Drop cancelled requests, admit queued ones into free regions; the running requests
        (none while paused: no pass)."""
        with self.cond:
            if self._pauses:
                return []
            for r in [r for r in self.running if r.cancelled]:
                self._finish(r, "cancelled")
            while self.waiting and self.free:
                r = self.waiting.popleft()
                r.region = self.free.pop(0)
                self.running.append(r)
            return list(self.running)

    def schedule(self, reqs: list) -> SchedulerOutput:
        """The pass for the running requests ``reqs``: which verify a tree, which prefill a prompt
        chunk, and the method, budget and depth of the trees."""
        room = self.prefill_chunk
        trees, chunks = [], []
        for r in reqs:
            c = len(r.t_pending)
            if c <= room:
                trees.append(r)
                room -= c
            elif room > 0:
                chunks.append((r, room))
                room = 0
        catch_up = max([len(r.pending) for r in trees] or [0])
        context = sum(r.root_pos for r in trees) // len(trees) if trees else 0
        method, budget, depth = self.method, self.max_budget, self.method.params.get("max_depth", 0)
        if trees and self.auto is not None:
            method, budget, depth = self.auto.plan(trees, catch_up, context)
        return SchedulerOutput(trees, chunks, method, budget, depth,
                               controller=self.auto.controller if self.auto is not None else None,
                               first_trees=any(r.stats.target_passes == 0 for r in trees),
                               carries_prompt=any(r.t_pending for r in trees) or bool(chunks), catch_up=catch_up,
                               context=context)

    def update(self, out: SchedulerOutput, run) -> None:
        """Count the pass ``run`` (runner.RunnerOutput) into every request's stats and text, feed
        auto, end the requests that are done."""
        accepted, finished = [], []
        for res in run.results:
            r = res.request
            if not res.finite:
                finished.append((r, NonFiniteLogitsError(
                    f"the target model produced NaN/inf logits in a verification pass (method={self.method.name}); "
                    f"its weights or activations are not finite (a corrupt checkpoint, or an overflow in a "
                    f"low-precision dtype)")))
                continue
            new = res.new_tokens()
            if res.grown:     # a root verified alone (its draft not ready) says nothing about the trees
                accepted.append(res.accepted)
            self._count(r.stats, out, run, res.tree_size, len(new))
            r.produced += len(new)
            r.committed.extend(new)
            piece = r.tracker.add(new)
            with self.cond:
                r.pieces.append(piece)
            if r.tracker.finish_reason:
                r.final_piece = piece        # delivered with the done signal
                finished.append((r, None))
            elif r.on_update is not None:
                r.on_update(piece, False)
        for r, _ in out.prefill_chunks:
            r.stats.prefill_seconds += run.target_seconds
        if self.auto is not None and accepted:
            self.auto.observe(out, run, accepted)
        with self.cond:
            for r, err in finished:
                self._finish(r, r.tracker.finish_reason or "error", err)
            self.cond.notify_all()

    def _count(self, s, out: SchedulerOutput, run, tree_size: int, n_new: int) -> None:
        s.draft_seconds += run.draft_seconds
        s.target_seconds += run.target_seconds
        s.target_passes += 1
        s.tree_tokens += tree_size
        s.tokens_per_pass_histogram[n_new] = s.tokens_per_pass_histogram.get(n_new, 0) + 1
        s.syncs += run.syncs
        s.max_syncs_per_pass = max(s.max_syncs_per_pass, run.syncs)
        s.batch_sizes.append(len(out.tree_requests))
        if self.method.supports_auto:
            s.budgets.append(out.budget)
        s.modes.append(out.method.name)

    def fail(self, reqs: list, error: BaseException) -> None:
        """A pass over ``reqs`` raised ``error``: each of them ends with it."""
        with self.cond:
            for r in reqs:
                self._finish(r, "error", error)

    def _finish(self, req: Request, reason: str, error: Optional[BaseException] = None) -> None:
        """Under ``cond``: the request is done; its region is free again."""
        if req.done:
            return
        req.stats.wall_seconds = time.perf_counter() - req.submitted
        if error is None:
            req.stats.finish_reason = req.stats.finish_reason or reason
            req.stats.new_tokens = len(req.tracker.token_ids)
            req.result = GenerationResult(token_ids=list(req.tracker.token_ids), text=req.tracker.text, stats=req.stats)
        req.error = error
        req.done = True
        if req.on_update is not None:
            # The last piece (text made safe by the end) goes with the done signal, once the
            # lock is released (deliver).
            self._done_callbacks.append((req.on_update, req.final_piece if error is None else ""))
        if req in self.running:
            self.running.remove(req)
        if req.region is not None:
            self.free.append(req.region)
            self.free.sort()
            req.region = None
        self.last_finished = req
