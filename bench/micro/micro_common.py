"""What every micro-benchmark does: time one implementation inside its op-and-shape group and
put the roofline figure beside the time.

``run_case`` sets the benchmark's ``group`` (ours, the reference and the peers of one op and
shape share it, so ``--benchmark-compare`` and ``--benchmark-histogram`` line them up) and its
``extra_info``: ``impl`` (ours / reference / peer), ``shape``, the ``bytes`` the call must move
and the ``flops`` it must do, which of the two bounds it (``bound``), and from the median time
``GB/s`` and ``TFLOP/s``. Bytes and FLOPs are the minimum for the problem in each
implementation's own format (a float32 peer reads 4 bytes per weight, an int4 kernel about
half a byte), so the figures compare each implementation with the machine's roofline.

A decode step reads each weight once, after the rest of the model has evicted it, so the matmul
cases take their weight from ``cold_copies``: enough copies that the rounds, taking them in
turn, find none in cache (llm.c flushes the L2 for the same reason).
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch

# More than a CPU's last-level cache or a GPU's L2 (50 MB on an H100).
COLD_BYTES = 128 << 20
MAX_COPIES = 32


def cold_copies(benchmark, first, copy: Callable[[object], object], nbytes: int) -> list:
    """``first`` and enough ``copy(first)`` that together they exceed ``COLD_BYTES`` (at most
    ``MAX_COPIES``); ``nbytes``: the bytes a call reads of one copy. Only ``first`` when the
    benchmark is disabled (``--benchmark-disable`` runs each case once)."""
    if not benchmark.enabled:
        return [first]
    n = max(1, min(MAX_COPIES, -(-COLD_BYTES // max(1, nbytes))))
    return [first] + [copy(first) for _ in range(n - 1)]


def rotating(fn: Callable[[object], object], copies: Sequence) -> Callable[[], object]:
    """A call of ``fn`` on the next of ``copies`` each time."""
    it = itertools.cycle(copies)
    return lambda: fn(next(it))


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device sync on CUDA (a benchmark round then times the kernels, not
    only their launch)."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def run_case(benchmark, fn: Callable[[], object], *, group: str, impl: str, shape: dict, nbytes: int, flops: int,
             bound: str, device: torch.device = torch.device("cpu"), copies: int = 1):
    """Benchmark ``fn`` and record the roofline figures; returns ``fn``'s result. ``copies``:
    how many weight copies ``fn`` rotates through (1: the same inputs every round, in cache
    when they fit)."""
    if bound not in ("memory", "compute"):
        raise ValueError(f"bound must be 'memory' or 'compute', got {bound!r}")
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, shape=shape, bytes=int(nbytes), flops=int(flops), bound=bound,
                                weight_copies=copies, cpu_threads=torch.get_num_threads())
    fn = synced(fn, device)
    for _ in range(copies):  # first-call work (lazy packing, library load, compilation) stays out of the rounds
        fn()
    out = benchmark(fn)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        gbs, tflops = float(f"{nbytes / stats.median / 1e9:.4g}"), float(f"{flops / stats.median / 1e12:.4g}")
        benchmark.extra_info.update({"GB/s": gbs, "TFLOP/s": tflops,
                                     "roofline": f"{gbs} GB/s" if bound == "memory" else f"{tflops} TFLOP/s"})
    return out
