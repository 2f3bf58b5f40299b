"""The launch-bound path's structure, counted (not timed): one tree-attention plan per forward,
one Triton launch per linear layer and attention, few PyTorch kernel ops per layer.
bench/host_overhead.py measures the host time of the same path."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import types

import pytest
import torch

from specexec_rt.model import ops
from specexec_rt.kernels import device_info
from specexec_rt.kernels import attention as ta
from specexec_rt.kernels.attention import triton_kernels as attention_kernels
from specexec_rt.kernels.int4 import triton_kernels as int4_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("host_overhead", ROOT / "bench" / "host_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forward_plans_attention_once_and_launches_once_per_matrix():
    bench = load_bench()
    res = bench.run(n_layers=4, n_q=8, n_tree=16, prefix=32, reps=3)
    assert res["attention_plans_per_forward"] == 1
    launches = res["triton_launches"]
    assert launches["_tree_attn_fwd"] == 4
    assert launches.get("_int4_gemv_kernel", 0) + launches.get("_int4_mm_kernel", 0) == 4 * 4
    assert "_int4_dequant_kernel" not in launches          # small M stays on the fused kernels
    # Norms, RoPE, cache writes, residuals, SiLU: about 27 PyTorch kernels per layer today.
    assert res["torch_kernel_ops_per_layer"] <= 32, res["top_ops"]
    timings = ("forward_us", "int4_matmul_us", "int4_matmul_m1_us", "tree_attention_packed_us",
               "tree_attention_planned_run_us")
    assert all(isinstance(res[key], float) and math.isfinite(res[key]) for key in timings), res
    assert res["forward_us_per_layer"] == res["forward_us"] / 4


def test_median_us_times_each_call_after_warming_up(monkeypatch):
    """The timer behind every figure: warm-up calls untimed, then the median of ``reps`` timed
    calls, in microseconds (a scripted clock gives calls of 0, 1, ..., reps - 1 seconds)."""
    bench = load_bench()
    reps, calls, ticks = 30, [], iter(range(1000))
    now = [0.0]

    def clock():
        return now[0]

    def fn():
        calls.append(1)
        now[0] += next(ticks) if len(calls) > 3 else 1000.0      # warm-ups: slow, and not counted

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=clock))     # this module's clock only
    assert bench.median_us(fn, reps) == pytest.approx((14 + 15) / 2 * 1e6)    # median of 0 .. 29 seconds
    assert len(calls) == 3 + reps


def test_stubbed_path_is_restored():
    bench = load_bench()
    before = (ops.use_triton, attention_kernels._tree_attn_fwd, int4_kernels._int4_gemv_kernel, device_info.interpreting)
    with bench.stubbed_triton_path():
        assert isinstance(attention_kernels._tree_attn_fwd, bench.CountingStub) and ops.use_triton(torch.device("cpu"))
    assert (ops.use_triton, attention_kernels._tree_attn_fwd, int4_kernels._int4_gemv_kernel, device_info.interpreting) == before


def test_planned_launch_rejects_other_shapes():
    """A launch planned for one layer's shapes refuses different ones instead of reading the
    wrong memory."""
    bench = load_bench()
    with bench.stubbed_triton_path():
        q = torch.randn(4, 2, 64, dtype=torch.float16)
        k = torch.randn(24, 2, 64, dtype=torch.float16)
        mask = torch.ones(4, 8, dtype=torch.bool).tril(4)
        launch = ta.TreeAttentionLaunch(q, k, k, ta.pack_tree_mask(mask, 16), 16, 8)
        launch.run(q, k, k)
        with pytest.raises(ValueError, match="differ from the planned"):
            launch.run(q[:3], k, k)
        with pytest.raises(ValueError, match="differ from the planned"):
            launch.run(q, k[:20], k[:20])
        with pytest.raises(ValueError, match="differ from the planned"):
            launch.run(q.float(), k, k)
