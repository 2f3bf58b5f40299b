"""SpecExec tree policies: which tree a pass verifies for a given budget.

- ``calibrated`` (default): the parallel best-first search (docs/ALGORITHM.md, step 1) ranking
  nodes by the acceptance model's calibrated path acceptance (acceptance.py), learned online
  from what verification accepts.
- ``softmax``: the same search ranking nodes by the draft's own path probability at a fixed
  growth temperature (``growth_temperature``; default 1 for greedy decoding, the sampling
  temperature otherwise): the search as the paper describes it.
- ``sequoia``: Sequoia's optimal static tree for the budget and depth (sequoia.py), built
  from a per-rank acceptance vector: ``acceptance=[...]`` (e.g. measured by a calibration run)
  or, by default, the calibrated model's positional marginal, learned online.

Each policy is a class (``POLICIES`` maps the ``tree=`` name to it; nothing else in the
package switches on the name). A policy only chooses which tree is verified; acceptance is the
same exact walk for all of them, so none can change the output. Every policy records the acceptance model's evidence, so
its statistics are also available to compare against (``TreePolicy.model``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .acceptance import AcceptanceModel
from .sampling import SamplingParams

# SpecExec method parameters that are not positive ints (validated here, not by the method).
POLICY_PARAMS = ("tree", "growth_temperature", "acceptance")
SEQUOIA_REFRESH = 0.02      # re-plan a Sequoia shape when a rank's rate moved by more than this
# Evidence: children of every verified parent ("verified"), or of reached parents only
# ("reached": unbiased, a tenth of the data; measured 5.26 vs 5.55 tokens/pass at budget 64).
EVIDENCE = "verified"
# The acceptance model reads each child's probability renormalised over its siblings at this
# temperature (``margin_feature``; 6.02 vs 5.55 tokens/pass with the raw q at budget 64).
FEATURE_TEMPERATURE = 0.5
# The calibrated search does not expand a node whose path acceptance is below this: its children
# are worth less than 1e-3 accepted tokens together, yet each such node is one more row in a
# draft call (on the CPU a 32-row draft step costs ~2x a 1-row one). Without it, an identical
# draft at budget 64 and depth 32 spent the 32 budget slots the chain cannot use on siblings
# that are never accepted, and expanded them: 1.8x Sequoia's draft time for the same tree value.
EXPAND_FLOOR = 1e-3


def set_defaults(p: dict) -> dict:
    """Fill and check SpecExec's tree-policy parameters in ``p`` (in place): ``tree``
    ["calibrated"], ``max_depth`` [the policy's ``default_max_depth``: 32; 16 for softmax],
    and every policy's own parameters (``growth_temperature``, ``acceptance``) [None], each
    given only to the policy that takes it. Raises ValueError naming the parameter."""
    name = p.setdefault("tree", "calibrated")
    if name not in POLICIES:
        raise ValueError(f"specexec parameter tree={name!r}; choose one of {tuple(POLICIES)}")
    chosen = POLICIES[name]
    p.setdefault("max_depth", chosen.default_max_depth)
    for policy in POLICIES.values():
        for param in policy.own_params:
            value = p.setdefault(param, None)
            if value is None:
                continue
            if policy is not chosen:
                raise ValueError(f"{param} applies to tree={policy.name!r} only (got tree={name!r})")
            p[param] = policy.check_param(param, value)
    return p


def margin_feature(logq: torch.Tensor) -> torch.Tensor:
    """log of the draft probability the acceptance model reads, ``[m, w]``: each child's
    probability re-normalised over its siblings at temperature FEATURE_TEMPERATURE,
    ``q^(1/T) / sum_siblings q^(1/T)``. At T = 0.5 it is near 1 for a top token far ahead of the
    runner-up and near 0.5 for a near-tie, where ``q`` alone can be 0.5 in both cases."""
    return torch.log_softmax(logq / FEATURE_TEMPERATURE, dim=-1)


@dataclass
class ShapePlan:
    """A Sequoia shape laid out for ``DraftTree`` growth with ``width`` children per expansion.

    levels[d] = (nodes, alive): the DraftTree node ids expanded by draft call ``d`` (int64
    ``[m_d]``; call 0 is the root) and which of each one's top-``width`` children belong to the
    shape (bool ``[m_d, width]``). capacity: DraftTree nodes created; beams: the widest level
    (the static draft step pads to it); n_expanded: draft slots used."""

    levels: list
    capacity: int
    beams: int
    n_expanded: int
    value: float


def plan_shape(shape, width: int, device) -> ShapePlan:
    """Lay out ``shape`` (sequoia.TreeShape, breadth-first) in DraftTree creation order: the
    nodes expanded by one draft call create ``width`` children each, consecutively, in rank order."""
    kids: dict = {}
    for i in range(1, shape.n):
        kids.setdefault(shape.parents[i], []).append(i)
    tree_id = {0: 0}
    next_id = 1
    levels = []
    frontier = [0]
    while frontier:
        expanding = [i for i in frontier if i in kids]
        if not expanding:
            break
        alive = torch.zeros(len(expanding), width, dtype=torch.bool)
        new_frontier = []
        for j, i in enumerate(expanding):
            for c in kids[i]:
                r = shape.ranks[c]
                if r > width:
                    raise ValueError(f"shape has a rank-{r} child but only {width} children per expansion")
                tree_id[c] = next_id + j * width + r - 1
                alive[j, r - 1] = True
                new_frontier.append(c)
        levels.append((torch.tensor([tree_id[i] for i in expanding], dtype=torch.long, device=device),
                       alive.to(device)))
        next_id += len(expanding) * width
        frontier = sorted(new_frontier)
    n_exp = sum(int(nodes.shape[0]) for nodes, _ in levels)
    return ShapePlan(levels=levels, capacity=next_id, beams=max([int(n.shape[0]) for n, _ in levels] or [1]),
                     n_expanded=n_exp, value=shape.value)


class TreePolicy:
    """Per-engine state of SpecExec's tree policy: one acceptance model per sampling
    configuration. The base class ranks the best-first search by the calibrated path
    acceptance; subclasses change what differs (``SoftmaxPolicy``: the draft's probabilities;
    ``SequoiaPolicy``: a static shape instead of the search). ``POLICIES`` maps each ``tree=``
    name to its class.

    width: ``branch_width``; growth_temperature, acceptance: see ``set_defaults``."""

    name = ""
    own_params: tuple = ()          # method parameters only this policy takes
    default_max_depth = 32

    def __init__(self, device, width: int, growth_temperature: Optional[float] = None,
                 acceptance: Optional[Sequence[float]] = None):
        self.device = torch.device(device)
        self.width = int(width)
        self.growth_temperature = growth_temperature
        self.fixed_vector = None if acceptance is None else tuple(float(x) for x in acceptance)
        self.models: dict = {}            # SamplingParams -> AcceptanceModel
        self.evidence = EVIDENCE

    @staticmethod
    def check_param(name: str, value):
        """``value`` of one of ``own_params``, checked (ValueError naming it) and normalised."""
        return value

    # ------------------------------------------------------------------ sizes
    def static_beams(self, beams: int, m: int) -> int:
        """Rows of the static draft step that serves a step of ``m`` nodes (``beams`` per step)."""
        return beams

    def pass_size(self, budget: int, beams: int, capacity: int) -> tuple[int, int]:
        """(draft rows of one step, ``DraftTree`` nodes) of a pass at ``budget``, given the
        search's ``beams`` per step and its worst-case ``capacity``."""
        return beams, capacity

    # ------------------------------------------------------------------ growth
    def model(self, params: SamplingParams) -> AcceptanceModel:
        if params not in self.models:
            self.models[params] = AcceptanceModel(self.device)
        return self.models[params]

    def draft_temperature(self, params: SamplingParams) -> float:
        """Temperature of the draft distribution the search reads (``q``)."""
        return params.temperature if params.temperature > 0 else 1.0

    def child_scores(self, logq: torch.Tensor, params: SamplingParams, coupled: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-scores, feature bins) of the top-``w`` children of ``m`` expanded nodes, both
        ``[m, w]``, from ``logq`` float ``[m, w]`` in rank order: the draft's log-probs, or for a
        ``coupled`` tree the log race keys ``log(q / E)`` (sampling.coupled_children). The
        acceptance model reads either through ``margin_feature`` (a share among the siblings),
        so the calibrated and Sequoia policies learn what a coupled rank is worth."""
        return self.model(params).scores_and_features(margin_feature(logq))

    def candidate_margin(self, params: SamplingParams) -> float:
        """log of the best acceptance a child can get (<= 0): a node whose score plus this cannot
        beat the budget-th best node has no child worth creating, so it is not expanded."""
        return math.log(max(self.model(params).max_accept, 1e-30))

    def expand_floor(self) -> float:
        """log of the least path acceptance of a node the search expands (-inf: no floor)."""
        return -math.inf if EXPAND_FLOOR <= 0 else math.log(EXPAND_FLOOR)

    static_shapes = False     # grows static shapes (shape_plans) instead of searching

    def shape_plans(self, params: Sequence[SamplingParams], budget: int, depths: Sequence[int]) -> Optional[list]:
        """Static shapes to fill, one ``ShapePlan`` per request (request ``i``: ``params[i]``,
        depth at most ``depths[i]``), or None: grow by the best-first search."""
        return None

    # ------------------------------------------------------------------ learning
    def observations(self, tree, p: torch.Tensor, params: SamplingParams,
                     reached: Optional[torch.Tensor] = None, draws: Optional[torch.Tensor] = None
                     ) -> Optional[torch.Tensor]:
        """The pass's evidence for the acceptance model (int64 device tensor), or None when the
        tree carries none (other methods). ``reached``: bool ``[n]``, the rows the walk reached
        (the accepted path and the root); with ``evidence="reached"`` only their children count.
        ``draws``: int64 ``[n]``, the target's draw at every row when it is a function of what
        the draft saw (greedy; coupled sampling, where the draft ranked by the same noise): each
        child is then valued 1 if it is its parent's draw, else 0, instead of ``p``'s mass."""
        if tree.proposed is None:
            return None
        rows, tokens, bins = tree.proposed
        if self.evidence == "reached" and reached is not None:
            rows = torch.where(reached[rows.clamp_min(0)] & (rows >= 0), rows, torch.full_like(rows, -1))
        return self.model(params).observations(p, rows, tokens, bins, draws)

    def update(self, params: SamplingParams, packet: Sequence[int]) -> None:
        self.model(params).update(packet)


class CalibratedPolicy(TreePolicy):
    """The best-first search ranked by the acceptance model's calibrated path acceptance."""

    name = "calibrated"


class SoftmaxPolicy(TreePolicy):
    """The best-first search ranked by the draft's own path probability at a fixed growth
    temperature, expanding whatever fills the budget: the search as the paper describes it."""

    name = "softmax"
    own_params = ("growth_temperature",)
    default_max_depth = 16

    @staticmethod
    def check_param(name: str, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0) or math.isinf(value):
            raise ValueError(f"specexec parameter growth_temperature must be a positive number, got {value!r}")
        return value

    def draft_temperature(self, params: SamplingParams) -> float:
        if self.growth_temperature is not None:
            return float(self.growth_temperature)
        return super().draft_temperature(params)

    def child_scores(self, logq: torch.Tensor, params: SamplingParams, coupled: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's log-probs (the bins still feed the acceptance model, for comparison). A
        coupled child is scored by its share of the siblings' race keys (at
        ``growth_temperature``, default 1): near 1 for a clear winner of the race, which is the
        target's draw unless the target and draft disagree."""
        _, feats = super().child_scores(logq, params, coupled)
        if coupled:
            return torch.log_softmax(logq / (self.growth_temperature or 1.0), dim=-1), feats
        return logq, feats

    def candidate_margin(self, params: SamplingParams) -> float:
        return 0.0

    def expand_floor(self) -> float:
        return -math.inf


class SequoiaPolicy(TreePolicy):
    """Sequoia's optimal static tree for the budget and depth (sequoia.py), from the per-rank
    acceptance vector ``acceptance=[...]`` or, by default, the calibrated model's positional
    marginal, learned online. Children are scored as the calibrated policy scores them."""

    name = "sequoia"
    own_params = ("acceptance",)
    static_shapes = True

    def __init__(self, device, width: int, growth_temperature: Optional[float] = None,
                 acceptance: Optional[Sequence[float]] = None):
        super().__init__(device, width, growth_temperature, acceptance)
        self._vectors: dict = {}          # SamplingParams -> the Sequoia vector in use
        self._plans: dict = {}            # (vector, budget, depth) -> ShapePlan

    @staticmethod
    def check_param(name: str, value):
        try:
            vals = [float(x) for x in value]
        except TypeError:
            raise ValueError(f"specexec parameter acceptance must be a sequence of probabilities, got {value!r}")
        if not vals or any(not (0.0 <= x <= 1.0) for x in vals) or sum(vals) > 1.0 + 1e-6:
            raise ValueError("specexec parameter acceptance must be non-empty probabilities in [0, 1] "
                             f"summing to at most 1 (distinct siblings are accepted exclusively), got {vals}")
        return tuple(vals)

    def static_beams(self, beams: int, m: int) -> int:
        """A level of ``m`` nodes padded to a power of two: levels vary and are re-planned as the
        acceptance vector is learned, and re-planned shapes then reuse the same static steps."""
        return 1 << max(0, m - 1).bit_length()

    def pass_size(self, budget: int, beams: int, capacity: int) -> tuple[int, int]:
        # A static shape expands each of its <= budget + 1 nodes at most once, but one level
        # (one draft step) may hold up to budget nodes.
        return budget, 1 + (budget + 1) * self.width

    def shape_plans(self, params: Sequence[SamplingParams], budget: int, depths: Sequence[int]) -> Optional[list]:
        return [self.sequoia_plan(p, budget, d) for p, d in zip(params, depths)]

    def vector(self, params: SamplingParams) -> tuple:
        """Sequoia's per-rank acceptance vector: the fixed one, else the learned marginal,
        refreshed only when a rank's rate moved by more than SEQUOIA_REFRESH (each new vector
        costs a DP solve)."""
        if self.fixed_vector is not None:
            return self.fixed_vector[:self.width]
        learned = self.model(params).rank_acceptance(self.width)
        old = self._vectors.get(params)
        if old is None or max(abs(x - y) for x, y in zip(old, learned)) > SEQUOIA_REFRESH:
            self._vectors[params] = tuple(round(x, 4) for x in learned)
        return self._vectors[params]

    def sequoia_plan(self, params: SamplingParams, budget: int, max_depth: int) -> ShapePlan:
        """The optimal static tree of ``budget`` draft nodes and depth <= ``max_depth``."""
        from .sequoia import max_nodes, optimal_shape

        vec = self.vector(params)
        key = (vec, budget, max_depth)
        if key not in self._plans:
            # Kept: a plan is a DP solve plus host-to-device copies of its node ids (on CUDA a
            # copy from pageable memory waits for the stream); the vector changes rarely.
            n = 1 + min(budget, max_nodes(len(vec), max_depth) - 1)
            # Children are created branch_width at a time (all ranks are evidence for the model).
            self._plans[key] = plan_shape(optimal_shape(vec, n, max_depth), self.width, self.device)
        return self._plans[key]


POLICIES = {cls.name: cls for cls in (CalibratedPolicy, SoftmaxPolicy, SequoiaPolicy)}


def make_policy(name: str, device, width: int, growth_temperature: Optional[float] = None,
                acceptance: Optional[Sequence[float]] = None) -> TreePolicy:
    """The policy ``tree=name`` (one of ``POLICIES``)."""
    if name not in POLICIES:
        raise ValueError(f"tree={name!r}; choose one of {tuple(POLICIES)}")
    return POLICIES[name](device, width, growth_temperature, acceptance)
