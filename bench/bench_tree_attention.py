"""Tree-masked attention benchmark: ours vs dense-mask SDPA, eager attention, flash SDPA, FlexAttention.

    python bench/bench_tree_attention.py [--dry] [--json out.json] [--no-flex] [--sweep]

Each line is one (model, n_q, prefix) shape with a random draft tree of n_q nodes (ancestor
mask) after the prefix: n_k = prefix + n_q. Times are medians of ``triton.testing.do_bench``
(which flushes the L2 before every run), cycling over several input sets. TFLOP/s counts the
full rectangle, 4 * n_q * n_k * head_dim * n_heads. Columns:
  ours      tree_attention_packed (the per-layer call; mask packing, once per forward, is
            reported separately as pack_ms)
  dense     SDPA fp16 with the dense bool mask, GQA folded as the reference does (what
            HF-style tree verification pays)
  flash     SDPA flash backend, no mask, same shape: the floor (target: ours <= 1.25x)
  eager     HF eager attention, the paper's reference code's path: K/V repeated per query head
            (repeat_kv), scores q @ k.T * scale materialised in fp16, plus a dense additive
            float mask, softmax in fp32, cast back, @ v
  flex      FlexAttention with a block mask (compiled), n/a if unavailable
  *_graph   ours and flash under CUDA graphs (``triton.testing.do_bench_cudagraph``): kernel
            time without the Python launch cost (no L2 flush; the input sets are cycled inside
            the graph), graph_ours_vs_flash their ratio; n/a if capture fails
  sdpa_decode  n_q = 1 rows only: ``prefix_attention_sdpa`` (flash SDPA, no mask), the
            runtime's one-token decode path
``--dry`` runs tiny fp32 shapes on the CPU through Triton's interpreter (ours, eager and the
decode path vs the reference, timed with time.perf_counter; CUDA-graph columns n/a) so CI
can exercise this script in seconds.
``--sweep`` times a few tile configs at n_q=1024, prefix=4096 (to retune the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

MODELS = {"llama2-70b": (64, 8, 128), "llama2-7b": (32, 32, 128)}  # n_heads, n_kv_heads, head_dim
N_Q = (1, 16, 128, 1024, 2048)
PREFIX = (512, 4096)
N_INPUT_SETS = 3


def _kernel_module(dry: bool):
    """Import the kernel module; the dry run needs the interpreter on before Triton loads."""
    if dry:
        if "specexec_rt.kernels.attention" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("dry run needs TRITON_INTERPRET=1 set before the kernel module is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    from specexec_rt.kernels import attention as ta

    return ta


def tree_mask_exact(n: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestor-or-self bool mask [n, n] of a random tree (parent of node i uniform in [-1, i))."""
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, n)]
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    return anc


def _flops(n_q, n_k, n_heads, d):
    return 4.0 * n_q * n_k * d * n_heads


class _Cycle:
    """Calls fn(*inputs[i]) with i cycling over the input sets, so the L2 rarely holds them."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs, self.i = fn, inputs, 0

    def __call__(self):
        args = self.inputs[self.i]
        self.i = (self.i + 1) % len(self.inputs)
        return self.fn(*args)


def _bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _graph_ms(fn, what: str):
    """Median ms of fn replayed in a CUDA graph (no launch overhead); None if capture fails."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception as e:  # noqa: BLE001 - an uncapturable call: report n/a, keep benchmarking
        print(f"  {what} graph n/a: {type(e).__name__}: {e}"[:200], file=sys.stderr)
        return None


def _make_inputs(n_q, n_k, n_heads, n_kv, d, dtype, device, gen):
    q = torch.randn(n_q, n_heads, d, generator=gen).to(device, dtype)
    k = torch.randn(n_k, n_kv, d, generator=gen).to(device, dtype)
    v = torch.randn(n_k, n_kv, d, generator=gen).to(device, dtype)
    return q, k, v


def _fold(q, k, v):
    """[n, H, D] -> SDPA layout with the GQA group folded into the query axis (contiguous)."""
    n_q, n_heads, d = q.shape
    n_kv = k.shape[1]
    g = n_heads // n_kv
    qf = q.view(n_q, n_kv, g, d).permute(1, 2, 0, 3).reshape(1, n_kv, g * n_q, d).contiguous()
    kf = k.permute(1, 0, 2).unsqueeze(0).contiguous()
    vf = v.permute(1, 0, 2).unsqueeze(0).contiguous()
    return qf, kf, vf


def _unfold(o, n_q, n_heads):
    n_kv, d = o.shape[1], o.shape[3]
    return o.view(n_kv, n_heads // n_kv, n_q, d).permute(2, 0, 1, 3).reshape(n_q, n_heads, d)


def _eager_inputs(q, k, v):
    """HF layout: contiguous [1, heads, n, D] (HF's K/V cache is [B, n_kv, n_k, D])."""
    return tuple(t.permute(1, 0, 2).unsqueeze(0).contiguous() for t in (q, k, v))


def _additive_mask(visible: torch.Tensor, dtype) -> torch.Tensor:
    """HF's dense float mask: 0 where visible, finfo(dtype).min elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, torch.finfo(dtype).min)


def eager_attention(q4, k4, v4, bias):
    """HF eager attention (what the SpecExec reference code runs), [1, H, n, D] -> [n_q, H, D]."""
    n_heads, n_kv = q4.shape[1], k4.shape[1]
    if n_heads != n_kv:  # repeat_kv: expand + reshape, a copy per forward
        g = n_heads // n_kv
        k4 = k4[:, :, None].expand(-1, -1, g, -1, -1).reshape(1, n_heads, *k4.shape[2:])
        v4 = v4[:, :, None].expand(-1, -1, g, -1, -1).reshape(1, n_heads, *v4.shape[2:])
    scores = torch.matmul(q4, k4.transpose(2, 3)) * (q4.shape[-1] ** -0.5)
    scores = scores + bias
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q4.dtype)
    return torch.matmul(p, v4)[0].transpose(0, 1)


def _flex_fn(n_q, n_k, prefix_len, tree_mask, device):
    """Compiled FlexAttention with a block mask (prefix blocks unmasked); None if unavailable."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tree = tree_mask

    def mask_mod(b, h, q_idx, kv_idx):
        j = (kv_idx - prefix_len).clamp(min=0)
        return (kv_idx < prefix_len) | tree[q_idx, j]

    # Every shape (and the captured prefix_len) recompiles; the default limit of 8 would
    # silently fall back to the slow eager path part-way through the table.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    block_mask = create_block_mask(mask_mod, None, None, n_q, n_k, device=device)
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q4, k4, v4):
        return flex(q4, k4, v4, block_mask=block_mask, enable_gqa=True)

    return run


def _bench_cuda_shape(ta, model, n_heads, n_kv, d, n_q, prefix_len, flex: bool, gen,
                      device="cuda", dtype=torch.float16) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_k = prefix_len + n_q
    mask = tree_mask_exact(n_q, gen).to(device)
    packed = ta.pack_tree_mask(mask, prefix_len)
    sets = [_make_inputs(n_q, n_k, n_heads, n_kv, d, dtype, device, gen) for _ in range(N_INPUT_SETS)]
    folded = [_fold(*s) for s in sets]
    g = n_heads // n_kv
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    visible[:, prefix_len:] = mask
    dense = visible.repeat(g, 1)
    bias = _additive_mask(visible, dtype)
    eager_sets = [_eager_inputs(*s) for s in sets]

    # Correctness once per shape: poisoned output vs dense-mask SDPA.
    q, k, v = sets[0]
    out = torch.full_like(q, float("nan"))
    ta.tree_attention_packed(q, k, v, packed, prefix_len, n_q, out=out)
    want = _unfold(torch.nn.functional.scaled_dot_product_attention(*folded[0], attn_mask=dense), n_q, n_heads)
    max_err = (out.float() - want.float()).abs().max().item()
    if not max_err < 2e-2:
        raise AssertionError(f"{model} n_q={n_q} prefix={prefix_len}: max error {max_err} vs dense SDPA")
    eager_err = (eager_attention(*eager_sets[0], bias).float() - want.float()).abs().max().item()
    if not eager_err < 2e-2:
        raise AssertionError(f"{model} n_q={n_q} prefix={prefix_len}: eager max error {eager_err}")

    outs = [torch.empty_like(s[0]) for s in sets]
    ours = _Cycle(lambda q, k, v, o: ta.tree_attention_packed(q, k, v, packed, prefix_len, n_q, out=o),
                  [(*s, o) for s, o in zip(sets, outs)])
    ours_ms = _bench_ms(ours)
    ours_graph_ms = _graph_ms(ours, "ours")
    pack_ms = _bench_ms(lambda: ta.pack_tree_mask(mask))
    dense_ms = _bench_ms(_Cycle(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=dense), folded))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = _Cycle(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), folded)
        flash_ms = _bench_ms(flash)
        flash_graph_ms = _graph_ms(flash, "flash")
    eager_ms = _bench_ms(_Cycle(lambda q4, k4, v4: eager_attention(q4, k4, v4, bias), eager_sets))
    sdpa_decode_ms = None
    if n_q == 1:  # a one-node tree sees everything: the runtime's decode step
        got = ta.prefix_attention_sdpa(q, k, v)
        if not (got.float() - want.float()).abs().max().item() < 2e-2:
            raise AssertionError(f"{model} prefix={prefix_len}: prefix_attention_sdpa disagrees")
        sdpa_decode_ms = _bench_ms(_Cycle(ta.prefix_attention_sdpa, sets))
    flex_ms = None
    if flex:
        try:
            fn = _flex_fn(n_q, n_k, prefix_len, mask, device)
            sets4 = [(q.permute(1, 0, 2).unsqueeze(0), k.permute(1, 0, 2).unsqueeze(0),
                      v.permute(1, 0, 2).unsqueeze(0)) for q, k, v in sets]
            got = fn(*sets4[0])[0].permute(1, 0, 2)
            if not (got.float() - want.float()).abs().max().item() < 2e-2:
                raise AssertionError("flex output disagrees")
            flex_ms = _bench_ms(_Cycle(fn, sets4))
        except Exception as e:  # noqa: BLE001 - any failure: report n/a, keep benchmarking
            print(f"  flex n/a for {model} n_q={n_q} prefix={prefix_len}: {type(e).__name__}: {e}"[:200],
                  file=sys.stderr)
    flops = _flops(n_q, n_k, n_heads, d)
    return dict(model=model, n_q=n_q, prefix=prefix_len, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d,
                dtype="fp16", ours_ms=ours_ms, pack_ms=pack_ms, dense_ms=dense_ms, flash_ms=flash_ms,
                flex_ms=flex_ms, eager_ms=eager_ms, ours_graph_ms=ours_graph_ms, flash_graph_ms=flash_graph_ms,
                sdpa_decode_ms=sdpa_decode_ms,
                ours_tflops=flops / ours_ms * 1e-9, flash_tflops=flops / flash_ms * 1e-9,
                ours_vs_flash=ours_ms / flash_ms, dense_over_ours=dense_ms / ours_ms,
                eager_over_ours=eager_ms / ours_ms,
                flex_over_ours=None if flex_ms is None else flex_ms / ours_ms,
                graph_ours_vs_flash=_ratio(ours_graph_ms, flash_graph_ms), max_err=max_err)


def _bench_dry_shape(ta, n_q, prefix_len, gen) -> dict:
    n_heads, n_kv, d = 4, 2, 64
    n_k = prefix_len + n_q
    mask = tree_mask_exact(n_q, gen)
    q, k, v = _make_inputs(n_q, n_k, n_heads, n_kv, d, torch.float32, "cpu", gen)

    def timed(fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, res

    out = torch.full_like(q, float("nan"))
    ours_ms, _ = timed(lambda: ta.tree_attention(q, k, v, mask, prefix_len, out=out))
    ref_ms, ref = timed(lambda: ta.tree_attention_reference(q, k, v, mask, prefix_len))
    visible = torch.ones(n_q, n_k, dtype=torch.bool)
    visible[:, prefix_len:] = mask
    bias = _additive_mask(visible, q.dtype)
    eager_ms, eager = timed(lambda: eager_attention(*_eager_inputs(q, k, v), bias))
    decode_ms, decode = timed(lambda: ta.prefix_attention_sdpa(q, k, v)) if n_q == 1 else (None, ref)
    max_err = max((x - ref).abs().max().item() for x in (out, eager, decode))
    if not max_err < 1e-4:
        raise AssertionError(f"dry n_q={n_q} prefix={prefix_len}: max error {max_err}")
    flops = _flops(n_q, n_k, n_heads, d)
    # CUDA-graph columns are CUDA-only: None (n/a) here, so the dry rows have every column.
    return dict(model="tiny-cpu-interp", n_q=n_q, prefix=prefix_len, n_heads=n_heads, n_kv_heads=n_kv,
                head_dim=d, dtype="fp32", ours_ms=ours_ms, ref_ms=ref_ms, eager_ms=eager_ms,
                ours_graph_ms=None, flash_graph_ms=None, sdpa_decode_ms=decode_ms,
                ours_tflops=flops / ours_ms * 1e-9, eager_over_ours=eager_ms / ours_ms,
                graph_ours_vs_flash=None, max_err=max_err)


def run(dry: bool, flex: bool = True, models=None, n_qs=None, prefixes=None) -> list[dict]:
    """Benchmark rows (dicts). dry: tiny CPU shapes through the interpreter. ``models``
    (names of ``MODELS``), ``n_qs`` and ``prefixes`` pick a subset of the CUDA shapes (default
    all)."""
    ta = _kernel_module(dry)
    gen = torch.Generator().manual_seed(0)
    if dry:
        return [_bench_dry_shape(ta, n_q, p, gen) for n_q in (1, 16) for p in (32, 100)]
    if not torch.cuda.is_available():
        raise RuntimeError("the full benchmark needs CUDA (use --dry on the CPU)")
    rows = []
    for model in models or MODELS:
        n_heads, n_kv, d = MODELS[model]
        for prefix_len in prefixes or PREFIX:
            for n_q in n_qs or N_Q:
                rows.append(_bench_cuda_shape(ta, model, n_heads, n_kv, d, n_q, prefix_len, flex, gen))
                print_row(rows[-1])
    return rows


def sweep(configs=None) -> list[dict]:
    """Time a few TileConfigs on the 70B n_q=1024, prefix=4096 shape (for retuning the table)."""
    ta = _kernel_module(False)
    gen = torch.Generator().manual_seed(1)
    n_heads, n_kv, d, n_q, prefix_len = 64, 8, 128, 1024, 4096
    mask = tree_mask_exact(n_q, gen).cuda()
    packed = ta.pack_tree_mask(mask, prefix_len)
    sets = [_make_inputs(n_q, prefix_len + n_q, n_heads, n_kv, d, torch.float16, "cuda", gen) for _ in range(2)]
    configs = configs or [ta.TileConfig(bm, bn, w, s) for bm, bn, w, s in
                          [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                           (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 3)]]
    res = []
    for cfg in configs:
        try:
            ms = _bench_ms(_Cycle(lambda q, k, v: ta.tree_attention_packed(
                q, k, v, packed, prefix_len, n_q, config=cfg), sets))
        except Exception as e:  # noqa: BLE001 - a config may not fit in shared memory
            print(f"{cfg}: failed ({type(e).__name__})")
            continue
        tflops = _flops(n_q, prefix_len + n_q, n_heads, d) / ms * 1e-9
        print(f"{cfg}: {ms:.3f} ms  {tflops:.0f} TFLOP/s")
        res.append(dict(config=list(cfg), ms=ms, tflops=tflops))
    return res


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _fmt(x, spec):
    return format("n/a", spec.split(".")[0]) if x is None else format(x, spec)


HEADER_GPU = (f"{'model':<11} {'n_q':>5} {'prefix':>6} | {'ours ms':>8} {'TF/s':>5} | {'flash ms':>8} {'TF/s':>5} "
              f"{'ours/fl':>7} | {'dense ms':>8} {'de/ours':>7} | {'eager ms':>8} {'ea/ours':>7} | "
              f"{'flex ms':>8} {'fx/ours':>7} | {'ours gr':>8} {'fl gr':>8} {'ours/fl':>7} | {'decode':>8} | "
              f"{'pack ms':>7}")
HEADER_DRY = (f"{'model':<16} {'n_q':>5} {'prefix':>6} | {'ours ms':>9} | {'ref ms':>8} | {'eager ms':>8} | "
              f"{'decode':>8} | {'max err':>8}")


def print_row(r: dict) -> None:
    if r["dtype"] == "fp32":
        print(f"{r['model']:<16} {r['n_q']:>5} {r['prefix']:>6} | {r['ours_ms']:>9.2f} | {r['ref_ms']:>8.2f} | "
              f"{r['eager_ms']:>8.2f} | {_fmt(r['sdpa_decode_ms'], '>8.2f')} | {r['max_err']:>8.1e}")
        return
    print(f"{r['model']:<11} {r['n_q']:>5} {r['prefix']:>6} | {r['ours_ms']:>8.4f} {r['ours_tflops']:>5.0f} | "
          f"{r['flash_ms']:>8.4f} {r['flash_tflops']:>5.0f} {r['ours_vs_flash']:>6.2f}x | {r['dense_ms']:>8.4f} "
          f"{r['dense_over_ours']:>6.1f}x | {r['eager_ms']:>8.4f} {r['eager_over_ours']:>6.1f}x | "
          f"{_fmt(r['flex_ms'], '>8.4f')} {_fmt(r['flex_over_ours'], '>6.2f')}{'x' if r['flex_ms'] else ' '} | "
          f"{_fmt(r['ours_graph_ms'], '>8.4f')} {_fmt(r['flash_graph_ms'], '>8.4f')} "
          f"{_fmt(r['graph_ours_vs_flash'], '>6.2f')}{'x' if r['graph_ours_vs_flash'] else ' '} | "
          f"{_fmt(r['sdpa_decode_ms'], '>8.4f')} | {r['pack_ms']:>7.4f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="tiny CPU shapes through the Triton interpreter")
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take time)")
    ap.add_argument("--sweep", action="store_true", help="time a few tile configs on the target shape")
    args = ap.parse_args(argv)
    if args.sweep:
        rows = sweep()
    else:
        if args.dry:
            print(HEADER_DRY)
            rows = run(True)
            for r in rows:
                print_row(r)
        else:
            dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
            print(f"# {dev}, torch {torch.__version__}; ours/fl = time ratio to unmasked flash SDPA (floor), "
                  "de/ours, ea/ours and fx/ours = speed-up of ours over dense-mask SDPA, eager attention and "
                  "FlexAttention; gr = under CUDA graphs; decode = prefix_attention_sdpa (n_q = 1)")
            print(HEADER_GPU)
            rows = run(False, flex=not args.no_flex)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
