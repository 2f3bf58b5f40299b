"""DraftTree invariants under random growth and pruning, the exact walk, and cache commits."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specexec_rt.speculative.tree import NEG_INF, ChainTree, DraftTree, path_rows, walk_accept

V = 12


def host_ancestors(parents: list, i: int) -> set:
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


def grow_random(seed: int, budget: int, beams: int, width: int, steps: int, max_depth: int) -> DraftTree:
    """Best-first growth exactly as the engine drives it, with random draft log-probs."""
    g = torch.Generator().manual_seed(seed)
    tree = DraftTree(1 + steps * beams * width, "cpu", root_token=3)
    threshold = torch.tensor(NEG_INF)
    for _ in range(steps):
        cand = tree.candidates(threshold, max_depth)
        vals, idx = cand.topk(min(beams, tree.n_nodes))
        nodes = idx[vals > NEG_INF]
        if len(nodes) == 0:
            break
        tree.mark_expanded(nodes)
        logq = torch.log_softmax(torch.randn(len(nodes), V, generator=g) * 2, -1)
        # ties on purpose: quantised log-probs make equal scores common
        logq = (logq * 2).round() / 2
        v, t = logq.topk(width, dim=-1)
        tree.add_children(nodes, t, v)
        threshold = tree.prune(budget)
    return tree


def check_invariants(tree: DraftTree, budget: int):
    n = tree.n_nodes
    parents = tree.parents[:n].tolist()
    alive = tree.alive[:n].tolist()
    anc = tree.anc[:n, :n]
    for i in range(n):
        expected = torch.zeros(n, dtype=torch.bool)
        expected[list(host_ancestors(parents, i))] = True
        assert torch.equal(anc[i], expected), f"ancestor row {i}"
        if alive[i] and parents[i] >= 0:
            assert alive[parents[i]], f"alive node {i} has a dead parent"
    assert alive[0]
    assert sum(alive) - 1 <= budget
    scores = tree.scores[:n]
    # scores never increase along a path
    for i in range(1, n):
        assert scores[i] <= scores[parents[i]] + 1e-6
    # best-budget: every dead node (whose parent is alive) scores at most the worst alive node
    alive_t = tree.alive[:n].clone()
    alive_t[0] = False
    if alive_t.any():
        worst = scores[alive_t].min()
        dead = ~tree.alive[:n]
        par_alive = torch.tensor([parents[i] >= 0 and alive[parents[i]] for i in range(n)])
        if (dead & par_alive).any():
            assert scores[dead & par_alive].max() <= worst + 1e-6
    # siblings carry distinct tokens (the walk relies on it)
    seen = set()
    for i in range(1, n):
        if alive[i]:
            key = (parents[i], int(tree.tokens[i]))
            assert key not in seen
            seen.add(key)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), budget=st.integers(1, 40), beams=st.integers(1, 6),
       width=st.integers(1, 5), steps=st.integers(1, 6), max_depth=st.integers(1, 6))
def test_growth_keeps_tree_ancestor_closed_and_best(seed, budget, beams, width, steps, max_depth):
    tree = grow_random(seed, budget, beams, width, steps, max_depth)
    check_invariants(tree, budget)
    assert int(tree.depths[:tree.n_nodes][tree.alive[:tree.n_nodes]].max()) <= max_depth
    vt = tree.compact(tree.alive_nodes())
    nodes = vt.nodes.tolist()
    parents = tree.parents[:tree.n_nodes].tolist()
    for r, node in enumerate(nodes):
        anc = host_ancestors(parents, node)
        assert vt.mask[r].tolist() == [m in anc for m in nodes]
        if r:
            assert nodes[int(vt.parents[r])] == parents[node]
            assert int(vt.parents[r]) < r                    # topological row order
    # the draft mask of expanded nodes is their ancestor relation over draft slots
    exp = tree.expanded[:tree.n_nodes].nonzero().squeeze(1)
    if len(exp):
        order = tree.draft_order[:tree.n_draft_slots].tolist()
        dm = tree.draft_mask(exp)
        for r, node in enumerate(exp.tolist()):
            anc = host_ancestors(parents, node)
            assert dm[r].tolist() == [m in anc for m in order]


def host_walk(vt, draws: list) -> list:
    """Reference: the sequential walk of docs/ALGORITHM.md, step 3."""
    tokens, parents = vt.tokens.tolist(), vt.parents.tolist()
    path = [0]
    while True:
        y = draws[path[-1]]
        child = [r for r in range(len(tokens)) if parents[r] == path[-1] and tokens[r] == y]
        if not child:
            return path
        path.append(child[0])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.integers(1, 30))
def test_walk_accept_equals_sequential_walk(seed, budget):
    tree = grow_random(seed, budget, beams=4, width=3, steps=5, max_depth=5)
    vt = tree.compact(tree.alive_nodes())
    g = torch.Generator().manual_seed(seed + 1)
    # draws that often hit a child: pick a random child token, sometimes a random token
    draws = torch.randint(0, V, (vt.n,), generator=g)
    for r in range(1, vt.n):
        if torch.rand(1, generator=g) < 0.6:
            draws[vt.parents[r]] = vt.tokens[r]
    last = walk_accept(vt, draws)
    expected = host_walk(vt, draws.tolist())
    assert int(last) == expected[-1]
    rows = path_rows(vt, last, vt.n)[: len(expected)].tolist()
    assert rows == expected


def test_add_children_respects_capacity_and_dead_children():
    tree = DraftTree(4, "cpu", root_token=0)
    tree.mark_expanded(torch.tensor([0]))
    tree.add_children(torch.tensor([0]), torch.tensor([[1, 2, 3]]),
                      torch.tensor([[-0.1, float("-inf"), -2.0]]))
    assert tree.alive[:4].tolist() == [True, True, False, True]
    with pytest.raises(RuntimeError, match="capacity"):
        tree.add_children(torch.tensor([1]), torch.tensor([[5]]), torch.tensor([[0.0]]))


def test_prune_threshold_reports_full_tree():
    tree = DraftTree(8, "cpu", root_token=0)
    tree.mark_expanded(torch.tensor([0]))
    tree.add_children(torch.tensor([0]), torch.tensor([[1, 2, 3]]), torch.tensor([[-0.5, -1.0, -3.0]]))
    assert float(tree.prune(5)) == NEG_INF                 # room left: everything is a candidate
    assert float(tree.prune(2)) == -1.0                    # full: the 2nd best score
    assert tree.alive[:4].tolist() == [True, True, True, False]
    cand = tree.candidates(torch.tensor(-1.0), max_depth=3)
    assert cand.tolist() == [NEG_INF, -0.5, NEG_INF, NEG_INF]  # root expanded; only node 1 beats it


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), budget=st.integers(1, 40))
def test_storage_grows_on_demand_with_the_same_tree(seed, budget):
    """Storage starts small and doubles while growing (DraftTree.INITIAL_NODES): the tree, its
    ancestor relation and its draft slots are those of a tree allocated at full capacity."""
    def grown(initial):
        old = DraftTree.INITIAL_NODES
        DraftTree.INITIAL_NODES = initial
        try:
            return grow_random(seed, budget, beams=4, width=3, steps=6, max_depth=6)
        finally:
            DraftTree.INITIAL_NODES = old

    small, full = grown(3), grown(10_000)
    assert full.allocated == full.capacity and small.n_nodes <= small.allocated <= small.capacity
    n = full.n_nodes
    assert small.n_nodes == n
    for name in ("tokens", "parents", "depths", "scores", "alive", "expanded", "draft_slot"):
        assert torch.equal(getattr(small, name)[:n], getattr(full, name)[:n]), name
    assert torch.equal(small.anc[:n, :n], full.anc[:n, :n])
    assert torch.equal(small.draft_order[:small.n_draft_slots], full.draft_order[:full.n_draft_slots])
    check_invariants(small, budget)


@pytest.mark.parametrize("length", [1, 2, 3, 6])
def test_chain_tree_compacts_as_the_general_tree(length):
    """The chain's fast tree hands the engine what the general tree would for the same chain:
    the same tokens, depths, parents, ancestor mask, draft slots and depth bound, at every level
    the drafter sees (draft masks), with the last node left without a draft slot or not."""
    g = torch.Generator().manual_seed(length)
    toks = torch.randint(0, 1000, (length,), generator=g)
    for expand_last in (False, True):
        general, chain = DraftTree(length + 1, "cpu", 7), ChainTree(length + 1, "cpu", 7)
        tip_g = tip_c = torch.zeros(1, dtype=torch.long)
        for i in range(length + 1):
            if i < length or expand_last:
                assert torch.equal(general.mark_expanded(tip_g), chain.mark_expanded(tip_c))
                assert torch.equal(general.draft_mask(tip_g), chain.draft_mask(tip_c))
                assert general.n_draft_slots == chain.n_draft_slots
            if i < length:
                tip_g = general.add_children(tip_g, toks[i].view(1, 1), torch.zeros(1, 1))
                tip_c = chain.add_children(tip_c, toks[i].view(1, 1), None)
                assert torch.equal(tip_g, tip_c)
        a, b = general.compact(torch.arange(general.n_nodes)), chain.compact()
        for name in ("tokens", "depths", "parents", "mask", "draft_slots", "nodes"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.depth_bound == b.depth_bound == length
        # Greedy acceptance gives the same path on either: the walk sees the same tree.
        draws = torch.cat([toks[:length // 2], torch.tensor([5000]), toks[length // 2 + 1:], torch.tensor([1])])
        assert int(walk_accept(a, draws)) == int(walk_accept(b, draws))
        assert torch.equal(path_rows(a, walk_accept(a, draws), length + 1),
                           path_rows(b, walk_accept(b, draws), length + 1))


def test_chain_tree_refuses_what_is_not_a_chain():
    t = ChainTree(3, "cpu", 1)
    with pytest.raises(RuntimeError, match="tip"):
        t.mark_expanded(torch.tensor([0, 0]))
    t.mark_expanded(torch.tensor([0]))
    with pytest.raises(RuntimeError, match="tip"):
        t.mark_expanded(torch.tensor([0]))         # the root again: only the tip, once
    with pytest.raises(RuntimeError, match="one child"):
        t.add_children(torch.tensor([0]), torch.tensor([[4, 5]]), None)
    t.add_children(torch.tensor([0]), torch.tensor([[4]]), None)
    t.add_children(torch.tensor([1]), torch.tensor([[5]]), None)
    with pytest.raises(RuntimeError, match="capacity"):
        t.add_children(torch.tensor([2]), torch.tensor([[6]]), None)
    with pytest.raises(RuntimeError, match="whole chain"):
        t.compact(torch.arange(2))
