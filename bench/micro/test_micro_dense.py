"""A float32 weight times a few rows on the CPU (SmolLM2's 3072 x 576 gate/up matrix): the
native prefetching kernel against its reference, ``F.linear`` (BLAS)."""
from __future__ import annotations

import pytest
import torch

from micro_common import cold_copies, rotating, run_case
from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.dense import f32_linear_native, f32_linear_reference

N, K = 3072, 576


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_f32_linear_cpu(benchmark, impl, m):
    if impl == "ours" and cpu_native.library() is None:
        pytest.skip("the native CPU library is unavailable (see the logged reason)")
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(N, K, generator=g) * 0.02, torch.randn(m, K, generator=g)
    ws = cold_copies(benchmark, w, torch.clone, w.nbytes)
    fn = rotating((lambda c: f32_linear_native(x, c)) if impl == "ours" else (lambda c: f32_linear_reference(x, c)), ws)
    y = run_case(benchmark, fn, group=f"f32-linear cpu M={m} N={N} K={K}", impl=impl, shape=dict(m=m, n=N, k=K),
                 nbytes=w.nbytes + m * (N + K) * 4, flops=2 * m * N * K, bound="memory", copies=len(ws))
    torch.testing.assert_close(y, f32_linear_reference(x, w), rtol=1e-4, atol=1e-4)
