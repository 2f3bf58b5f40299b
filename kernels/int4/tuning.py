"""Measure the fastest ``int4_matmul`` launch plan per weight shape on this GPU.

The default plans (``plans.default_plan``) are guesses for an H100. ``tune_shape``
times every plan of ``candidate_plans`` on this GPU for one weight shape and a set of M
buckets, after checking each against the reference (a fast wrong plan is never chosen), and
registers the fastest with ``plans.register_plan``; ``plans.save_tuning`` writes
them to the tuning file that ``int4_matmul`` reads on its first GPU call. Tuning costs
seconds per shape (every tile config compiles once), so it is an explicit step:
``specexec-rt tune-int4`` or ``bench/bench_int4_matmul.py --tune``, never a side effect of a
forward pass.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

from .gemm import run_plan
from .plans import Int4Plan, candidate_plans, default_plan, m_bucket, register_plan, tuned_key
from .reference import int4_matmul_reference
from .weight import Int4Weight, quantize_int4

DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Weights rotate over copies until this many bytes are in play, so the L2 cannot serve them.
L2_FLUSH_BYTES = 256 * 1024 * 1024


def _default_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")

    def cpu_timer(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_timer


def _copies(w: Int4Weight, m: int, k: int, dtype, device) -> int:
    if device.type != "cuda":
        return 1
    per = w.nbytes + m * k * torch.finfo(dtype).bits // 8
    return max(1, min(16, math.ceil(L2_FLUSH_BYTES / per)))


def tune_shape(n: int, k: int, group_size: int = 128, ms: Sequence[int] = DEFAULT_MS,
               dtype: torch.dtype = torch.float16, device=None,
               timer: Optional[Callable[[Callable[[], object]], float]] = None,
               plans: Optional[Callable[[int], Iterable[Int4Plan]]] = None,
               weight: Optional[Int4Weight] = None, progress: bool = False) -> list[dict]:
    """Time the candidate plans of an ``[n, k]`` int4 weight at every M bucket of ``ms`` and
    register the fastest correct one. Returns one row per bucket: ``m``, ``plan``, ``ms``,
    ``default_ms``, ``candidates``, ``rejected`` (plans that failed or gave wrong results).

    ``timer(fn) -> ms`` defaults to ``triton.testing.do_bench`` on CUDA (wall clock on CPU,
    where the kernels run in Triton's interpreter); ``plans(m)`` defaults to
    ``candidate_plans``; ``weight`` defaults to a random one of that shape.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    timer = timer or _default_timer(device)
    on_cuda = device.type == "cuda"
    plans = plans or (lambda m: candidate_plans(m, k, group_size, dequant=on_cuda))
    g = torch.Generator(device="cpu").manual_seed(n * 31 + k)
    if weight is None:
        weight = quantize_int4((torch.randn(n, k, generator=g) * 0.02).to(device), group_size)
    elif weight.shape != (n, k) or weight.group_size != group_size:
        raise ValueError(f"weight is {weight.shape} group {weight.group_size}, expected {(n, k)} group {group_size}")
    rows = []
    for bucket in sorted({m_bucket(m) for m in ms}):
        n_copies = _copies(weight, bucket, k, dtype, device)
        ws = [weight] + [dataclasses.replace(weight, qweight=weight.qweight.clone(), scales=weight.scales.clone(),
                                             mins=weight.mins.clone()) for _ in range(n_copies - 1)]
        xs = [(torch.randn(bucket, k, generator=g) * 0.5).to(device=device, dtype=dtype) for _ in ws]
        ref = int4_matmul_reference(xs[0].float(), weight)
        tol = 2e-2 * ref.abs().max().item() + 1e-3 if dtype != torch.float32 else 1e-3 * ref.abs().max().item() + 1e-4
        default = default_plan(bucket, k, group_size, dequant=on_cuda)
        timed, rejected = {}, []
        for plan in dict.fromkeys([default, *plans(bucket)]):
            why = plan.problem(k, group_size)
            if why is not None:
                rejected.append((plan, why))
                continue
            try:
                y = run_plan(xs[0], weight, plan)
                err = (y.float() - ref).abs().max().item()
                if not math.isfinite(err) or err > tol:
                    rejected.append((plan, f"max error {err:.3g} > {tol:.3g}"))
                    continue
                state = {"i": 0}

                def call(plan=plan):
                    i = state["i"] % n_copies
                    state["i"] += 1
                    run_plan(xs[i], ws[i], plan)

                timed[plan] = float(timer(call))
            except Exception as e:  # a config this GPU cannot compile or run is skipped
                rejected.append((plan, f"{type(e).__name__}: {e}"))
        if not timed:
            raise RuntimeError(f"int4 tuning: no plan ran correctly for N={n} K={k} M={bucket}: {rejected[:3]}")
        best = min(timed, key=timed.get)
        key = tuned_key(device, dtype, n, k, group_size, bucket)
        register_plan(key, best, {"ms": timed[best], "default_ms": timed.get(default)})
        rows.append({"N": n, "K": k, "group_size": group_size, "m": bucket, "plan": best,
                     "ms": timed[best], "default_ms": timed.get(default), "candidates": len(timed),
                     "rejected": rejected})
        if progress:
            d = timed.get(default)
            print(f"[tune-int4] N={n} K={k} M={bucket}: {best} {timed[best]:.4f} ms"
                  + (f" (default {d:.4f} ms, {d / timed[best]:.2f}x)" if d else "")
                  + f"; {len(timed)} timed, {len(rejected)} rejected", flush=True)
        ws = xs = None  # free this bucket's copies before the next bucket allocates its own
    return rows


def model_shapes(config) -> dict:
    """The runtime's int4 matrices of a model (fused as it runs them): name -> (N, K)."""
    h, d = config.hidden_size, config.head_dim
    return {
        "wqkv": ((config.n_heads + 2 * config.n_kv_heads) * d, h),
        "wo": (h, config.n_heads * d),
        "w_gate_up": (2 * config.intermediate_size, h),
        "w_down": (h, config.intermediate_size),
    }
