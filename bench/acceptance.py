"""Tokens per target pass vs budget on the real SmolLM2 pair: SpecExec's tree policies against
Sequoia, SpecInfer and a chain, with the default int4 draft and with an identical draft.

Columns (``--methods``, default all):
- ``calibrated``: SpecExec, best-first search ranked by the acceptance model learned online
  from verification (``tree="calibrated"``, the default policy);
- ``softmax``: SpecExec as the paper describes it, ranked by the draft's softmax path
  probability (``tree="softmax"``, the policy before the calibrated search);
- ``softmax-T<t>``: the softmax ranking at a fixed, sharper growth temperature (``--growth-temps``):
  the crude fix the calibrated search must beat;
- ``sequoia``: Sequoia's optimal static tree for the budget from the per-rank acceptance vector
  learned online (``tree="sequoia"``);
- ``specinfer``: n x depth = budget (n = the power of two nearest sqrt(budget));
- ``chain``: k = min(budget, --chain-cap) (a chain of 1024 sequential draft calls per pass is not
  a baseline anyone runs).

Every engine is built once per (draft, method, budget) and runs the prompts in order, so the
learning policies start untrained and learn during the run (the first prompt pays for it), unless
``--warmup N``: each engine first generates N other prompts (the last N of the list, not counted),
as an engine that has served a few requests would have. Greedy
outputs are checked against the target's own greedy text. Rows go to a JSON file as they are
measured (``--json``; a rerun skips rows already there, so a long run can be resumed or split
across processes), then the markdown table and PNG plot are written from all rows.

    python bench/acceptance.py --quick            # CI size: 1 prompt, budgets 8/32/128, 24 tokens
    python bench/acceptance.py                    # budgets 8..1024, 3 prompts, 64 tokens, both drafts
    python bench/acceptance.py --temperature 0.7 --top-p 0.9 --methods calibrated,softmax
    python bench/acceptance.py --drafts           # also: which draft agrees best with the target
    python bench/acceptance.py --warmup 1         # policies trained on one other prompt first
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, step by step.",
    "def quicksort(arr):",
    "Give me three tips for staying focused while studying.",
    "Write a polite email asking my landlord to fix the heating.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ALL_METHODS = "calibrated,softmax,softmax-T,sequoia,specinfer,chain"


def specinfer_shape(budget: int) -> tuple[int, int]:
    n = 2 ** round(math.log2(max(1, budget)) / 2)
    return n, max(1, budget // n)


def engine_kwargs(method: str, budget: int, chain_cap: int) -> dict:
    """Engine(**kwargs) for one column at one budget. A ``-uncoupled`` suffix (SpecExec) grows
    sampled trees by the draft's probabilities alone; ``-rejection`` (chain, SpecInfer) draws
    sampled drafts independently and verifies them by rejection sampling. Without a suffix,
    sampled drafts are coupled to the target's draws (the default)."""
    base, _, variant = method.partition("-")
    if variant.startswith("T"):
        base, variant = method, ""
    kw = {}
    if variant in ("uncoupled", "rejection"):
        kw["coupled"] = False
    elif variant:
        raise ValueError(f"unknown method column {method!r}")
    if base == "calibrated":
        return dict(method="specexec", budget=budget, tree="calibrated", **kw)
    if base == "softmax":
        return dict(method="specexec", budget=budget, tree="softmax", **kw)
    if base.startswith("softmax-T"):
        return dict(method="specexec", budget=budget, tree="softmax", growth_temperature=float(base[9:]))
    if base == "sequoia":
        return dict(method="specexec", budget=budget, tree="sequoia", **kw)
    if base == "specinfer":
        n, depth = specinfer_shape(budget)
        return dict(method="specinfer", budget=n * depth, n=n, depth=depth, **kw)
    if base == "chain":
        return dict(method="chain", budget=budget, k=min(budget, chain_cap), **kw)
    raise ValueError(f"unknown method column {method!r}")


def prompt_ids(tok, text: str) -> list:
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return list(tok(chat).input_ids)


def weight_bytes(model) -> int:
    from specexec_rt.model.weights import weights_nbytes

    w = model.weights
    return sum(weights_nbytes(lw) for lw in w.layers) + weights_nbytes(w.lm_head)   # a tensor or an Int4Weight


def copy_bandwidth_gbps(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory-copy bandwidth of this machine right now (read + write bytes per second, median):
    the roofline of a pass that reads every weight once."""
    src = torch.empty(n_bytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / sorted(times)[repeats // 2] / 1e9


def run_one(target, draft, tok, method, budget, prompts, args, reference, warmup=()) -> dict:
    from specexec_rt.speculative.engine import Engine

    kw = engine_kwargs(method, budget, args.chain_cap)
    engine = Engine(target, draft, tokenizer=tok, **kw)
    for i, ids in enumerate(warmup):   # trains the learning policies; not counted
        engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=1000 + i)
    new = passes = calls = tree_tokens = 0
    draft_s = target_s = wall = 0.0
    for i, ids in enumerate(prompts):
        t0 = time.perf_counter()
        res = engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=i)
        wall += time.perf_counter() - t0
        # Walk-verified engines give the target's own text for a seed; rejection sampling gives
        # another draw from the same distribution.
        if res.token_ids != reference[i] and not (args.temperature > 0 and kw.get("coupled") is False
                                                  and kw["method"] != "specexec"):
            raise AssertionError(f"{method} budget {budget}: output differs from the target's (same seed)")
        s = res.stats
        new, passes, calls = new + s.new_tokens, passes + s.target_passes, calls + s.draft_calls
        tree_tokens += s.tree_tokens
        draft_s, target_s = draft_s + s.draft_seconds, target_s + s.target_seconds
    # Weight bytes read per second: every target pass and every draft call reads all weights once.
    streamed = weight_bytes(target) * passes + (weight_bytes(draft) * calls if draft is not None else 0)
    row = dict(budget=budget, method=method, params={k: v for k, v in kw.items() if k != "method"},
               tokens_per_pass=new / passes, new_tokens=new, passes=passes, draft_calls=calls,
               tree_tokens=tree_tokens, draft_s=draft_s, target_s=target_s, wall_s=wall,
               tokens_per_s=new / wall, weights_gbps=streamed / wall / 1e9)
    if engine.tree_policy is not None and engine.tree_policy.models:
        model = next(iter(engine.tree_policy.models.values()))
        row["rank_acceptance"] = [round(x, 4) for x in model.rank_acceptance(8)]
    return row


def draft_agreement(target, tok, prompts) -> list:
    """Teacher-forced agreement of candidate drafts with the target over the prompts' text."""
    from specexec_rt.speculative.drafts import default_keep, int4_draft, layer_dropped_draft

    n = target.config.n_layers
    candidates = {
        "int4 (all layers, group 64)": lambda: int4_draft(target, share_cache=False),
        f"layers {default_keep(n)}": lambda: layer_dropped_draft(target, default_keep(n), share_cache=False),
        "every other layer + last": lambda: layer_dropped_draft(target, list(range(0, n, 2)) + [n - 1],
                                                                  share_cache=False),
        "first 2/3 + last 2": lambda: layer_dropped_draft(target, list(range(2 * n // 3)) + [n - 2, n - 1],
                                                            share_cache=False),
    }
    refs = [target.forward(torch.tensor(p), torch.arange(len(p)), target.cache, 0) for p in prompts]
    out = []
    for name, make in candidates.items():
        d = make()
        top1 = top8 = count = 0
        for p, ref in zip(prompts, refs):
            logits = d.forward(torch.tensor(p), torch.arange(len(p)), d.cache, 0)
            a = ref.argmax(-1)
            top1 += int((logits.argmax(-1) == a).sum())
            top8 += int((logits.topk(8).indices == a[:, None]).any(-1).sum())
            count += len(p)
        out.append((name, top1 / count, top8 / count))
        print(f"draft {name:32s} top-1 {top1 / count:.3f} top-8 {top8 / count:.3f}", flush=True)
    return out


# ---------------------------------------------------------------------- outputs
def _key(row) -> tuple:
    return (row["draft"], row["temperature"], row["top_p"], row["budget"], row["method"])


def load_rows(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def save_rows(path: str, rows: list, meta: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def table(rows: list, field: str, fmt: str) -> list:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    md = ["| budget | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for b in budgets:
        cells = []
        for m in methods:
            hit = [r for r in rows if r["budget"] == b and r["method"] == m]
            cells.append(format(hit[0][field], fmt) if hit else "")
        md.append(f"| {b} | " + " | ".join(cells) + " |")
    return md


def ratio_lines(rows: list) -> list:
    """calibrated / softmax, calibrated / best fixed temperature, calibrated / sequoia per budget."""
    out = []
    for b in sorted({r["budget"] for r in rows}):
        at = {r["method"]: r["tokens_per_pass"] for r in rows if r["budget"] == b}
        if "calibrated" not in at:
            continue
        c = at["calibrated"]
        parts = [f"budget {b}: calibrated {c:.2f}"]
        if "softmax" in at:
            parts.append(f"{c / at['softmax']:.2f}x softmax")
        temps = {m: v for m, v in at.items() if m.startswith("softmax-T")}
        if temps:
            best = max(temps, key=temps.get)
            parts.append(f"{c / temps[best]:.2f}x the best fixed temperature ({best}: {temps[best]:.2f})")
        if "sequoia" in at:
            parts.append(f"{c / at['sequoia']:.2f}x sequoia")
        out.append("- " + ", ".join(parts))
    return out


def write_outputs(all_rows: list, meta: dict, tag: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    groups = list(dict.fromkeys((r["draft"], r["temperature"], r["top_p"]) for r in all_rows))
    md = [f"# Tokens per target pass vs budget{(' (' + tag + ')') if tag else ''}", "",
          f"SmolLM2-135M-Instruct target on a {meta['machine']}; {meta['max_new_tokens']} new tokens x "
          f"{meta['prompts']} chat prompts per cell, "
          + (f"every engine trained first on {meta['warmup']} other prompt(s), not counted (as after serving a "
             f"few requests). " if meta.get("warmup") else
             "every engine fresh per cell (learning policies start untrained). ")
          + f"SpecInfer n x depth = budget; chain k = min(budget, {meta['chain_cap']}). "
          f"Wall-clock is CPU time of the whole cell (draft + target), measured while other jobs shared "
          f"the cores: compare columns, not runs. Generated by `python bench/acceptance.py "
          f"{meta['argv']}` at commit {meta['commit']}, {meta['date']}; the run took "
          f"{meta.get('run_minutes', 0):.0f} min.", ""]
    for draft, temp, top_p in groups:
        rows = [r for r in all_rows if (r["draft"], r["temperature"], r["top_p"]) == (draft, temp, top_p)]
        mode = "greedy" if temp == 0 else f"sampling, temperature {temp}, top-p {top_p}"
        md += [f"## {draft} draft, {mode}: tokens per target pass", ""] + table(rows, "tokens_per_pass", ".2f")
        md += [""] + ratio_lines(rows)
        md += ["", f"### {draft} draft, {mode}: CPU tokens/s (wall-clock; baseline: autoregressive "
                   f"{meta['ar_tokens_per_s']:.2f} tok/s in the same run)", ""] + table(rows, "tokens_per_s", ".2f")
        md += ["", f"### {draft} draft, {mode}: weights read, GB/s (roofline: memory copy "
                   f"{meta['copy_gbps']:.1f} GB/s in the same run; autoregressive "
                   f"{meta['ar_gbps']:.2f} GB/s)", ""] + table(rows, "weights_gbps", ".2f")
        md += ["", f"### {draft} draft, {mode}: draft calls per target pass", ""]
        for r in rows:
            r["calls_per_pass"] = r["draft_calls"] / r["passes"]
        md += table(rows, "calls_per_pass", ".1f") + [""]
    if meta.get("agreement"):
        md += ["## Draft agreement with the target (teacher forced)", "", "| draft | top-1 | top-8 |", "|---|---|---|"]
        md += [f"| {n} | {a:.3f} | {b:.3f} |" for n, a, b in meta["agreement"]] + [""]
    name = f"acceptance{('-' + tag) if tag else ''}"
    path = os.path.join(RESULTS, name + ".md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, (draft, temp, top_p) in zip(axes[0], groups):
        rows = [r for r in all_rows if (r["draft"], r["temperature"], r["top_p"]) == (draft, temp, top_p)]
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["budget"], r["tokens_per_pass"]) for r in rows if r["method"] == m)
            style = "--" if m.startswith("softmax-T") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (draft tokens per target pass)")
        ax.set_ylabel("generated tokens per target pass")
        ax.set_title(f"SmolLM2-135M, {draft} draft, " + ("greedy" if temp == 0 else f"T={temp}, top-p={top_p}"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    png = os.path.join(RESULTS, name + ".png")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def render(paths: list, tag: str) -> None:
    """One table and plot from the rows of several runs (e.g. run in parallel per draft)."""
    rows, metas = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows += data["rows"]
        metas.append(data["meta"])
    meta = dict(metas[0])
    meta["argv"] = "; ".join(f"`{m['argv']}`" for m in metas).strip("`")
    meta["run_minutes"] = sum(m.get("run_minutes", 0) for m in metas)
    meta["agreement"] = next((m["agreement"] for m in metas if m.get("agreement")), [])
    write_outputs(rows, meta, tag)


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: 1 prompt, budgets 8/32/128, 24 tokens")
    ap.add_argument("--budgets", default=None, help="comma-separated (default 8,16,...,1024)")
    ap.add_argument("--methods", default=ALL_METHODS, help=f"comma-separated columns [{ALL_METHODS}]")
    ap.add_argument("--growth-temps", default="0.5", help="fixed growth temperatures for softmax-T [0.5]")
    ap.add_argument("--draft", default="default,identical", help="default (int4) and/or identical (the target)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--prompt-file", default=None,
                    help="a text file of chat prompts, one per line, instead of the built-in list (held-out prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--chain-cap", type=int, default=32)
    ap.add_argument("--drafts", action="store_true", help="also measure draft agreement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=0,
                    help="prompts each engine generates first, not counted (trains the learning policies) [0]")
    ap.add_argument("--json", default=None, help="rows file (default bench/results/acceptance[-tag].json)")
    ap.add_argument("--tag", default=None, help="output name suffix (default: quick for --quick)")
    ap.add_argument("--render", default=None,
                    help="comma-separated JSON row files of earlier runs: write their merged table and plot only")
    args = ap.parse_args(argv)
    if args.render:
        render(args.render.split(","), args.tag if args.tag is not None else "")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else (
        [8, 32, 128] if args.quick else [8, 16, 32, 64, 128, 256, 512, 1024])
    texts = PROMPTS
    if args.prompt_file:
        with open(args.prompt_file) as f:
            texts = [line.strip() for line in f if line.strip()]
    args.prompts = args.prompts or (1 if args.quick else 3)
    if not 1 <= args.prompts <= len(texts):
        raise SystemExit(f"--prompts must be in [1, {len(texts)}]")
    if not 0 <= args.warmup <= len(texts) - args.prompts:
        raise SystemExit(f"--warmup must be in [0, {len(texts) - args.prompts}] (warm-up prompts are "
                         f"other prompts than the {args.prompts} measured)")
    args.max_new_tokens = args.max_new_tokens or (24 if args.quick else 64)
    tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
    methods = []
    for m in args.methods.split(","):
        methods += [f"softmax-T{t}" for t in args.growth_temps.split(",")] if m == "softmax-T" else [m]
    json_path = args.json or os.path.join(RESULTS, f"acceptance{('-' + tag) if tag else ''}.json")

    from specexec_rt import load_model, load_tokenizer
    from specexec_rt.speculative.drafts import default_draft, layer_dropped_draft
    from specexec_rt.speculative.engine import Engine

    t_start = time.perf_counter()
    max_len = 512 + args.max_new_tokens + max(budgets) + 1
    target = load_model("smollm2-135m", device="cpu", max_len=max_len)
    drafts = {"default": lambda: default_draft(target),
              # The target's own layers and weights with a cache of its own: always right (greedy).
              "identical": lambda: layer_dropped_draft(target, range(target.config.n_layers), share_cache=False)}
    tok = load_tokenizer(target)
    prompts = [prompt_ids(tok, p) for p in texts[:args.prompts]]
    warmup = [prompt_ids(tok, p) for p in texts[len(texts) - args.warmup:]] if args.warmup else []
    agreement = draft_agreement(target, tok, prompts) if args.drafts else []
    ar = Engine(target, method="autoregressive", tokenizer=tok)
    t0 = time.perf_counter()
    reference = [ar.generate(p, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             seed=i).token_ids for i, p in enumerate(prompts)]
    ar_s = time.perf_counter() - t0
    ar_tps = len(prompts) * args.max_new_tokens / ar_s
    ar_gbps = weight_bytes(target) * len(prompts) * args.max_new_tokens / ar_s / 1e9
    copy_gbps = copy_bandwidth_gbps()
    rows = load_rows(json_path)
    done = {_key(r) for r in rows}
    meta = dict(machine=f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                max_new_tokens=args.max_new_tokens, prompts=args.prompts, chain_cap=args.chain_cap, warmup=args.warmup,
                argv=" ".join(argv if argv is not None else sys.argv[1:]), commit=_commit(),
                date=time.strftime("%Y-%m-%d"), ar_tokens_per_s=ar_tps, ar_gbps=ar_gbps, copy_gbps=copy_gbps,
                target_weight_bytes=weight_bytes(target))
    for draft_name in args.draft.split(","):
        draft = drafts[draft_name]()
        for budget in budgets:
            for method in methods:
                key = (draft_name, args.temperature, args.top_p, budget, method)
                if key in done:
                    continue
                row = run_one(target, draft, tok, method, budget, prompts, args, reference, warmup)
                row.update(draft=draft_name, temperature=args.temperature, top_p=args.top_p)
                print(f"{draft_name:9s} budget {budget:5d} {method:14s} {row['tokens_per_pass']:6.2f} tokens/pass "
                      f"{row['tokens_per_s']:6.2f} tok/s ({row['draft_calls'] / row['passes']:.1f} draft calls/pass, "
                      f"draft {row['draft_s']:.1f}s, target {row['target_s']:.1f}s)", flush=True)
                rows = [r for r in load_rows(json_path) if _key(r) != key] + [row]   # other processes may append
                save_rows(json_path, rows, meta)
    meta["run_minutes"] = (time.perf_counter() - t_start) / 60
    meta["agreement"] = agreement
    save_rows(json_path, rows, meta)
    write_outputs(rows, meta, tag)


if __name__ == "__main__":
    main()
