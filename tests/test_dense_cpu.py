"""The native float32 few-row matmul (kernels/dense/, csrc/f32_cpu.h) and its use by ops.py.

- Against the float64 product within a float32 summation bound, with and without the fused
  prologue (RMSNorm, SiLU * up) and residual; against ``f32_linear_reference``.
- Every ISA path and thread count gives the same bits, and a row's result does not depend on
  the other rows (N not a multiple of the 4/16-column tiles, K down to 16).
- ``ops.linear`` / ``norm_linear`` / ``swiglu_linear`` take it for CPU float32 passes of up to
  ``MAX_ROWS`` rows and BLAS above, with results that agree; without the library, BLAS.
"""
from __future__ import annotations

import pytest
import torch

from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.dense import cpu as dense_cpu
from specexec_rt.kernels.dense import f32_linear_native, f32_linear_reference

pytestmark = pytest.mark.usefixtures("one_thread")
EPS32 = 2.0 ** -23


def _native_or_skip():
    if cpu_native.library() is None:
        pytest.skip(f"native CPU library unavailable here: {cpu_native.unavailable_reason()}")


def _t(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _bound(x, w):
    return (x.shape[-1] + 2) * EPS32 * (x.abs() @ w.abs().T) + 1e-30


@pytest.mark.parametrize("n,k", [(1, 16), (7, 48), (37, 96), (130, 576)])
@pytest.mark.parametrize("m", [1, 2, 5, 9])
def test_matches_the_float64_product(n, k, m):
    _native_or_skip()
    w, x = _t(n, k, seed=n), _t(m, k, seed=m, scale=3.0)
    y = f32_linear_native(x, w)
    ref = (x.double() @ w.double().T).float()
    assert ((y - ref).abs() <= _bound(x, w)).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [3, 7, 13, 17])
def test_every_isa_and_thread_count_gives_the_same_bits(threads, m):
    """1, 2-4 and more rows take different loops (more in groups of balanced sizes: 13 as 7 + 6,
    17 as 6 + 6 + 5); a row's bits must not depend on which, nor on the ISA or the threads."""
    _native_or_skip()
    w, x = _t(101, 160, seed=1), _t(m, 160, seed=2)
    want = f32_linear_native(x, w, isa="scalar", threads=1)
    for isa in cpu_native.supported_isas():
        assert torch.equal(f32_linear_native(x, w, isa=isa, threads=threads), want), isa
        for r in range(m):
            assert torch.equal(f32_linear_native(x[r:r + 1].clone(), w, isa=isa, threads=threads), want[r:r + 1])


@pytest.mark.parametrize("norm,swiglu,residual", [(True, False, False), (False, True, True), (True, True, True),
                                                  (False, False, True)])
@pytest.mark.parametrize("m", [1, 4])
def test_fused_prologue_and_residual(norm, swiglu, residual, m):
    _native_or_skip()
    n, k = 70, 96
    w = _t(n, k, seed=3, scale=0.2)
    x = _t(m, 2 * k if swiglu else k, seed=4, scale=2.0)
    nrm = (torch.rand(k) + 0.5, 1e-5) if norm else None
    res = _t(m, n, seed=5) if residual else None
    y = f32_linear_native(x, w, residual=res, norm=nrm, swiglu=swiglu)
    ref = f32_linear_reference(x.double(), w.double(), None if res is None else res.double(),
                               None if nrm is None else (nrm[0].double(), nrm[1]), swiglu)
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)
    wide = torch.zeros(m, x.shape[1] + 16)          # a strided input gives the same bits
    wide[:, :x.shape[1]] = x
    assert torch.equal(f32_linear_native(wide[:, :x.shape[1]], w, residual=res, norm=nrm, swiglu=swiglu), y)


def test_nonfinite_and_argument_checks():
    _native_or_skip()
    w, x = _t(20, 32, seed=6), _t(3, 32, seed=7)
    x[1, 3] = float("inf")
    y = f32_linear_native(x, w)
    assert not torch.isfinite(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    with pytest.raises(ValueError, match="K a multiple of 16"):
        f32_linear_native(torch.zeros(1, 24), torch.zeros(4, 24))
    with pytest.raises(ValueError, match=r"x must be a CPU float32 \[M, 64\]"):
        f32_linear_native(torch.zeros(1, 32), torch.zeros(4, 32), swiglu=True)
    with pytest.raises(ValueError, match="residual must be float32"):
        f32_linear_native(torch.zeros(2, 32), torch.zeros(4, 32), residual=torch.zeros(2, 5))


def test_ops_take_it_for_few_rows_and_blas_above(monkeypatch):
    from specexec_rt.model import ops

    _native_or_skip()
    n, k = 64, 64          # w_down's K (n / 2) is a multiple of 16 too
    w, wd = _t(n, k, seed=8, scale=0.1), _t(k, n // 2, seed=9, scale=0.1)
    nw = torch.rand(k) + 0.5
    calls = []
    real = dense_cpu.run_f32_native
    monkeypatch.setattr(dense_cpu, "run_f32_native", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for m in (1, dense_cpu.MAX_ROWS, dense_cpu.MAX_ROWS + 1):
        x, res = _t(m, k, seed=m), _t(m, n, seed=m + 1)
        gu = _t(m, n, seed=m + 2)
        got = (ops.linear(x, w, residual=res), ops.norm_linear(x, nw, 1e-5, w), ops.swiglu_linear(gu, wd, residual=x))
        want = (x @ w.T + res, ops.rms_norm(x, nw, 1e-5) @ w.T,
                x + (torch.nn.functional.silu(gu[:, :n // 2]) * gu[:, n // 2:]) @ wd.T)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert calls == [1] * 3 + [dense_cpu.MAX_ROWS] * 3     # above MAX_ROWS: BLAS
    calls.clear()
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    ops.linear(_t(1, k), w)
    assert calls == []
