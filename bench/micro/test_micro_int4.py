"""4-bit weight-only matmul ``x @ W.T``: ours against the aten int4 op, dense float matmul and
the dequantizing reference, per M (1 = a decode step, more = a tree's rows).

CPU: SmolLM2-135M's fused gate/up matrix (3072 x 576, group 64), as the default draft runs it.
CUDA: a Llama-2-70B-sized square (8192 x 8192, group 128), fp16.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from micro_common import cold_copies, rotating, run_case
from specexec_rt.kernels.int4 import int4_matmul, int4_matmul_cpu, int4_matmul_reference, quantize_int4
from specexec_rt.kernels.int4 import cpu as int4_cpu

CPU_N, CPU_K, CPU_G = 3072, 576, 64
CUDA_N, CUDA_K, CUDA_G = 8192, 8192, 128


def _int4_bytes(w, m: int, act_bytes: int) -> int:
    """The weight as stored plus the activations in and the result out."""
    return w.nbytes + m * (w.in_features + w.out_features) * act_bytes


def _copy_int4(w):
    return dataclasses.replace(w, qweight=w.qweight.clone(), scales=w.scales.clone(), mins=w.mins.clone())


@pytest.fixture(scope="module")
def cpu_weight():
    w = quantize_int4(torch.randn(CPU_N, CPU_K, generator=torch.Generator().manual_seed(0)) * 0.02, CPU_G)
    return w.dequantize(), w  # the dense peer multiplies the same (dequantized) weight


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("impl", ["ours", "aten-int4-bf16", "dense-f32"])
def test_int4_linear_cpu(benchmark, cpu_weight, impl, m):
    dense, w = cpu_weight
    if impl == "ours" and not int4_cpu.native_active():
        pytest.skip("the native CPU library is unavailable (see the logged reason)")
    x = torch.randn(m, CPU_K, generator=torch.Generator().manual_seed(m))
    if impl == "dense-f32":
        nbytes = dense.nbytes + m * (CPU_N + CPU_K) * 4
        ws = cold_copies(benchmark, dense, torch.clone, dense.nbytes)
        fn = rotating(lambda d: F.linear(x, d), ws)
    else:
        nbytes = _int4_bytes(w, m, 4)
        ws = cold_copies(benchmark, w, _copy_int4, w.nbytes)
        cdt = None if impl == "ours" else torch.bfloat16
        fn = rotating(lambda q: int4_matmul_cpu(x, q, compute_dtype=cdt), ws)
    y = run_case(benchmark, fn, group=f"int4-linear cpu M={m} N={CPU_N} K={CPU_K}",
                 impl="peer" if impl != "ours" else "ours",
                 shape=dict(m=m, n=CPU_N, k=CPU_K, group=CPU_G), nbytes=nbytes, flops=2 * m * CPU_N * CPU_K,
                 bound="memory", copies=len(ws))
    torch.testing.assert_close(y.float(), int4_matmul_reference(x, w).float(), rtol=0.05, atol=0.05)


@pytest.fixture(scope="module")
def cuda_weight():
    w = quantize_int4((torch.randn(CUDA_N, CUDA_K, generator=torch.Generator().manual_seed(0)) * 0.02).cuda(), CUDA_G)
    return w.dequantize(torch.float16), w


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("impl", ["ours", "dense-fp16", "reference"])
def test_int4_linear_cuda(benchmark, cuda_weight, impl, m):
    dense, w = cuda_weight
    x = torch.randn(m, CUDA_K, device="cuda", dtype=torch.float16)
    if impl == "ours":
        nbytes = _int4_bytes(w, m, 2)
        ws = cold_copies(benchmark, w, _copy_int4, w.nbytes)  # 34 MB each: beyond the L2 in turn
        fn = rotating(lambda q: int4_matmul(x, q), ws)
    else:
        nbytes = dense.nbytes + m * (CUDA_N + CUDA_K) * 2
        ws = [w]
        fn = (lambda: F.linear(x, dense)) if impl == "dense-fp16" else (lambda: int4_matmul_reference(x, w))
    run_case(benchmark, fn, group=f"int4-linear cuda M={m} N={CUDA_N} K={CUDA_K}",
             impl={"ours": "ours", "dense-fp16": "peer", "reference": "reference"}[impl],
             shape=dict(m=m, n=CUDA_N, k=CUDA_K, group=CUDA_G, dtype="float16"), nbytes=nbytes,
             flops=2 * m * CUDA_N * CUDA_K, bound="memory" if m <= 64 else "compute", device=torch.device("cuda"),
             copies=len(ws))
