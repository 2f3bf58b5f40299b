"""``specexec-rt profile-offload``: PCIe bandwidth and how well the LayerStreamer hides it.

Two questions in one command:
1. host<->device bandwidth for pageable, pinned and registered host memory (medians of
   CUDA-event-timed copies, 1 MB .. 1 GB), the roofline of every offloaded pass;
2. on a synthetic stack of layers of a real shape (random weights, dense fp16 or int4):
   copy-only time per pass, compute-only time (layers resident), streamed time, and the overlap
   efficiency ``max(copy, compute) / streamed`` (1.0 = the copy is perfectly hidden or hides
   the compute).
``--dry`` runs the same code on the CPU with tiny shapes (CI); without ``--dry`` and without a
CUDA device it exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.int4 import Int4Weight, int4_matmul
from . import native
from .streamer import LayerStreamer, layout_layer
from ..model.weights import LayerWeights, ResidentLayers, replace_leaves

SHAPES = {
    "llama-2-70b": dict(hidden=8192, n_heads=64, n_kv_heads=8, head_dim=128, inter=28672, n_layers=80),
    "llama-2-7b": dict(hidden=4096, n_heads=32, n_kv_heads=32, head_dim=128, inter=11008, n_layers=32),
    "tiny": dict(hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, inter=512, n_layers=4),
}
DEFAULT_SIZES = "1M,4M,16M,64M,256M,1G"
DRY_SIZES = "64K,1M"
GROUP_SIZE = 128
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'1M' -> 1048576, '1G', '512K', '4096' (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"bad size {text!r}: expected e.g. 1M, 256M, 1G") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


# ---------------------------------------------------------------- synthetic layers

def _matrix(out: int, inp: int, quantize: str, g: torch.Generator):
    if quantize == "none":
        return torch.empty(out, inp, dtype=torch.float16).uniform_(-0.02, 0.02, generator=g)
    q = torch.randint(0, 256, (out, inp // 2), dtype=torch.uint8, generator=g)
    scales = torch.empty(inp // GROUP_SIZE, out, dtype=torch.float16).uniform_(1e-3, 2e-3, generator=g)
    mins = -8 * scales
    return Int4Weight(qweight=q, scales=scales, mins=mins, out_features=out, in_features=inp,
                      group_size=GROUP_SIZE)


def synthetic_layer(shape: str, quantize: str, seed: int = 0) -> LayerWeights:
    """One host layer of the real shape with random weights."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    if quantize not in ("none", "int4"):
        raise ValueError(f"quantize must be 'none' or 'int4', got {quantize!r}")
    s = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    h, qkv = s["hidden"], (s["n_heads"] + 2 * s["n_kv_heads"]) * s["head_dim"]
    ones = torch.ones(h, dtype=torch.float16)
    return LayerWeights(attn_norm=ones, wqkv=_matrix(qkv, h, quantize, g), bqkv=None,
                        wo=_matrix(h, s["n_heads"] * s["head_dim"], quantize, g), bo=None,
                        ffn_norm=ones.clone(), w_gate_up=_matrix(2 * s["inter"], h, quantize, g),
                        w_down=_matrix(h, s["inter"], quantize, g))


def _linear(x: torch.Tensor, w) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return int4_matmul(x, w)


def synthetic_block(x: torch.Tensor, w: LayerWeights, n_q: int) -> torch.Tensor:
    """The block's matmuls with real shapes (no attention: it does not touch the weights);
    ``x`` ``[tokens, hidden]`` fp16."""
    qkv = _linear(x * w.attn_norm, w.wqkv)
    x = x + _linear(qkv[:, :n_q], w.wo)
    gate, up = _linear(x * w.ffn_norm, w.w_gate_up).chunk(2, dim=-1)
    x = x + _linear(F.silu(gate) * up, w.w_down)
    return x * 0.5  # keep magnitudes bounded over many layers


# ---------------------------------------------------------------- timing

class _Clock:
    """Timestamps of device work: CUDA events on the current stream on a GPU, perf_counter on the
    CPU. Marks are recorded without synchronising, so back-to-back passes stay back to back."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


def _median_pass_time(clock: _Clock, source, x0: torch.Tensor, n_q: int, passes: int,
                      compute: bool) -> float:
    """Median seconds per pass in steady state.

    Passes run back to back with a mark between each, and the first interval is dropped: it
    starts with the wrap-around prefetch already done (the warm-up's copies), so it would
    undercount the copies. Later intervals see the copy stream busy across pass boundaries.
    """
    def one_pass():
        x = x0
        for layer in source.iter_layers():
            if compute:
                x = synthetic_block(x, layer, n_q)

    one_pass()  # warm-up: allocator, kernels, first prefetch
    if clock.cuda:
        torch.cuda.synchronize()
    marks = [clock.mark()]
    for _ in range(passes + 1):
        one_pass()
        marks.append(clock.mark())
    times = [clock.seconds(a, b) for a, b in zip(marks[1:-1], marks[2:])]
    return statistics.median(times)


def probe_rows(sizes: list[int], iters: int, device: torch.device, dry: bool) -> list[dict]:
    """Bandwidth rows: {kind, direction, bytes, median_ms, gbps}."""
    rows = []
    kinds = ("pageable",) if dry else ("pageable", "pinned", "registered")
    for size in sizes:
        for kind in kinds:
            for direction in ("h2d", "d2h"):
                if dry:
                    src, dst = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
                    times = []
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        dst.copy_(src)
                        times.append((time.perf_counter() - t0) * 1e3)
                else:
                    times = native.probe_bandwidth(size, kind, direction, iters, device)
                ms = statistics.median(times)
                rows.append(dict(kind=kind, direction=direction, bytes=size, median_ms=ms,
                                 gbps=size / (ms / 1e3) / 1e9 if ms > 0 else math.inf))
    return rows


def run_profile(sizes: Optional[list[int]] = None, shape: str = "tiny", quantize: str = "none",
                layers: Optional[int] = None, tokens: int = 128, iters: int = 10, passes: int = 5,
                n_slots: int = 2, dry: bool = False, device=None) -> dict:
    """Measure bandwidths and streamer overlap; returns a JSON-ready dict (see module docstring).

    ``dry`` runs on the CPU (no CUDA needed). On CUDA ``device`` defaults to the current GPU.
    """
    if dry:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("profile-offload needs a CUDA device (use --dry for the CPU code path)")
        device = torch.device(device or "cuda")
    sizes = sizes or [parse_size(s) for s in (DRY_SIZES if dry else DEFAULT_SIZES).split(",")]
    clock = _Clock(device)
    out = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               engine=native.backend() if device.type == "cuda" else "cpu", dry=dry,
               torch=torch.__version__, bandwidth=probe_rows(sizes, iters, device, dry))

    template = synthetic_layer(shape, quantize)
    layer_bytes = layout_layer(template)[1]
    if layers is None:  # enough layers for >= 4 GiB per pass (steady state), at most the model's
        layers = 2 if dry else min(SHAPES[shape]["n_layers"], max(4, math.ceil((4 << 30) / layer_bytes)))
    n_q = SHAPES[shape]["n_heads"] * SHAPES[shape]["head_dim"]
    x0 = (torch.randn(tokens, SHAPES[shape]["hidden"]) * 0.1).to(torch.float16).to(device)
    if device.type == "cpu":
        x0 = x0.float()  # fp16 matmul is slow or missing on some CPUs
        template = replace_leaves(template, lambda p, t: t.float() if t.is_floating_point() else t)
        layer_bytes = layout_layer(template)[1]
    streamer = LayerStreamer([template] * layers, device, n_resident=0, n_slots=n_slots)
    resident = ResidentLayers([replace_leaves(template, lambda p, t: t.to(device))] * layers)
    try:
        copy_s = _median_pass_time(clock, streamer, x0, n_q, passes, compute=False)
        compute_s = _median_pass_time(clock, resident, x0, n_q, passes, compute=True)
        streamed_s = _median_pass_time(clock, streamer, x0, n_q, passes, compute=True)
        if device.type == "cuda":  # per-copy timing in a separate run: events perturb a little
            streamer.timing = True
            streamer.stats(reset=True)
            _median_pass_time(clock, streamer, x0, n_q, 1, compute=True)
            timed = streamer.stats()
        else:
            timed = {}
    finally:
        streamer.close()
    per_pass = streamer.streamed_bytes_per_pass
    out["streamer"] = dict(
        shape=shape, quantize=quantize, layers=layers, tokens=tokens, n_slots=n_slots,
        layer_bytes=layer_bytes, bytes_per_pass=per_pass, host_bytes=streamer.host_bytes,
        copy_only_s=copy_s, compute_only_s=compute_s, streamed_s=streamed_s,
        copy_only_gbps=per_pass / copy_s / 1e9, streamed_gbps=per_pass / streamed_s / 1e9,
        efficiency=max(copy_s, compute_s) / streamed_s,
        copy_event_gbps=timed.get("copy_gbps"), compute_wait_s=timed.get("wait_s"))
    return out


# ---------------------------------------------------------------- CLI

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile-offload", help="PCIe bandwidth and LayerStreamer overlap",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help=f"copy sizes (default {DEFAULT_SIZES}; --dry: {DRY_SIZES})")
    p.add_argument("--shape", default=None, choices=list(SHAPES), help="layer shape (default llama-2-7b; --dry: tiny)")
    p.add_argument("--quantize", default="none", choices=["none", "int4"])
    p.add_argument("--layers", type=int, default=None, help="layers in the synthetic stack")
    p.add_argument("--tokens", type=int, default=128, help="tokens per pass (tree size)")
    p.add_argument("--slots", type=int, default=2, help="GPU slots (prefetch depth)")
    p.add_argument("--iters", type=int, default=10, help="timed copies per bandwidth point")
    p.add_argument("--passes", type=int, default=5, help="timed groups of passes per streamer figure")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a bandwidth plot (PNG) here (needs matplotlib)")
    p.add_argument("--dry", action="store_true", help="CPU only, tiny shapes: exercise the code path")
    p.set_defaults(func=main)
    return p


def _report(res: dict) -> str:
    lines = [f"device: {res['device']}  engine: {res['engine']}  torch {res['torch']}",
             f"{'kind':<11}{'dir':<5}{'bytes':>12}{'median ms':>12}{'GB/s':>9}"]
    for r in res["bandwidth"]:
        lines.append(f"{r['kind']:<11}{r['direction']:<5}{r['bytes']:>12}{r['median_ms']:>12.3f}{r['gbps']:>9.2f}")
    s = res["streamer"]
    lines += [f"streamer: {s['layers']} x {s['shape']} ({s['quantize']}) layers of {s['layer_bytes'] / 2**20:.1f} MiB, "
              f"{s['tokens']} tokens, {s['n_slots']} slots",
              f"  copy only   {s['copy_only_s'] * 1e3:9.2f} ms/pass  {s['copy_only_gbps']:7.2f} GB/s",
              f"  compute only{s['compute_only_s'] * 1e3:9.2f} ms/pass",
              f"  streamed    {s['streamed_s'] * 1e3:9.2f} ms/pass  {s['streamed_gbps']:7.2f} GB/s",
              f"  overlap efficiency max(copy, compute) / streamed = {s['efficiency']:.3f}"]
    if res["bandwidth"] and not res["dry"]:
        peak = max(r["gbps"] for r in res["bandwidth"] if r["kind"] == "pinned" and r["direction"] == "h2d")
        lines.append(f"  streamer copy bandwidth = {s['copy_only_gbps'] / peak:.1%} of the pinned H2D peak "
                     f"({peak:.2f} GB/s)")
    return "\n".join(lines)


def _plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("pageable", "pinned", "registered"):
        for direction, style in (("h2d", "-o"), ("d2h", "--s")):
            rows = [r for r in res["bandwidth"] if r["kind"] == kind and r["direction"] == direction]
            if rows:
                ax.plot([r["bytes"] for r in rows], [r["gbps"] for r in rows], style, label=f"{kind} {direction}")
    s = res["streamer"]
    ax.axhline(s["copy_only_gbps"], color="k", lw=0.8, label=f"streamer copy-only ({s['shape']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("copy size (bytes)")
    ax.set_ylabel("GB/s")
    ax.set_title(f"host <-> device bandwidth: {res['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    if not args.dry and not torch.cuda.is_available():
        print("specexec-rt profile-offload: no CUDA device found; offload profiling needs a GPU "
              "(--dry runs the code path on the CPU with tiny shapes)", file=sys.stderr)
        return 2
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else None
    except ValueError as e:
        print(f"specexec-rt profile-offload: {e}", file=sys.stderr)
        return 2
    shape = args.shape or ("tiny" if args.dry else "llama-2-7b")
    res = run_profile(sizes=sizes, shape=shape, quantize=args.quantize, layers=args.layers, tokens=args.tokens,
                      iters=args.iters, passes=args.passes, n_slots=args.slots, dry=args.dry)
    print(_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.plot:
        try:
            _plot(res, args.plot)
        except ImportError:
            print("specexec-rt profile-offload: matplotlib not installed, no plot written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="profile_offload")
    _sub = _p.add_subparsers(dest="command", required=True)
    add_parser(_sub)
    _a = _p.parse_args(["profile-offload", *sys.argv[1:]])
    sys.exit(_a.func(_a))
