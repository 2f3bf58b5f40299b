"""Sampling on device tensors: logits processing, seeded draws, and the rejection-sampling rules.

Every rule here works on *processed* distributions (temperature, top-k, top-p already applied)
and the same processing must be applied to the target's ``p`` and the draft's ``q`` before a
ratio test, or the output is no longer the target's distribution.

Greedy decoding is the point mass at the argmax (``temperature == 0``); with it every
acceptance rule reduces to "accept the token iff it is the target's argmax".

Nothing here reads a device tensor on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import SamplingParameterError
from ..kernels.argmax import argmax_rows


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0.0):      # also rejects NaN
            raise SamplingParameterError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingParameterError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingParameterError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# A full sort of a 49152-wide row costs ~3.7 ms on a 2-core CPU (per sampled row: a draft call
# or a verified row), about a fifth of a float32 decode step of SmolLM2. The nucleus of a sharp
# distribution is a few dozen tokens, so on the CPU ``top_p_mask`` first takes this many most
# likely tokens (``topk``, ~0.1 ms per row) and sorts a row fully only when its nucleus reaches
# past them. Other devices sort (no host read of which rows need it).
TOP_P_CANDIDATES = 256


def _nucleus_size(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """int64 ``[..., 1]``: how many of the descending ``sorted_p`` the nucleus takes (the mass
    strictly before a kept one is below ``top_p``; at least one)."""
    return ((sorted_p.cumsum(-1) - sorted_p) < top_p).sum(-1, keepdim=True).clamp_min(1)


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """True nucleus: bool mask ``[..., V]`` of the smallest set of most likely tokens whose mass
    reaches ``top_p``: in descending order a token is in it iff the mass of the tokens before it
    is still below ``top_p`` (the most likely token always is). The mask keeps every token at
    least as likely as the nucleus's least likely one, so tokens tied with it are all kept and
    the result does not depend on how a sort orders ties."""
    v = probs.shape[-1]
    k = min(v, TOP_P_CANDIDATES) if probs.device.type == "cpu" else v
    top = probs.topk(k, dim=-1).values if k < v else probs.sort(dim=-1, descending=True).values
    n = _nucleus_size(top, top_p)
    tau = top.gather(-1, n - 1)                 # the nucleus's least likely probability
    if k < v:
        spill = (n == k).squeeze(-1)            # the nucleus may go on past the candidates
        if bool(spill.any()):
            full = probs[spill].sort(dim=-1, descending=True).values
            tau[spill] = full.gather(-1, _nucleus_size(full, top_p) - 1)
    return probs >= tau


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits ``[..., V]`` -> the distribution actually sampled from, float32 ``[..., V]``.

    Greedy gives the one-hot of the argmax (first index on ties, like ``torch.argmax``).
    Otherwise: divide by the temperature, keep the ``top_k`` largest, softmax, keep the true
    nucleus ``top_p``, renormalise.
    """
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    x = logits / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = x.topk(params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        probs = probs * top_p_mask(probs, params.top_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def exp1_(out: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Fill float32 ``out`` with Exp(1) noise in place. On the CPU as ``-log1p(-U)`` of float64
    uniforms (the inverse CDF): ``exponential_`` draws element by element there, 0.95 ms for a
    49152-wide row against 0.33 ms (2-core EPYC), and a sampled chain pass draws a row per draft
    call and per verified token. Elsewhere ``exponential_``."""
    if out.device.type != "cpu":
        return out.exponential_(1.0, generator=generator)
    u = torch.rand(out.shape, dtype=torch.float64, generator=generator)
    return out.copy_(u.neg_().log1p_().neg_())


def exponential_noise(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Exp(1) noise; ``argmax(p / E)`` is a draw from ``p`` (no multinomial, no host sync)."""
    return exp1_(torch.empty(shape, device=device), generator)


def sample(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row of ``probs`` ``[..., V]`` -> int64 ``[...]``. Zero-probability tokens are
    never drawn (0 / E = 0 and some token has positive mass)."""
    e = exponential_noise(probs.shape, generator, probs.device)
    return argmax_rows(probs / e)


def sample_with_noise(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``argmax(probs / noise)`` row-wise: a draw from each row of ``probs`` ``[..., V]`` given
    Exp(1) ``noise`` of the same shape."""
    return argmax_rows(probs / noise)


def _mix64(seed: int, index: int) -> int:
    """A well-spread 63-bit generator seed for (seed, index) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2 ** 64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
    return (z ^ (z >> 31)) & (2 ** 63 - 1)


def noise_ring_rows(window: int) -> int:
    """Rows a ``PositionNoise`` holds once asked for windows of up to ``window`` positions."""
    cap = PositionNoise.INITIAL_ROWS
    while cap < window:
        cap *= 2
    return cap


class PositionNoise:
    """Exp(1) noise vectors ``E_t`` ``[V]``, one per absolute sequence position ``t``, each a
    function of (seed, t) only.

    The SpecExec walk draws the token at position ``t`` as ``argmax(p_t / E_t)``, where ``p_t``
    is the target's processed distribution given the tokens before ``t``; every tree row at the
    same depth shares ``E_t``, but only one of them lies on the accepted path. Each emitted token
    is therefore a draw from the target with noise used for nothing else (exact), and the text is
    the same whatever tree was verified: the same seed gives the same output for every method,
    tree policy, budget, batch arrangement and history of a learning policy.

    The draft reads the same rows to grow *coupled* trees: it ranks the children of a node at
    position ``t`` by ``q_t / E_t`` (``coupled_children``), so its first child is its own draw
    coupled to the target's (docs/ALGORITHM.md, "Coupled sampled trees").

    Rows live in a ring of ``capacity`` slots (slot ``t % capacity``), filled once per position
    as a request advances (``ensure``) and read by growth and verification alike, so a position's
    row costs one ``V``-sized fill however many passes and draft steps read it. The ring grows
    (by doubling) only when a window wider than it is asked for."""

    INITIAL_ROWS = 8

    def __init__(self, seed: int, device):
        self.seed = int(seed) & (2 ** 63 - 1)
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device)
        self.capacity = self.INITIAL_ROWS
        self._held: list = [-1] * self.capacity     # host: the position each slot holds (-1: none)
        self._rows: Optional[torch.Tensor] = None   # float32 [capacity, V]

    def _fill(self, slot: int, position: int) -> None:
        self.gen.manual_seed(_mix64(self.seed, position))
        exp1_(self._rows[slot], self.gen)
        self._held[slot] = position

    def ensure(self, first: int, n: int, vocab: int) -> None:
        """Make positions ``first .. first + n - 1`` readable (host work only, no sync)."""
        if self._rows is None or self._rows.shape[1] != vocab:
            self._rows = torch.empty(self.capacity, vocab, device=self.device)
            self._held = [-1] * self.capacity
        if n > self.capacity:
            cap = self.capacity
            while cap < n:
                cap *= 2
            old, held = self._rows, self._held
            self.capacity, self._rows, self._held = cap, torch.empty(cap, vocab, device=self.device), [-1] * cap
            for slot, position in enumerate(held):
                if position >= 0:
                    self._rows[position % cap] = old[slot]
                    self._held[position % cap] = position
        for t in range(first, first + n):
            if self._held[t % self.capacity] != t:
                self._fill(t % self.capacity, t)

    def at(self, first: int, offsets: torch.Tensor) -> torch.Tensor:
        """float32 ``[m, V]``: ``E_{first + offsets[i]}`` for int64 device ``offsets`` ``[m]``
        (positions made readable by ``ensure`` first)."""
        return self._rows[(offsets + first) % self.capacity]

    def rows(self, first: int, n: int, vocab: int) -> torch.Tensor:
        """float32 ``[n, vocab]``: ``E_first, ..., E_{first + n - 1}`` (a copy)."""
        self.ensure(first, n, vocab)
        return self.at(first, torch.arange(n, device=self.device))


def coupled_children(probs: torch.Tensor, noise: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` children of each row ranked by the exponential race ``probs / noise``.

    probs: the draft's processed distributions ``[m, V]``; noise: the Exp(1) rows of the
    children's positions ``[m, V]``, the same rows verification draws the target's tokens with.
    Returns (log race keys float32 ``[m, width]``, descending, -inf for tokens ``probs`` excludes;
    tokens int64 ``[m, width]``). The first child is ``argmax(q / E)``: a draw from ``q`` that
    equals the target's draw ``argmax(p / E)`` with probability at least
    ``(1 - TV(p, q)) / (1 + TV(p, q))``, and the later ones are the race's runners-up."""
    keys, tokens = (probs / noise).topk(min(width, probs.shape[-1]), dim=-1)
    return keys.log(), tokens


def sample_without_replacement(probs: torch.Tensor, n: int, generator: Optional[torch.Generator]
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` draws without replacement from ``probs`` ``[V]`` (exponential-race / Gumbel top-k):
    returns tokens int64 ``[n]`` in draw order and a bool ``[n]`` that is False for draws past the
    support of ``probs`` (those tokens are arbitrary and must be ignored)."""
    keys = probs / exponential_noise(probs.shape, generator, probs.device)
    vals, tokens = keys.topk(n, dim=-1)
    return tokens, vals > 0


def uniform(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p - q, 0))`` row-wise ``[..., V]``. Where ``p <= q`` everywhere (so a rejection
    had probability 0) ``p`` is returned, to keep the result a distribution."""
    r = (p - q).clamp_min_(0.0)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp_min(1e-30), p)


def ratio_accept(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The speculative-sampling test: accept a draft token ``x ~ q`` with probability
    ``min(1, p(x) / q(x))``, i.e. iff ``u * q(x) < p(x)`` for ``u ~ U[0, 1)``. Bool, same shape.

    (Module-level on purpose: tests replace it with a broken rule to show the losslessness tests
    catch it.)"""
    return u * q_x < p_x


def remove_token(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``q`` ``[V]`` with token ``x`` (0-dim int64) zeroed and renormalised (all-zero stays zero)."""
    q = q.scatter(-1, x.view(1), 0.0)
    s = q.sum()
    return q / s.clamp_min(1e-30)


def multi_candidate_accept(p: torch.Tensor, q: torch.Tensor, candidates: torch.Tensor,
                           valid: torch.Tensor, generator: Optional[torch.Generator]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Recursive rejection sampling over siblings drawn *without replacement* from ``q``.

    p, q: ``[V]`` processed target / draft distributions at the parent. candidates: int64 ``[n]``
    in draw order; valid: bool ``[n]``. For each candidate: accept with ``min(1, p(x)/q(x))``;
    on rejection ``p <- norm(max(p - q, 0))``, ``q(x) <- 0`` and renormalise ``q``.

    Returns (index of the accepted candidate or -1, 0-dim int64; the final ``p`` ``[V]``, the
    distribution to draw the emitted token from when none was accepted). Device-only.
    """
    n = int(candidates.shape[0])
    u = uniform((n,), generator, p.device)
    accepted = torch.full((), -1, dtype=torch.long, device=p.device)
    done = torch.zeros((), dtype=torch.bool, device=p.device)
    for j in range(n):
        x = candidates[j]
        live = valid[j] & ~done
        acc = live & ratio_accept(p[x], q[x], u[j])
        accepted = torch.where(acc, torch.full_like(accepted, j), accepted)
        done = done | acc
        rejected = live & ~acc
        p = torch.where(rejected, residual(p, q), p)
        q = torch.where(rejected, remove_token(q, x), q)
    return accepted, p


def chain_accept(p_rows: torch.Tensor, q_rows: torch.Tensor, tokens: torch.Tensor,
                 generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Leviathan / Chen speculative sampling over a chain of ``k`` draft tokens.

    p_rows: ``[k + 1, V]`` target distributions (row i predicts token i; row k is the bonus).
    q_rows: ``[k, V]`` draft distributions the tokens were drawn from. tokens: int64 ``[k]``.
    Returns (number accepted ``a`` in [0, k], 0-dim int64; the emitted token: a draw from
    ``norm(max(p_a - q_a, 0))`` when ``a < k``, from ``p_k`` otherwise). Device-only.
    """
    k = int(tokens.shape[0])
    dev = p_rows.device
    if k == 0:
        return torch.zeros((), dtype=torch.long, device=dev), sample(p_rows[0], generator)
    idx = torch.arange(k, device=dev)
    u = uniform((k,), generator, dev)
    acc = ratio_accept(p_rows[idx, tokens], q_rows[idx, tokens], u)
    n_acc = acc.long().cumprod(0).sum()
    final = torch.cat([residual(p_rows[:k], q_rows), p_rows[k:k + 1]], dim=0)
    draws = sample(final, generator)
    return n_acc, draws[n_acc]
