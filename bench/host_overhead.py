"""Host (Python) cost of a forward on the launch-bound path, measured on any machine.

    python bench/host_overhead.py [--layers 32] [--n-q 32] [--n-tree 96] [--prefix 512] [--json out.json]

A resident 4-bit draft grows its tree in small forwards (32 tokens over a few hundred keys)
whose GPU work is tens of microseconds per layer, so its speed is what the host spends
issuing work: measured on the H100, 42 ms per 7B-shaped draft call, the draft being the
end-to-end bottleneck (bench/results/2026-11-22-*). This script measures that host cost
without a GPU: the runtime's Triton path runs on CPU tensors with every Triton kernel
replaced by a stub that only counts launches, in a model with the draft's layer count but
tiny dimensions (so the CPU time of the remaining PyTorch ops is per-op overhead, as on a
GPU). It prints per-call host microseconds of the two launchers and, per layer of a
forward, the host time, the PyTorch ops that launch kernels and the Triton launches.

Triton's own launch cost is not included (the stub replaces it); on the GPU each Triton
launch adds its launcher's time (tens of microseconds) and each PyTorch op its dispatch.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from specexec_rt.model import ops
from specexec_rt.model.config import ModelConfig
from specexec_rt.kernels import device_info
from specexec_rt.kernels.int4 import quantize_int4
from specexec_rt.kernels.int4 import gemm as int4_gemm
from specexec_rt.kernels import attention as ta
from specexec_rt.kernels.attention import triton_kernels as attention_kernels
from specexec_rt.kernels.int4 import triton_kernels as int4_kernels
from specexec_rt.model import Transformer
from specexec_rt.model.weights import LayerWeights, ModelWeights

KERNELS = {attention_kernels: ("_tree_attn_fwd", "_tree_attn_merge"),
           int4_kernels: ("_int4_gemv_kernel", "_int4_mm_kernel", "_sum_splits_kernel", "_int4_dequant_kernel")}
# Ops that launch no kernel on a GPU (views, and allocations).
NO_KERNEL_OPS = {"view", "_unsafe_view", "slice", "select", "expand", "t", "transpose", "unsqueeze", "squeeze",
            "permute", "as_strided", "alias", "detach", "split", "split_with_sizes", "chunk", "unbind",
            "reshape", "_reshape_alias", "lift_fresh", "empty"}


class CountingStub:
    """Stands in for a Triton kernel: ``stub[grid](*args, **kwargs)`` counts and returns."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1


@contextlib.contextmanager
def stubbed_triton_path():
    """Route the runtime's CPU tensors through the Triton launchers, with counting stubs."""
    saved, stubs = [], {}
    patches = [(ops, "use_triton", lambda device: True), (device_info, "interpreting", lambda: True)]
    for mod, names in KERNELS.items():
        for name in names:
            stubs[name] = CountingStub()
            patches.append((mod, name, stubs[name]))
    for mod, name, value in patches:
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)
    int4_gemm._fused_launch.cache_clear()
    try:
        yield stubs
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        int4_gemm._fused_launch.cache_clear()


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def tiny_int4_model(n_layers: int, max_len: int, dtype=torch.float16, seed: int = 0) -> Transformer:
    """Draft-like model: ``n_layers`` 4-bit layers, hidden 128, 2 heads of 64 (no GQA, as
    Llama-2-7B), random packed weights."""
    cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                      n_layers=n_layers, n_heads=2, n_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
                      max_position_embeddings=max_len)
    g = torch.Generator().manual_seed(seed)

    def int4(n, k):
        return quantize_int4(torch.randn(n, k, generator=g) / math.sqrt(k), group_size=64)

    h = cfg.hidden_size
    layers = [LayerWeights(attn_norm=torch.ones(h, dtype=dtype), wqkv=int4(cfg.qkv_size, h), bqkv=None,
                           wo=int4(h, h), bo=None, ffn_norm=torch.ones(h, dtype=dtype),
                           w_gate_up=int4(2 * cfg.intermediate_size, h), w_down=int4(h, cfg.intermediate_size))
              for _ in range(n_layers)]
    w = ModelWeights(embed=torch.randn(cfg.vocab_size, h, generator=g).to(dtype),
                     final_norm=torch.ones(h, dtype=dtype),
                     lm_head=(torch.randn(cfg.vocab_size, h, generator=g) / math.sqrt(h)).to(dtype), layers=layers)
    return Transformer(cfg, w, max_len, torch.device("cpu"), dtype)


def median_us(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def tree_pass_inputs(model: Transformer, n_q: int, n_tree: int, prefix: int, seed: int = 0):
    """A draft step's forward: ``n_q`` new nodes at the end of an ``n_tree``-slot tree region
    (each sees the root chain up to itself: a causal band) after ``prefix`` committed tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n_q, n_tree, dtype=torch.bool).tril(n_tree - n_q)
    tokens = torch.randint(0, model.config.vocab_size, (n_q,), generator=g)
    positions = prefix + torch.arange(n_tree - n_q, n_tree)
    slots = torch.arange(prefix + n_tree - n_q, prefix + n_tree)
    return tokens, positions, mask, slots


def run(n_layers: int = 32, n_q: int = 32, n_tree: int = 96, prefix: int = 512, reps: int = 30) -> dict:
    torch.manual_seed(0)
    model = tiny_int4_model(n_layers, prefix + n_tree + 8)
    tokens, positions, mask, slots = tree_pass_inputs(model, n_q, n_tree, prefix)
    out = {"layers": n_layers, "n_q": n_q, "n_tree": n_tree, "prefix": prefix}
    plans = []
    real_init = ta.TreeAttentionLaunch.__init__

    def counting_init(self, *a, **k):
        plans.append(1)
        real_init(self, *a, **k)

    with stubbed_triton_path() as stubs:
        def forward():
            return model.forward(tokens, positions, model.cache, prefix, tree_mask=mask, cache_slots=slots)

        ta.TreeAttentionLaunch.__init__ = counting_init
        try:
            forward()
            for s in stubs.values():
                s.launches = 0
            plans.clear()
            with OpCounter() as counter:
                forward()
            launches = {name: s.launches for name, s in stubs.items() if s.launches}
            out["attention_plans_per_forward"] = len(plans)
            out["forward_us"] = median_us(forward, reps)
        finally:
            ta.TreeAttentionLaunch.__init__ = real_init
        kernel_ops = sum(n for op, n in counter.ops.items() if op not in NO_KERNEL_OPS)
        out["torch_kernel_ops_per_layer"] = kernel_ops / n_layers
        out["triton_launches_per_layer"] = sum(launches.values()) / n_layers
        out["triton_launches"] = launches
        out["forward_us_per_layer"] = out["forward_us"] / n_layers
        out["top_ops"] = dict(counter.ops.most_common(12))

        # The launchers alone, per call.
        lw = model.weights.layers[0]
        x = torch.randn(n_q, model.config.hidden_size, dtype=model.dtype)
        out["int4_matmul_us"] = median_us(lambda: int4_gemm.int4_matmul(x, lw.w_gate_up), reps * 20)
        x1 = x[:1].contiguous()
        out["int4_matmul_m1_us"] = median_us(lambda: int4_gemm.int4_matmul(x1, lw.w_gate_up), reps * 20)
        c = model.config
        q = torch.randn(n_q, c.n_heads, c.head_dim, dtype=model.dtype)
        k = model.cache.k[0][:prefix + n_tree]
        v = model.cache.v[0][:prefix + n_tree]
        packed = ta.pack_tree_mask(mask, prefix)
        out["tree_attention_packed_us"] = median_us(
            lambda: ta.tree_attention_packed(q, k, v, packed, prefix, n_tree), reps * 20)
        launch = ta.TreeAttentionLaunch(q, k, v, packed, prefix, n_tree)
        out["tree_attention_planned_run_us"] = median_us(lambda: launch.run(q, k, v), reps * 20)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--n-q", type=int, default=32)
    p.add_argument("--n-tree", type=int, default=96)
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = run(a.layers, a.n_q, a.n_tree, a.prefix, a.reps)
    print(f"host cost, Triton kernels stubbed ({a.layers} layers, {a.n_q} new tokens, {a.n_tree} tree slots, "
          f"prefix {a.prefix}; CPU: {torch.get_num_threads()} threads)")
    for key in ("forward_us", "forward_us_per_layer", "torch_kernel_ops_per_layer", "triton_launches_per_layer",
                "attention_plans_per_forward", "int4_matmul_us", "int4_matmul_m1_us", "tree_attention_packed_us",
                "tree_attention_planned_run_us"):
        val = res[key]
        print(f"  {key:32s} {val:10.1f}" if isinstance(val, float) else f"  {key:32s} {val:>10}")
    print(f"  triton launches per forward: {res['triton_launches']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
