"""The speculative engine: requests in, passes run, tokens out.

One pass (docs/ALGORITHM.md) serves every active request at once: the decoding method grows
each request's draft tree (one draft call per tree level for all of them), one target forward
verifies all trees (each request attends only to its own region of the caches), each request
accepts exactly from its own tree, and all accepted paths are committed into both caches with
one index copy per cache. A request that has just arrived rides in the same pass: its prompt
(or a chunk of it, ``prefill_chunk`` tokens per pass at most) is prefilled as a causal chain
in front of its tree instead of costing a target pass of its own. Requests join and leave
between passes.

Threads: ``submit`` may be called from any thread; whichever thread waits on a handle
(``stream``, ``result``, ``generate``) runs the next pass for every request when no other
thread is running one, so one thread or many work the same way, without a background thread.

Host syncs per pass: one per draft step (how many nodes each tree expands), one for the trees'
sizes, one for every request's acceptance result together; ``GenerationStats.syncs`` counts
them.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Iterator, Optional, Sequence, Union

import torch

from . import memory
from ..errors import (ContextLengthError, InvalidParameterError, MemoryBudgetError, ModelLoadError,
                      NonFiniteLogitsError, SamplingParameterError, SpecExecError, VocabularyMismatchError)
from .detok import TextTracker
from .methods import METHOD_PARAMS, METHODS, method_class
from .runner import Runner
from .scheduler import SchedulerOutput
from .params import check_prompt, check_request, check_token_ids
from .request import GenerationResult, GenerationStats, Request, RequestHandle
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "GenerationStats", "RequestHandle", "METHODS", "METHOD_PARAMS",
           "check_same_vocabulary"]


class Engine:
    """Generate exactly as ``target`` would, verifying draft trees in as few passes as possible.

    Engine(target, draft=None, method="specexec", budget=256, tokenizer=None, static_draft=None,
           max_batch=1, prefill_chunk=1024, **method_params)

    Method parameters (defaults in brackets):
    - ``autoregressive``: none (no draft needed).
    - ``chain``: ``k`` draft tokens per pass [min(budget, 8)].
    - ``specinfer``: ``n`` root candidates [min(budget, 8)], each a chain of ``depth`` tokens
      [max(1, budget // n)], so ``n * depth`` tokens per pass.
    - ``specexec``: ``budget`` draft nodes per tree and request (the root is verified too: budget
      + 1 tokens per pass; with several requests in a pass one search shares ``budget x
      requests`` nodes among them), ``beams_per_step`` nodes expanded per draft call
      [min(budget, 32)], ``branch_width`` children per expanded node [8], ``max_depth`` tree
      depth and draft calls per pass [32; 16 for tree="softmax"], ``tree`` the tree policy
      (specexec_rt/speculative/tree_policy.py): ``"calibrated"`` [default] ranks the search by
      the acceptance learned from verification, ``"softmax"`` by the draft's probability (at
      ``growth_temperature``), ``"sequoia"`` grows Sequoia's optimal static tree (from
      ``acceptance=[...]`` per rank, or learned online). ``budget="auto"`` picks the budget (powers of two up
      to ``max_budget`` [min(1024, what the target's cache holds)]) and the depth (up to
      ``max_depth``) before every pass from online estimates (specexec_rt/speculative/budget.py);
      ``stats.budgets`` lists them. It also decodes without drafting while that is faster
      (``stats.modes`` says which mode each pass used). ``auto_shapes``: ``"trees"`` (SpecExec
      trees) or ``"chains"`` (draft chains of 1..8 tokens, the chain method's passes); default
      chains when the target runs on the CPU, where a draft call and a verification both cost
      more per row and chains of 2-3 measured faster than any tree, else trees.

    ``max_batch``: requests that share each pass (continuous batching); each owns a region of
    ``max_len`` slots in both models' KV caches (with 1, the models' own caches; with more, the
    engine allocates ``max_batch`` regions once). Further requests wait in a queue.
    ``prefill_chunk``: prompt tokens prefilled per pass at most (longer prompts are prefilled
    over several passes, each also verifying the other requests' trees).

    ``static_draft`` (SpecExec, one request per pass): run draft tree steps with static shapes
    (padded to the pass's beams, a fixed-width tree region, the prefix length on the device) so
    that on CUDA each is captured once as a CUDA graph and replayed
    (specexec_rt/speculative/draft_graph.py). Default: on when the draft is on CUDA, resident,
    and ``max_batch == 1``. ``True`` on the CPU runs the static pass eagerly.

    The draft shares the target's vocabulary (checked here: size, and a sample of token strings
    when both come from different checkpoints) and device.
    """

    def __init__(self, target, draft=None, method: str = "specexec", budget: Union[int, str] = 256,
                 tokenizer=None, static_draft: Optional[bool] = None, max_batch: int = 1,
                 prefill_chunk: int = 1024, **method_params):
        method_cls = method_class(method)
        self.auto = isinstance(budget, str) and budget == "auto"
        if isinstance(budget, str) and not self.auto:
            raise ValueError(f"budget must be a positive int or 'auto', got {budget!r}")
        method_params = dict(method_params)
        auto_shapes = method_params.pop("auto_shapes", None)
        if auto_shapes is not None and not self.auto:
            raise ValueError(f"auto_shapes={auto_shapes!r} needs budget='auto'")
        if auto_shapes not in (None, "trees", "chains"):
            raise ValueError(f"auto_shapes must be 'trees' or 'chains', got {auto_shapes!r}")
        if self.auto:
            if not method_cls.supports_auto:
                raise ValueError(f"budget='auto' needs method='specexec', not {method!r}")
            max_budget = method_params.pop("max_budget", None)
            budget = max(1, min(1024, target.max_len - 3)) if max_budget is None else max_budget
        unknown = set(method_params) - set(METHOD_PARAMS[method])
        if unknown:
            raise TypeError(f"method {method!r} takes no parameter(s) {sorted(unknown)}; "
                            f"it takes {list(METHOD_PARAMS[method]) or 'none'}")
        if method_cls.needs_draft and draft is None:
            raise ValueError(f"method {method!r} needs a draft model (or use method='autoregressive'; "
                             f"specexec_rt.default_draft(target) builds one from the target)")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int or 'auto', got {budget!r}"
                             if not self.auto else f"max_budget must be a positive int, got {budget!r}")
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.target = target
        self.draft = draft if method_cls.needs_draft else None
        self.method = method
        self.budget = "auto" if self.auto else budget
        self.decoder = method_cls(budget, method_params, self.auto, target.device)
        self.params = self.decoder.params
        self.tree_policy = self.decoder.policy   # SpecExec: tree_policy.TreePolicy
        self.device = target.device
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._tokenizer = tokenizer
        self._tokenizer_error: Optional[Exception] = None
        if self.draft is not None:
            check_same_vocabulary(target, self.draft)
        self._max_budget = budget       # the largest tree: the fixed budget, or auto's ceiling
        self._check_tree_fits()
        avail = memory.available_bytes(self.device)
        if avail is not None:           # auto lowers its ceiling to what fits instead of raising
            what = "one draft-and-verify pass" + (f" of {max_batch} requests" if max_batch > 1 else "")
            self._max_budget = memory.fit_budget(target, self.draft, self.decoder, budget, self.auto, avail,
                                                 False, what, n_requests=max_batch)
        # Cache regions: with one, the models' own caches; with more, pools allocated once, on
        # first use.
        self.region_len = target.max_len
        self.draft_region_len = self.draft.max_len if self.draft is not None else 0
        if static_draft is None:
            static_draft = (self.draft is not None and self.draft.device.type == "cuda" and max_batch == 1
                            and type(self.draft.layer_source).__name__ == "ResidentLayers")
        self.static_draft = bool(static_draft) and method_cls.static_draft and max_batch == 1
        self._runner = Runner(target, self.draft, self.decoder, max_batch, self.static_draft)
        self.budget_controller = None
        self.auto_shapes: Optional[str] = None   # budget="auto": "trees" or "chains"
        if self.auto:
            from .budget import BudgetController

            # Plain decoding (budget 0) and trees down to one node are candidates too: auto never
            # keeps drafting when drafting does not pay on this device.
            # On the CPU a pass's cost grows with its tree (draft steps and verification are
            # compute-bound), so the first trees are small and grow only while they pay; an
            # offloaded GPU pass costs the same for 1..1000 tokens, so it starts at 16.
            prior = 4 if self.device.type == "cpu" else 16
            self.auto_shapes = auto_shapes or ("chains" if self.device.type == "cpu" else "trees")
            self.budget_controller = BudgetController(self._max_budget, min_budget=1, prior_budget=prior,
                                                      max_depth=self.params["max_depth"],
                                                      allow_autoregressive=self.draft is not None,
                                                      chains=self.auto_shapes == "chains",
                                                      max_chain=min(8, self.params["max_depth"]))
        # Scheduling state. _cond guards the queue, the free regions and every request's
        # pieces/done/error; _loop is held by the thread running a pass.
        self._cond = threading.Condition()
        self._loop = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._active: list = []
        self._free = list(range(max_batch))
        self._callbacks: list = []         # (on_update, last piece) of requests just finished
        self.last_result: Optional[GenerationResult] = None
        self._last_request: Optional[Request] = None

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        """The target's tokenizer, loaded on first use from ``target.source``; None when there is
        none (a model built in memory, or a checkpoint saved without tokenizer files: token ids
        still work, text prompts and stop strings raise with the reason)."""
        if self._tokenizer is None and self._tokenizer_error is None and getattr(self.target, "source", None) is not None:
            from ..loading import load_tokenizer

            try:
                self._tokenizer = load_tokenizer(self.target)
            except ModelLoadError as e:
                self._tokenizer_error = e
        return self._tokenizer

    def _no_tokenizer(self, what: str) -> SamplingParameterError:
        why = f" ({str(self._tokenizer_error).splitlines()[0]})" if self._tokenizer_error is not None else ""
        return SamplingParameterError(f"{what}: a tokenizer is needed and this engine has none{why}; pass "
                                      f"Engine(..., tokenizer=...) or give the prompt as token ids")

    def apply_chat_template(self, messages: list) -> str:
        if self.tokenizer is None:
            raise self._no_tokenizer("a chat template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list:
        """Token ids of ``text`` exactly as ``generate`` would feed them (needs a tokenizer)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._encode(text)

    def _encode(self, prompt) -> list:
        prompt = check_prompt(prompt, self.target.vocab_size)      # a str, or checked token ids
        if not isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise self._no_tokenizer("a text prompt")
        ids = list(self.tokenizer(prompt).input_ids)
        if not ids:
            raise InvalidParameterError("prompt", "the prompt is empty once tokenized")
        return check_token_ids(ids, self.target.vocab_size)

    def _eos_ids(self) -> set:
        eos = set(self.target.config.eos_token_ids or [])
        tok = self._tokenizer
        if tok is not None and getattr(tok, "eos_token_id", None) is not None:
            eos.add(int(tok.eos_token_id))
        return eos

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_or_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: Optional[int] = None, stop: Optional[Sequence[str]] = None,
               on_update=None) -> RequestHandle:
        """Queue a request and return its handle (thread-safe). Its parameters are checked here;
        it runs in the passes that the threads waiting on handles drive (see ``generate``), or
        that a serving loop drives with ``step``. ``on_update(piece, done)``, if given, is called
        from the thread running the pass after each of the request's passes (and once when it
        ends): what a server uses to forward text without a thread per request."""
        req = self._make_request(prompt_or_ids, max_new_tokens, temperature, top_p, top_k, seed, stop)
        req.on_update = on_update
        with self._cond:
            self._queue.append(req)
            self._cond.notify_all()
        return RequestHandle(self, req)

    def step(self, timeout: Optional[float] = None) -> int:
        """Run one pass for every active request (admitting queued ones first); returns how many
        requests it served. With nothing to do, waits up to ``timeout`` seconds (None: forever)
        for a submission and returns 0. For serving loops; callers of ``generate``/``stream``
        never need it."""
        with self._cond:
            if not self._queue and not self._active:
                self._cond.wait(timeout)
                if not self._queue and not self._active:
                    return 0
        with self._loop:
            with self._cond:
                n = len(self._active) + min(len(self._queue), len(self._free))
            self._run_pass()
        with self._cond:
            self._cond.notify_all()
        return n

    @property
    def pending_requests(self) -> tuple[int, int]:
        """(requests in passes, requests queued for a cache region)."""
        with self._cond:
            return len(self._active), len(self._queue)

    def generate(self, prompt_or_ids, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                 stop: Optional[Sequence[str]] = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` (exactly that many unless EOS or a stop string comes
        first). ``temperature=0`` is greedy. ``stop`` strings end generation; the text stops
        before the stop string and ``token_ids`` end with the token that completed it.

        Raises SamplingParameterError for bad parameters and ContextLengthError when prompt +
        max_new_tokens + the largest draft tree cannot fit the KV caches (the budget is never
        shrunk silently: load the models with a larger max_len or lower the budget)."""
        result = self.submit(prompt_or_ids, max_new_tokens, temperature, top_p, top_k, seed, stop).result()
        self.last_result = result
        return result

    def stream(self, prompt_or_ids, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
               stop: Optional[Sequence[str]] = None) -> Iterator[str]:
        """Like ``generate`` but yields one text piece after every target pass, possibly ""
        (text held back while it could still be the start of a stop string or an incomplete
        character, or no tokenizer), so a consumer that closes the iterator stops its request at
        the next pass. ``self.last_result`` holds the GenerationResult when the iterator ends."""
        handle = self.submit(prompt_or_ids, max_new_tokens, temperature, top_p, top_k, seed, stop)
        yield from handle.stream()
        self.last_result = handle.result()

    def generate_batch(self, prompts: Sequence, max_new_tokens: int = 256, **sampling) -> list:
        """Generate for several prompts together (they share passes, ``max_batch`` at a time);
        returns their ``GenerationResult`` in order. ``sampling`` as for ``generate``; a
        ``seed`` seeds request ``i`` with ``seed + i``."""
        seed = sampling.pop("seed", None)
        handles = [self.submit(p, max_new_tokens, seed=None if seed is None else seed + i, **sampling)
                   for i, p in enumerate(prompts)]
        return [h.result() for h in handles]

    def grow_trees(self, committed: Sequence[int], roots: Sequence[int], temperature: float = 0.0):
        """Grow the draft trees of one pass as the engine would, for ``len(roots)`` requests
        (at most ``max_batch``): request ``i`` uses region ``i`` of the draft's cache, which
        already holds ``committed[i]`` tokens, and its last token is ``roots[i]``. Returns
        ``([VerifyTree], GenerationStats)`` (stats of the growth: draft calls, syncs). For
        benchmarks of the drafting cost alone: nothing is verified or committed."""
        if self.draft is None:
            raise ValueError("growing draft trees needs a draft model")
        if not 1 <= len(roots) <= self.max_batch or len(committed) != len(roots):
            raise ValueError(f"grow_trees takes 1..max_batch={self.max_batch} requests, one committed length each")
        reqs = []
        for i, (c, root) in enumerate(zip(committed, roots)):
            req = Request([int(root)], SamplingParams(float(temperature)), 0, 1 << 30, None, self.device)
            req.dp, req.pending, req.region = int(c), [int(root)], i
            reqs.append(req)
        stats = GenerationStats()
        trees, stats.syncs = self._runner.grow_only(reqs, self._max_budget, self.params.get("max_depth", 0), stats)
        return trees, stats

    def grow_tree(self, committed: int, root: int, temperature: float = 0.0):
        """``grow_trees`` for one request: ``(VerifyTree, GenerationStats)``."""
        (tree,), stats = self.grow_trees([committed], [root], temperature)
        return tree, stats

    @property
    def static_draft_steps(self) -> list:
        """The static draft steps (``draft_graph.StaticDraftStep``) made so far, one per beams
        value used; for checking which steps ran, were captured and replayed."""
        return self._runner.static_steps

    @property
    def captured_draft_graphs(self) -> int:
        """Static draft steps captured as CUDA graphs so far (one per beams value used)."""
        return sum(1 for step in self._runner.static_steps if step.graph is not None)

    def pass_bytes(self, budget: Optional[int] = None, sampled: bool = True, n_requests: int = 1) -> int:
        """The working-memory estimate of one pass at ``budget`` (default: the largest)."""
        b = self._max_budget if budget is None else budget
        return memory.pass_bytes(self.target, self.draft, self.decoder.pass_shape(b, n_requests), sampled)

    # ------------------------------------------------------------------ requests
    def _make_request(self, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop) -> Request:
        checked = check_request(max_new_tokens, temperature, top_p, top_k, seed, stop)
        max_new_tokens, seed, stops = checked.max_new_tokens, checked.seed, list(checked.stop)
        params = SamplingParams(checked.temperature, checked.top_p, checked.top_k)
        if stops and self.tokenizer is None:
            raise self._no_tokenizer("stop strings")
        ids = self._encode(prompt)
        cap = self._check_fits(len(ids), max_new_tokens)
        cap = min(cap, memory.check_request(self.target, self.draft, self.decoder, self._max_budget, self.auto,
                                            len(ids), sampled=not params.greedy, n_requests=self.max_batch))
        tracker = TextTracker(self.tokenizer, self._eos_ids(), max_new_tokens, stops)
        req = Request(ids, params, seed, max_new_tokens, tracker, self.device)
        req.auto_cap = cap
        req.seq = list(ids)        # committed text (introspection and tests)
        return req

    def _cancel(self, req: Request) -> None:
        with self._cond:
            if req.done:
                return
            req.cancelled = True
            if req in self._queue:
                self._queue.remove(req)
                self._finish(req, "cancelled")
            self._cond.notify_all()
        self._notify()

    def _notify(self) -> None:
        """Run the done-callbacks of requests that finished, outside ``_cond``."""
        with self._cond:
            calls, self._callbacks = self._callbacks, []
        for on_update, piece in calls:
            on_update(piece, True)

    def _wait(self, req: Request) -> tuple[list, bool]:
        """Text pieces of ``req`` not yet handed out, and whether it is done. Runs passes (for
        every request) while this request has nothing new and no other thread runs one."""
        while True:
            with self._cond:
                if req.pieces or req.done:
                    pieces, req.pieces = req.pieces, []
                    return pieces, req.done
            if self._loop.acquire(blocking=False):
                try:
                    with self._cond:
                        ready = bool(req.pieces) or req.done
                    if not ready:
                        self._run_pass()
                finally:
                    self._loop.release()
                    with self._cond:
                        self._cond.notify_all()
            else:
                with self._cond:
                    if not (req.pieces or req.done):
                        self._cond.wait(0.05)

    def _finish(self, req: Request, reason: str, error: Optional[BaseException] = None) -> None:
        """Under ``_cond``: the request is done; its region is free again."""
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
            # lock is released (_notify): a callback may take locks of its own.
            self._callbacks.append((req.on_update, req.final_piece if error is None else ""))
        if req in self._active:
            self._active.remove(req)
        if req.region is not None:
            self._free.append(req.region)
            self._free.sort()
            req.region = None
        self._last_request = req

    def _admit(self) -> list:
        """Under ``_cond``: drop cancelled requests, admit queued ones into free regions."""
        for r in [r for r in self._active if r.cancelled]:
            self._finish(r, "cancelled")
        while self._queue and self._free:
            r = self._queue.popleft()
            r.region = self._free.pop(0)
            self._active.append(r)
        return list(self._active)

    def _run_pass(self) -> None:
        try:
            self._run_pass_inner()
        finally:
            self._notify()

    def _run_pass_inner(self) -> None:
        with self._cond:
            reqs = self._admit()
        if not reqs:
            return
        try:
            self._pass(reqs)
        except BaseException as e:
            err = e
            if isinstance(e, RuntimeError) and _is_oom(e):
                err = MemoryBudgetError(memory.describe_failure(self.target, self.draft, self.decoder,
                                                                self._max_budget, e))
                err.__cause__ = e
            with self._cond:
                for r in reqs:
                    self._finish(r, "error", err)
            if not isinstance(e, Exception):
                raise

    # ------------------------------------------------------------------ capacity
    def _check_tree_fits(self) -> None:
        """At construction: the largest verification pass must fit the target's cache next to the
        shortest possible request (a 1-token prompt, 1 new token)."""
        verify = self.decoder.verify_rows(self._max_budget)
        if 2 + verify > self.target.max_len:
            setting = self.decoder.size_setting()
            raise ContextLengthError(
                f"{setting}: a verification tree of {verify} tokens (plus a 1-token prompt and 1 new token) "
                f"does not fit the target's KV cache (max_len={self.target.max_len}); lower the budget or "
                f"load the target with a larger max_len")

    def _check_fits(self, prompt_len: int, max_new_tokens: int) -> int:
        """Raise ContextLengthError unless the request fits both caches; returns the largest
        budget its caches allow (auto shrinks the tree to it; a fixed budget must fit whole)."""
        verify = self.decoder.verify_rows(self._max_budget)
        cap = self._max_budget
        if self.auto:
            # Shrinking the tree to what this request leaves free is auto's job; it needs 1 node.
            cap = min(self._max_budget, self.region_len - prompt_len - max_new_tokens - 1)
            verify = 1 + max(1, cap)
        need = prompt_len + max_new_tokens + verify
        if need > self.region_len:
            raise ContextLengthError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) + verification tree ({verify}) "
                f"= {need} tokens exceed the target's KV cache (max_len={self.target.max_len}); lower "
                f"max_new_tokens or the budget, or load the target with a larger max_len")
        if self.draft is not None:
            draft_slots = self.decoder.draft_slots()
            need = prompt_len + max_new_tokens + draft_slots
            if need > self.draft_region_len:
                raise ContextLengthError(
                    f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) + draft tree ({draft_slots}) "
                    f"= {need} tokens exceed the draft's KV cache (max_len={self.draft.max_len})")
        return max(1, cap)

    # ------------------------------------------------------------------ one pass
    def _pass(self, reqs: list) -> None:
        # Which requests verify a tree this pass, and how much of a new prompt rides along.
        room = self.prefill_chunk
        tree_reqs, chunk_reqs = [], []
        for r in reqs:
            c = len(r.t_pending)
            if c <= room:
                tree_reqs.append(r)
                room -= c
            elif room > 0:
                chunk_reqs.append((r, room))
                room = 0
        first_trees = any(r.stats.target_passes == 0 for r in tree_reqs)
        carries_prompt = any(r.t_pending for r in tree_reqs) or bool(chunk_reqs)
        catch_up_lens = [len(r.pending) for r in tree_reqs] or [0]
        budget, depth, decoder = self._max_budget, self.params.get("max_depth", 0), self.decoder
        if tree_reqs and self.auto:
            cap = min(r.auto_cap for r in tree_reqs)
            ctl = self.budget_controller
            if ctl.chains:
                # A chain of k draft tokens takes k slots of the draft's cache after what it
                # has yet to read (a SpecExec tree just grows less near the end of it).
                cap = min([cap] + [self.draft_region_len - r.dp - len(r.pending) + 1 for r in tree_reqs])
            budget, depth = ctl.plan(cap, max(catch_up_lens)) if cap >= 1 else (0, 0)
            decoder = self.decoder.auto_method(budget, ctl.chains)
        out = SchedulerOutput(tree_reqs, chunk_reqs, decoder, budget, depth, self.budget_controller, first_trees,
                              carries_prompt, max(catch_up_lens))
        run = self._runner.execute(out)

        # Bookkeeping, text, and who is done.
        accepted = []
        finished = []
        for res in run.results:
            r = res.request
            if not res.finite:
                finished.append((r, NonFiniteLogitsError(
                    f"the target model produced NaN/inf logits in a verification pass (method={self.method}); its "
                    f"weights or activations are not finite (a corrupt checkpoint, or an overflow in a "
                    f"low-precision dtype)")))
                continue
            s = r.stats
            new = res.new_tokens()
            accepted.append(res.accepted)
            s.draft_seconds += run.draft_seconds
            s.target_seconds += run.target_seconds
            s.target_passes += 1
            s.tree_tokens += res.tree_size
            s.tokens_per_pass_histogram[len(new)] = s.tokens_per_pass_histogram.get(len(new), 0) + 1
            s.syncs += run.syncs
            s.max_syncs_per_pass = max(s.max_syncs_per_pass, run.syncs)
            s.batch_sizes.append(len(tree_reqs))
            if self.decoder.supports_auto:
                s.budgets.append(budget)
            s.modes.append(decoder.name)
            r.produced += len(new)
            r.seq.extend(new)
            piece = r.tracker.add(new)
            with self._cond:
                r.pieces.append(piece)
            if r.tracker.finish_reason:
                r.final_piece = piece        # delivered with the done signal
            elif r.on_update is not None:
                r.on_update(piece, False)
            if r.tracker.finish_reason:
                finished.append((r, None))
        for r, _ in chunk_reqs:
            r.stats.prefill_seconds += run.target_seconds
        if self.auto and accepted:
            # A pass that carried a prompt (or a draft's prompt prefill) says nothing about the
            # cost of a tree: its times are left out of the fits.
            pts, curve_vals = run.curve if run.curve is not None else ([], [])
            # A draft catching up on tokens it skipped in plain passes is not a tree's cost either.
            catch_up = max(catch_up_lens) > self.params["max_depth"] + 2
            self.budget_controller.observe(
                budget, run.n_verified, run.draft_calls,
                None if first_trees or catch_up else run.draft_seconds, None if carries_prompt else run.target_seconds,
                pts, curve_vals,
                # Per request, as the curve (its mass is averaged over the pass's trees) and the
                # costs (a plain pass decodes the same requests) are: the mean, not the luckiest.
                sum(accepted) / len(accepted), truncated=budget > 0 and any(r.remaining < depth for r in tree_reqs),
                catch_up=(max(catch_up_lens), run.draft_seconds) if catch_up and run.draft_calls else None)
        with self._cond:
            for r, err in finished:
                self._finish(r, r.tracker.finish_reason or "error", err)
            self._cond.notify_all()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "can't allocate memory" in str(e)


def check_same_vocabulary(target, draft, n_sample: int = 512) -> None:
    """Raise VocabularyMismatchError unless ``draft`` and ``target`` share a vocabulary: same size
    and, when they come from different checkpoints with tokenizers, the same token strings on an
    evenly spaced sample of ids (the first and last ids included)."""
    if draft.vocab_size != target.vocab_size:
        raise VocabularyMismatchError(
            f"draft vocabulary has {draft.vocab_size} tokens but the target's has {target.vocab_size}: "
            f"the draft must use the target's tokenizer")
    if torch.device(draft.device) != torch.device(target.device):
        raise ValueError(f"draft is on {draft.device} but target on {target.device}; load both on one device")
    ts, ds = getattr(target, "source", None), getattr(draft, "source", None)
    if ts is None or ds is None or str(ts) == str(ds):
        return
    from ..loading import load_tokenizer

    try:
        tt, dt = load_tokenizer(target), load_tokenizer(draft)
    except SpecExecError:
        return    # no tokenizer to compare: the size check is all we can do
    v = target.vocab_size
    ids = sorted(set(torch.linspace(0, v - 1, min(n_sample, v)).long().tolist()))
    a, b = tt.convert_ids_to_tokens(ids), dt.convert_ids_to_tokens(ids)
    bad = [(i, x, y) for i, x, y in zip(ids, a, b) if x != y]
    if bad:
        i, x, y = bad[0]
        raise VocabularyMismatchError(
            f"draft and target tokenizers differ on {len(bad)} of {len(ids)} sampled ids (e.g. id {i}: "
            f"target {x!r}, draft {y!r}); the draft must use the target's tokenizer")
