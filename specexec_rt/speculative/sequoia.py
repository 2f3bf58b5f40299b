"""Sequoia's optimal static trees (Chen et al., 2024) as a SpecExec tree policy.

Sequoia assumes *positional acceptance*: the k-th most likely draft child of a node that the
walk reached is accepted with a probability ``a[k-1]`` that depends only on its rank ``k``. A
node is accepted iff its whole root path is, so the expected number of accepted nodes of a
tree is the sum over its nodes of the product of ``a[rank]`` along their paths (the root counts
1). ``optimal_shape`` finds the tree of ``n`` nodes (root included) and depth at most ``D``
that maximises it, by dynamic programming over (depth bound, first free rank, nodes left):

    G[d][n]    = 1 + H[d][1][n - 1]                 best tree of n nodes, depth <= d
    H[d][k][s] = max_{1<=t<=s} a_k G[d-1][t] + H[d][k+1][s - t]   (s > 0; H[d][k][0] = 0)

where ``H[d][k][s]`` places ``s`` nodes in the subtrees of children ranked ``k, k+1, ...``
(ranks are contiguous: child ``k + 1`` exists only if child ``k`` does). ``G[0][1] = 1`` and
``G[0][n > 1] = -inf``. Time ``O(D * w * n^2)`` (vectorised over one axis), memory
``O(D * w * n)`` for the argmax table.

The shape is static: the engine fills it with the draft's top-ranked children level by level
(``tree_policy.ShapePlan``), one draft call per level, with no host reads during growth. Verification is
the same exact walk as every SpecExec tree, so the policy changes speed, never the output.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

NEG = -1e30


@dataclass(frozen=True)
class TreeShape:
    """A rooted tree in breadth-first order: node 0 the root; ``parents[i]`` (root -1),
    ``ranks[i]`` (1-based rank among its siblings, root 0), ``depths[i]``; ``value`` the expected
    number of accepted nodes (root included) under the acceptance vector it was built for."""

    parents: tuple
    ranks: tuple
    depths: tuple
    value: float

    @property
    def n(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return max(self.depths)

    def children(self, i: int) -> list:
        return [j for j, p in enumerate(self.parents) if p == i]


def shape_value(parents: Sequence[int], ranks: Sequence[int], acceptance: Sequence[float]) -> float:
    """Expected accepted nodes (root included) of any tree under positional acceptance."""
    a = list(acceptance)
    prob = [1.0] * len(parents)
    for i in range(1, len(parents)):     # parents come before children
        r = ranks[i]
        prob[i] = prob[parents[i]] * (a[r - 1] if r <= len(a) else 0.0)
    return float(sum(prob))


def _solve(a: np.ndarray, n: int, depth: int):
    """The DP tables: G [depth + 1, n + 1] (NEG where infeasible) and the argmax subtree sizes
    T [depth + 1, w + 1, n + 1] (``T[d, k, s]``: nodes in child ``k``'s subtree when ``s`` nodes go
    to children ``k, k+1, ...`` under depth bound ``d``)."""
    w = len(a)
    G = np.full((depth + 1, n + 1), NEG)
    G[:, 1] = 1.0
    T = np.zeros((depth + 1, w + 1, n + 1), dtype=np.int32)
    s = np.arange(n + 1)[:, None]
    t = np.arange(n + 1)[None, :]
    rest = s - t
    tri = (t >= 1) & (rest >= 0)                          # child k takes t of the s nodes
    rest_c = np.clip(rest, 0, n)
    for d in range(1, depth + 1):
        g_ok = G[d - 1] > NEG / 2                         # feasible subtree sizes at depth d - 1
        H = np.full(n + 1, NEG)                           # no ranks left: only s = 0 is feasible
        H[0] = 0.0
        for k in range(w, 0, -1):
            h_ok = H > NEG / 2
            ok = tri & g_ok[None, :] & h_ok[rest_c]
            cand = np.where(ok, a[k - 1] * np.where(g_ok, G[d - 1], 0.0)[None, :] + H[rest_c], NEG)
            best_t = cand.argmax(1)
            best = cand[np.arange(n + 1), best_t]
            feasible = ok.any(1)
            T[d, k] = np.where(feasible, best_t, 0)
            H = np.where(feasible, best, NEG)
            H[0] = 0.0
        G[d, 1:] = np.where(H[:n] > NEG / 2, 1.0 + H[:n], NEG)
    return G, T


_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()    # (vector, depth) -> (n_max, G, T)
_MAX_TABLES = 8


def _tables(a: tuple, n: int, depth: int):
    """DP tables covering ``n`` nodes and depth ``depth`` for vector ``a``: reuses any cached
    solve of the same vector that is at least as large (its rows d <= depth and columns s <= n are
    the same numbers), else solves for the next power of two above ``n - 1`` (plus the root), so
    one solve serves every smaller budget."""
    for (va, vd), (n_max, G, T) in _TABLES.items():
        if va == a and vd >= depth and n_max >= n:
            _TABLES.move_to_end((va, vd))
            return G, T
    n_max = 1 + (1 << max(0, (n - 2).bit_length())) if n > 1 else 1
    G, T = _solve(np.asarray(a, dtype=np.float64), n_max, depth)
    _TABLES[(a, depth)] = (n_max, G, T)
    while len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return G, T


def _reconstruct(G, T, n: int, depth: int) -> TreeShape:
    parents, ranks, depths = [-1], [0], [0]
    queue = [(0, n, depth)]        # (node id, nodes in its subtree, depth bound)
    head = 0
    while head < len(queue):
        node, size, d = queue[head]
        head += 1
        s, k = size - 1, 1
        while s > 0:
            t = int(T[d, k, s])
            if t < 1:
                raise AssertionError(f"Sequoia DP: no child size at d={d} k={k} s={s}")
            child = len(parents)
            parents.append(node)
            ranks.append(k)
            depths.append(depths[node] + 1)
            queue.append((child, t, d - 1))
            s -= t
            k += 1
    order = _bfs_order(parents, depths)
    return _reindex(parents, ranks, depths, order, float(G[depth, n]))


def _bfs_order(parents: list, depths: list) -> list:
    """Node ids sorted by (depth, parent's new position, rank): breadth-first, siblings by rank."""
    pos = {0: 0}
    order = [0]
    by_depth: dict = {}
    for i in range(1, len(parents)):
        by_depth.setdefault(depths[i], []).append(i)
    for d in sorted(by_depth):
        level = sorted(by_depth[d], key=lambda i: (pos[parents[i]], i))
        for i in level:
            pos[i] = len(order)
            order.append(i)
    return order


def _reindex(parents, ranks, depths, order, value) -> TreeShape:
    new = {old: i for i, old in enumerate(order)}
    return TreeShape(parents=tuple(-1 if parents[o] < 0 else new[parents[o]] for o in order),
                     ranks=tuple(ranks[o] for o in order), depths=tuple(depths[o] for o in order),
                     value=value)


def optimal_shape(acceptance: Sequence[float], n_nodes: int, max_depth: int) -> TreeShape:
    """The tree of exactly ``n_nodes`` nodes (root included) and depth ``<= max_depth`` that
    maximises the expected number of accepted nodes when the rank-``k`` child of a reached node
    is accepted with probability ``acceptance[k - 1]`` (a node has at most ``len(acceptance)``
    children). The DP tables are cached per vector (see ``_tables``)."""
    a = tuple(float(x) for x in acceptance)
    if not a or any(not (0.0 <= x <= 1.0) for x in a):
        raise ValueError(f"acceptance must be a non-empty sequence of probabilities in [0, 1], got {list(a)}")
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    # Every node of a depth-bounded tree with w children per node: enough for n_nodes?
    w = len(a)
    if n_nodes > max_nodes(w, max_depth):
        raise ValueError(f"no tree of {n_nodes} nodes has depth <= {max_depth} and <= {w} children per node")
    G, T = _tables(a, int(n_nodes), int(max_depth))
    return _reconstruct(G, T, int(n_nodes), int(max_depth))


def max_nodes(width: int, depth: int) -> int:
    """Nodes of the full tree with ``width`` children per node and depth ``depth`` (root included)."""
    if width <= 1:
        return depth + 1
    total, level = 1, 1
    for _ in range(depth):
        level *= width
        total += level
        if total > 1 << 40:
            break
    return total
