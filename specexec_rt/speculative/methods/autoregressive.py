"""Plain decoding as a method: the tree is the root alone, no draft."""
from __future__ import annotations

from ..memory import PassShape
from ..sampling import noise_ring_rows
from ..tree import ChainTree
from .base import Method, PassContext


class Autoregressive(Method):
    """One target row per pass: the root, whose draw is the pass's one new token."""

    name = "autoregressive"
    needs_draft = False

    def verify_rows(self, budget: int) -> int:
        return 1

    def draft_slots(self) -> int:
        return 0

    def pass_shape(self, budget: int, n_requests: int = 1) -> PassShape:
        return PassShape(1, n_requests=n_requests, noise_rows=noise_ring_rows(1))

    def grow(self, ctx: PassContext) -> list:
        return self.root_trees(ctx.requests, ctx.device)

    @staticmethod
    def root_trees(requests: list, device) -> list:
        """``(VerifyTree, None)`` of each request's root alone."""
        return [(ChainTree(1, device, r.root).compact(), None) for r in requests]
