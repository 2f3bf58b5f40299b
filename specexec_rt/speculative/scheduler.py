"""The scheduler's decision for one pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .methods import Method


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
    draft reads before drafting)."""

    tree_requests: list
    prefill_chunks: list
    method: Method
    budget: int
    depth: int
    controller: Optional[object] = None
    first_trees: bool = False
    carries_prompt: bool = False
    catch_up: int = 0
    requests: list = field(default_factory=list)
