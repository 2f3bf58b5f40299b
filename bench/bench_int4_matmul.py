"""4-bit weight-only matmul vs fp16 cuBLAS and vs dequantise + cuBLAS, Llama layer shapes.

One line per (shape, M): times (median of ``triton.testing.do_bench``), our achieved GB/s
(packed weights + scales + mins + x + out) and TFLOP/s, and ratios against fp16 ``x @ W.T``
and against dequantise-then-matmul. Weights (and x) rotate over enough copies that the L2
cannot serve them. ``fused`` is the Triton GEMV/tensor-core kernel forced at every M, so
the table also shows where ``DEQUANT_MIN_M`` should sit. ``ms_default`` is the untuned
plan; with ``--tune`` every shape is first tuned on this GPU (kernels/int4/tuning.py) and
``ms_ours`` is the measured plan (``plan`` column). ``*_graph`` columns time one CUDA-graph
replay (``do_bench_cudagraph``): kernel time without Python launch overhead, which is what
a graph-captured decode step pays.

    python bench/bench_int4_matmul.py [--dry] [--tune] [--json out.json] [--stages 1] [--models 7b,70b]

``--dry``: tiny shapes on CPU through Triton's interpreter (seconds), for CI.
``run(dry)`` returns the rows for a GPU suite to import.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

SHAPES = {  # name: (in_features K, out_features N)
    "70b.q/o": (8192, 8192),
    "70b.k/v": (8192, 1024),
    "70b.gate/up": (8192, 28672),
    "70b.down": (28672, 8192),
    "7b.q/k/v/o": (4096, 4096),
    "7b.gate/up": (4096, 11008),
    "7b.down": (11008, 4096),
    # As the runtime runs them: q/k/v and gate/up fused into one matrix each.
    "70b.qkv-fused": (8192, 10240),
    "70b.gate_up-fused": (8192, 57344),
}
MS = (1, 16, 64, 256, 1024, 2048)
DRY_SHAPES = {"dry.a": (256, 96), "dry.b": (512, 64)}
DRY_MS = (1, 16)
GROUP = 128
L2_FLUSH_BYTES = 256 * 1024 * 1024  # rotate copies until this many bytes are in play


def _bench_cuda(fn, n_copies: int) -> float:
    import triton

    state = {"i": 0}

    def call():
        fn(state["i"] % n_copies)
        state["i"] += 1

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")


def _bench_cuda_graph(fn, n_copies: int):
    """Median ms of one call inside a CUDA graph (no launch overhead); None if capture fails."""
    import triton

    state = {"i": 0}

    def call():
        fn(state["i"] % n_copies)
        state["i"] += 1

    try:  # do_bench_cudagraph warms up, then captures on its own side stream
        return triton.testing.do_bench_cudagraph(call, rep=50, return_mode="median")
    except Exception as e:  # noqa: BLE001 - a column, not the benchmark, is lost
        print(f"  (CUDA graph timing failed: {type(e).__name__}: {e})", file=sys.stderr)
        return None


def _bench_cpu(fn, n_copies: int, reps: int = 3) -> float:
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i % n_copies)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _row(name, k, n, m, torch, dry, tune=False):
    from specexec_rt.kernels import int4
    from specexec_rt.kernels.int4 import gemm as int4_gemm, plans as int4_plans

    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.float16
    g = torch.Generator(device=device).manual_seed(k * 7 + n + m)
    w0 = torch.randn(n, k, device=device, generator=g, dtype=torch.float32) * 0.02
    wq = int4.quantize_int4(w0, GROUP)
    w16 = w0.to(dtype)
    del w0
    q_bytes = wq.nbytes
    io_bytes = (m * k + m * n) * torch.finfo(dtype).bits // 8
    n_q = 1 if dry else max(1, min(32, math.ceil(L2_FLUSH_BYTES / (q_bytes + io_bytes))))
    n_16 = 1 if dry else max(1, min(8, math.ceil(L2_FLUSH_BYTES / w16.nbytes)))
    wqs = [wq] + [dataclasses.replace(wq, qweight=wq.qweight.clone(), scales=wq.scales.clone(),
                                      mins=wq.mins.clone()) for _ in range(n_q - 1)]
    w16s = [w16] + [w16.clone() for _ in range(n_16 - 1)]
    xs = [torch.randn(m, k, device=device, generator=g, dtype=torch.float32).to(dtype)
          for _ in range(max(n_q, n_16))]

    # Correctness first: a fast wrong kernel must not reach the table.
    ref = int4.int4_matmul_reference(xs[0], wq).float()
    for label, y in (("ours", int4_gemm.int4_matmul(xs[0], wq)),
                     ("fused", int4_gemm._launch_fused(xs[0], wq))):
        scale = (xs[0].float().abs() @ wq.dequantize().abs().T).max().item()
        err = (y.float() - ref).abs().max().item()
        if not math.isfinite(err) or err > 5e-3 * scale + 1e-4:
            raise RuntimeError(f"{name} M={m}: {label} differs from reference by {err:.3g}")

    bench = _bench_cpu if dry else _bench_cuda
    if tune and not dry:
        from specexec_rt.kernels.int4 import tuning as int4_tuning

        int4_tuning.tune_shape(n, k, GROUP, ms=[m], dtype=dtype, device=device, weight=wq)
    plan = int4_plans.plan_for(xs[0], wq)
    default = int4_plans.default_plan(m, k, GROUP, dequant=not dry)
    t_ours = bench(lambda i: int4_gemm.int4_matmul(xs[i], wqs[i % n_q]), len(xs))
    t_default = t_ours if plan == default else bench(lambda i: int4_gemm.run_plan(xs[i], wqs[i % n_q], default), len(xs))
    t_fused = bench(lambda i: int4_gemm._launch_fused(xs[i], wqs[i % n_q]), len(xs))
    if dry:
        t_deq = bench(lambda i: xs[i] @ wqs[i % n_q].dequantize(dtype).T, len(xs))
    else:
        t_deq = bench(lambda i: int4_gemm._dequant_matmul(xs[i], wqs[i % n_q]), len(xs))
    t_16 = bench(lambda i: xs[i] @ w16s[i % n_16].T, len(xs))
    t_best = min(t_ours, t_fused)
    g_ours = g_16 = None
    if not dry:
        g_ours = _bench_cuda_graph(lambda i: int4_gemm.int4_matmul(xs[i], wqs[i % n_q]), len(xs))
        g_16 = _bench_cuda_graph(lambda i: xs[i] @ w16s[i % n_16].T, len(xs))
    return {
        "shape": name, "K": k, "N": n, "M": m, "dtype": str(dtype).replace("torch.", ""),
        "group_size": GROUP, "path": plan.path,
        "plan": "dequant+mm" if plan.path == "dequant" else
                f"{plan.path} {plan.block_m}x{plan.block_n}x{plan.block_k} w{plan.warps} s{plan.split_k or 'auto'}",
        "tuned": plan != default,
        "ms_ours": t_ours, "ms_default": t_default, "ms_fused": t_fused, "ms_dequant_mm": t_deq, "ms_fp16": t_16,
        "ms_ours_graph": g_ours, "ms_fp16_graph": g_16,
        "gbps_ours": (q_bytes + io_bytes) / (t_ours * 1e-3) / 1e9,
        "gbps_fp16": (w16.nbytes + io_bytes) / (t_16 * 1e-3) / 1e9,
        "tflops_ours": 2 * m * n * k / (t_ours * 1e-3) / 1e12,
        "tflops_fp16": 2 * m * n * k / (t_16 * 1e-3) / 1e12,
        "speedup_vs_fp16": t_16 / t_ours,
        "speedup_vs_fp16_graph": g_16 / g_ours if g_ours and g_16 else None,
        "tuned_over_default": t_default / t_ours,
        "speedup_vs_dequant_mm": t_deq / t_ours,
        "best_path_speedup_vs_fp16": t_16 / t_best,
        "stages": int4_gemm.K_LOOP_STAGES,
    }


def run(dry: bool = False, models: tuple[str, ...] = ("70b", "7b"), ms=None,
        stages: int | None = None, tune: bool = False, tune_budget_s: float = 240.0) -> list[dict]:
    """Benchmark rows (dicts, see ``_row``). ``dry`` needs TRITON_INTERPRET=1 set before
    Triton is first imported (``main`` does that). ``tune``: measure the best plan of every
    (shape, M) on this GPU first (in-process only; ``specexec-rt tune-int4`` saves them),
    until ``tune_budget_s`` of tuning is spent (later rows run their default plans, and say so)."""
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise RuntimeError("run(dry=True) needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from specexec_rt.kernels.int4 import gemm as int4_gemm

    if not dry and not torch.cuda.is_available():
        raise RuntimeError("the int4 benchmark needs a CUDA GPU (or --dry)")
    if stages is not None:
        int4_gemm.K_LOOP_STAGES = stages
    shapes = DRY_SHAPES if dry else {s: v for s, v in SHAPES.items()
                                     if s.split(".")[0] in models}
    rows = []
    tuning_s = 0.0
    for name, (k, n) in shapes.items():
        for m in (DRY_MS if dry else (ms or MS)):
            t0 = time.perf_counter()
            tune_now = tune and tuning_s < tune_budget_s
            rows.append(_row(name, k, n, m, torch, dry, tune_now))
            rows[-1]["tuned_in_run"] = tune_now
            if tune_now:
                tuning_s += time.perf_counter() - t0
            _print_row(rows[-1], header=len(rows) == 1)
            if not dry:
                torch.cuda.empty_cache()
    return rows


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'shape':<18}{'K':>6}{'N':>6}{'M':>5} {'plan':<26}{'ours ms':>9}{'default':>9}{'fused':>9}"
              f"{'deq+mm':>9}{'fp16 ms':>9}{'GB/s':>7}{'TFLOP/s':>8}{'fp16 TF':>8}"
              f"{'x fp16':>7}{'x graph':>8}{'x deq':>7}")
    graph = r["speedup_vs_fp16_graph"]
    print(f"{r['shape']:<18}{r['K']:>6}{r['N']:>6}{r['M']:>5} {r['plan']:<26}"
          f"{r['ms_ours']:>9.4f}{r['ms_default']:>9.4f}{r['ms_fused']:>9.4f}{r['ms_dequant_mm']:>9.4f}"
          f"{r['ms_fp16']:>9.4f}{r['gbps_ours']:>7.0f}{r['tflops_ours']:>8.1f}"
          f"{r['tflops_fp16']:>8.1f}{r['speedup_vs_fp16']:>7.2f}"
          f"{'n/a' if graph is None else f'{graph:.2f}':>8}{r['speedup_vs_dequant_mm']:>7.2f}",
          flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="tiny shapes on CPU via the interpreter")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--models", default="70b,7b", help="comma list of 70b, 7b")
    ap.add_argument("--ms", default=None, help="comma list of M values (default 1..2048)")
    ap.add_argument("--tune", action="store_true", help="tune every (shape, M) on this GPU first")
    ap.add_argument("--stages", type=int, default=None,
                    help="software-pipelining stages of the K loops (module default 1)")
    args = ap.parse_args(argv)
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    ms = tuple(int(v) for v in args.ms.split(",")) if args.ms else None
    rows = run(args.dry, tuple(args.models.split(",")), ms, args.stages, tune=args.tune)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
