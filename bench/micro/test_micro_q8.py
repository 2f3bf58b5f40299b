"""The Q8_0 LM head ``x @ W.T`` (SmolLM2's tied 49152 x 576 embedding, one decode row): ours with
float32 or int8 activations, against aten's int8 weight-only op and the dequantized float32
weight through ``F.linear`` (the reference)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from micro_common import cold_copies, rotating, run_case
from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.q8 import q8_linear_native, q8_linear_reference, quantize_q8_0, with_int8_activations

N, K = 49152, 576


@pytest.fixture(scope="module")
def head():
    return quantize_q8_0(torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02)


@pytest.mark.parametrize("impl", ["ours", "ours-int8-act", "aten-int8", "reference"])
def test_q8_head_cpu(benchmark, head, impl):
    m = 1
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(1))
    if impl.startswith("ours") and cpu_native.library() is None:
        pytest.skip("the native CPU library is unavailable (see the logged reason)")
    if impl == "aten-int8":
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            pytest.skip("this torch has no aten._weight_int8pack_mm")
        # Per-channel int8 (aten's format): the same bytes per weight as Q8_0, one scale per row.
        dense = head.dequantize()
        scale = dense.abs().amax(1).clamp_min(1e-8) / 127
        q = torch.round(dense / scale[:, None]).to(torch.int8)
        nbytes = q.nbytes + scale.nbytes
        ws = cold_copies(benchmark, (q, scale), lambda c: (c[0].clone(), c[1].clone()), nbytes)
        fn = rotating(lambda c: torch.ops.aten._weight_int8pack_mm(x, *c), ws)
    elif impl == "reference":
        nbytes = N * K * 4  # its dequantized copy, cached on the weight: larger than any cache already
        ws = [head]
        fn = lambda: q8_linear_reference(x, head)  # noqa: E731
    else:
        w = with_int8_activations(head) if impl == "ours-int8-act" else head
        nbytes = head.nbytes
        ws = cold_copies(benchmark, w, lambda c: dataclasses.replace(c, qweight=c.qweight.clone(),
                                                                     scales=c.scales.clone()), nbytes)
        fn = rotating(lambda c: q8_linear_native(x, c), ws)
    y = run_case(benchmark, fn, group=f"q8-head cpu M={m} N={N} K={K}",
                 impl={"reference": "reference", "aten-int8": "peer"}.get(impl, "ours"),
                 shape=dict(m=m, n=N, k=K), nbytes=nbytes + m * (N + K) * 4, flops=2 * m * N * K, bound="memory",
                 copies=len(ws))
    torch.testing.assert_close(y.float(), q8_linear_reference(x, head), rtol=0.05, atol=0.05)
