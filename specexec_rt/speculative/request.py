"""One generation request: its parameters, its place in the caches, its progress, its results.

A ``Request`` is what the engine's pass loop works on; a ``RequestHandle`` is what callers
hold (``Engine.submit`` returns one): ``stream()`` yields text pieces as passes complete,
``result()`` waits for the ``GenerationResult``, ``cancel()`` frees the request's cache region
at the next pass. Handles are safe to use from any thread; whichever thread waits on a handle
helps run passes (see ``Engine``), so no background thread is needed.

Cache bookkeeping of a request (host ints, no device reads), relative to its region:
- target: slots ``[0, tp)`` hold every committed token except the root and ``t_pending``
  (committed tokens not yet in the target cache: the prompt before its prefill rides in a
  pass); the root (the last committed token) is fed in the next verification pass.
- draft: slots ``[0, dp)`` hold committed tokens; ``pending`` (the rest, ending with the root)
  is fed as a causal chain in the first draft call of the next pass.
- a draft that reads the target's cache (``draft_reads_target``): its prefix is the target's,
  so ``dp == tp`` and ``pending == [root]`` after every pass; it drafts only once the whole
  prompt is in the target cache (``t_pending`` empty): a request's first tree is its root alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .sampling import PositionNoise, SamplingParams


@dataclass
class GenerationStats:
    """target_passes counts verification passes this request took part in (a pass that only
    carried a chunk of its prompt is not one); tokens per pass is new tokens / target passes.
    draft_seconds covers tree growth (including the draft's prompt prefill); target_seconds
    covers verification, acceptance and commits (including the prompt prefill that rode in the
    first pass); with several requests in a pass, each request is charged the whole pass. On
    CUDA both end at a host sync, so they are wall-clock exact."""

    new_tokens: int = 0
    target_passes: int = 0
    draft_calls: int = 0
    static_draft_calls: int = 0                # draft steps run by the static (CUDA-graph) runner
    tree_tokens: int = 0                       # tokens verified, summed over passes
    tokens_per_pass_histogram: dict = field(default_factory=dict)   # tokens emitted -> passes
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    prefill_seconds: float = 0.0               # passes that only carried a chunk of the prompt
    syncs: int = 0
    max_syncs_per_pass: int = 0
    finish_reason: str = ""
    wall_seconds: float = 0.0                  # from submit to finish (queueing included)
    budgets: list = field(default_factory=list)       # specexec: the tree budget of each pass (auto: 0 = plain decoding)
    modes: list = field(default_factory=list)         # each pass's growth: "specexec", "chain", ..., "autoregressive"
    batch_sizes: list = field(default_factory=list)   # requests that shared each verification pass

    @property
    def tokens_per_pass(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["tokens_per_pass"] = self.tokens_per_pass
        return d


@dataclass
class GenerationResult:
    """``text`` is None when the engine has no tokenizer."""

    token_ids: list
    text: Optional[str]
    stats: GenerationStats


class Request:
    """The engine-side state of one request (touched only by the thread running a pass, except
    the fields guarded by the scheduler's condition: ``pieces``, ``done``, ``error``)."""

    def __init__(self, ids: list, params: SamplingParams, seed: Optional[int], max_new_tokens: int,
                 tracker, device, draft_reads_target: bool = False):
        self.ids = ids
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.tracker = tracker
        self.gen = torch.Generator(device=device)
        if seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(seed)
        # The sampled walk draws position t's token with noise keyed by (seed, t), so the text
        # does not depend on which tree a pass verified (sampling.PositionNoise).
        self.noise = None if params.greedy else PositionNoise(self.gen.initial_seed(), device)
        self.stats = GenerationStats()
        self.region: Optional[int] = None          # index of the cache region, once admitted
        self.tp = 0
        self.t_pending: list = list(ids[:-1])
        self.dp = 0
        self.draft_reads_target = draft_reads_target
        self.pending: list = list(ids[-1:]) if draft_reads_target else list(ids)
        self.produced = 0
        self.committed: list = list(ids)           # every committed token: the prompt, then the new ones
        self.lookup = None                         # prompt lookup: the n-gram index of committed (ngram.py)
        self.auto_cap = 0                          # budget="auto": the largest tree its caches allow
        self.submitted = time.perf_counter()
        self.on_update = None                      # callback(piece, done) from the pass thread
        self.final_piece = ""
        # Guarded by the scheduler's condition:
        self.pieces: list = []
        self.done = False
        self.cancelled = False
        self.error: Optional[BaseException] = None
        self.result: Optional[GenerationResult] = None

    @property
    def root(self) -> int:
        return self.pending[-1]

    @property
    def root_pos(self) -> int:
        """Absolute position of the root (the last committed token): what the target cache
        holds, plus the committed tokens it has yet to read before the root."""
        return self.tp + len(self.t_pending)

    @property
    def draft_ready(self) -> bool:
        """Whether the draft can grow this request's tree now: a draft that reads the target's
        cache needs the whole prompt in it (its own cache catches up on any tokens instead)."""
        return not (self.draft_reads_target and self.t_pending)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.produced


class RequestHandle:
    """A submitted request. ``stream()`` yields its text pieces (possibly "" for a pass that
    made no text safe to show, so a consumer can stop at any pass); ``result()`` returns the
    ``GenerationResult`` (raising the request's error if it failed); ``cancel()`` stops it: its
    result then holds what was generated so far, with ``finish_reason == "cancelled"``."""

    def __init__(self, engine, request: Request):
        self._engine = engine
        self._req = request

    @property
    def done(self) -> bool:
        return self._req.done

    def cancel(self) -> None:
        """Stop generating; the request's cache region is freed at the next pass."""
        self._engine._cancel(self._req)

    def stream(self) -> Iterator[str]:
        try:
            while True:
                pieces, finished = self._engine._wait(self._req)
                yield from pieces
                if finished:
                    break
        finally:
            if not self._req.done:      # the consumer stopped early: free the region
                self.cancel()
        self._raise_if_failed()

    def result(self) -> GenerationResult:
        while True:
            _, finished = self._engine._wait(self._req)
            if finished:
                break
        self._raise_if_failed()
        return self._req.result

    def _raise_if_failed(self) -> None:
        if self._req.error is not None:
            raise self._req.error
