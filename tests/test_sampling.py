"""Logits processing (greedy, temperature, top-k, true nucleus top-p) and the rejection rules."""
from __future__ import annotations

import pytest
import torch

from specexec_rt.speculative import sampling
from specexec_rt.errors import SamplingParameterError
from specexec_rt.speculative.sampling import SamplingParams, process_logits


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value of ``counts`` against ``probs``; cells with small expected
    counts are pooled into one so the chi-square approximation holds."""
    counts, probs = counts.double(), probs.double()
    n = counts.sum()
    expected = probs * n
    if (counts[expected == 0] > 0).any():
        return 0.0    # a sample the distribution cannot produce
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = max(int(keep.sum()) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def test_params_validation():
    for bad in [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                dict(top_k=-1), dict(top_k=1.5)]:
        with pytest.raises(SamplingParameterError):
            SamplingParams(**bad)
    assert SamplingParams(0.0).greedy and not SamplingParams(0.5).greedy


def test_greedy_is_one_hot_of_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 5.0]])
    p = process_logits(logits, SamplingParams(0.0))
    assert torch.equal(p, torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]]))


def test_temperature_and_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, generator=g)
    p = process_logits(logits, SamplingParams(0.7))
    torch.testing.assert_close(p, torch.softmax(logits / 0.7, -1))
    pk = process_logits(logits, SamplingParams(1.0, top_k=5))
    assert ((pk > 0).sum(-1) == 5).all()
    top5 = logits.topk(5).indices
    assert (pk.gather(-1, top5) > 0).all()
    torch.testing.assert_close(pk.sum(-1), torch.ones(3))


def test_top_p_is_the_true_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    # sorted: 0.5, 0.3, 0.1, ...: 0.5 < 0.79 so 0.3 is needed; 0.8 reaches 0.79 -> stop.
    p = process_logits(logits[None], SamplingParams(1.0, top_p=0.79))[0]
    torch.testing.assert_close(p, torch.tensor([0.0, 0.5, 0.0, 0.3, 0.0]) / 0.8)
    p = process_logits(logits[None], SamplingParams(1.0, top_p=0.81))[0]
    torch.testing.assert_close(p, torch.tensor([0.0, 0.5, 0.1, 0.3, 0.0]) / 0.9)
    # the most likely token alone when it already reaches top_p; never the least likely ones
    p = process_logits(logits[None], SamplingParams(1.0, top_p=0.2))[0]
    assert torch.equal(p > 0, torch.tensor([False, True, False, False, False]))


def test_top_p_random_rows_keep_the_smallest_prefix():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(4, 50, generator=g) * 2
        top_p = float(torch.rand(1, generator=g)) * 0.9 + 0.05
        base = torch.softmax(logits, -1)
        keep = sampling.top_p_mask(base, top_p)
        for row in range(4):
            sp, order = base[row].sort(descending=True)
            k = int(keep[row].sum())
            assert sp[:k].sum() >= top_p - 1e-6             # reaches top_p
            assert k == 1 or sp[:k - 1].sum() < top_p       # and is the smallest such set
            assert keep[row, order[:k]].all()               # made of the most likely tokens


def test_top_p_candidates_path_equals_the_full_sort(monkeypatch):
    """On the CPU the nucleus is found among the ``TOP_P_CANDIDATES`` most likely tokens, with a
    full sort only for rows whose nucleus reaches past them: the same mask as sorting every row,
    for sharp rows, flat rows (nucleus of thousands) and both in one call."""
    g = torch.Generator().manual_seed(4)
    vocab = 5000
    sharp = torch.randn(6, vocab, generator=g) * 8          # nucleus of a few tokens
    flat = torch.randn(3, vocab, generator=g) * 0.5          # nucleus far past 256
    probs = torch.softmax(torch.cat([sharp, flat])[torch.randperm(9, generator=g)], -1)
    for top_p in (0.05, 0.5, 0.9, 0.999):
        fast = sampling.top_p_mask(probs, top_p)
        monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", vocab)
        full = sampling.top_p_mask(probs, top_p)
        monkeypatch.undo()
        assert torch.equal(fast, full), top_p
    sizes = sampling.top_p_mask(probs, 0.9).sum(-1)
    assert sizes.min() < 50 and sizes.max() > sampling.TOP_P_CANDIDATES   # both paths were taken


def test_top_p_keeps_every_token_tied_at_the_boundary():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]])
    # 0.4 < 0.5, then a 0.2 reaches 0.6: the nucleus ends on a 0.2, and its twin stays too.
    assert sampling.top_p_mask(probs, 0.5).tolist() == [[True, True, True, False, False]]
    assert sampling.top_p_mask(probs, 0.3).tolist() == [[True, False, False, False, False]]


def test_exp1_noise_is_exponential():
    """The CPU's Exp(1) noise (-log1p(-U) of float64 uniforms): positive, finite, and
    exponentially distributed (chi-square over 10 equal-mass bins, fixed seed)."""
    g = torch.Generator().manual_seed(5)
    e = sampling.exp1_(torch.empty(200_000), g)
    assert e.dtype == torch.float32 and torch.isfinite(e).all() and (e >= 0).all()
    edges = -torch.log1p(-torch.arange(1, 10) / 10.0)          # Exp(1) deciles
    counts = torch.bincount(torch.bucketize(e, edges), minlength=10)
    assert chi2_pvalue(counts, torch.full((10,), 0.1)) > 1e-3
    assert abs(float(e.mean()) - 1.0) < 0.01


def test_sample_matches_distribution():
    g = torch.Generator().manual_seed(2)
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3])
    draws = sampling.sample(probs.expand(20000, 4), g)
    counts = torch.bincount(draws, minlength=4)
    assert counts[1] == 0
    assert chi2_pvalue(counts, probs) > 1e-3


def test_sample_without_replacement_distinct_and_flags_support():
    g = torch.Generator().manual_seed(3)
    probs = torch.tensor([0.6, 0.0, 0.4, 0.0, 0.0])
    for _ in range(50):
        tokens, valid = sampling.sample_without_replacement(probs, 4, g)
        assert valid.tolist() == [True, True, False, False]
        assert set(tokens[:2].tolist()) == {0, 2}
    # the first draw follows probs
    firsts = torch.stack([sampling.sample_without_replacement(probs, 2, g)[0][0] for _ in range(3000)])
    assert chi2_pvalue(torch.bincount(firsts, minlength=5), probs) > 1e-3


def test_residual():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    torch.testing.assert_close(sampling.residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(sampling.residual(p, p), p)      # zero residual mass -> p itself


def _random_dist(g, v, zeros=0):
    x = torch.rand(v, generator=g) + 0.05
    if zeros:
        x[torch.randperm(v, generator=g)[:zeros]] = 0
    return x / x.sum()


def test_chain_accept_is_exact():
    """Two-token chain on a 4-token vocabulary: the emitted first token is distributed as p0,
    whatever q is (drafted tokens drawn from q as the engine does)."""
    g = torch.Generator().manual_seed(4)
    v = 4
    p = torch.stack([_random_dist(g, v), _random_dist(g, v), _random_dist(g, v)])
    q = torch.stack([_random_dist(g, v, zeros=1), _random_dist(g, v)])
    firsts = []
    for _ in range(4000):
        x0 = sampling.sample(q[0], g)
        x1 = sampling.sample(q[1], g)
        n_acc, tok = sampling.chain_accept(p, q, torch.stack([x0, x1]), g)
        firsts.append(int(x0) if int(n_acc) >= 1 else int(tok))
    counts = torch.bincount(torch.tensor(firsts), minlength=v)
    assert chi2_pvalue(counts, p[0]) > 1e-3


@pytest.mark.parametrize("n", [1, 3])
def test_multi_candidate_accept_is_exact(n):
    g = torch.Generator().manual_seed(5 + n)
    v = 6
    p = _random_dist(g, v)
    q = _random_dist(g, v, zeros=2)   # only 4 tokens in q's support: some draws run out of it
    out = []
    for _ in range(4000):
        cands, valid = sampling.sample_without_replacement(q, n, g)
        j, p_final = sampling.multi_candidate_accept(p, q, cands, valid, g)
        out.append(int(cands[j]) if int(j) >= 0 else int(sampling.sample(p_final, g)))
    counts = torch.bincount(torch.tensor(out), minlength=v)
    assert chi2_pvalue(counts, p) > 1e-3


def test_ratio_test_matters():
    """Without the ratio test the emitted token follows q, which the same check rejects."""
    g = torch.Generator().manual_seed(9)
    p = torch.tensor([0.7, 0.1, 0.1, 0.1])
    q = torch.tensor([0.1, 0.1, 0.1, 0.7])
    out = []
    for _ in range(2000):
        cands, valid = sampling.sample_without_replacement(q, 1, g)
        out.append(int(cands[0]))   # "accept everything"
    assert chi2_pvalue(torch.bincount(torch.tensor(out), minlength=4), p) < 1e-6
