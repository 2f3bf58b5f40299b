"""The acceptance model: how likely verification is to accept a draft child, learned online.

SpecExec's walk (docs/ALGORITHM.md, step 3) accepts child ``c`` of a node it has reached iff
the target's draw at that node is ``c``; the draw comes from the target's processed
distribution ``p`` there, so

    P(c accepted | parent reached) = p(c)     (greedy: 1 if c is the target's argmax, else 0)

and a node is accepted iff its whole path is. The draft's own probability ``q(c)`` is a poor
stand-in for ``p(c)``: with greedy verification a draft that agrees with the target's argmax
73% of the time gives its top token ``q`` of 0.3-0.6, so a search ranked by ``q`` spends the
budget on siblings instead of depth. This model maps what the draft knows about a child (its
rank among its siblings and a probability ``q``: tree_policy.py passes the draft's probability
renormalised over the siblings at temperature 0.5, which also reflects the margin over the
runner-up) to the acceptance probability verification actually shows, and the SpecExec search
ranks nodes by the product of those along the path.

Learning, from every verification pass, at no extra host sync: every child the draft proposed
(pruned ones included) whose parent was verified is one observation, valued at exactly
``p_parent(c)`` from the verification logits (a 0/1 outcome for greedy; for sampling its
expectation, which has less variance than the realised draw). Per bin (rank class x ``q``
interval) the model keeps exponentially decayed sums of observations and of their count; the
engine reads both back with the acceptance result (``observations`` builds them on device).
The estimate per bin is a Beta-style posterior mean whose prior comes from the bin's whole rank
class: a Platt fit ``a = sigmoid(alpha + beta * logit(q))`` of the class's bins (weighted
logistic regression, ridge toward ``alpha = 0, beta = 1``, i.e. toward ``a = q``), so an
untrained model behaves like the softmax ranking and a bin with little data borrows from its
neighbours (a draft that is always right has every rank-1 bin near 1 after a few passes, not
only the common ones). The estimates are made non-decreasing in ``q`` within a rank class
(pool-adjacent-violators) and read off by linear interpolation in ``q`` between bin centres, so
siblings and cousins keep their draft order inside a bin (tabulated at ``GRID`` points in ``q``
per rank class when the estimates change, so that a lookup is a handful of tensor ops: on a
2-core CPU the host ops around each draft call are a tenth of a decoding pass).

Separate models are kept per sampling configuration (greedy and each temperature / top-p /
top-k), since acceptance depends on it. The positional marginal (mean acceptance per rank,
pooled over ``q``) is Sequoia's acceptance vector (sequoia.py).

Shapes: ``features`` / ``log_accept`` take ``logq`` float ``[m, w]`` (the draft's top-``w``
log-probabilities of each expanded node, in rank order) and return ``[m, w]``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .packet import FIXED_POINT

# Bin edges on the draft probability q; bin j holds Q_EDGES[j - 1] <= q < Q_EDGES[j].
Q_EDGES = (0.005, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.96)
N_RANK_CLASSES = 9          # ranks 1..8 each, then 9 and beyond together
MIN_ACCEPT = 1e-6           # floor of the estimate: a node is never ranked as impossible
GRID = 4096                 # log_accept reads the interpolant at the nearest of GRID points in q
WARM_PASSES = 16            # passes during which every rank class's prior is refitted each pass


def bin_observations(p: Optional[torch.Tensor], parent_rows: torch.Tensor, tokens: torch.Tensor, bins: torch.Tensor,
                     draws: Optional[torch.Tensor], n_bins: int) -> torch.Tensor:
    """Per bin ``0 .. n_bins - 1``: how many proposed children (``bins`` int64 ``[k]``; others
    ignored) had a verified parent (``parent_rows`` >= 0) and how many of them verification
    accepted, int64 ``[2 * n_bins]`` on the device (counts, then sums in ``FIXED_POINT`` units):
    each child is worth 1 if it is its parent's draw (``draws`` given), else ``p_parent(c)``."""
    nb = n_bins
    valid = (parent_rows >= 0) & (bins >= 0) & (bins < nb)
    if draws is not None:
        obs = (draws[parent_rows.clamp_min(0)] == tokens) & valid
    else:
        obs = p[parent_rows.clamp_min(0), tokens] * valid
    idx = torch.where(valid, bins, torch.full_like(bins, nb))
    counts = torch.zeros(nb + 1, device=bins.device).index_add_(0, idx, valid.float())
    sums = torch.zeros(nb + 1, device=bins.device).index_add_(0, idx, obs.float())
    return torch.cat([counts[:nb], sums[:nb] * FIXED_POINT]).round().long()


def _centres() -> list:
    edges = (0.0,) + Q_EDGES + (1.0,)
    return [0.5 * (lo + hi) for lo, hi in zip(edges[:-1], edges[1:])]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def platt_fit(x: Sequence[float], n: Sequence[float], s: Sequence[float], ridge: float,
              start: tuple = (0.0, 1.0), iters: int = 25) -> tuple[float, float]:
    """``(alpha, beta)`` maximising ``sum_j s_j log sig(z_j) + (n_j - s_j) log(1 - sig(z_j))`` with
    ``z_j = alpha + beta x_j``, minus ``ridge / 2 * (alpha^2 + (beta - 1)^2)``: Newton's method on
    the 2-parameter problem (observations ``n_j`` with fractional successes ``s_j``)."""
    a, b = start
    for _ in range(iters):
        g0, g1 = -ridge * a, -ridge * (b - 1.0)
        h00 = h01 = h11 = ridge
        for xj, nj, sj in zip(x, n, s):
            if nj <= 0:
                continue
            sg = _sigmoid(a + b * xj)
            r = sj - nj * sg
            w = nj * sg * (1.0 - sg)
            g0 += r
            g1 += r * xj
            h00 += w
            h01 += w * xj
            h11 += w * xj * xj
        det = h00 * h11 - h01 * h01
        if not det > 1e-12 * h00 * h11:
            break
        # Damped steps: separable data (a draft that is always or never right) has no finite
        # optimum without the ridge, and full Newton steps can overshoot far before it bites.
        da = max(-4.0, min(4.0, (h11 * g0 - h01 * g1) / det))
        db = max(-4.0, min(4.0, (h00 * g1 - h01 * g0) / det))
        # beta >= 0 keeps the map non-decreasing in q.
        a, b = max(-30.0, min(30.0, a + da)), max(0.0, min(10.0, b + db))
        if abs(da) + abs(db) < 1e-6:
            break
    return a, b


def pool_adjacent_violators(values: Sequence[float], weights: Sequence[float]) -> list:
    """The non-decreasing sequence closest to ``values`` in weighted least squares."""
    blocks: list = []     # [mean, weight, length]
    for v, w in zip(values, weights):
        blocks.append([float(v), max(float(w), 1e-12), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list = []
    for m, _, n in blocks:
        out += [m] * n
    return out


class AcceptanceModel:
    """P(child accepted | parent reached) as a function of (rank, q), learned online.

    prior_strength: pseudo-observations of the prior (the rank class's Platt fit) per bin.
    ridge: strength of the Platt fit's pull toward ``a = q``, in observations.
    decay: per-pass factor on the accumulated observations (1 = never forget).
    device: where the lookup table lives (the draft's device).
    """

    def __init__(self, device="cpu", prior_strength: float = 2.0, ridge: float = 1.0, decay: float = 0.97):
        if not (prior_strength > 0):
            raise ValueError(f"prior_strength must be > 0, got {prior_strength}")
        if not (0.0 < decay <= 1.0):
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.device = torch.device(device)
        self.prior_strength = float(prior_strength)
        self.ridge = float(ridge)
        self.decay = float(decay)
        self.n_q = len(Q_EDGES) + 1
        self.n_bins = N_RANK_CLASSES * self.n_q
        self.centres = _centres()
        self._logits = [math.log(c / (1.0 - c)) for c in self.centres]
        self._platt = [(0.0, 1.0)] * N_RANK_CLASSES
        self.counts = [0.0] * self.n_bins          # decayed number of observations per bin
        self.sums = [0.0] * self.n_bins            # decayed sum of p_parent(child) per bin
        self.passes = 0
        self._edges = torch.tensor(Q_EDGES, dtype=torch.float32, device=self.device)
        self._centres_t = torch.tensor(self.centres, dtype=torch.float32, device=self.device)
        # Where each of the GRID points of q falls between bin centres (lower, upper, weight).
        c, q = self._centres_t, torch.linspace(0.0, 1.0, GRID, device=self.device)
        hi = torch.searchsorted(c, q).clamp(1, len(c) - 1)
        self._grid_at = (hi - 1, hi, ((q - c[hi - 1]) / (c[hi] - c[hi - 1])).clamp(0.0, 1.0))
        self._table = torch.empty(N_RANK_CLASSES, self.n_q, device=self.device)
        self._grid = torch.empty(N_RANK_CLASSES * GRID, device=self.device)
        self._rank_cache: dict = {}
        self._refresh()

    # ------------------------------------------------------------------ estimates (host)
    def bin_estimates(self) -> list:
        """Posterior mean per bin, ``[N_RANK_CLASSES][n_q]``, non-decreasing in q per rank class."""
        k = self.prior_strength
        out = []
        for r in range(N_RANK_CLASSES):
            means, weights = [], []
            alpha, beta = self._platt[r]
            for j in range(self.n_q):
                b = r * self.n_q + j
                prior = _sigmoid(alpha + beta * self._logits[j])
                means.append((self.sums[b] + k * prior) / (self.counts[b] + k))
                weights.append(self.counts[b] + k)
            out.append([min(1.0, max(MIN_ACCEPT, v)) for v in pool_adjacent_violators(means, weights)])
        return out

    def rank_acceptance(self, width: int) -> list:
        """Sequoia's positional vector: mean acceptance of the rank-k child (k = 1..width),
        pooled over q. Ranks with no data yet fall back to the prior ``1 / (k + 1)`` scaled so that
        the vector sums to at most 1."""
        out = []
        for k in range(width):
            r = min(k, N_RANK_CLASSES - 1)
            n = sum(self.counts[r * self.n_q:(r + 1) * self.n_q])
            s = sum(self.sums[r * self.n_q:(r + 1) * self.n_q])
            prior = 0.5 / (k + 1) ** 2
            m = self.prior_strength
            out.append(min(1.0, max(MIN_ACCEPT, (s + m * prior) / (n + m))))
        # Acceptance of distinct siblings is exclusive: the vector can never sum above 1.
        total = sum(out)
        if total > 1.0:
            out = [v / total for v in out]
        return out

    @property
    def max_accept(self) -> float:
        """The largest acceptance any child can be given (the table's maximum; kept on the host
        so that reading it is no device sync)."""
        return self._max_accept

    def _refresh(self) -> None:
        nq = self.n_q
        for r in range(N_RANK_CLASSES):
            # The Platt fit is only the prior of bins with little data and moves slowly (decayed
            # sums): after the first passes one rank class is refitted per pass, in turn (each
            # fit is ~100 host sigmoids; all of them every pass cost a millisecond of a CPU pass).
            if self.passes > WARM_PASSES and (self.passes - r) % N_RANK_CLASSES:
                continue
            n, s = self.counts[r * nq:(r + 1) * nq], self.sums[r * nq:(r + 1) * nq]
            if sum(n) > 0:
                self._platt[r] = platt_fit(self._logits, n, s, self.ridge, start=self._platt[r])
        estimates = self.bin_estimates()
        self._max_accept = max(max(row) for row in estimates)
        self._table = torch.tensor(estimates, dtype=torch.float32, device=self.device)
        # The interpolant at GRID points of q per rank class, as logs (log_accept's lookup).
        lo, hi, t = self._grid_at
        tab = self._table
        a = tab[:, lo] + t * (tab[:, hi] - tab[:, lo])
        self._grid = a.clamp_min(MIN_ACCEPT).log().reshape(-1)

    # ------------------------------------------------------------------ device side
    def features(self, logq: torch.Tensor) -> torch.Tensor:
        """Bin index of every child, int64 ``[m, w]``; ``n_bins`` (dropped) where ``logq`` is not
        finite (a broken draft)."""
        return self.scores_and_features(logq)[1]

    def _ranks(self, w: int, dev) -> tuple:
        """(rank class, rank class x GRID) of each of ``w`` children, int64 ``[w]``, cached."""
        key = (w, str(dev))
        if key not in self._rank_cache:
            rank = torch.arange(w, device=dev).clamp_max(N_RANK_CLASSES - 1)
            self._rank_cache[key] = (rank * self.n_q, rank * GRID)
        return self._rank_cache[key]

    def scores_and_features(self, logq: torch.Tensor) -> tuple:
        """``(log_accept(logq), features(logq))`` with the shared work done once."""
        m, w = logq.shape
        bin_off, grid_off = self._ranks(w, logq.device)
        q = logq.float().exp().nan_to_num_(0.0)
        bad = ~torch.isfinite(logq)
        b = (torch.bucketize(q, self._edges, right=True) + bin_off).masked_fill_(bad, self.n_bins)
        idx = (q * (GRID - 1) + 0.5).long().clamp_(0, GRID - 1) + grid_off
        return self._grid[idx].masked_fill_(bad, float("-inf")), b

    def log_accept(self, logq: torch.Tensor) -> torch.Tensor:
        """Calibrated log P(accepted | parent reached), float32 ``[m, w]``: the bin estimates of
        the child's rank class, interpolated linearly in q between bin centres (read at the
        nearest of ``GRID`` points); -inf where ``logq`` is -inf or NaN (the child is created
        dead, as with the softmax ranking)."""
        return self.scores_and_features(logq)[0]

    def observations(self, p: Optional[torch.Tensor], parent_rows: torch.Tensor, tokens: torch.Tensor,
                     bins: torch.Tensor, draws: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One pass's evidence, int64 ``[2 * n_bins]`` on device (counts, then sums in
        ``packet.FIXED_POINT`` units).

        p: float ``[n, V]`` the processed target distributions of the verified rows;
        parent_rows: int64 ``[k]`` the verified row of each proposed child's parent (-1: the
        parent was not verified); tokens, bins: int64 ``[k]``. ``draws``: int64 ``[n]``, the
        target's draw at each row, when acceptance is that 0/1 outcome rather than ``p``'s mass
        (greedy, and coupled sampling, where the draft's ranking saw the draw's noise and ``p``'s
        mass is no longer the chance of acceptance); ``p`` is then unused."""
        return bin_observations(p, parent_rows, tokens, bins, draws, self.n_bins)

    def update(self, packet: Sequence[int]) -> None:
        """Fold in one pass's ``observations`` (read back on the host)."""
        nb = self.n_bins
        if len(packet) != 2 * nb:
            raise ValueError(f"acceptance packet has {len(packet)} values, expected {2 * nb}")
        d = self.decay
        for b in range(nb):
            self.counts[b] = d * self.counts[b] + packet[b]
            self.sums[b] = d * self.sums[b] + packet[nb + b] / FIXED_POINT
        self.passes += 1
        self._refresh()
