"""The acceptance model (specexec_rt/speculative/acceptance.py): it converges to acceptance
rates known by construction, keeps its estimates monotone in q, and its evidence is exactly the
target's probability of each proposed child."""
from __future__ import annotations

import math

import pytest
import torch

from specexec_rt.speculative.acceptance import (N_RANK_CLASSES, AcceptanceModel, pool_adjacent_violators)

W = 6
RATE_SCALE = (1.5, 0.8, 0.6, 0.5, 0.4, 0.3)     # true acceptance of the rank-k child: RATE_SCALE[k] * q_k


def true_rate(rank: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.tensor(RATE_SCALE)[rank] * q


def synthetic_pass(gen: torch.Generator, m: int, greedy: bool):
    """One pass of a synthetic draft/target pair with known acceptance: ``m`` verified parents,
    each with ``W`` proposed children whose draft probabilities ``q`` (sorted, summing to <= 0.66
    so that the true rates sum to <= 1) come from a random softmax; the target's distribution at
    each parent puts ``RATE_SCALE[k] * q_k`` on child k (the rest on a token no child has).
    Greedy: the target's argmax is child k with exactly that probability (one-hot rows)."""
    vocab = W + 1
    logits = torch.randn(m, W, generator=gen) * 1.5
    q = torch.softmax(logits, -1).sort(-1, descending=True).values * 0.66
    rank = torch.arange(W).expand(m, W)
    rates = true_rate(rank, q)                                       # [m, W], rows sum <= 1
    probs = torch.cat([rates, (1 - rates.sum(-1, keepdim=True)).clamp_min(0)], -1)
    if greedy:
        pick = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        probs = torch.nn.functional.one_hot(pick, vocab).float()
    tokens = torch.arange(W).expand(m, W)                            # child k carries token k
    parent_rows = torch.arange(m)[:, None].expand(m, W)
    return q.log(), probs, parent_rows.reshape(-1), tokens.reshape(-1)


@pytest.mark.parametrize("greedy", [True, False])
def test_converges_to_known_rates(greedy):
    model = AcceptanceModel(decay=1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        logq, p, rows, tokens = synthetic_pass(gen, 64, greedy)
        bins = model.features(logq).reshape(-1)
        model.update(model.observations(p, rows, tokens, bins).tolist())
    # Per child: the calibrated estimate against the true rate, on fresh children.
    logq, _, _, _ = synthetic_pass(gen, 2000, greedy)
    est = model.log_accept(logq).exp()
    truth = true_rate(torch.arange(W).expand_as(logq), logq.exp())
    err = (est - truth).abs()
    assert float(err.mean()) < 0.02, float(err.mean())
    assert float(err[:, 0].max()) < 0.1                              # rank 1: where the mass is
    # Sequoia's positional vector: the mean rate per rank over the children seen.
    vec = model.rank_acceptance(W)
    for k in range(W):
        assert vec[k] == pytest.approx(float(truth[:, k].mean()), abs=0.02)
    # The draft's own q (what the softmax ranking uses) is far off for rank 1.
    assert float((logq[:, 0].exp() - truth[:, 0]).abs().mean()) > 0.1


def test_untrained_model_is_the_softmax_ranking():
    """With no evidence the estimate is the prior q (interpolated between bin centres)."""
    model = AcceptanceModel()
    q = torch.tensor([[0.9, 0.05, 0.01], [0.5, 0.3, 0.1]])
    est = model.log_accept(q.log()).exp()
    torch.testing.assert_close(est, q, atol=0.02, rtol=0)


def test_estimates_are_monotone_in_q_and_forget():
    model = AcceptanceModel(decay=0.5)
    nb, nq = model.n_bins, model.n_q
    packet = [0] * (2 * nb)
    # Rank 1: contradictory evidence (a high-q bin accepted less than a lower one).
    lo, hi = 5, 10
    packet[lo], packet[nb + lo] = 100, int(90 * 1e6)
    packet[hi], packet[nb + hi] = 100, int(10 * 1e6)
    model.update(packet)
    row = model.bin_estimates()[0]
    assert all(a <= b + 1e-12 for a, b in zip(row, row[1:]))
    assert row[hi] < 0.9
    before = model.counts[lo]
    model.update([0] * (2 * nb))
    assert model.counts[lo] == pytest.approx(0.5 * before)
    assert len(model.bin_estimates()) == N_RANK_CLASSES and len(row) == nq


def test_pool_adjacent_violators():
    assert pool_adjacent_violators([1, 3, 2, 4], [1, 1, 1, 1]) == [1, 2.5, 2.5, 4]
    assert pool_adjacent_violators([3, 2, 1], [1, 1, 2]) == pytest.approx([1.75] * 3)
    assert pool_adjacent_violators([0.1, 0.2], [5, 1]) == [0.1, 0.2]


def test_evidence_is_the_target_probability_of_each_child():
    model = AcceptanceModel()
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    rows = torch.tensor([0, 0, 1, -1])            # the last child's parent was not verified
    tokens = torch.tensor([0, 1, 2, 2])
    logq = torch.tensor([[math.log(0.6), math.log(0.3)], [math.log(0.7), math.log(0.2)]])
    bins = model.features(logq).reshape(-1)
    packet = model.observations(p, rows, tokens, bins).tolist()
    nb = model.n_bins
    counts, sums = packet[:nb], [v / 1e6 for v in packet[nb:]]
    assert sum(counts) == 3
    expect = {}
    for b, r, t in zip(bins.tolist()[:3], rows.tolist()[:3], tokens.tolist()[:3]):
        expect[b] = expect.get(b, 0.0) + float(p[r, t])
    for b, v in expect.items():
        assert sums[b] == pytest.approx(v, abs=1e-5)
    # A broken draft's children (non-finite log-probs) are not evidence and are created dead.
    bad = torch.tensor([[float("nan"), float("-inf")]])
    assert model.features(bad).tolist() == [[nb, nb]]
    assert torch.isneginf(model.log_accept(bad)).all()


def test_parameter_validation():
    with pytest.raises(ValueError, match="decay"):
        AcceptanceModel(decay=0.0)
    with pytest.raises(ValueError, match="prior_strength"):
        AcceptanceModel(prior_strength=0)
    with pytest.raises(ValueError, match="packet"):
        AcceptanceModel().update([1, 2, 3])
