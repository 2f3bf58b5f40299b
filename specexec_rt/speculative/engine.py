"""The speculative engine: autoregressive, chain, SpecInfer and SpecExec on one verification path.

One iteration (docs/ALGORITHM.md): grow a draft tree from the root (the last committed
token), verify root + tree in one target forward with the ancestor mask, accept exactly, commit
the accepted path into both caches, emit accepted tokens + one target sample (the bonus).

Cache bookkeeping (host ints, no device reads):
- target: slots ``[0, tp)`` hold every committed token except the root; the root is fed in the
  next verification pass.
- draft: slots ``[0, dp)`` hold committed tokens; ``pending`` (the rest, ending with the root)
  is fed as a causal chain in the first draft call of the next iteration. Accepted nodes the
  draft never ran on (leaves) and the bonus token end up pending.

Host syncs: one per draft step (how many nodes to expand), one for the alive-node count, one
for the acceptance result; ``GenerationStats.syncs`` counts them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from . import sampling
from . import tree as _tree
from . import memory
from . import tree_policy
from ..errors import (ContextLengthError, MemoryBudgetError, NonFiniteLogitsError, SamplingParameterError,
                     VocabularyMismatchError)
from .sampling import SamplingParams, process_logits
from .tree import NEG_INF, DraftTree, VerifyTree, path_rows

_CURVE_SCALE = 1e6     # prediction-curve values travel as int64 micro-tokens in the packet

METHODS = ("autoregressive", "chain", "specinfer", "specexec")
METHOD_PARAMS = {
    "autoregressive": (),
    "chain": ("k",),
    "specinfer": ("n", "depth"),
    "specexec": ("beams_per_step", "branch_width", "max_depth") + tree_policy.POLICY_PARAMS,
}


@dataclass
class GenerationStats:
    """target_passes counts verification passes (the prompt prefill is not one); tokens per pass
    is new tokens / target passes. draft_seconds covers tree growth (including the draft's
    prompt prefill); target_seconds covers verification, acceptance and commits; on CUDA both
    end at a host sync, so they are wall-clock exact."""

    new_tokens: int = 0
    target_passes: int = 0
    draft_calls: int = 0
    static_draft_calls: int = 0                # draft steps run by the static (CUDA-graph) runner
    tree_tokens: int = 0                       # tokens verified, summed over passes
    tokens_per_pass_histogram: dict = field(default_factory=dict)   # tokens emitted -> passes
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    prefill_seconds: float = 0.0
    syncs: int = 0
    max_syncs_per_pass: int = 0
    finish_reason: str = ""
    budgets: list = field(default_factory=list)    # specexec: the budget of each pass, in order

    @property
    def tokens_per_pass(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["tokens_per_pass"] = self.tokens_per_pass
        return d


@dataclass
class GenerationResult:
    token_ids: list
    text: str
    stats: GenerationStats


@dataclass
class _Pass:
    """What one iteration produced: the accepted path (root first) and the bonus token."""

    tokens: list        # path tokens, root first (length m + 1)
    draft_slots: list   # their draft tree-region slots (-1: no draft K/V)
    rows: list          # their verification rows
    bonus: int
    tail: list = field(default_factory=list)   # budget="auto": the tree's prediction curve (scaled)


class Engine:
    """Generate exactly as ``target`` would, verifying draft trees in as few passes as possible.

    Engine(target, draft=None, method="specexec", budget=256, tokenizer=None, **method_params)

    Method parameters (defaults in brackets):
    - ``autoregressive``: none (no draft needed).
    - ``chain``: ``k`` draft tokens per pass [min(budget, 8)].
    - ``specinfer``: ``n`` root candidates [min(budget, 8)], each a chain of ``depth`` tokens
      [max(1, budget // n)], so ``n * depth`` tokens per pass.
    - ``specexec``: ``budget`` draft nodes per tree (the root is verified too: budget + 1
      tokens per pass), ``beams_per_step`` nodes expanded per draft call [min(budget, 32)],
      ``branch_width`` children per expanded node [8], ``max_depth`` tree depth and draft calls
      per pass [32; 16 for tree="softmax"], ``tree`` the tree policy (tree_policy.py):
      ``"calibrated"`` [default] ranks the search by acceptance learned from verification,
      ``"softmax"`` by the draft's probability (at ``growth_temperature``), ``"sequoia"`` builds
      Sequoia's optimal static tree (from ``acceptance=[...]`` per rank, or learned online).
      ``budget="auto"`` picks the budget (powers of two up to ``max_budget``
      [min(1024, what the target's cache holds)]) and the depth (up to ``max_depth``) before
      every pass from online estimates (see specexec_rt/speculative/budget.py); ``stats.budgets`` lists them.

    ``static_draft`` (SpecExec): run draft tree steps with static shapes (padded to the pass's
    beams, a fixed-width tree region, the prefix length on the device) so that on CUDA each is
    captured once as a CUDA graph and replayed (specexec_rt/speculative/draft_graph.py). Default: on when
    the draft is on CUDA and resident. ``True`` on the CPU runs the static pass eagerly.

    The draft shares the target's vocabulary (checked here: size, and a sample of token strings
    when both come from different checkpoints) and device.
    """

    def __init__(self, target, draft=None, method: str = "specexec", budget: Union[int, str] = 256,
                 tokenizer=None, static_draft: Optional[bool] = None, **method_params):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; choose one of {METHODS}")
        self.auto = isinstance(budget, str) and budget == "auto"
        max_budget = None
        if self.auto:
            if method != "specexec":
                raise ValueError(f"budget='auto' needs method='specexec', not {method!r}")
            method_params = dict(method_params)
            max_budget = method_params.pop("max_budget", None)
            if max_budget is None:
                max_budget = max(1, min(1024, target.max_len - 3))
            budget = max_budget
        unknown = set(method_params) - set(METHOD_PARAMS[method])
        if unknown:
            raise TypeError(f"method {method!r} takes no parameter(s) {sorted(unknown)}; "
                            f"it takes {list(METHOD_PARAMS[method]) or 'none'}")
        if method != "autoregressive" and draft is None:
            raise ValueError(f"method {method!r} needs a draft model (or use method='autoregressive'; "
                             f"specexec_rt.default_draft(target) builds one from the target)")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int or 'auto', got {budget!r}"
                             if not self.auto else f"max_budget must be a positive int, got {budget!r}")
        self.target = target
        self.draft = draft if method != "autoregressive" else None
        self.method = method
        self.budget = "auto" if self.auto else budget
        self._max_budget = budget       # the largest tree: the fixed budget, or auto's ceiling
        self._budget = budget           # this pass's budget
        self._user_beams = "beams_per_step" in method_params
        self.device = target.device
        self._tokenizer = tokenizer
        self.params = self._method_defaults(method, budget, method_params)
        if self.draft is not None:
            check_same_vocabulary(target, self.draft)
        self._check_tree_fits()
        memory.check_engine(self)     # may lower auto's ceiling (self._max_budget)
        budget = self._max_budget
        self.last_result: Optional[GenerationResult] = None
        self._prefill_bad = None
        self._curve = None
        self._depth = self.params.get("max_depth")
        self._auto_cap = budget
        self.budget_controller = None
        if static_draft is None:
            static_draft = (self.draft is not None and self.draft.device.type == "cuda"
                            and type(self.draft.layer_source).__name__ == "ResidentLayers")
        self.static_draft = bool(static_draft) and method == "specexec"
        self._draft_runners: dict = {}     # beams -> StaticDraftStep (None: cache too short)
        self.tree_policy = None
        if method == "specexec":
            p = self.params
            self.tree_policy = tree_policy.TreePolicy(p["tree"], self.device, p["branch_width"],
                                                      p["growth_temperature"], p["acceptance"])
        if self.auto:
            from .budget import BudgetController

            self.budget_controller = BudgetController(budget, max_depth=self.params["max_depth"])

    @staticmethod
    def _method_defaults(method: str, budget: int, given: dict) -> dict:
        p = dict(given)
        if method == "chain":
            p.setdefault("k", min(budget, 8))
        elif method == "specinfer":
            p.setdefault("n", min(budget, 8))
            p.setdefault("depth", max(1, budget // p["n"]))
        elif method == "specexec":
            p.setdefault("beams_per_step", min(budget, 32))
            p.setdefault("branch_width", 8)
            tree_policy.set_defaults(p)     # tree, max_depth, growth_temperature, acceptance
        for k, v in p.items():
            if k in tree_policy.POLICY_PARAMS:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{method} parameter {k} must be a positive int, got {v!r}")
        return p

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        """The target's tokenizer, loaded on first use from ``target.source`` (None if the target
        has no source, e.g. a model built in memory)."""
        if self._tokenizer is None and getattr(self.target, "source", None) is not None:
            from ..loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.target)
        return self._tokenizer

    def apply_chat_template(self, messages: list) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list:
        """Token ids of ``text`` exactly as ``generate`` would feed them (needs a tokenizer)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._encode(text)

    def _encode(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SamplingParameterError("a text prompt needs a tokenizer: pass Engine(..., tokenizer=...) "
                                             "or token ids")
            ids = list(self.tokenizer(prompt).input_ids)
        elif isinstance(prompt, torch.Tensor):
            ids = [int(t) for t in prompt.reshape(-1).tolist()]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise SamplingParameterError("the prompt is empty")
        v = self.target.vocab_size
        if min(ids) < 0 or max(ids) >= v:
            raise SamplingParameterError(f"prompt token ids must be in [0, {v})")
        return ids

    def _decode(self, ids: list) -> str:
        tok = self.tokenizer
        return tok.decode(ids, skip_special_tokens=True) if tok is not None else ""

    def _eos_ids(self) -> set:
        eos = set(self.target.config.eos_token_ids or [])
        tok = self._tokenizer
        if tok is not None and getattr(tok, "eos_token_id", None) is not None:
            eos.add(int(tok.eos_token_id))
        return eos

    # ------------------------------------------------------------------ public API
    def generate(self, prompt_or_ids, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                 stop: Optional[Sequence[str]] = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` (exactly that many unless EOS or a stop string comes
        first). ``temperature=0`` is greedy. ``stop`` strings end generation; the text stops
        before the stop string and ``token_ids`` end with the token that completed it.

        Raises SamplingParameterError for bad parameters and ContextLengthError when prompt +
        max_new_tokens + the largest draft tree cannot fit the KV caches (the budget is never
        shrunk silently: load the models with a larger max_len or lower the budget)."""
        for _ in self.stream(prompt_or_ids, max_new_tokens, temperature, top_p, top_k, seed, stop):
            pass
        return self.last_result

    def stream(self, prompt_or_ids, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
               stop: Optional[Sequence[str]] = None) -> Iterator[str]:
        """Like ``generate`` but yields one text piece after every target pass, possibly ""
        (text held back while it could still be the start of a stop string or an incomplete
        character, or no tokenizer), so a consumer that closes the iterator stops the engine at
        the next pass. ``self.last_result`` holds the GenerationResult when the iterator ends."""
        params = SamplingParams(float(temperature), float(top_p), top_k)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise SamplingParameterError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise SamplingParameterError("stop strings must be non-empty")
        if stops and self.tokenizer is None:
            raise SamplingParameterError("stop strings need a tokenizer")
        ids = self._encode(prompt_or_ids)
        self._check_fits(len(ids), max_new_tokens)
        mem_cap = memory.check_request(self, len(ids), sampled=not params.greedy)
        if self.auto:
            self._auto_cap = min(self._auto_cap, mem_cap)
        text_on = self.tokenizer is not None
        eos = self._eos_ids()
        out: list = []
        emitted = ""
        stats = GenerationStats()
        for new in self._out_of_memory_named(self._passes(ids, max_new_tokens, params, seed, stats)):
            finish = None
            for i, t in enumerate(new):
                if t in eos:
                    new, finish = new[:i + 1], "eos"
                    break
            out.extend(new)
            if len(out) >= max_new_tokens:
                out, finish = out[:max_new_tokens], finish or "length"
            if text_on:
                text = self._decode(out)
                cut = _find_stop(text, stops)
                if cut is not None:
                    text, finish = text[:cut[0]], "stop"
                    out = self._trim_to_stop(out, cut[1])
                    safe = len(text)
                else:
                    safe = len(text) if finish else _safe_prefix_len(text, stops)
                piece = ""
                if safe > len(emitted):
                    piece = text[len(emitted):safe]
                    emitted = text[:safe]
                yield piece
            else:
                yield ""
            if finish:
                stats.finish_reason = finish
                break
        stats.new_tokens = len(out)
        self.last_result = GenerationResult(token_ids=out, text=emitted if text_on else "", stats=stats)

    def _out_of_memory_named(self, passes: Iterator[list]) -> Iterator[list]:
        """An allocation failure inside a pass (the estimate in memory.py missed, or another
        process took the memory) becomes a MemoryBudgetError that names the setting to lower."""
        try:
            yield from passes
        except RuntimeError as e:
            oom = isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "can't allocate memory" in str(e)
            if not oom:
                raise
            raise MemoryBudgetError(memory.describe_failure(self, e)) from e

    def _trim_to_stop(self, out: list, end: int) -> list:
        """The shortest prefix of ``out`` whose text contains the stop string ending at ``end``."""
        for i in range(1, len(out) + 1):
            if len(self._decode(out[:i])) >= end:
                return out[:i]
        return out

    # ------------------------------------------------------------------ capacity
    def _tree_sizes(self) -> tuple[int, int]:
        """(most tokens one verification pass writes, most draft tree-region slots per pass)."""
        p = self.params
        if self.method == "autoregressive":
            return 1, 0
        if self.method == "chain":
            return 1 + p["k"], p["k"]
        if self.method == "specinfer":
            return 1 + p["n"] * p["depth"], 1 + p["n"] * (p["depth"] - 1)
        return 1 + self._max_budget, 1 + (p["max_depth"] - 1) * p["beams_per_step"]

    def _check_tree_fits(self) -> None:
        """At construction: the largest verification pass must fit the target's cache next to the
        shortest possible request (a 1-token prompt, 1 new token)."""
        verify, _ = self._tree_sizes()
        if 2 + verify > self.target.max_len:
            what = {"specexec": f"budget={self.budget}" + (f" (max_budget={self._max_budget})" if self.auto else ""), "chain": f"k={self.params.get('k')}",
                    "specinfer": f"n={self.params.get('n')} x depth={self.params.get('depth')}"}.get(self.method, "")
            raise ContextLengthError(
                f"{what}: a verification tree of {verify} tokens (plus a 1-token prompt and 1 new token) "
                f"does not fit the target's KV cache (max_len={self.target.max_len}); lower the budget or "
                f"load the target with a larger max_len")

    def _check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        verify, draft_slots = self._tree_sizes()
        if self.auto:
            # Shrinking the tree to what this request leaves free is auto's job; it needs 1 node.
            self._auto_cap = min(self._max_budget, self.target.max_len - prompt_len - max_new_tokens - 1)
            verify = 1 + max(1, self._auto_cap)
        need = prompt_len + max_new_tokens + verify
        if need > self.target.max_len:
            raise ContextLengthError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) + verification tree ({verify}) "
                f"= {need} tokens exceed the target's KV cache (max_len={self.target.max_len}); lower "
                f"max_new_tokens or the budget, or load the target with a larger max_len")
        if self.draft is not None:
            # SpecExec grows a smaller tree when the draft's cache runs short; it needs one slot.
            draft_slots = 1 if self.method == "specexec" else draft_slots
            need = prompt_len + max_new_tokens + draft_slots
            if need > self.draft.max_len:
                raise ContextLengthError(
                    f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) + draft tree ({draft_slots}) "
                    f"= {need} tokens exceed the draft's KV cache (max_len={self.draft.max_len})")

    # ------------------------------------------------------------------ the loop
    def _host(self, t: torch.Tensor):
        """Every device -> host read of the engine goes through here, so syncs are counted."""
        self._syncs += 1
        return t.tolist()

    def _passes(self, ids: list, max_new_tokens: int, params: SamplingParams, seed: Optional[int],
                stats: GenerationStats) -> Iterator[list]:
        """Yields the new tokens of each target pass (the caller stops the iteration)."""
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        # The walk's draws use noise keyed by sequence position (sampling.PositionNoise): the
        # sampled text does not depend on which tree was verified.
        noise = sampling.PositionNoise(gen.initial_seed(), self.device)
        t0 = time.perf_counter()
        tp = len(ids) - 1
        # Checked with the first acceptance read, so a broken prefill costs no extra sync.
        self._prefill_bad = None
        if tp:
            pl = self.target.forward(torch.tensor(ids[:-1], device=self.device), torch.arange(tp, device=self.device),
                                     self.target.cache, 0, logits_rows=torch.tensor([tp - 1], device=self.device))
            self._prefill_bad = ~torch.isfinite(pl).all()
        stats.prefill_seconds = time.perf_counter() - t0
        self._dp, self._pending = 0, list(ids)
        self._tp, self._seq = tp, list(ids)     # introspection: committed target prefix and text
        produced = 0
        while produced < max_new_tokens:
            self._syncs = 0
            # Drafting deeper than what is left to generate is wasted work.
            limit = max_new_tokens - produced
            if self.auto:
                self._budget, self._depth = self.budget_controller.plan(self._auto_cap)
            self._curve = None
            calls0 = stats.draft_calls
            t0 = time.perf_counter()
            tree, extra = self._grow(params, gen, limit, stats)
            t1 = time.perf_counter()
            stats.draft_seconds += t1 - t0
            positions = tp + tree.depths
            logits = self.target.forward(tree.tokens, positions, self.target.cache, tp, tree.mask)
            walk_noise = None
            if not params.greedy and (extra is None):
                bound = tree.depth_bound if tree.depth_bound is not None else tree.n - 1
                walk_noise = noise.rows(tp + 1, min(bound, tree.n - 1) + 1, logits.shape[-1])
            res = self._accept(tree, extra, logits, params, gen, walk_noise)
            tp = self.target.cache.commit(tp, torch.tensor(res.rows, device=self.device) + tp)
            self._commit_draft(res)
            t2 = time.perf_counter()
            stats.target_seconds += t2 - t1
            if self.method == "specexec":
                stats.budgets.append(self._budget)
            if self.auto:
                pts = self._curve[0] if self._curve is not None else []
                # The first pass's draft time includes the draft's prompt prefill: not a tree cost.
                self.budget_controller.observe(
                    self._budget, tree.n, stats.draft_calls - calls0, None if stats.target_passes == 0 else t1 - t0,
                    t2 - t1, pts, [v / _CURVE_SCALE for v in res.tail], len(res.tokens) - 1,
                    truncated=limit < self._depth)
            stats.target_passes += 1
            stats.tree_tokens += tree.n
            new = res.tokens[1:] + [res.bonus]
            h = stats.tokens_per_pass_histogram
            h[len(new)] = h.get(len(new), 0) + 1
            stats.syncs += self._syncs
            stats.max_syncs_per_pass = max(stats.max_syncs_per_pass, self._syncs)
            produced += len(new)
            self._tp = tp
            self._seq.extend(new)
            yield new

    def _commit_draft(self, res: _Pass) -> None:
        if self.draft is None:
            self._pending = [res.bonus]
            return
        k = 0
        while k < len(res.draft_slots) and res.draft_slots[k] >= 0:
            k += 1
        if k:
            slots = torch.tensor(res.draft_slots[:k], device=self.device) + self._dp
            self._dp = self.draft.cache.commit(self._dp, slots)
        self._pending = res.tokens[k:] + [res.bonus]

    # ------------------------------------------------------------------ drafting
    def _draft_root(self, tree: DraftTree, stats: GenerationStats) -> torch.Tensor:
        """Feed the pending chain (ending with the root) to the draft: it becomes committed
        draft prefix except the root, whose K/V lands in draft slot 0. Returns root logits [V]."""
        dev, dp, pend = self.device, self._dp, self._pending
        n = len(pend)
        logits = self.draft.forward(torch.tensor(pend, device=dev), torch.arange(dp, dp + n, device=dev),
                                    self.draft.cache, dp, logits_rows=torch.tensor([n - 1], device=dev))
        stats.draft_calls += 1
        self._dp = dp + n - 1
        self._pending = []
        tree.mark_expanded(torch.zeros(1, dtype=torch.long, device=dev))
        return logits[0]

    def _draft_step(self, tree: DraftTree, nodes: torch.Tensor, stats: GenerationStats,
                    runner=None) -> torch.Tensor:
        """One draft call over ``nodes`` (each attends to the prefix and its ancestors) -> logits
        ``[m, V]``. ``runner``: the pass's StaticDraftStep, used where the step fits it."""
        slots = tree.mark_expanded(nodes)
        dp = self._dp
        if runner is not None and runner.fits(dp, tree.n_draft_slots):
            logits = runner(tree.tokens[nodes], dp + tree.depths[nodes], dp + slots, tree.draft_mask(nodes), dp)
            stats.static_draft_calls += 1
        else:
            logits = self.draft.forward(tree.tokens[nodes], dp + tree.depths[nodes], self.draft.cache, dp,
                                        tree_mask=tree.draft_mask(nodes), cache_slots=dp + slots)
        stats.draft_calls += 1
        return logits

    def _static_runner(self, beams: int):
        """The static-shape draft step for ``beams`` nodes per step (one per beams value; None
        when off or when the draft's cache is too short for one)."""
        if not self.static_draft:
            return None
        if beams not in self._draft_runners:
            from .draft_graph import StaticDraftStep

            # The tree region of 16 full-beam steps (deeper passes rarely fill every step;
            # a step past the region runs dynamically).
            width = 1 + (min(self.params["max_depth"], 16) - 1) * beams
            fits = self.draft.max_len >= beams + width + 1
            self._draft_runners[beams] = StaticDraftStep(self.draft, beams, width) if fits else None
        return self._draft_runners[beams]

    def _grow(self, params: SamplingParams, gen, limit: int, stats: GenerationStats):
        root = self._pending[-1]
        if self.method == "autoregressive":
            tree = DraftTree(1, self.device, root)
            return tree.compact(torch.zeros(1, dtype=torch.long, device=self.device)), None
        if self.method == "specexec":
            return self._grow_specexec(root, params, min(limit, self._depth), stats), None
        n = 1 if self.method == "chain" else self.params["n"]
        depth = self.params["k"] if self.method == "chain" else self.params["depth"]
        return self._grow_chains(root, params, gen, n, min(depth, limit), stats)

    def _grow_specexec(self, root: int, params: SamplingParams, max_depth: int, stats) -> VerifyTree:
        """Parallel best-first growth (docs/ALGORITHM.md, step 1); deterministic given the draft."""
        budget, beams, width = self._budget, self.params["beams_per_step"], self.params["branch_width"]
        if self.auto and not self._user_beams:
            beams = min(budget, 32)
        policy = self.tree_policy
        temp = policy.draft_temperature(params)
        plan = policy.sequoia_plan(params, budget, max_depth) if policy.name == "sequoia" else None
        if plan is not None:
            # A static draft step pads to a power of two: shapes re-planned as the vector is
            # learned reuse the same runner (and CUDA graph).
            beams = 1 << (plan.beams - 1).bit_length()
        runner = self._static_runner(beams)
        tree = DraftTree(plan.capacity if plan else 1 + max_depth * beams * width, self.device, root)

        def expand(nodes, logits, shape_mask=None):
            logq = torch.log_softmax(logits.float() / temp, dim=-1)
            vals, toks = logq.topk(min(width, logq.shape[-1]), dim=-1)
            # Tree policy (tree_policy.py): child scores (calibrated log-acceptance or draft log-prob)
            # and the acceptance model's feature bins.
            scores, feats = policy.child_scores(vals, params)
            if shape_mask is not None:      # Sequoia: children outside the static shape are created dead
                scores = torch.where(shape_mask[:, :scores.shape[1]], scores, torch.full_like(scores, NEG_INF))
            tree.add_children(nodes, toks, scores, feats)
            return tree.prune(budget)

        root_logits = self._draft_root(tree, stats)[None]
        if plan is not None:
            self._grow_static_shape(tree, plan, root_logits, expand, stats, runner)
            self._syncs += 1    # nonzero() reads the count
            if self.auto:
                self._curve = self._prediction_curve(tree, budget)
            return tree.compact(tree.alive_nodes())
        threshold = expand(torch.zeros(1, dtype=torch.long, device=self.device), root_logits)
        margin = policy.candidate_margin(params)
        for _ in range(1, max_depth):
            # Near the end of the draft's cache the tree just grows less (still exact).
            room = self.draft.max_len - self._dp - tree.n_draft_slots
            if room <= 0:
                break
            cand = tree.candidates(threshold - margin, max_depth)
            vals, idx = cand.topk(min(beams, tree.n_nodes, room))
            n_valid = self._host((vals > NEG_INF).sum())
            if n_valid == 0:
                break
            nodes = idx[:n_valid]
            threshold = expand(nodes, self._draft_step(tree, nodes, stats, runner))
        self._syncs += 1    # nonzero() reads the count
        if self.auto:
            self._curve = self._prediction_curve(tree, budget)
        return tree.compact(tree.alive_nodes())

    def _grow_static_shape(self, tree: DraftTree, plan, root_logits, expand, stats, runner) -> None:
        """Sequoia: fill ``plan`` (tree_policy.ShapePlan) level by level, one draft call per level,
        no host reads."""
        for level, (nodes, alive) in enumerate(plan.levels):
            if level == 0:
                expand(nodes, root_logits, alive)
                continue
            if self.draft.max_len - self._dp - tree.n_draft_slots < int(nodes.shape[0]):
                break   # near the end of the draft's cache the tree just stops growing (still exact)
            expand(nodes, self._draft_step(tree, nodes, stats, runner), alive)

    def _prediction_curve(self, tree: DraftTree, budget: int):
        """(sizes, device int64 values): the expected accepted draft tokens of the best ``size``
        nodes created (sum of their path probabilities), at the controller's sizes, then the
        expected accepted tokens at each depth 1..max_depth of the tree verified (the controller
        weighs each level against the cost of its draft call); scaled to integers so they ride
        in the acceptance packet (budget.py)."""
        n = tree.n_nodes - 1
        pts = self.budget_controller.eval_points(budget, n)
        if not pts:
            return None
        prob = tree.scores[1:n + 1].exp()
        cum = prob.sort(descending=True).values.cumsum(0)
        vals = cum[torch.tensor([p - 1 for p in pts], device=self.device)]
        depths = tree.depths[1:n + 1].clamp_max(self.params["max_depth"])
        at_depth = torch.zeros(self.params["max_depth"] + 1, device=self.device).index_add_(
            0, depths, prob * tree.alive[1:n + 1])[1:]
        return pts, (torch.cat([vals, at_depth]) * _CURVE_SCALE).round().long()

    def _grow_chains(self, root: int, params: SamplingParams, gen, n: int, depth: int, stats):
        """``n`` root candidates (greedy: the draft's top-n; sampling: drawn without replacement
        from the processed draft distribution), each continued to a chain of ``depth`` tokens.
        Node of chain j at depth i (1-based) is ``1 + (i - 1) * n + j``."""
        dev = self.device
        tree = DraftTree(1 + n * depth, dev, root)
        root_logits = self._draft_root(tree, stats)
        n = min(n, root_logits.shape[-1])
        q_rows = None
        if params.greedy:
            cands, valid = root_logits.topk(n).indices, torch.ones(n, dtype=torch.bool, device=dev)
        else:
            q_rows = torch.zeros(1 + n * depth, root_logits.shape[-1], device=dev)
            q_rows[0] = process_logits(root_logits, params)
            cands, valid = sampling.sample_without_replacement(q_rows[0], n, gen)
        zero = torch.zeros(1, n, device=dev)
        tips = tree.add_children(torch.zeros(1, dtype=torch.long, device=dev), cands[None],
                                 torch.where(valid[None], zero, zero - float("inf")))
        for _ in range(1, depth):
            logits = self._draft_step(tree, tips, stats)
            if params.greedy:
                nxt = logits.argmax(-1)
            else:
                q = process_logits(logits, params)
                q_rows[tips] = q
                nxt = sampling.sample(q, gen)
            tips = tree.add_children(tips, nxt[:, None], torch.zeros(n, 1, device=dev))
        vt = tree.compact(torch.arange(tree.n_nodes, device=dev))
        return vt, (q_rows, cands, valid, n, depth)

    # ------------------------------------------------------------------ acceptance
    def _accept(self, tree: VerifyTree, extra, logits: torch.Tensor, params: SamplingParams, gen,
                walk_noise: Optional[torch.Tensor] = None) -> _Pass:
        """``walk_noise``: float ``[depths, V]`` Exp(1) noise of the sampled walk, row d for the
        draws of tree depth d (sampling.PositionNoise)."""
        p = process_logits(logits, params)
        if extra is None or params.greedy:
            # The walk is exact for any tree; for greedy it is what every method reduces to.
            draws = p.argmax(-1) if params.greedy else sampling.sample_with_noise(p, walk_noise[tree.depths])
            last = _tree.walk_accept(tree, draws)   # module lookup: tests swap in a broken walk
            bonus = draws[last]
        else:
            last, bonus = self._accept_chains(tree, extra, p, gen)
        rows = path_rows(tree, last, tree.n)
        bad = (~torch.isfinite(logits).all()).long()
        if self._prefill_bad is not None:
            bad = bad + 2 * self._prefill_bad.long()
            self._prefill_bad = None
        parts = [bad.view(1), tree.depths[last].view(1), bonus.view(1), tree.tokens[rows],
                 tree.draft_slots[rows], rows]
        n_tail = 0
        if self._curve is not None:
            parts.append(self._curve[1])
            n_tail = int(self._curve[1].shape[0])
        # Tree policy: the acceptance model's evidence rides in the same read (no extra sync).
        evidence = (self.tree_policy.observations(tree, p, params, tree.mask[last])
                    if self.tree_policy is not None else None)
        if evidence is not None:
            parts.append(evidence)
        h = self._host(torch.cat(parts))
        evidence_packet = None
        if evidence is not None:
            n_ev = int(evidence.shape[0])
            evidence_packet, h = h[len(h) - n_ev:], h[:len(h) - n_ev]
        tail = h[len(h) - n_tail:] if n_tail else []
        if h[0]:
            where = "the prompt prefill" if h[0] >= 2 else "a verification pass"
            raise NonFiniteLogitsError(
                f"the target model produced NaN/inf logits in {where} (method={self.method}); its weights "
                f"or activations are not finite (a corrupt checkpoint, or an overflow in a low-precision "
                f"dtype)")
        if evidence_packet is not None:     # only finite passes teach the tree policy
            self.tree_policy.update(params, evidence_packet)
        m, bonus_tok, rest = h[1], h[2], h[3:]
        n = len(rows)
        return _Pass(tokens=rest[:m + 1], draft_slots=rest[n:n + m + 1], rows=rest[2 * n:2 * n + m + 1],
                     bonus=bonus_tok, tail=tail)

    def _accept_chains(self, tree: VerifyTree, extra, p: torch.Tensor, gen):
        """Multi-candidate rejection at the root, then chain rejection along the accepted
        candidate's chain (n = 1 is classic speculative sampling). Device-only."""
        q_rows, cands, valid, n, depth = extra
        dev = p.device
        acc_j, p_root = sampling.multi_candidate_accept(p[0], q_rows[0], cands, valid, gen)
        rows = 1 + torch.arange(depth, device=dev) * n + acc_j.clamp_min(0)
        n_acc, tok = sampling.chain_accept(p[rows], q_rows[rows[:-1]], tree.tokens[rows[1:]], gen)
        rejected = acc_j < 0
        last = torch.where(rejected, torch.zeros_like(n_acc), rows[n_acc])
        bonus = torch.where(rejected, sampling.sample(p_root, gen), tok)
        return last, bonus


# ---------------------------------------------------------------------- helpers
def _find_stop(text: str, stops: list) -> Optional[tuple[int, int]]:
    """(start, end) of the earliest stop string in ``text``, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(s))
    return best


def _safe_prefix_len(text: str, stops: list) -> int:
    """How much of ``text`` can be shown: hold back an incomplete character and any suffix that
    may be the start of a stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                n -= k
                break
    return max(n, 0)


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
    except Exception:
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
