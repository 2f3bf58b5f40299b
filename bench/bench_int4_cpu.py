"""The CPU int4 path on SmolLM2-135M: kernel table, draft-step headline, breakdown, agreement.

    python bench/bench_int4_cpu.py                  # everything, markdown to bench/results/
    python bench/bench_int4_cpu.py --part micro     # one part only (micro, arith, model, agreement)
    python bench/bench_int4_cpu.py --quick          # fewer repeats and M values (a smoke run)

- micro: SmolLM2's matrices (q/k/v fused 960x576, o 576x576, gate/up 3072x576, down 576x1536,
  LM head 49152x576) at M = 1, 8, 32, 128: the native int4 kernel vs fp32 ``F.linear`` vs bf16
  ``F.linear`` vs aten's int4 op (bf16), each reading its weights cold (copies rotated through
  more memory than the L3 holds), interleaved repeats, medians; GB/s of weight bytes read,
  next to a plain read of a large fp32 tensor in the same run (the memory floor).
- model: one decode step (M=1) and one 32-node tree step of the default draft (all layers
  int4 at the GGUF's own group 32, the target's Q8_0 LM head), of the previous default (group
  64, int4 LM head) and of group 64 with the target's head, of the
  float32 target and of the target kept 4-bit (``quantize="int4"``), interleaved, medians;
  decode steps of the draft and the float32 target also through the per-op path
  (``SPECEXEC_NATIVE_LAYERS=0``); that path's split into native matmuls, attention and
  everything else; greedy
  autoregressive tok/s of the float32 and the int4 target.
- arith: the arithmetic choice. The shipped kernel (int8 activations, integer dot products)
  against ``bench/int4_cpu_fp32act.c`` (fp32 activations, one FMA per weight; same layout,
  tiling and threads), compiled here with the same compiler, on the gate/up and LM head shapes.
- agreement: teacher-forced top-1 / top-8 agreement of each draft with the target over the
  target's own greedy continuations (128 tokens) of six chat prompts (what greedy acceptance
  rests on), for the LM head choices and with the layers computed exactly.

Timings on a machine others share are noisy: the report prints the load average before and
after each part.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]
COLD_BYTES = 96 * 2**20  # more than the L3 (32 MiB on the 2-core EPYC): every call reads DRAM


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def median_ms(samples: list) -> float:
    return statistics.median(samples) * 1e3


# ---------------------------------------------------------------------------------------- micro
def read_floor(repeats: int) -> float:
    """GB/s of ``x.sum()`` over 256 MiB of fp32 (a plain streaming read)."""
    x = torch.ones(64 * 2**20)
    x.sum()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(ts) / 1e9


def _copies(make, nbytes: int) -> list:
    return [make() for _ in range(max(1, min(256, -(-COLD_BYTES // nbytes))))]


def micro(ms: list, repeats: int, shapes: Optional[list] = None) -> list:
    from specexec_rt.kernels.int4 import int4_matmul_cpu, int4_matmul_native
    from specexec_rt.kernels.int4 import Int4Weight, quantize_int4
    from specexec_rt.kernels.q8 import q8_linear_native, quantize_q8_0, with_int8_activations

    rows = []
    for name, n, k in SHAPES:
        if shapes and name not in shapes:
            continue
        w32 = torch.randn(n, k) * 0.05
        w4 = quantize_int4(w32, 64)
        int4_bytes = w4.nbytes
        w8_bytes = quantize_q8_0(w32).nbytes
        clone4 = lambda: Int4Weight(w4.qweight.clone(), w4.scales.clone(), w4.mins.clone(), n, k, 64)  # noqa: E731
        methods = {
            "native int4": (_copies(clone4, int4_bytes), int4_matmul_native, int4_bytes, torch.float32),
            "fp32": (_copies(w32.clone, w32.nbytes), F.linear, w32.nbytes, torch.float32),
            "bf16": (_copies(lambda: w32.to(torch.bfloat16), w32.nbytes // 2), F.linear, w32.nbytes // 2,
                     torch.bfloat16),
            "aten int4 (bf16)": (_copies(clone4, int4_bytes),
                                 lambda x, w: int4_matmul_cpu(x, w, compute_dtype=torch.bfloat16), int4_bytes,
                                 torch.float32),
            # The Q8_0 kernel (a GGUF's tied LM head): float32 activations, or int8 as llama.cpp.
            "q8 (fp32 act.)": (_copies(lambda: quantize_q8_0(w32), w8_bytes), q8_linear_native, w8_bytes,
                               torch.float32),
            "q8 (int8 act.)": (_copies(lambda: with_int8_activations(quantize_q8_0(w32)), w8_bytes),
                               q8_linear_native, w8_bytes, torch.float32),
        }
        for m in ms:
            x = torch.randn(m, k)
            xs = {dt: x.to(dt) for dt in (torch.float32, torch.bfloat16)}
            samples: dict = {key: [] for key in methods}
            for rep in range(repeats + 1):          # the first round warms up (packing, caches)
                for key, (ws, fn, _, dt) in methods.items():
                    t = time.perf_counter()
                    for w in ws:
                        fn(xs[dt], w)
                    if rep:
                        samples[key].append((time.perf_counter() - t) / len(ws))
            for key, (_, _, nbytes, _) in methods.items():
                t_ms = median_ms(samples[key])
                rows.append(dict(shape=f"{name} {n}x{k}", m=m, method=key, ms=t_ms, gbs=nbytes / t_ms / 1e6,
                                 gmacs=m * n * k / t_ms / 1e6))
            line = "  ".join(f"{r['method']} {r['ms']:.3f} ms" for r in rows[-len(methods):])
            print(f"{name:8s} M={m:<4d} {line}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- arith
def arith(ms: list, repeats: int) -> list:
    """int8-activation kernel (shipped) vs the fp32-activation variant, weights read cold."""
    import ctypes
    import tempfile

    from specexec_rt.kernels import cpu_native
    from specexec_rt.kernels.int4 import int4_matmul_native
    from specexec_rt.kernels.int4 import Int4Weight, quantize_int4

    cc, how = cpu_native.find_compiler()
    if cc is None:
        print(f"arith: skipped ({how})")
        return []
    out = os.path.join(tempfile.mkdtemp(prefix="int4-fp32act-"), "libfp32act.so")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int4_cpu_fp32act.c")
    subprocess.run([cc, "-O3", "-fPIC", "-shared", "-fopenmp", "-o", out, src], check=True)
    fn = ctypes.CDLL(out).exp_fp32_linear
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p,
                                                                                                  ctypes.c_int]

    def fp32act(x, w):
        y = torch.empty(x.shape[0], w.out_features)
        fn(x.data_ptr(), x.shape[0], w.qweight.data_ptr(), w.scales.data_ptr(), w.mins.data_ptr(), w.out_features,
           w.in_features, w.group_size, y.data_ptr(), torch.get_num_threads())
        return y

    rows = []
    for name, n, k in [s for s in SHAPES if s[0] in ("gate_up", "lm_head")]:
        w = quantize_int4(torch.randn(n, k) * 0.05, 64)
        ws = _copies(lambda: Int4Weight(w.qweight.clone(), w.scales.clone(), w.mins.clone(), n, k, 64), w.nbytes)
        for m in ms:
            x = torch.randn(m, k)
            exact = x @ w.dequantize().T
            err = {"int8 activations (shipped)": (int4_matmul_native(x, w) - exact).abs().max().item(),
                   "fp32 activations": (fp32act(x, w) - exact).abs().max().item()}
            samples: dict = {key: [] for key in err}
            for rep in range(repeats + 1):
                for key, f in (("int8 activations (shipped)", int4_matmul_native), ("fp32 activations", fp32act)):
                    t = time.perf_counter()
                    for ww in ws:
                        f(x, ww)
                    if rep:
                        samples[key].append((time.perf_counter() - t) / len(ws))
            for key, v in samples.items():
                t_ms = median_ms(v)
                rows.append(dict(shape=f"{name} {n}x{k}", m=m, method=key, ms=t_ms, gmacs=m * n * k / t_ms / 1e6,
                                 err=err[key], scale=exact.abs().max().item()))
            print("  ".join(f"{r['shape']} M={m} {r['method']} {r['ms']:.3f} ms" for r in rows[-2:]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------- model
def tree_mask(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random n-node tree (node i's parent is an earlier node or the root): ancestor mask
    bool [n, n] (self included) and depths [n]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        p = int(torch.randint(-1, i, (1,), generator=g)) if i else -1
        if p >= 0:
            mask[i] = mask[p]
            depth[i] = depth[p] + 1
        mask[i, i] = True
    return mask, depth


def model_steps(repeats: int, prompt_len: int = 64) -> dict:
    from specexec_rt import load_model
    from specexec_rt.kernels.int4 import cpu as int4_cpu
    from specexec_rt.model import ops
    from specexec_rt.speculative.drafts import default_draft, int4_draft

    target = load_model("smollm2-135m", device="cpu", dtype=torch.float32, max_len=512)
    target4 = load_model("smollm2-135m", device="cpu", dtype=torch.float32, max_len=512, quantize="int4")
    draft = default_draft(target, share_cache=False)
    models = {"target fp32": target, "target int4": target4, "default draft (g32 + target's Q8_0 head)": draft,
              "draft g64 (int4 LM head)": int4_draft(target, group_size=64, lm_head_int4=True, share_cache=False),
              "draft g64 (target's Q8_0 LM head)": int4_draft(target, group_size=64, lm_head_int4=False,
                                                               share_cache=False)}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (prompt_len,), generator=g)
    for mdl in models.values():
        mdl.prefill(prompt)     # the first native use builds each int4 weight's streaming layout
    # The same int4 models on the plain layout only (csrc/int4_cpu.h, sxc_int4_pack), side by side.
    stream = int4_cpu.STREAM_LAYOUT
    int4_cpu.STREAM_LAYOUT = False
    try:
        plain = {"target int4, plain layout": load_model("smollm2-135m", device="cpu", dtype=torch.float32,
                                                          max_len=512, quantize="int4"),
                 "default draft (g32 + target's Q8_0 head), plain layout": default_draft(target, share_cache=False)}
        for mdl in plain.values():
            mdl.prefill(prompt)
    finally:
        int4_cpu.STREAM_LAYOUT = stream
    models.update(plain)
    mask, depth = tree_mask(32)
    tree_ids = torch.randint(100, 40000, (32,), generator=g)

    def decode(mdl):
        mdl.forward(tree_ids[:1], torch.tensor([prompt_len]), mdl.cache, prompt_len)

    def tree(mdl):
        mdl.forward(tree_ids, prompt_len + depth, mdl.cache, prompt_len, tree_mask=mask)

    # Every layer in one native call (the default), and the same steps through the per-op path
    # (five native calls per layer from Python; SPECEXEC_NATIVE_LAYERS=0).
    cases = [(f"{name}, decode step (M=1)", decode, mdl, "1") for name, mdl in models.items()]
    cases += [(f"{name}, decode step (M=1), per-op path", decode, models[name], "0")
              for name in ("target fp32", "default draft (g32 + target's Q8_0 head)")]
    cases += [(f"{name}, 32-node tree step", tree, mdl, "1") for name, mdl in models.items()
              if not name.startswith("target int4")]
    samples: dict = {c[0]: [] for c in cases}
    for rep in range(repeats + 1):
        for name, fn, mdl, flag in cases:
            os.environ["SPECEXEC_NATIVE_LAYERS"] = flag
            t = time.perf_counter()
            fn(mdl)
            if rep:
                samples[name].append(time.perf_counter() - t)
    steps = {name: median_ms(s) for name, s in samples.items()}
    best = {name: min(s) * 1e3 for name, s in samples.items()}
    for name, v in steps.items():
        print(f"{name:45s} {v:8.2f} ms (min {best[name]:.2f})", flush=True)

    os.environ["SPECEXEC_NATIVE_LAYERS"] = "1"
    # Where a step of the per-op path goes: the native calls, dense F.linear (a tied LM head stays
    # dense) and attention, timed inside the forward; the rest is PyTorch ops and Python.
    spent = {"native": 0.0, "dense": 0.0, "attention": 0.0, "q8 head": 0.0}
    # ops calls run_native_linear (fused layer ops) or, unfused, int4_cpu.int4_matmul_native; a
    # Q8_0 head goes through ops.q8_linear.
    real = {"fused": ops.run_native_linear, "mm": int4_cpu.int4_matmul_native, "attn": ops.attention,
            "dense": torch.nn.functional.linear, "q8": ops.q8_linear, "rope_attn": ops.rope_attention}

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            y = fn(*a, **k)
            spent[key] += time.perf_counter() - t
            return y
        return wrapper

    split = {}
    for label, fn, mdl in (("draft, decode step (M=1), per-op path", decode, draft),
                           ("draft, 32-node tree step, per-op path", tree, draft),
                           ("target int4, decode step (M=1), per-op path", decode, target4)):
        parts: dict = {"total": [], "native": [], "dense": [], "attention": [], "q8 head": []}
        for _ in range(repeats):
            ops.run_native_linear, int4_cpu.int4_matmul_native = timed("native", real["fused"]), timed("native", real["mm"])
            ops.attention, torch.nn.functional.linear = timed("attention", real["attn"]), timed("dense", real["dense"])
            ops.q8_linear, ops.rope_attention = timed("q8 head", real["q8"]), timed("attention", real["rope_attn"])
            spent.update({key: 0.0 for key in spent})
            os.environ["SPECEXEC_NATIVE_LAYERS"] = "0"
            t = time.perf_counter()
            try:
                fn(mdl)
            finally:
                os.environ["SPECEXEC_NATIVE_LAYERS"] = "1"
                ops.run_native_linear, int4_cpu.int4_matmul_native = real["fused"], real["mm"]
                ops.attention, torch.nn.functional.linear = real["attn"], real["dense"]
                ops.q8_linear, ops.rope_attention = real["q8"], real["rope_attn"]
            parts["total"].append(time.perf_counter() - t)
            for key in spent:
                parts[key].append(spent[key])
        i = min(range(len(parts["total"])), key=parts["total"].__getitem__)   # the least disturbed run
        split[label] = {**{k: median_ms(v) for k, v in parts.items()},
                        **{f"{k} (fastest run)": v[i] * 1e3 for k, v in parts.items()}}
        print(f"{label}: {split[label]}", flush=True)

    # Greedy autoregressive decoding, float32 vs 4-bit target.
    def ar_tok_s(mdl, n_new: int = 64) -> float:
        logits = mdl.prefill(prompt)
        tok = logits.argmax().view(1)
        t = time.perf_counter()
        for i in range(n_new):
            logits = mdl.forward(tok, torch.tensor([prompt_len + i]), mdl.cache, prompt_len + i)
            tok = logits[0].argmax().view(1)
        return n_new / (time.perf_counter() - t)

    runs: dict = {"target fp32": [], "target int4": []}
    for _ in range(max(3, repeats // 3)):
        for name in runs:
            runs[name].append(ar_tok_s(models[name]))
    ar = {k: statistics.median(v) for k, v in runs.items()}
    ar_best = {k: max(v) for k, v in runs.items()}
    print(f"autoregressive tok/s: {ar} (best {ar_best})", flush=True)
    weights = {name: sum(t.nbytes for t in _tensors(mdl)) for name, mdl in models.items()}
    return dict(steps=steps, best=best, split=split, ar=ar, ar_best=ar_best, weights=weights)


def _tensors(mdl):
    import dataclasses

    w = mdl.weights
    mats = [w.lm_head] + [getattr(lw, f) for lw in w.layers for f in ("wqkv", "wo", "w_gate_up", "w_down")]
    for m in mats:
        if dataclasses.is_dataclass(m):   # Int4Weight, Q8Weight
            yield from (getattr(m, f.name) for f in dataclasses.fields(m) if isinstance(getattr(m, f.name), torch.Tensor))
        else:
            yield m


# ---------------------------------------------------------------------------------------- agreement
# Three more chat prompts beside bench/acceptance.py's three, for a larger agreement sample.
MORE_PROMPTS = [
    "What are three tips for staying focused while studying?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
]


def agreement(n_new: int = 128) -> list:
    from acceptance import PROMPTS, prompt_ids

    from specexec_rt import load_model, load_tokenizer
    from specexec_rt.speculative.drafts import default_draft, int4_draft

    from specexec_rt.kernels.int4 import cpu as int4_cpu
    from specexec_rt.kernels.int4 import quantize_int4

    target = load_model("smollm2-135m", device="cpu", dtype=torch.float32, max_len=512)
    tok = load_tokenizer(target)
    head32 = int4_draft(target, group_size=64, lm_head_int4=True, share_cache=False)
    head32.weights.lm_head = quantize_int4(target.weights.lm_head.dequantize(torch.float32), 32)
    dense_head = int4_draft(target, group_size=64, lm_head_int4=False, share_cache=False)
    default = default_draft(target, share_cache=False)
    # Each draft runs standalone here, on a cache of its own (share_cache=False).
    # (draft, int4 compute dtype): None = the native kernel (int8 activations), float32 = the
    # aten op in fp32 (the int4 weights applied exactly), isolating the activation quantization.
    # Group 64 re-quantizes the GGUF's 32-wide Q4_1 blocks; group 32 (the default) reproduces them.
    drafts = {"g64 layers, int4 LM head g64 (the default before 2026-12-01)":
              (int4_draft(target, group_size=64, lm_head_int4=True, share_cache=False), None),
              "g64 layers, int4 LM head g32": (head32, None),
              "g64 layers, target's LM head (Q8_0, fp32 act.)": (dense_head, None),
              "g64 layers exact (fp32 activations), target's LM head": (dense_head, torch.float32),
              "g32 layers, int4 LM head g64": (int4_draft(target, group_size=32, lm_head_int4=True,
                                                          share_cache=False), None),
              "g32 layers, target's LM head (the default)": (default, None),
              "g32 layers exact (fp32 activations), target's LM head": (default, torch.float32)}
    seqs = []
    for text in PROMPTS + MORE_PROMPTS:
        ids = prompt_ids(tok, text)
        logits = target.prefill(torch.tensor(ids))
        out = []
        for i in range(n_new):
            nxt = int(logits.argmax())
            out.append(nxt)
            logits = target.forward(torch.tensor([nxt]), torch.tensor([len(ids) + i]), target.cache, len(ids) + i)[0]
        seqs.append((len(ids), ids + out))
    rows = []
    refs = [target.forward(torch.tensor(seq), torch.arange(len(seq)), target.cache, 0)[p_len - 1:-1].argmax(-1)
            for p_len, seq in seqs]
    for name, (d, compute_dtype) in drafts.items():
        top1 = top8 = count = 0
        for (p_len, seq), ref in zip(seqs, refs):
            int4_cpu.CPU_COMPUTE_DTYPE = compute_dtype
            try:
                lg = d.forward(torch.tensor(seq), torch.arange(len(seq)), d.cache, 0)[p_len - 1:-1]
            finally:
                int4_cpu.CPU_COMPUTE_DTYPE = None
            top1 += int((lg.argmax(-1) == ref).sum())
            top8 += int((lg.topk(8).indices == ref[:, None]).any(-1).sum())
            count += len(ref)
        rows.append(dict(draft=name, top1=top1 / count, top8=top8 / count, tokens=count))
        print(f"{name:40s} top-1 {top1 / count:.3f} top-8 {top8 / count:.3f} ({count} tokens)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- report
def write_report(path: str, args, meta: dict, floor, micro_rows, model, agree, arith_rows=None) -> None:
    lines = [f"# CPU int4 path on SmolLM2-135M ({meta['cpu']})", "",
             f"- Date {meta['date']}, commit {meta['commit']}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, native ISA `{meta['isa']}`.",
             f"- `python bench/bench_int4_cpu.py {' '.join(sys.argv[1:])}`; medians of {args.repeats} "
             "interleaved repeats.",
             f"- Load average (1/5/15 min) per part: {meta['loads']}. The machine is shared: a load above "
             "the thread count means other work competed for the cores.", ""]
    if floor is not None:
        lines += [f"Memory floor: a plain read of 256 MiB fp32 (`x.sum()`) runs at **{floor:.1f} GB/s**.", ""]
    if micro_rows:
        lines += ["## Kernels (weights read cold)", "",
                  "| matrix | M | native int4 ms | GB/s | GMAC/s | fp32 ms | GB/s | bf16 ms | aten int4 ms | "
                  "native vs fp32 | Q8_0 fp32 act. ms | GB/s | Q8_0 int8 act. ms | GB/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        by = {(r["shape"], r["m"], r["method"]): r for r in micro_rows}
        for shape, m in dict.fromkeys((r["shape"], r["m"]) for r in micro_rows):
            nat, f32 = by[(shape, m, "native int4")], by[(shape, m, "fp32")]
            lines.append(f"| {shape} | {m} | {nat['ms']:.3f} | {nat['gbs']:.1f} | {nat['gmacs']:.1f} | "
                         f"{f32['ms']:.3f} | {f32['gbs']:.1f} | {by[(shape, m, 'bf16')]['ms']:.3f} | "
                         f"{by[(shape, m, 'aten int4 (bf16)')]['ms']:.3f} | {f32['ms'] / nat['ms']:.1f}x | "
                         + " | ".join(f"{by[(shape, m, key)]['ms']:.3f} | {by[(shape, m, key)]['gbs']:.1f}"
                                      for key in ("q8 (fp32 act.)", "q8 (int8 act.)")) + " |")
        lines += ["", "GB/s: weight bytes (int4: nibbles + fp16 scales and mins; Q8_0: 1 byte per weight + an "
                  "fp16 scale per 32; fp32: 4 per weight) over the time; GMAC/s: M x N x K over the time.", ""]
    if arith_rows:
        lines += ["## Arithmetic: int8 activations vs fp32 activations (same layout, tiling, threads)", "",
                  "| matrix | M | int8 act. ms | GMAC/s | fp32 act. ms | GMAC/s | fp32 / int8 time | "
                  "max error vs exact, int8 / fp32 (output scale) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for i in range(0, len(arith_rows), 2):
            a, b = arith_rows[i], arith_rows[i + 1]
            lines.append(f"| {a['shape']} | {a['m']} | {a['ms']:.3f} | {a['gmacs']:.1f} | {b['ms']:.3f} | "
                         f"{b['gmacs']:.1f} | {b['ms'] / a['ms']:.1f}x | {a['err']:.2e} / {b['err']:.2e} "
                         f"({a['scale']:.1f}) |")
        lines.append("")
    if model:
        st, best = model["steps"], model["best"]
        tgt, tgt_best = st["target fp32, decode step (M=1)"], best["target fp32, decode step (M=1)"]
        lines += ["## SmolLM2-135M steps (prompt of 64 tokens in the cache)", "",
                  "Median (and min) of the interleaved repeats; the ratio is to the fp32 target's decode step of "
                  "the same statistic.", "",
                  "floor ms: the step's weight bytes at the memory floor above (a step cannot be faster); "
                  "min / floor is what is left to gain.", "",
                  "| step | median ms | ratio | min ms | ratio (min) | weight MB read | GB/s (min) | floor ms | "
                  "min / floor |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in st.items():
            mb = model["weights"][name.split(",")[0]] / 1e6
            b = best[name]
            fl = mb / floor
            lines.append(f"| {name} | {v:.2f} | {v / tgt:.3f} | {b:.2f} | {b / tgt_best:.3f} | {mb:.0f} | "
                         f"{mb / b:.1f} | {fl:.2f} | {b / fl:.2f} |")
        lines += ["", "Steps run every layer in one native call (`csrc/layers_cpu.h`) unless marked *per-op "
                  "path* (`SPECEXEC_NATIVE_LAYERS=0`: five native calls per layer from Python, same arithmetic). "
                  "*plain layout*: the same int4 model reading its weights as stored (`SPECEXEC_INT4_STREAM=0`), "
                  "not the one-stream-per-16-columns copy the AVX2 kernels read by default (same results).",
                  "", "Where a step of the per-op path goes: the native int4 calls (with their fused RMSNorm / "
                  "SiLU / residual), the Q8_0 LM head (the GGUF's tied embedding kept 8-bit; the int4 target runs "
                  "it on int8 activations), dense `F.linear` and attention (the native RoPE + cache write + "
                  "attention call, or `ops.attention`), timed inside the forward; the rest is PyTorch ops and "
                  "Python. Medians, then the fastest run's own split.", "",
                  "| step | total ms | native int4 ms | Q8_0 head ms | dense fp32 ms | attention ms | "
                  "everything else ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        for label, s in model["split"].items():
            for tag in ("", " (fastest run)"):
                t, nat, q8, den, at = (s[k + tag] for k in ("total", "native", "q8 head", "dense", "attention"))
                lines.append(f"| {label}{tag} | {t:.2f} | {nat:.2f} | {q8:.2f} | {den:.2f} | {at:.2f} | "
                             f"{t - nat - q8 - den - at:.2f} |")
        ar, arb = model["ar"], model["ar_best"]
        lines += ["", f"Greedy autoregressive decoding (64 tokens), median (best): fp32 target "
                  f"{ar['target fp32']:.1f} ({arb['target fp32']:.1f}) tok/s, int4 target {ar['target int4']:.1f} "
                  f"({arb['target int4']:.1f}) tok/s, ratio {ar['target int4'] / ar['target fp32']:.2f} "
                  f"({arb['target int4'] / arb['target fp32']:.2f}).", ""]
    if agree:
        lines += ["## Draft agreement with the target (teacher forced on the target's greedy text)", "",
                  "| draft | top-1 | top-8 | tokens |", "|---|---:|---:|---:|"]
        lines += [f"| {r['draft']} | {r['top1']:.3f} | {r['top8']:.3f} | {r['tokens']} |" for r in agree]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", help="all, or a comma-separated subset of micro,arith,model,agreement")
    ap.add_argument("--repeats", type=int, default=None, help="default 9 (--quick: 3)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ms", default=None, help="micro: comma-separated row counts M (default 1,8,32,128; "
                    "--quick: 1,32)")
    ap.add_argument("--shapes", default=None, help=f"micro: comma-separated subset of "
                    f"{','.join(name for name, _, _ in SHAPES)} (default all)")
    ap.add_argument("--out", default=None, help="markdown path (default bench/results/<date>-cpu-int4.md)")
    args = ap.parse_args(argv)
    names = [name for name, _, _ in SHAPES]
    if args.shapes and not set(args.shapes.split(",")) <= set(names):
        ap.error(f"--shapes: choose from {','.join(names)}, got {args.shapes!r}")
    if args.ms and not all(v.isdigit() and int(v) > 0 for v in args.ms.split(",")):
        ap.error(f"--ms: comma-separated positive row counts, got {args.ms!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (3 if args.quick else 9)
    from specexec_rt.kernels import cpu_native

    if cpu_native.library() is None:
        sys.exit(f"native CPU library unavailable: {cpu_native.unavailable_reason()}")
    date = datetime.date.today().isoformat()
    meta = dict(cpu=cpu_model(), date=date, commit=commit(), isa=cpu_native.ISAS[cpu_native.isa()], loads=[])
    floor = micro_rows = model = agree = arith_rows = None
    known = ["micro", "arith", "model", "agreement"]
    parts = known if args.part == "all" else args.part.split(",")
    if not set(parts) <= set(known):
        sys.exit(f"--part: choose all or from {known}, got {args.part!r}")
    for part in parts:
        before = load()
        if part in ("micro", "model") and floor is None:
            floor = read_floor(args.repeats)
            print(f"read floor {floor:.1f} GB/s", flush=True)
        if part == "micro":
            ms = [int(v) for v in args.ms.split(",")] if args.ms else [1, 32] if args.quick else [1, 8, 32, 128]
            micro_rows = micro(ms, args.repeats, args.shapes.split(",") if args.shapes else None)
        elif part == "arith":
            arith_rows = arith([1, 8, 32], args.repeats)
        elif part == "model":
            model = model_steps(args.repeats)
        else:
            agree = agreement()
        meta["loads"].append(f"{part} {before} -> {load()}")
    meta["loads"] = "; ".join(meta["loads"])
    os.makedirs(RESULTS, exist_ok=True)
    out = args.out or os.path.join(RESULTS, f"{date}-cpu-int4{'-quick' if args.quick else ''}.md")
    write_report(out, args, meta, floor, micro_rows, model, agree, arith_rows)


if __name__ == "__main__":
    main()
