"""The draft tree on device tensors, SpecExec's best-first growth rules, and the exact walk.

Node 0 is the root (the last committed token, whose K/V is not yet in either cache). Nodes are
appended level by level and never moved; pruning only clears ``alive``. Because nodes are
created after their parents, index order is a topological order.

Every shape that the host needs (number of nodes, of draft slots) is tracked on the host; the
only host reads are the ones the caller makes explicitly (through the pass's counted reader,
``runner.HostReads``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NEG_INF = float("-inf")


@dataclass
class VerifyTree:
    """A compact tree ready for one verification pass: ``n`` rows, row 0 the root, parents before
    children.

    tokens, depths, parents (root: -1), nodes (index in the DraftTree): int64 ``[n]``;
    mask: bool ``[n, n]``, ``mask[i, j]`` iff row j is row i or one of its ancestors;
    draft_slots: int64 ``[n]``, the draft tree-region slot holding the row's draft K/V, -1 if the
    draft never ran on it.
    proposed: what the acceptance model learns from (acceptance.py), or None: every child the
    draft proposed (pruned ones included), as int64 ``[k]`` triples (row of its parent in this
    tree or -1 if the parent is not verified, token, feature bin).
    """

    tokens: torch.Tensor
    depths: torch.Tensor
    parents: torch.Tensor
    mask: torch.Tensor
    draft_slots: torch.Tensor
    nodes: torch.Tensor
    proposed: Optional[tuple] = None
    depth_bound: Optional[int] = None     # host: no row is deeper (None: unknown, n - 1)

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])


class DraftTree:
    """Growable tree with a fixed node ``capacity``; all state lives on ``device``.

    tokens / parents / depths int64 ``[C]``, scores float32 ``[C]`` (cumulative log-score along
    the path, root 0: the draft's log-probability, or the acceptance model's calibrated
    log-acceptance), alive / expanded bool ``[C]``, draft_slot int64 ``[C]`` (-1 = no draft
    K/V), features int64 ``[C]`` (the acceptance model's bin of the node, -1 = none),
    anc bool ``[C, C]`` (``anc[i, j]``: j is i or an ancestor of i).

    Besides the draft model's children, a tree can take candidates from elsewhere (``graft``: a
    prompt-lookup trie, ngram.py). A grafted node is expanded by the draft only once its parent
    was (so every expanded node has the draft's K/V of all its ancestors), and a child the draft
    proposes again under the same parent is merged with the grafted one (``add_children``).
    """

    # Storage starts at this many nodes and doubles on demand up to ``capacity``: a pass rarely
    # creates its worst case (1 + depth * beams * width nodes), and ``anc`` is quadratic in it.
    INITIAL_NODES = 1024

    def __init__(self, capacity: int, device, root_token) -> None:
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self._allocate(min(self.capacity, self.INITIAL_NODES))
        dev = self.device
        self.tokens[0] = torch.as_tensor(root_token, device=dev)
        self.scores[0] = 0.0
        self.alive[0] = True
        self.anc[0, 0] = True
        self.n_nodes = 1            # host: nodes ever created
        self.n_draft_slots = 0      # host: draft tree-region slots used
        self.levels = 0             # host: a bound on the depth (add_children calls, grafted depths)
        self._grafted = None        # (parents, tokens, node ids) of grafted nodes, int64 [G] each

    def _allocate(self, c: int) -> None:
        """(Re)allocate storage for ``c`` nodes, keeping what the first ``n_nodes`` hold."""
        dev = self.device
        old = {name: getattr(self, name) for name in ("tokens", "parents", "depths", "scores", "alive",
                                                       "expanded", "draft_slot", "features", "anc",
                                                       "draft_order")} if hasattr(self, "anc") else None
        self.tokens = torch.zeros(c, dtype=torch.long, device=dev)
        self.parents = torch.full((c,), -1, dtype=torch.long, device=dev)
        self.depths = torch.zeros(c, dtype=torch.long, device=dev)
        self.scores = torch.full((c,), NEG_INF, device=dev)
        self.alive = torch.zeros(c, dtype=torch.bool, device=dev)
        self.expanded = torch.zeros(c, dtype=torch.bool, device=dev)
        self.draft_slot = torch.full((c,), -1, dtype=torch.long, device=dev)
        self.features = torch.full((c,), -1, dtype=torch.long, device=dev)
        self.anc = torch.zeros(c, c, dtype=torch.bool, device=dev)
        self.draft_order = torch.zeros(c, dtype=torch.long, device=dev)   # draft slot -> node
        self.allocated = c
        if old is not None:
            n = self.n_nodes
            for name, t in old.items():
                if name == "anc":
                    self.anc[:n, :n] = t[:n, :n]
                elif name == "draft_order":
                    self.draft_order[:self.n_draft_slots] = t[:self.n_draft_slots]
                else:
                    getattr(self, name)[:n] = t[:n]

    # ------------------------------------------------------------------ growth
    def mark_expanded(self, nodes: torch.Tensor) -> torch.Tensor:
        """Give ``nodes`` (int64 ``[m]``) the next ``m`` draft slots; returns those slots."""
        m = int(nodes.shape[0])
        slots = torch.arange(self.n_draft_slots, self.n_draft_slots + m, device=self.device)
        self.draft_slot[nodes] = slots
        self.expanded[nodes] = True
        self.draft_order[self.n_draft_slots:self.n_draft_slots + m] = nodes
        self.n_draft_slots += m
        return slots

    def draft_mask(self, nodes: torch.Tensor) -> torch.Tensor:
        """bool ``[m, n_draft_slots]``: which draft slots each of ``nodes`` (already marked
        expanded) may attend to: its ancestors and itself."""
        return self.anc[nodes][:, self.draft_order[:self.n_draft_slots]]

    def add_children(self, parents: torch.Tensor, tokens: torch.Tensor, logq: torch.Tensor,
                     features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append children: ``parents`` int64 ``[m]``, ``tokens``/``logq`` ``[m, w]`` (log-score of
        each child given its parent's path: the draft's log-prob, or a calibrated log-acceptance;
        never above 0, so scores never increase along a path), ``features`` optional int64
        ``[m, w]`` (acceptance-model bins). Children with ``logq == -inf`` are created dead.
        Returns the new node indices ``[m * w]``."""
        m, w = tokens.shape
        k = m * w
        self._reserve(k)
        if self._grafted is not None:
            logq = self._merge_twins(parents, tokens, logq)
        # The new nodes are the next k indices: slices, not index tensors (each indexed write is
        # a scatter; this runs once per tree level, on a CPU a tenth of a millisecond per op).
        a, b = self.n_nodes, self.n_nodes + k
        new = torch.arange(a, b, device=self.device)
        par = parents if w == 1 else parents.repeat_interleave(w)
        self.tokens[a:b] = tokens.reshape(-1)
        if features is not None:
            self.features[a:b] = features.reshape(-1)
        self.parents[a:b] = par
        self.depths[a:b] = self.depths[par] + 1
        # A broken draft (NaN log-probs) must only cost speed: its children are created dead.
        lq = logq.reshape(-1).float()
        sc = self.scores[par] + torch.where(torch.isnan(lq), torch.full_like(lq, NEG_INF), lq)
        self.scores[a:b] = sc
        self.alive[a:b] = self.alive[par] & (sc > NEG_INF)
        rows = self.anc[par]
        rows[:, a:b].fill_diagonal_(True)       # each new node is its own ancestor
        self.anc[a:b] = rows
        self.n_nodes += k
        self.levels += 1
        return new

    def _reserve(self, k: int) -> None:
        if self.n_nodes + k > self.capacity:
            raise RuntimeError(f"DraftTree capacity {self.capacity} exceeded ({self.n_nodes} + {k} nodes)")
        if self.n_nodes + k > self.allocated:
            self._allocate(min(self.capacity, max(2 * self.allocated, self.n_nodes + k)))

    def _merge_twins(self, parents: torch.Tensor, tokens: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        """Children ``[m, w]`` of ``parents`` that a graft already holds (same parent, same token)
        are not created again (their ``logq`` becomes -inf: created dead, still proposed
        evidence); the grafted twin keeps the better of the two path scores. Device ops only."""
        m, w = tokens.shape
        gp, gt, gid = self._grafted
        twin_of = (parents.view(m, 1, 1) == gp) & (tokens.view(m, w, 1) == gt)      # [m, w, G]
        twin = twin_of.any(-1)
        ids = gid[twin_of.to(torch.int8).argmax(-1)]
        lq = logq.float()
        path = self.scores[parents].view(m, 1) + torch.where(torch.isnan(lq), torch.full_like(lq, NEG_INF), lq)
        self.scores.scatter_reduce_(0, ids.reshape(-1), torch.where(twin, path, torch.full_like(path, NEG_INF))
                                    .reshape(-1), "amax")
        return torch.where(twin, torch.full_like(lq, NEG_INF), lq)

    def graft(self, parent: int, cand) -> None:
        """Append a trie of candidates under node ``parent``: ``cand`` (``ngram.Candidates``)
        holds host lists, parents before children: ``parents`` (index among the trie's nodes,
        -1 for ``parent``), ``tokens``, ``logq`` (log-score given the parent, never above 0) and
        ``bins`` (features). The whole trie is a handful of device ops, however deep."""
        k = len(cand.tokens)
        if k == 0:
            return
        self._reserve(k)
        dev, a, b = self.device, self.n_nodes, self.n_nodes + k
        depth, score, block = cand.depths(), cand.path_scores(), torch.zeros(k, k, dtype=torch.bool)
        for i, p in enumerate(cand.parents):
            if p >= 0:
                block[i] = block[p]
            block[i, i] = True
        glob = torch.tensor([parent if p < 0 else a + p for p in cand.parents], device=dev)
        toks = torch.tensor(cand.tokens, device=dev)
        self.tokens[a:b] = toks
        self.parents[a:b] = glob
        self.features[a:b] = torch.tensor(cand.bins, device=dev)
        self.depths[a:b] = self.depths[parent] + torch.tensor(depth, device=dev)
        sc = self.scores[parent] + torch.tensor(score, dtype=torch.float32, device=dev)
        self.scores[a:b] = sc
        self.alive[a:b] = self.alive[parent] & (sc > NEG_INF)
        self.anc[a:b, :a] = self.anc[parent, :a]
        self.anc[a:b, a:b] = block.to(dev)
        ids = torch.arange(a, b, device=dev)
        new = (glob, toks, ids)
        self._grafted = new if self._grafted is None else tuple(torch.cat(p) for p in zip(self._grafted, new))
        self.n_nodes = b
        self.levels += max(depth)

    def prune(self, budget: int) -> torch.Tensor:
        """Keep the root and the ``budget`` best other nodes by score (see ``prune_forest``).
        Returns the score of the ``budget``-th best node, -inf when the tree has room (0-dim
        float, on device)."""
        return prune_forest([self], budget)

    def prune_keys(self) -> torch.Tensor:
        """float64 keys of the nodes that compete for the budget (alive, not the root), -inf
        elsewhere. Ties are broken toward shallower nodes (``score - 1e-9 * depth``): scores never
        increase along a path, so every ancestor of a node has a strictly larger key and a top-k
        over keys keeps the alive set ancestor-closed with no quadratic check."""
        n = self.n_nodes
        key = self.scores[:n].double() - 1e-9 * self.depths[:n].double()
        key = torch.where(self.alive[:n], key, torch.full_like(key, NEG_INF))
        key[0] = NEG_INF
        return key

    def keep_only(self, keep: torch.Tensor) -> None:
        """Alive := the root and the nodes in ``keep`` (bool ``[n_nodes]``, ancestor-closed: a
        top-k over ``prune_keys``)."""
        n = self.n_nodes
        keep = keep.clone()
        keep[0] = True
        self.alive[:n] = keep

    def candidates(self, threshold: torch.Tensor, max_depth: int) -> torch.Tensor:
        """Scores of nodes worth expanding (alive, unexpanded, shallower than ``max_depth``,
        scoring above ``threshold``), -inf elsewhere: float ``[n_nodes]``."""
        n = self.n_nodes
        ok = self.alive[:n] & ~self.expanded[:n] & (self.depths[:n] < max_depth) & (self.scores[:n] > threshold)
        if self._grafted is not None:      # a grafted node waits for its parent's expansion
            ok &= self.expanded[self.parents[:n].clamp_min(0)]
        return torch.where(ok, self.scores[:n], torch.full_like(self.scores[:n], NEG_INF))

    # ------------------------------------------------------------------ verification
    def compact(self, nodes: torch.Tensor) -> VerifyTree:
        """The VerifyTree over ``nodes`` (int64 ``[n]``, ascending, ancestor-closed, root first),
        with every proposed child (nodes ``1 .. n_nodes - 1``) as acceptance-model evidence."""
        n = int(nodes.shape[0])
        remap = torch.full((self.n_nodes,), -1, dtype=torch.long, device=self.device)
        remap[nodes] = torch.arange(n, device=self.device)
        par = self.parents[nodes]
        parents = torch.where(par >= 0, remap[par.clamp_min(0)], par)
        k = self.n_nodes
        proposed = (remap[self.parents[1:k]], self.tokens[1:k], self.features[1:k])
        return VerifyTree(tokens=self.tokens[nodes], depths=self.depths[nodes], parents=parents,
                          mask=self.anc[nodes][:, nodes], draft_slots=self.draft_slot[nodes], nodes=nodes,
                          proposed=proposed, depth_bound=self.levels)

    def alive_nodes(self) -> torch.Tensor:
        """Indices of alive nodes, ascending (one host sync: the count)."""
        return self.alive[:self.n_nodes].nonzero().squeeze(1)


class ChainTree:
    """A ``DraftTree`` that can only be a chain (one child per level, node i at depth i), for the
    chain method and plain passes. Same interface as far as ``Drafter`` and the chain methods
    use it, with the structure known in advance: depths, parents, masks and draft slots are
    slices of per-capacity constants (``_chain_constants``), so growing a level writes one token
    and ``compact`` builds nothing. On a CPU every small tensor op costs microseconds; the
    general tree's ~15 per level and ~10 per compact were ~1 ms of a chain pass's host work."""

    def __init__(self, capacity: int, device, root_token) -> None:
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self._c = _chain_constants(self.capacity, self.device)
        self.tokens = torch.empty(self.capacity, dtype=torch.long, device=self.device)
        self.tokens[0] = torch.as_tensor(root_token, device=self.device)
        self.depths = self._c["ar"]
        self.n_nodes = 1
        self.n_draft_slots = 0
        self.levels = 0

    def mark_expanded(self, nodes: torch.Tensor) -> torch.Tensor:
        """``nodes``: the tip (``[1]``, the node created last); gets the next draft slot."""
        s = self.n_draft_slots
        if int(nodes.shape[0]) != 1 or s != self.n_nodes - 1:
            raise RuntimeError("ChainTree: only the tip of the chain can be expanded, once")
        self.n_draft_slots += 1
        return self._c["ar"][s:s + 1]

    def draft_mask(self, nodes: torch.Tensor) -> torch.Tensor:
        return self._c["ones"][:, :self.n_draft_slots]       # the tip sees the whole chain

    def add_children(self, parents: torch.Tensor, tokens: torch.Tensor, logq: Optional[torch.Tensor] = None,
                     features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One child of the tip: ``tokens`` ``[1, 1]`` (``logq``/``features`` unused: a chain
        keeps no scores). Returns its index ``[1]``."""
        a = self.n_nodes
        if tuple(tokens.shape) != (1, 1):
            raise RuntimeError(f"ChainTree takes one child per level, got {list(tokens.shape)}")
        if a >= self.capacity:
            raise RuntimeError(f"ChainTree capacity {self.capacity} exceeded")
        self.tokens[a:a + 1] = tokens.reshape(1)
        self.n_nodes += 1
        self.levels += 1
        return self._c["ar"][a:a + 1]

    def compact(self, nodes: Optional[torch.Tensor] = None) -> VerifyTree:
        """The VerifyTree of the whole chain (``nodes``, if given, must be all of it)."""
        n = self.n_nodes
        if nodes is not None and int(nodes.shape[0]) != n:
            raise RuntimeError("ChainTree.compact keeps the whole chain")
        c = _chain_constants(n, self.device)
        if self.n_draft_slots == n:             # every node expanded: node i holds slot i
            slots = c["ar"]
        elif self.n_draft_slots == n - 1:       # the usual chain: all but the last
            slots = c["slots"]
        else:
            slots = torch.where(c["ar"] < self.n_draft_slots, c["ar"], torch.full_like(c["ar"], -1))
        return VerifyTree(tokens=self.tokens[:n], depths=c["ar"], parents=c["parents"], mask=c["tril"],
                          draft_slots=slots, nodes=c["ar"], proposed=None, depth_bound=n - 1)


_CHAIN_CONSTANTS: dict = {}


def _chain_constants(n: int, device: torch.device) -> dict:
    """Read-only tensors of an ``n``-node chain on ``device``, made once: ``ar`` = 0..n-1 (node
    indices and depths), ``parents`` (root -1), ``tril`` (the ancestor mask), ``ones`` [1, n],
    ``slots`` (draft slot of each node when all but the last were expanded: 0..n-2, -1). Callers
    never write into them."""
    key = (n, device)
    c = _CHAIN_CONSTANTS.get(key)
    if c is None:
        ar = torch.arange(n, device=device)
        c = {"ar": ar, "parents": ar - 1, "tril": torch.ones(n, n, dtype=torch.bool, device=device).tril_(),
             "ones": torch.ones(1, n, dtype=torch.bool, device=device),
             "slots": torch.where(ar < n - 1, ar, torch.full_like(ar, -1))}
        if len(_CHAIN_CONSTANTS) > 256:      # distinct (length, device) pairs: a handful in practice
            _CHAIN_CONSTANTS.clear()
        _CHAIN_CONSTANTS[key] = c
    return c


def walk_accept(tree: VerifyTree, draws: torch.Tensor) -> torch.Tensor:
    """SpecExec's exact acceptance, done for all rows at once.

    ``draws`` int64 ``[n]``: one independent target sample (or argmax) per row. The walk moves
    from a row to its child whose token equals the row's draw, so a row is on the accepted path
    iff every non-root row on its root path matches its parent's draw. Sibling tokens are
    distinct, so the path is unique. Returns the deepest accepted row (0-dim int64).
    """
    match = tree.tokens == draws[tree.parents.clamp_min(0)]
    match[0] = True
    on_path = ~(tree.mask & ~match[None, :]).any(-1)
    return (tree.depths * on_path).argmax()


def path_rows(tree: VerifyTree, last_row: torch.Tensor, max_len: int) -> torch.Tensor:
    """Rows of the root path of ``last_row`` in depth order, padded to ``max_len`` with later rows
    (the caller cuts at ``depths[last_row] + 1``). int64 ``[min(max_len, n)]``."""
    on = tree.mask[last_row]
    key = torch.where(on, tree.depths, tree.depths + tree.n + 1)
    order = key.argsort(stable=True)
    return order[:max_len]


def prune_forest(trees: list, budget: int) -> torch.Tensor:
    """One best-first budget over several requests' trees: keep every root and the ``budget``
    best non-root nodes of all trees together (scores are comparable across trees: each is the
    log-probability that its path is accepted), each tree ancestor-closed. Returns the score of
    the ``budget``-th best node, -inf while the trees hold fewer (0-dim float, on device)."""
    dev = trees[0].device
    keys = trees[0].prune_keys() if len(trees) == 1 else torch.cat([t.prune_keys() for t in trees])
    scores = trees[0].scores[:trees[0].n_nodes] if len(trees) == 1 \
        else torch.cat([t.scores[:t.n_nodes] for t in trees])
    n_compete = sum(t.n_nodes - 1 for t in trees)
    k = min(budget, n_compete)
    keep = torch.zeros(keys.shape[0], dtype=torch.bool, device=dev)
    if k > 0:
        vals, idx = keys.topk(k)
        keep[idx] = vals > NEG_INF
        full = scores[idx[-1]] if n_compete >= budget else torch.tensor(NEG_INF, device=dev)
        full = torch.where(vals[-1] > NEG_INF, full, torch.full_like(full, NEG_INF))
    else:
        full = torch.tensor(float("inf") if budget == 0 else NEG_INF, device=dev)
    if len(trees) == 1:
        trees[0].keep_only(keep)
    else:
        for t, part in zip(trees, keep.split([t.n_nodes for t in trees])):
            t.keep_only(part)
    return full
