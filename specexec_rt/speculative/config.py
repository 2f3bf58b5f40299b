"""The engine's configuration: ``Engine(...)``'s arguments checked together, before anything runs,
and what fits where.

- ``EngineConfig.build``: every constructor argument checked (each error names the argument),
  the method object built from the registry, the draft checked against the target (vocabulary,
  device), the largest tree checked against the target's cache and fitted to the free memory,
  and the static-draft default decided.
- ``request_budget_cap``: before a request is queued, whether it fits both caches, and the
  largest tree its caches allow (``budget="auto"`` shrinks its trees to it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import memory
from ..errors import ContextLengthError, MemoryBudgetError, SpecExecError, VocabularyMismatchError
from .auto import AUTO_SHAPES
from .methods import METHOD_PARAMS, Method, method_class


@dataclass
class EngineConfig:
    """What the engine's parts are built from.

    method: the decoding method object; draft: the draft model (None for a method that needs
    none); auto: ``budget="auto"``; budget: the ``budget`` as given (``"auto"`` or an int);
    max_budget: the largest tree a pass may verify (the fixed budget, or auto's ceiling, lowered
    to what fits in memory under auto); auto_shapes: as given (None: the device's default)."""

    method: Method
    draft: Optional[object]
    auto: bool
    budget: Union[int, str]
    max_budget: int
    max_batch: int
    prefill_chunk: int
    static_draft: bool
    auto_shapes: Optional[str]

    @classmethod
    def build(cls, target, draft, method: str, budget: Union[int, str], static_draft: Optional[bool],
              max_batch: int, prefill_chunk: int, method_params: dict) -> "EngineConfig":
        """Check ``Engine``'s arguments (ValueError / TypeError naming the bad one, ContextLengthError
        or MemoryBudgetError when the largest pass cannot fit) and build the config."""
        method_cls = method_class(method)
        auto = isinstance(budget, str) and budget == "auto"
        if isinstance(budget, str) and not auto:
            raise ValueError(f"budget must be a positive int or 'auto', got {budget!r}")
        method_params = dict(method_params)
        draft, lookup_alone = lookup_draft(draft, method, method_params)
        auto_shapes = method_params.pop("auto_shapes", None)
        if auto_shapes is not None and not auto:
            raise ValueError(f"auto_shapes={auto_shapes!r} needs budget='auto'")
        if auto_shapes is not None and auto_shapes not in AUTO_SHAPES:
            raise ValueError(f"auto_shapes must be 'trees' or 'chains', got {auto_shapes!r}")
        if auto and lookup_alone:
            # No draft model to grow chains: auto sizes the lookup's trees.
            if AUTO_SHAPES.get(auto_shapes, False):
                raise ValueError(f"draft={LOOKUP_DRAFT!r} has no draft model to grow chains: use auto_shapes='trees'")
            auto_shapes = "trees"
        if auto:
            if not method_cls.supports_auto:
                raise ValueError(f"budget='auto' needs method='specexec', not {method!r}")
            max_budget = method_params.pop("max_budget", None)
            budget = max(1, min(1024, target.max_len - 3)) if max_budget is None else max_budget
        unknown = set(method_params) - set(METHOD_PARAMS[method])
        if unknown:
            raise TypeError(f"method {method!r} takes no parameter(s) {sorted(unknown)}; "
                            f"it takes {list(METHOD_PARAMS[method]) or 'none'}")
        if method_cls.needs_draft and draft is None and not lookup_alone:
            raise ValueError(f"method {method!r} needs a draft model (or use method='autoregressive'; "
                             f"specexec_rt.default_draft(target) builds one from the target)")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int or 'auto', got {budget!r}"
                             if not auto else f"max_budget must be a positive int, got {budget!r}")
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        draft = draft if method_cls.needs_draft else None
        decoder = method_cls(budget, method_params, auto, target.device)
        if draft is not None:
            check_same_vocabulary(target, draft)
            check_draft_cache(target, draft)
        check_tree_fits(target, decoder, budget)
        max_budget = budget
        avail = memory.available_bytes(target.device)
        if avail is not None:
            # The KV caches come first (allocated on the first pass, at max_len per request slot);
            # the passes' working memory must fit beside them.
            kv = memory.engine_kv_bytes(target, draft, max_batch)
            if kv > avail:
                raise MemoryBudgetError(memory.describe_kv(target, draft, max_batch, kv, avail))
            avail -= kv
            # auto lowers its ceiling to what fits instead of raising
            what = "one draft-and-verify pass" + (f" of {max_batch} requests" if max_batch > 1 else "")
            max_budget = memory.fit_budget(target, draft, decoder, budget, auto, avail, False, what,
                                           n_requests=max_batch)
        if static_draft is None:
            static_draft = (draft is not None and draft.device.type == "cuda" and max_batch == 1
                            and type(draft.layer_source).__name__ == "ResidentLayers")
        return cls(decoder, draft, auto, "auto" if auto else budget, max_budget, max_batch, prefill_chunk,
                   bool(static_draft) and method_cls.static_draft and max_batch == 1, auto_shapes)


# ``Engine(target, draft=LOOKUP_DRAFT)``: prompt-lookup candidates alone, no draft model (ngram.py).
LOOKUP_DRAFT = "ngram"


def lookup_draft(draft, method: str, method_params: dict) -> tuple:
    """``(draft model or None, whether the draft is the prompt lookup alone)``. ``draft="ngram"``
    means SpecExec trees of prompt-lookup candidates: it sets ``ngram=True`` in
    ``method_params`` (in place). ValueError for another string, or another method."""
    if not isinstance(draft, str):
        return draft, False
    if draft != LOOKUP_DRAFT:
        raise ValueError(f"draft must be a model, or {LOOKUP_DRAFT!r} for prompt-lookup candidates alone; got "
                         f"{draft!r} (load a checkpoint with load_model, or use default_draft(target))")
    if "ngram" not in METHOD_PARAMS[method]:
        raise ValueError(f"draft={LOOKUP_DRAFT!r} grows SpecExec trees from prompt-lookup candidates: use "
                         f"method='specexec', not {method!r}")
    if method_params.setdefault("ngram", True) is not True:
        raise ValueError(f"draft={LOOKUP_DRAFT!r} is the prompt lookup alone: ngram="
                         f"{method_params['ngram']!r} contradicts it")
    return None, True


def check_tree_fits(target, method: Method, max_budget: int) -> None:
    """The largest verification pass must fit the target's cache next to the shortest possible
    request (a 1-token prompt, 1 new token)."""
    verify = method.verify_rows(max_budget)
    if 2 + verify > target.max_len:
        raise ContextLengthError(
            f"{method.size_setting()}: a verification tree of {verify} tokens (plus a 1-token prompt and 1 new "
            f"token) does not fit the target's KV cache (max_len={target.max_len}); lower the budget or "
            f"load the target with a larger max_len")


def request_budget_cap(target, draft, method: Method, max_budget: int, auto: bool, prompt_len: int,
                       max_new_tokens: int) -> int:
    """Raise ContextLengthError unless a request fits both caches (each request's region holds
    ``max_len`` slots of each); returns the largest budget its caches allow (auto shrinks the
    tree to it; a fixed budget must fit whole)."""
    verify = method.verify_rows(max_budget)
    cap = max_budget
    if auto:
        # Shrinking the tree to what this request leaves free is auto's job; it needs 1 node.
        cap = min(max_budget, target.max_len - prompt_len - max_new_tokens - 1)
        verify = 1 + max(1, cap)
    need = prompt_len + max_new_tokens + verify
    if need > target.max_len:
        raise ContextLengthError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) + verification tree ({verify}) "
            f"= {need} tokens exceed the target's KV cache (max_len={target.max_len}); lower "
            f"max_new_tokens or the budget, or load the target with a larger max_len")
    if draft is not None:
        draft_slots = method.draft_slots()
        need = prompt_len + max_new_tokens + draft_slots
        if need > draft.max_len:
            raise ContextLengthError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) + draft tree ({draft_slots}) "
                f"= {need} tokens exceed the draft's KV cache (max_len={draft.max_len})")
    return max(1, cap)


def check_draft_cache(target, draft) -> None:
    """A draft built to read a target's KV cache (drafts.py, ``share_cache``) runs only beside
    that target: another model's cache holds another model's keys and values."""
    source = getattr(draft, "kv_source", None)
    if source is not None and source is not target:
        raise ValueError("the draft reads the KV cache of the model it was derived from, which is not this "
                         "engine's target; derive it from this target, or build it with share_cache=False")


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
