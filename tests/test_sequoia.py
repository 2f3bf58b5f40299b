"""Sequoia's optimal static trees (specexec_rt/speculative/sequoia.py): the DP against a brute
force over every tree for small budgets, and the shapes laid out for DraftTree growth."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from specexec_rt.speculative.sequoia import max_nodes, optimal_shape, shape_value
from specexec_rt.speculative.tree_policy import plan_shape, set_defaults


def all_trees(n: int, depth: int, width: int):
    """Every ordered tree of ``n`` nodes, depth <= ``depth``, <= ``width`` children per node, as
    nested tuples of child subtrees in rank order."""
    if n == 1:
        yield ()
        return
    if depth == 0:
        return

    def compositions(s, parts):
        if s == 0:
            yield ()
            return
        if parts == 0:
            return
        for t in range(1, s + 1):
            for rest in compositions(s - t, parts - 1):
                yield (t,) + rest

    for sizes in compositions(n - 1, width):
        for subs in itertools.product(*[list(all_trees(t, depth - 1, width)) for t in sizes]):
            yield subs


def tree_value(tree, a) -> float:
    return 1.0 + sum(a[k] * tree_value(sub, a) for k, sub in enumerate(tree))


def random_vector(rng: random.Random, width: int) -> list:
    a = sorted((rng.random() for _ in range(width)), reverse=True)
    s = sum(a)
    return [x / s * rng.uniform(0.3, 1.0) for x in a] if s > 1 else a


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    width = rng.randint(1, 4)
    a = random_vector(rng, width)
    if seed % 4 == 0:
        a = [1.0] + [0.0] * (width - 1)          # a draft that is always right: chains
    for n in range(1, 8):
        for depth in range(0, 5):
            trees = list(all_trees(n, depth, width))
            if not trees:
                with pytest.raises(ValueError, match="no tree"):
                    optimal_shape(a, n, depth)
                continue
            best = max(tree_value(t, a) for t in trees)
            shape = optimal_shape(a, n, depth)
            assert shape.n == n and shape.depth <= depth
            assert all(r <= width for r in shape.ranks)
            assert shape.value == pytest.approx(best, abs=1e-9)
            assert shape_value(shape.parents, shape.ranks, a) == pytest.approx(best, abs=1e-9)


def test_shape_is_breadth_first_with_contiguous_ranks():
    shape = optimal_shape([0.7, 0.15, 0.05, 0.03], 40, 6)
    assert shape.parents[0] == -1 and list(shape.depths) == sorted(shape.depths)
    for i in range(shape.n):
        ranks = [shape.ranks[c] for c in shape.children(i)]
        assert ranks == list(range(1, len(ranks) + 1))
        for c in shape.children(i):
            assert shape.depths[c] == shape.depths[i] + 1 and c > i


def test_always_right_draft_gives_a_chain_as_deep_as_allowed():
    shape = optimal_shape([1.0, 0.0, 0.0], 11, 10)
    assert shape.depth == 10 and all(r == 1 for r in shape.ranks[1:])
    assert shape.value == pytest.approx(11.0)


def test_tables_are_reused_for_smaller_budgets_and_depths():
    a = [0.6, 0.2, 0.1]
    big = optimal_shape(a, 200, 8)
    for n, d in [(17, 8), (65, 5), (40, 3)]:
        small = optimal_shape(a, n, d)
        assert small.n == n and small.depth <= d
    assert big.value >= optimal_shape(a, 65, 8).value


def test_validation():
    with pytest.raises(ValueError, match="acceptance"):
        optimal_shape([], 4, 2)
    with pytest.raises(ValueError, match="acceptance"):
        optimal_shape([1.2], 4, 2)
    with pytest.raises(ValueError, match="n_nodes"):
        optimal_shape([0.5], 0, 2)
    assert max_nodes(1, 5) == 6 and max_nodes(3, 2) == 13
    for bad, match in [(dict(tree="beam"), "tree"), (dict(tree="softmax", growth_temperature=0), "growth_temperature"),
                       (dict(tree="calibrated", growth_temperature=0.5), "softmax"),
                       (dict(tree="sequoia", acceptance=[0.9, 0.5]), "acceptance"),
                       (dict(tree="softmax", acceptance=[0.5]), "sequoia")]:
        with pytest.raises(ValueError, match=match):
            set_defaults(dict(bad))
    assert set_defaults({})["max_depth"] == 32 and set_defaults({"tree": "softmax"})["max_depth"] == 16


def test_plan_lays_out_the_shape_in_creation_order():
    """Replaying the plan the way the engine grows a DraftTree (expanded nodes create ``width``
    children each, consecutively) recreates exactly the shape's parent/rank structure."""
    from specexec_rt.speculative.tree import DraftTree

    width = 4
    shape = optimal_shape([0.6, 0.2, 0.1, 0.05], 30, 5)
    plan = plan_shape(shape, width, "cpu")
    tree = DraftTree(plan.capacity, "cpu", root_token=0)
    for level, (nodes, alive) in enumerate(plan.levels):
        tree.mark_expanded(nodes)
        m = int(nodes.shape[0])
        tokens = torch.arange(width).repeat(m, 1)          # child of rank r carries token r - 1
        scores = torch.where(alive, torch.full((m, width), -0.1), torch.full((m, width), float("-inf")))
        tree.add_children(nodes, tokens, scores)
    assert plan.capacity == tree.n_nodes
    alive = tree.alive_nodes()
    assert int(alive.shape[0]) == shape.n
    # Same multiset of (depth, rank path) as the shape.
    parents, toks = tree.parents.tolist(), tree.tokens.tolist()

    def rank_path(parent_of, rank_of, i):
        out = []
        while parent_of(i) >= 0:
            out.append(rank_of(i))
            i = parent_of(i)
        return tuple(reversed(out))

    got = sorted(rank_path(lambda i: parents[i], lambda i: toks[i] + 1, int(i)) for i in alive)
    want = sorted(rank_path(lambda i: shape.parents[i], lambda i: shape.ranks[i], i) for i in range(shape.n))
    assert got == want
    assert plan.beams == max(int(n.shape[0]) for n, _ in plan.levels)
    assert plan.n_expanded == sum(1 for i in range(shape.n) if shape.children(i))
