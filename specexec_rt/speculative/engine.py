"""The speculative engine: requests in, passes run, tokens out.

``Engine`` is a thin facade over three parts, in the way vLLM v1 splits its engine:

- ``Scheduler`` (scheduler.py): the waiting and running requests, cache regions, admission,
  prefill chunking and ``budget="auto"``'s choice; each pass it emits a ``SchedulerOutput``
  (which requests, how many prompt tokens each, which method and budget), and afterwards counts
  the results into every request's stats and text.
- ``Runner`` (runner.py): the device side of a pass for a ``SchedulerOutput``: draft growth, one
  target forward verifying every request's tree, exact acceptance, one host read, the commits;
  it returns a ``PassResult`` per request.
- the decoding methods and tree policies (methods/, tree_policy.py): one object each behind one
  interface, found by name in one registry.

One pass (docs/ALGORITHM.md) serves every running request at once, and a request that has just
arrived rides in the same pass (its prompt, ``prefill_chunk`` tokens per pass at most, is
prefilled in front of its tree). Requests join and leave between passes.

The loop (``_run_pass``, one screen): admit, schedule, run, update, deliver. Threads: ``submit``
may be called from any thread; whichever thread waits on a handle (``stream``, ``result``,
``generate``) runs the next pass for every request when no other thread is running one, and a
serving loop (serving/worker.py) runs the same loop with ``step``, so one thread or many work
the same way, without a background thread.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

from . import memory
from ..errors import InvalidParameterError, MemoryBudgetError, ModelLoadError, SamplingParameterError
from .auto import AutoBudget
from .chat import check_messages, render_messages
from .config import EngineConfig, check_same_vocabulary, request_budget_cap
from .detok import TextTracker
from .methods import METHOD_PARAMS, METHODS
from .params import batch_item, batch_seeds, check_prompt, check_prompts, check_request, check_token_ids
from .request import GenerationResult, GenerationStats, Request, RequestHandle
from .runner import Runner
from .sampling import SamplingParams
from .scheduler import Scheduler

__all__ = ["Engine", "GenerationResult", "GenerationStats", "RequestHandle", "CacheState", "METHODS", "METHOD_PARAMS",
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
        cfg = EngineConfig.build(target, draft, method, budget, static_draft, max_batch, prefill_chunk, method_params)
        self.target, self.draft, self.method, self.budget, self.auto = target, cfg.draft, method, cfg.budget, cfg.auto
        self.decoder = cfg.method
        self.params = self.decoder.params
        self.tree_policy = self.decoder.policy   # SpecExec: tree_policy.TreePolicy
        self.device = target.device
        self.max_batch, self.prefill_chunk, self.static_draft = max_batch, prefill_chunk, cfg.static_draft
        self._max_budget = cfg.max_budget
        self._tokenizer = tokenizer
        self._tokenizer_error: Optional[Exception] = None
        self.runner = Runner(target, self.draft, self.decoder, max_batch, self.static_draft)
        self.region_len, self.draft_region_len = self.runner.region_len, self.runner.draft_region_len
        drafting = self.draft is not None or self.decoder.grows_without_draft
        auto = AutoBudget(self.decoder, cfg.max_budget, self.device, drafting, cfg.auto_shapes,
                          self.draft_region_len) if cfg.auto else None
        self.budget_controller = auto.controller if auto is not None else None
        self.auto_shapes: Optional[str] = auto.shapes if auto is not None else None   # "trees" or "chains"
        self.scheduler = Scheduler(self.decoder, max_batch, prefill_chunk, cfg.max_budget, auto)
        self._loop = threading.Lock()      # held by the thread running a pass
        self.last_result: Optional[GenerationResult] = None

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
        """The prompt text of chat ``messages`` (``[{"role", "content"}, ...]``; content a string
        or a list of text parts), with the generation prompt. The messages are checked first
        (InvalidParameterError naming ``messages[i].role`` ...); a template that refuses them
        raises ChatTemplateError naming the message (specexec_rt/speculative/chat.py)."""
        checked = check_messages(messages)
        if self.tokenizer is None:
            raise self._no_tokenizer("a chat template")
        return render_messages(self.tokenizer, checked)

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
        self.scheduler.add(req)
        return RequestHandle(self, req)

    def step(self, timeout: Optional[float] = None) -> int:
        """Run one pass for every active request (admitting queued ones first); returns how many
        requests it served. With nothing to do, waits up to ``timeout`` seconds (None: forever)
        for a submission and returns 0. For serving loops; callers of ``generate``/``stream``
        never need it."""
        if not self.scheduler.wait_for_work(timeout):
            return 0
        with self._loop:
            n = self._run_pass()
        self.scheduler.wake()
        return n

    @property
    def pending_requests(self) -> tuple[int, int]:
        """(requests in passes, requests queued for a cache region)."""
        return self.scheduler.counts

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

    def generate_batch(self, prompts: Sequence, max_new_tokens: int = 256, temperature: float = 0.0,
                       top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                       stop: Optional[Sequence[str]] = None) -> list:
        """Generate for several prompts together (they share passes, ``max_batch`` at a time);
        returns their ``GenerationResult`` in order. Parameters as for ``generate``; a ``seed``
        seeds request ``i`` with ``seed + i``. ``prompts`` is a list of prompts (a bare ``str``
        is refused, not split into characters). Every prompt and parameter is checked, and every
        text prompt tokenized, before any request is queued: an error names the parameter or
        ``prompts[i]`` and leaves nothing queued. An error or interrupt while they run cancels
        the others."""
        prompts = check_prompts(prompts, self.target.vocab_size)
        check_request(max_new_tokens, temperature, top_p, top_k, seed, stop)     # names a bad parameter once
        reqs = []
        for i, (prompt, s) in enumerate(zip(prompts, batch_seeds(seed, len(prompts)))):
            with batch_item("prompts", i):
                reqs.append(self._make_request(prompt, max_new_tokens, temperature, top_p, top_k, s, stop))
        self.scheduler.add(*reqs)          # together: one failing check above leaves none queued
        handles = [RequestHandle(self, r) for r in reqs]
        try:
            return [h.result() for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()          # a no-op for those already done
            raise

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
        trees, stats.syncs = self.runner.grow_only(reqs, self._max_budget, self.params.get("max_depth", 0), stats)
        return trees, stats

    def grow_tree(self, committed: int, root: int, temperature: float = 0.0):
        """``grow_trees`` for one request: ``(VerifyTree, GenerationStats)``."""
        (tree,), stats = self.grow_trees([committed], [root], temperature)
        return tree, stats

    @property
    def static_draft_steps(self) -> list:
        """The static draft steps (``draft_graph.StaticDraftStep``) made so far, one per beams
        value used; for checking which steps ran, were captured and replayed."""
        return self.runner.static_steps

    @property
    def captured_draft_graphs(self) -> int:
        """Static draft steps captured as CUDA graphs so far (one per beams value used)."""
        return sum(1 for step in self.runner.static_steps if step.graph is not None)

    def pass_bytes(self, budget: Optional[int] = None, sampled: bool = True, n_requests: int = 1) -> int:
        """The working-memory estimate of one pass at ``budget`` (default: the largest)."""
        b = self._max_budget if budget is None else budget
        return memory.pass_bytes(self.target, self.draft, self.decoder.pass_shape(b, n_requests), sampled)

    @property
    def max_budget(self) -> int:
        """The largest tree a pass may verify: the fixed budget, or ``budget="auto"``'s ceiling
        (``max_budget``, lowered at construction to what fits in the available memory)."""
        return self._max_budget

    def last_cache_state(self) -> Optional["CacheState"]:
        """Introspection (tests, debugging): the committed tokens of the request that finished
        last and how many of them each model's KV cache region holds, or None before any
        finished. Its region keeps them until another request is admitted into it."""
        req = self.scheduler.last_finished
        if req is None:
            return None
        return CacheState(list(req.committed), req.tp, req.dp)

    # ------------------------------------------------------------------ requests
    def _make_request(self, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop) -> Request:
        checked = check_request(max_new_tokens, temperature, top_p, top_k, seed, stop)
        max_new_tokens, seed, stops = checked.max_new_tokens, checked.seed, list(checked.stop)
        params = SamplingParams(checked.temperature, checked.top_p, checked.top_k)
        if stops and self.tokenizer is None:
            raise self._no_tokenizer("stop strings")
        ids = self._encode(prompt)
        cap = request_budget_cap(self.target, self.draft, self.decoder, self._max_budget, self.auto, len(ids),
                                 max_new_tokens)
        cap = min(cap, memory.check_request(self.target, self.draft, self.decoder, self._max_budget, self.auto,
                                            len(ids), sampled=not params.greedy, n_requests=self.max_batch))
        tracker = TextTracker(self.tokenizer, self._eos_ids(), max_new_tokens, stops)
        req = Request(ids, params, seed, max_new_tokens, tracker, self.device, self.runner.shares_cache)
        req.auto_cap = cap
        return req

    def _cancel(self, req: Request) -> None:
        """``RequestHandle.cancel``."""
        self.scheduler.cancel(req)

    def _wait(self, req: Request) -> tuple[list, bool]:
        """``RequestHandle``'s wait: text pieces of ``req`` not yet handed out, and whether it is
        done. Runs passes (for every request) while this request has nothing new and no other
        thread runs one."""
        sched = self.scheduler
        while True:
            news = sched.take_news(req)
            if news is not None:
                return news
            served = 0
            if self._loop.acquire(blocking=False):
                try:
                    served = 1 if sched.has_news(req) else self._run_pass()
                finally:
                    self._loop.release()
                    sched.wake()
            if not served:           # another thread runs the pass (or the scheduler is paused)
                sched.wait_for_news(req, 0.05)

    # ------------------------------------------------------------------ the loop
    def _run_pass(self) -> int:
        """One turn of the engine's loop, under ``_loop``: returns the requests it served."""
        sched = self.scheduler
        try:
            reqs = sched.admit()                     # queued requests take free regions
            if not reqs:
                return 0
            try:
                out = sched.schedule(reqs)           # trees, prompt chunks, method, budget
                run = self.runner.execute(out)       # grow, verify, accept, read, commit
                sched.update(out, run)               # stats, text, auto's fits, finished requests
            except BaseException as e:
                sched.fail(reqs, self._pass_error(e))
                if not isinstance(e, Exception):
                    raise
            return len(reqs)
        finally:
            sched.deliver()                          # done-callbacks, outside the scheduler's lock

    def _pass_error(self, e: BaseException) -> BaseException:
        """What the requests of a failed pass raise: an allocation failure as MemoryBudgetError."""
        if isinstance(e, RuntimeError) and _is_oom(e):
            err = MemoryBudgetError(memory.describe_failure(self.target, self.draft, self.decoder,
                                                            self._max_budget, e))
            err.__cause__ = e
            return err
        return e


@dataclass(frozen=True)
class CacheState:
    """``Engine.last_cache_state()``: ``committed`` token ids (prompt and new tokens), of which the
    target's cache region holds the first ``target_len`` (all but the last, the next root) and
    the draft's the first ``draft_len``."""

    committed: list
    target_len: int
    draft_len: int


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "can't allocate memory" in str(e)
