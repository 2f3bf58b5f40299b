"""Tokens per target pass vs budget: SpecExec vs SpecInfer vs chain on the real SmolLM2 pair.

Same prompts, same draft (``default_draft``: the target re-quantized to int4), greedy by
default. For budget B, SpecExec verifies a B-node tree; SpecInfer uses n x depth = B
(n = the power of two nearest sqrt(B)); chain uses k = min(B, --chain-cap) (a chain of 1024
sequential draft calls per pass is not a baseline anyone runs). Writes a markdown table and a
PNG plot to bench/results/.

    python bench/acceptance.py --quick            # CI size: 1 prompt, budgets 8/32/128, 24 tokens
    python bench/acceptance.py                    # budgets 8..1024, 3 prompts, 64 tokens
    python bench/acceptance.py --drafts           # also: which draft agrees best with the target
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, step by step.",
    "def quicksort(arr):",
]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def specinfer_shape(budget: int) -> tuple[int, int]:
    n = 2 ** round(math.log2(max(1, budget)) / 2)
    return n, max(1, budget // n)


def method_params(method: str, budget: int, chain_cap: int) -> dict:
    if method == "specexec":
        return dict(budget=budget)
    if method == "specinfer":
        n, depth = specinfer_shape(budget)
        return dict(budget=n * depth, n=n, depth=depth)
    return dict(budget=budget, k=min(budget, chain_cap))


def prompt_ids(tok, text: str) -> list:
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return list(tok(chat).input_ids)


def run(target, draft, tok, budgets, methods, prompts, max_new_tokens, temperature, chain_cap, reference):
    from specexec_rt.speculative.engine import Engine

    rows = []
    for budget in budgets:
        for method in methods:
            params = method_params(method, budget, chain_cap)
            engine = Engine(target, draft, method=method, tokenizer=tok, **params)
            new = passes = 0
            draft_s = target_s = 0.0
            t0 = time.perf_counter()
            for i, ids in enumerate(prompts):
                res = engine.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=i)
                if temperature == 0 and res.token_ids != reference[i]:
                    raise AssertionError(f"{method} budget {budget}: greedy output differs from the target's")
                new += res.stats.new_tokens
                passes += res.stats.target_passes
                draft_s += res.stats.draft_seconds
                target_s += res.stats.target_seconds
            rows.append(dict(budget=budget, method=method, params=params, tokens_per_pass=new / passes,
                             draft_s=draft_s, target_s=target_s, wall_s=time.perf_counter() - t0))
            r = rows[-1]
            print(f"budget {budget:5d} {method:10s} {r['tokens_per_pass']:6.2f} tokens/pass "
                  f"(draft {draft_s:.1f}s, target {target_s:.1f}s) {params}", flush=True)
    return rows


def draft_agreement(target, tok, prompts) -> list:
    """Teacher-forced agreement of candidate drafts with the target over the prompts' text."""
    from specexec_rt.speculative.drafts import default_keep, int4_draft, layer_dropped_draft

    n = target.config.n_layers
    candidates = {
        "int4 (all layers, group 64)": lambda: int4_draft(target),
        f"layers {default_keep(n)}": lambda: layer_dropped_draft(target, default_keep(n)),
        "every other layer + last": lambda: layer_dropped_draft(target, list(range(0, n, 2)) + [n - 1]),
        "first 2/3 + last 2": lambda: layer_dropped_draft(target, list(range(2 * n // 3)) + [n - 2, n - 1]),
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


def write_outputs(rows, agreement, args, tag: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    md = [f"# Tokens per target pass vs budget ({tag})", "",
          f"SmolLM2-135M-Instruct target, default int4 draft, temperature {args.temperature}, "
          f"{args.max_new_tokens} new tokens x {args.prompts} prompts, {platform.machine()} CPU. "
          f"SpecInfer n x depth = budget; chain k = min(budget, {args.chain_cap}).", "",
          "| budget | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for b in budgets:
        cells = [f"{r['tokens_per_pass']:.2f}" for m in methods for r in rows if r["budget"] == b and r["method"] == m]
        md.append(f"| {b} | " + " | ".join(cells) + " |")
    if agreement:
        md += ["", "## Draft agreement with the target (teacher forced)", "", "| draft | top-1 | top-8 |",
               "|---|---|---|"] + [f"| {n} | {a:.3f} | {b:.3f} |" for n, a, b in agreement]
    path = os.path.join(RESULTS, f"acceptance{tag}.md")
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
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = sorted((r["budget"], r["tokens_per_pass"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (draft tokens per target pass)")
    ax.set_ylabel("generated tokens per target pass")
    ax.set_title("SmolLM2-135M, int4 self-draft")
    ax.grid(True, alpha=0.3)
    ax.legend()
    png = os.path.join(RESULTS, f"acceptance{tag}.png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: 1 prompt, budgets 8/32/128, 24 tokens")
    ap.add_argument("--budgets", default=None, help="comma-separated (default 8,16,...,1024)")
    ap.add_argument("--methods", default="specexec,specinfer,chain")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--chain-cap", type=int, default=32)
    ap.add_argument("--drafts", action="store_true", help="also measure draft agreement")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else (
        [8, 32, 128] if args.quick else [8, 16, 32, 64, 128, 256, 512, 1024])
    args.prompts = args.prompts or (1 if args.quick else 3)
    args.max_new_tokens = args.max_new_tokens or (24 if args.quick else 64)

    from specexec_rt import load_model, load_tokenizer
    from specexec_rt.speculative.drafts import default_draft
    from specexec_rt.speculative.engine import Engine

    max_len = 512 + args.max_new_tokens + max(budgets) + 1
    target = load_model("smollm2-135m", device="cpu", max_len=max_len)
    draft = default_draft(target)
    tok = load_tokenizer(target)
    prompts = [prompt_ids(tok, p) for p in (PROMPTS * 4)[:args.prompts]]
    agreement = draft_agreement(target, tok, prompts) if args.drafts else []
    ar = Engine(target, method="autoregressive", tokenizer=tok)
    reference = [ar.generate(p, args.max_new_tokens, temperature=args.temperature, seed=i).token_ids
                 for i, p in enumerate(prompts)]
    rows = run(target, draft, tok, budgets, args.methods.split(","), prompts, args.max_new_tokens,
               args.temperature, args.chain_cap, reference)
    write_outputs(rows, agreement, args, "-quick" if args.quick else "")


if __name__ == "__main__":
    main()
