"""Prompt lookup: candidate tokens copied from earlier in the text (n-gram matches), no model.

What HF's ``prompt_lookup_num_tokens``, llama.cpp's lookup decoding and vLLM's ``ngram`` method
do: when the last ``n`` tokens of the text (prompt and generated so far) occurred before, the
tokens that followed them then are likely to follow now. Summaries, RAG answers and code edits
copy long spans of their input, so these candidates are often accepted many tokens deep, and
finding them costs a dictionary lookup instead of draft calls.

- ``NgramIndex``: per request, the end positions of every n-gram (``n = min_n .. max_n``) of its
  committed tokens, extended as tokens are committed.
- ``PromptLookup``: the engine's lookup. ``propose`` finds the most recent ``max_matches``
  occurrences of the longest suffix that occurred before and merges their continuations (up to
  ``max_tokens`` each) into a trie: several matches that agree share a path, matches that
  disagree branch, so a tree forms naturally. Each trie node gets a score, its estimated
  log-probability of being accepted once its parent is (``LookupAcceptance``), and a bin; the
  SpecExec tree takes the trie (``DraftTree.graft``) and one best-first budget keeps the best
  nodes of the trie and of the draft model's tree together (methods/specexec.py).

Exactness does not depend on any of this: the verification walk accepts a candidate only where
it is the target's own draw (greedy or sampled with the position noise), like every draft.

``LookupAcceptance`` learns the scores from verification as the acceptance model does for the
draft model (acceptance.py): every trie node whose parent was verified (pruned ones included) is
one observation, binned by (matched length, the node's share of the matches through its parent,
its depth in the trie), read with the pass's acceptance packet (no extra host sync), kept per
sampling configuration, as exponentially decayed counts; a bin's estimate is a posterior mean
with a prior by depth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .acceptance import bin_observations
from .packet import FIXED_POINT

# A trie node's bin is BIN_BASE + its index: past every acceptance-model bin, so the draft
# model's acceptance model ignores lookup nodes and this one ignores the draft model's.
BIN_BASE = 1 << 20
SHARE_EDGES = (0.5, 0.99)            # share bins: < 0.5, 0.5 .. 0.99, all matches agree
DEPTH_EDGES = (2, 4)                 # depth bins: 1, 2 .. 3, 4 and deeper
PRIOR = (0.3, 0.6, 0.7)              # prior acceptance per depth bin (weight PRIOR_WEIGHT)
PRIOR_WEIGHT = 4.0
DECAY = 0.97                         # per pass, as the draft model's acceptance model
MIN_ACCEPT = 1e-4


@dataclass(frozen=True)
class LookupSettings:
    """``min_n .. max_n``: the suffix lengths matched (longest first); ``max_matches``: the most
    recent occurrences used; ``max_tokens``: how far each continuation is copied."""

    min_n: int = 2
    max_n: int = 4
    max_matches: int = 8
    max_tokens: int = 16

    @property
    def max_nodes(self) -> int:
        return self.max_matches * self.max_tokens


# SpecExec's method parameters of the lookup (Engine(..., ngram=True, ngram_max=5), --ngram).
LOOKUP_PARAMS = ("ngram", "ngram_min", "ngram_max", "ngram_tokens")


def lookup_settings(p: dict) -> Optional[LookupSettings]:
    """Fill and check the lookup's method parameters in ``p`` (in place): ``ngram`` [False]:
    propose prompt-lookup candidates; with it ``ngram_min`` / ``ngram_max`` [2 / 4] (the suffix
    lengths matched) and ``ngram_tokens`` [16] (tokens copied per match). Returns the settings,
    or None when the lookup is off. Raises ValueError naming the parameter."""
    on = p.setdefault("ngram", False)
    if not isinstance(on, bool):
        raise ValueError(f"specexec parameter ngram must be True or False, got {on!r}")
    given = [k for k in LOOKUP_PARAMS[1:] if k in p]
    if not on:
        if given:
            raise ValueError(f"specexec parameter(s) {given} configure the prompt lookup: pass ngram=True too")
        return None
    d = LookupSettings()
    p.setdefault("ngram_min", d.min_n)
    p.setdefault("ngram_max", max(d.max_n, p["ngram_min"]) if isinstance(p["ngram_min"], int) else d.max_n)
    p.setdefault("ngram_tokens", d.max_tokens)
    for k in LOOKUP_PARAMS[1:]:
        v = p[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"specexec parameter {k} must be a positive int, got {v!r}")
    if p["ngram_min"] > p["ngram_max"]:
        raise ValueError(f"specexec parameters ngram_min={p['ngram_min']} > ngram_max={p['ngram_max']}: the "
                         f"shortest suffix matched must not be longer than the longest")
    return LookupSettings(p["ngram_min"], p["ngram_max"], d.max_matches, p["ngram_tokens"])


@dataclass
class Candidates:
    """One request's trie (host lists, parents before children): ``parents[i]`` is node i's
    parent among the trie's nodes (-1: the root), ``tokens``, ``logq`` (log-acceptance given
    the parent), ``bins`` (``BIN_BASE + bin``)."""

    parents: list
    tokens: list
    logq: list
    bins: list

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list:
        """Each node's depth below the trie's root (1 for the root's children)."""
        depth: list = []
        for par in self.parents:
            depth.append(1 if par < 0 else depth[par] + 1)
        return depth

    def path_scores(self) -> list:
        """Each node's log-probability of being accepted: its path's ``logq`` summed."""
        score: list = []
        for i, par in enumerate(self.parents):
            score.append(self.logq[i] + (score[par] if par >= 0 else 0.0))
        return score


class NgramIndex:
    """End positions of every n-gram (``n = min_n .. max_n``) of a growing token list."""

    def __init__(self, min_n: int, max_n: int):
        self.ends = {n: {} for n in range(min_n, max_n + 1)}
        self.indexed = 0
        # The last trie built from this text: ((text length, max depth), parents, tokens, bins).
        # budget="auto" scores a trie before the pass and the pass grafts it: built once.
        self.trie: Optional[tuple] = None

    def extend(self, tokens: list) -> None:
        """Index the n-grams ending at positions ``indexed .. len(tokens) - 1``."""
        for i in range(self.indexed, len(tokens)):
            for n, table in self.ends.items():
                if i + 1 >= n:
                    table.setdefault(tuple(tokens[i + 1 - n:i + 1]), []).append(i)
        self.indexed = len(tokens)

    def matches(self, tokens: list, limit: int) -> tuple[int, list]:
        """``(n, ends)``: the longest suffix of ``tokens`` that occurred before, and the end
        positions of its ``limit`` most recent earlier occurrences (most recent first); ``(0, [])``
        when none did."""
        self.extend(tokens)
        last = len(tokens) - 1
        for n in sorted(self.ends, reverse=True):
            if n > len(tokens):
                continue
            found = self.ends[n].get(tuple(tokens[-n:]), ())
            ends = [e for e in reversed(found) if e < last][:limit]
            if ends:
                return n, ends
        return 0, []


class LookupAcceptance:
    """Decayed counts and hits per bin for one sampling configuration; ``log_accept`` per bin."""

    def __init__(self, n_bins: int):
        self.counts = [0.0] * n_bins
        self.hits = [0.0] * n_bins
        self.log_accept = [math.log(PRIOR[self.depth_bin(b)]) for b in range(n_bins)]

    @staticmethod
    def depth_bin(b: int) -> int:
        return b % (len(DEPTH_EDGES) + 1)

    def update(self, packet: list) -> None:
        nb = len(self.counts)
        for b in range(nb):
            self.counts[b] = DECAY * self.counts[b] + packet[b]
            self.hits[b] = DECAY * self.hits[b] + packet[nb + b] / FIXED_POINT
            a = (self.hits[b] + PRIOR_WEIGHT * PRIOR[self.depth_bin(b)]) / (self.counts[b] + PRIOR_WEIGHT)
            self.log_accept[b] = math.log(min(1.0, max(MIN_ACCEPT, a)))


class PromptLookup:
    """The engine's prompt lookup (see the module docstring): candidates per request, their
    evidence from verification, and what it learns."""

    def __init__(self, settings: LookupSettings):
        self.settings = settings
        self.n_depth = len(DEPTH_EDGES) + 1
        self.n_bins = (settings.max_n - settings.min_n + 1) * (len(SHARE_EDGES) + 1) * self.n_depth
        self._models: dict = {}

    @property
    def packet_size(self) -> int:
        return 2 * self.n_bins

    def model(self, params) -> LookupAcceptance:
        key = (params.temperature, params.top_p, params.top_k)
        if key not in self._models:
            self._models[key] = LookupAcceptance(self.n_bins)
        return self._models[key]

    def _bin(self, n: int, share: float, depth: int) -> int:
        s = sum(share >= e for e in SHARE_EDGES)
        d = sum(depth >= e for e in DEPTH_EDGES)
        return ((n - self.settings.min_n) * (len(SHARE_EDGES) + 1) + s) * self.n_depth + d

    def propose(self, request, max_depth: int) -> Candidates:
        """The trie of ``request``'s continuations, at most ``max_depth`` deep (its tokens left),
        scored with what the lookup has learned so far."""
        st = self.settings
        if request.lookup is None:
            request.lookup = NgramIndex(st.min_n, st.max_n)
        key = (len(request.committed), max_depth)
        if request.lookup.trie is None or request.lookup.trie[0] != key:
            request.lookup.trie = (key, *self._build(request, max_depth))
        _, parents, tokens, bins = request.lookup.trie
        table = self.model(request.params).log_accept
        return Candidates(parents, tokens, [table[b - BIN_BASE] for b in bins], bins)

    def _build(self, request, max_depth: int) -> tuple:
        """(parents, tokens, bins) of the trie of ``request``'s continuations."""
        st = self.settings
        text = request.committed
        n, ends = request.lookup.matches(text, st.max_matches)
        parents, tokens, counts, depths = [], [], [], []
        child: dict = {}
        for e in ends:
            node = -1
            for t in text[e + 1:e + 1 + min(st.max_tokens, max_depth)]:
                key = (node, t)
                if key not in child:
                    child[key] = len(tokens)
                    parents.append(node)
                    tokens.append(t)
                    counts.append(0)
                    depths.append(1 if node < 0 else depths[node] + 1)
                node = child[key]
                counts[node] += 1
        bins = []
        for i, par in enumerate(parents):
            share = counts[i] / (counts[par] if par >= 0 else len(ends))
            bins.append(BIN_BASE + self._bin(n, share, depths[i]))
        return parents, tokens, bins

    def observations(self, tree, p: Optional[torch.Tensor], draws: Optional[torch.Tensor]) -> torch.Tensor:
        """The pass's evidence of ``tree`` (a VerifyTree with ``proposed``): int64
        ``[packet_size]`` on the device (``acceptance.bin_observations`` over the lookup bins)."""
        rows, tokens, bins = tree.proposed
        return bin_observations(p, rows, tokens, bins - BIN_BASE, draws, self.n_bins)

    def update(self, params, packet: list) -> None:
        self.model(params).update(packet)

    def shadow_update(self, params, cand: Candidates, continuation: list) -> None:
        """Learn from a pass that verified another tree: ``continuation`` holds the tokens the
        target committed after the root ``cand`` was proposed for. A node whose parent lies on
        that path (or is the root) and whose depth it reaches is one observation, a hit when its
        token is the committed one there: what verifying the trie would have found, for greedy
        and for coupled sampling alike (the walk accepts a node only where it is the target's
        own draw, ``sampling.PositionNoise``). So ``budget="auto"`` keeps measuring the lookup
        while it runs draft chains, and turns to it when it starts to pay (auto.py)."""
        if not continuation or not len(cand):
            return
        nb = self.n_bins
        packet = [0] * (2 * nb)
        on_path: list = []
        for i, (par, d) in enumerate(zip(cand.parents, cand.depths())):
            seen = d <= len(continuation) and (par < 0 or on_path[par])
            hit = seen and cand.tokens[i] == continuation[d - 1]
            on_path.append(hit)
            if seen:
                b = cand.bins[i] - BIN_BASE
                packet[b] += 1
                packet[nb + b] += FIXED_POINT if hit else 0
        self.update(params, packet)


def path_probabilities(cand: Candidates) -> list:
    """Each trie node's estimated probability of being accepted: the product of the acceptance
    estimates along its path (``exp`` of the score ``DraftTree.graft`` gives it), trie order."""
    return [math.exp(x) for x in cand.path_scores()]
