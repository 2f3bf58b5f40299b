"""The interface every decoding method implements, and what ``grow`` is given about a pass.

A method is one object per engine, built from the engine's ``budget`` and the method
parameters. It answers four kinds of question, and nothing outside the method asks which
method it is:

- sizes: ``verify_rows``, ``draft_slots``, ``pass_shape`` (the memory estimate), the settings
  an error message names;
- ``grow``: the verification trees of a pass's requests (the draft calls go through the
  pass's ``Drafter``);
- ``accept``: the accepted path of one request's tree given the target's processed
  distributions, and what the method learns from it (``evidence``, ``learn``);
- what it can do: ``needs_draft``, ``supports_auto`` (``budget="auto"`` sizes its passes and may
  switch them to another method: ``auto_method``), ``static_draft`` (its draft steps can run as
  static-shape steps, ``static_beams``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import sampling
from .. import tree as _tree
from ..memory import PassShape
from ..sampling import argmax_rows
from ..tree import VerifyTree


class PassContext:
    """What ``grow`` needs about the pass: its requests (each with ``params``, ``gen``,
    ``remaining``), the ``Drafter`` (None without a draft), the host-read function (counts
    the pass's syncs), the pass's budget and depth (SpecExec) and, for ``budget="auto"``, the
    controller whose prediction curve the tree fills in."""

    def __init__(self, requests: list, drafter, host, device, budget: int = 0, depth: int = 0,
                 controller=None):
        self.requests = requests
        self.drafter = drafter
        self.host = host
        self.device = device
        self.budget = budget
        self.depth = depth
        self.controller = controller
        # budget="auto": (sizes, float [k] on the device) set by SpecExec: the expected accepted
        # tokens of the best ``size`` nodes, then per depth (SpecExec.prediction_curve).
        self.curve: Optional[tuple] = None


class Method:
    """A decoding method (see the module docstring). ``budget``: the engine's budget (auto's
    ceiling under ``budget="auto"``); ``given``: the method parameters the user passed."""

    name = ""
    needs_draft = True            # drafts with a draft model (else the engine loads none)
    supports_auto = False         # budget="auto" can size its passes; stats.budgets records them
    static_draft = False          # its draft steps can run as static-shape (CUDA-graph) steps
    param_names: tuple = ()
    other_params: tuple = ()      # parameters that are not positive ints (checked by ``defaults``)
    policy = None                 # what it learns from verification (SpecExec: a TreePolicy)

    def __init__(self, budget: int, given: dict, auto: bool = False, device="cpu"):
        self.auto = auto
        self.max_budget = budget
        self.params = self.defaults(budget, dict(given))
        for k, v in self.params.items():
            if k in self.other_params:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{self.name} parameter {k} must be a positive int, got {v!r}")
        if not isinstance(self.params.get("coupled", True), bool):
            raise ValueError(f"{self.name} parameter coupled must be True or False, got {self.params['coupled']!r}")

    @property
    def grows_without_draft(self) -> bool:
        """Whether ``grow`` can make trees with no draft call (``ctx.drafter`` None): SpecExec's
        prompt lookup. Otherwise a request whose draft is not ready verifies its root alone."""
        return False

    @property
    def coupled(self) -> bool:
        """Sampled drafts are coupled to the target's draws (the draft ranks candidates by
        ``q / E`` with the request's position noise ``E``; see ``sampling.coupled_children``)."""
        return bool(self.params.get("coupled", False))

    def defaults(self, budget: int, p: dict) -> dict:
        return p

    # ------------------------------------------------------------------ sizes
    def verify_rows(self, budget: int) -> int:
        """Most tokens one request's verification writes (the root included)."""
        raise NotImplementedError

    def draft_slots(self) -> int:
        """Most draft tree-region slots one request uses per pass (what its draft cache must
        hold past the text)."""
        raise NotImplementedError

    def pass_shape(self, budget: int, n_requests: int = 1) -> PassShape:
        raise NotImplementedError

    def settings(self) -> tuple[str, str]:
        """(this method's size settings, what to lower), for error messages."""
        return "", "load the model with a smaller max_len"

    def size_setting(self) -> str:
        """The setting that sizes its verification tree, for a context-length error."""
        return self.settings()[0]

    def static_beams(self, budget: int, m: int) -> int:
        """Rows of the static draft step that serves a step of ``m`` nodes at ``budget`` (only
        asked of methods with ``static_draft``)."""
        raise NotImplementedError

    def auto_method(self, budget: int, chains: bool) -> "Method":
        """What grows a pass that ``budget="auto"`` planned at ``budget`` (``chains``: auto plans
        draft chains): only asked of methods with ``supports_auto``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ one pass
    def grow(self, ctx: PassContext) -> list:
        """The ``(VerifyTree, extra)`` of each request of the pass (``extra`` is what ``accept``
        needs besides the tree, or None)."""
        raise NotImplementedError

    def accept(self, tree: VerifyTree, extra, p: torch.Tensor, gen, params, noise=None) -> tuple:
        """(deepest accepted row, bonus token, the target's draw at every row or None), the
        first two 0-dim int64 on the device, the draws int64 ``[n]``. ``p``: the target's
        processed distributions of the tree's rows ``[n, V]`` (greedy: its logits, whose argmax
        is the same). The SpecExec walk is exact for any tree; with greedy decoding every method
        reduces to it. ``noise``: for a sampled walk, float ``[n, V]`` Exp(1) noise, each row's
        the noise of the position its draw fills (sampling.PositionNoise: the text does not
        depend on the tree); None: draw with ``gen``."""
        if params.greedy:
            draws = argmax_rows(p)
        elif noise is not None:
            draws = sampling.sample_with_noise(p, noise)
        else:
            draws = sampling.sample(p, gen)
        last = _tree.walk_accept(tree, draws)   # module lookup: tests swap in a broken walk
        return last, draws[last], draws

    def evidence(self, tree: VerifyTree, p: torch.Tensor, params, last: torch.Tensor,
                 draws: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """What this pass teaches the method about ``tree`` (int64 ``[k]`` on the device, read
        with the acceptance result), or None. ``last``: the deepest accepted row (``accept``);
        ``draws``: the target's draws when acceptance is their 0/1 outcome (greedy and coupled
        trees), else None."""
        if self.policy is None:
            return None
        return self.policy.observations(tree, p, params, tree.mask[last], draws)

    def learn(self, params, evidence: list) -> None:
        """Fold in one request's ``evidence`` of a finite pass, read back on the host."""
        self.policy.update(params, evidence)
