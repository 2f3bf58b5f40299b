"""Several users per pass on the real SmolLM2-135M (CPU): aggregate and per-request speed at 1, 2,
4 and 8 concurrent requests, side by side in one run.

For each method (autoregressive, SpecExec at a fixed budget, SpecExec with budget="auto") and
each number of concurrent requests B, one engine with ``max_batch=B`` serves B chat prompts
(greedy, ``--new`` tokens each) submitted together. Rows report the aggregate tokens/s (all
tokens / wall time), the median per-request tokens/s (its tokens / its time from submit to
finish), tokens per pass per request, the mean requests per pass, and the ratio to the same method at
B = 1 on the SAME B prompts: the ``max_batch=1`` engine serving them one after another, timed
in the same round. Rounds are interleaved (every configuration once per round) and the medians
over rounds are reported. Every output is checked against the request's solo greedy output.

A CPU pass is compute-bound once it carries enough tokens, so batching pays less here than on
an offloaded GPU target (where a pass costs the same for 1 or 2048 tokens): the table shows
what it gives on this machine, the roofline column the weight bytes read per second.

    python bench/batched.py [--new 48] [--rounds 3] [--batches 1,2,4,8] [--out bench/results/...md]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Explain in three sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "What are the main differences between Python lists and tuples?",
    "Give me three tips for a good night's sleep.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How does a refrigerator keep food cold?",
    "List five fruits that are rich in vitamin C.",
    "What is the capital of Australia, and why is it not Sydney?",
]


def configs(args) -> list:
    return [("autoregressive", dict(method="autoregressive")),
            (f"specexec b={args.budget}", dict(method="specexec", budget=args.budget)),
            ("specexec auto", dict(method="specexec", budget="auto"))]


def run_one(engine, prompts: list, n_new: int, one_at_a_time: bool = False) -> dict:
    """Serve ``prompts`` together (submitted at once) or one after another."""
    t0 = time.perf_counter()
    if one_at_a_time:
        results = [engine.generate(p, n_new) for p in prompts]
    else:
        handles = [engine.submit(p, n_new) for p in prompts]
        results = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    return dict(results=results, wall=wall, aggregate=tokens / wall,
                per_request=statistics.median(len(r.token_ids) / r.stats.wall_seconds for r in results),
                tokens_per_pass=statistics.mean(r.stats.tokens_per_pass for r in results),
                requests_per_pass=statistics.mean(statistics.mean(r.stats.batch_sizes) for r in results))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--out", default=None, help="markdown table to write (default: bench/results/<date>-cpu-batched.md)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from specexec_rt import Engine, default_draft, load_model, load_tokenizer

    from specexec_rt.model.weights import weights_nbytes

    target = load_model("smollm2-135m", device="cpu", dtype=torch.float32, max_len=512)
    draft = default_draft(target)
    tok = load_tokenizer(target)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    weight_bytes = sum(weights_nbytes(lw) for lw in target.weights.layers) + weights_nbytes(target.weights.lm_head)

    # Solo greedy outputs: the losslessness check of every batched run.
    solo_engine = Engine(target, method="autoregressive")
    solo = [solo_engine.generate(p, args.new).token_ids for p in prompts[:max(batches)]]
    engines = {}
    for name, kw in configs(args):
        for b in sorted(set(batches) | {1}):       # max_batch=1: every row's baseline
            engines[(name, b)] = Engine(target, None if kw["method"] == "autoregressive" else draft,
                                        max_batch=b, tokenizer=tok, **kw)
    for eng in engines.values():   # warm-up (and auto's first cost fits)
        run_one(eng, prompts[:1], 8)
    # (method, B) serves B prompts together; (method, B, "one at a time") the same B prompts on
    # the method's max_batch=1 engine, one after another: the "vs B=1" baseline of that row.
    runs = {key: (eng, False) for key, eng in engines.items() if key[1] in batches}
    runs.update({(name, b, "one at a time"): (engines[(name, 1)], True) for name, _ in configs(args)
                 for b in batches if b > 1})
    samples: dict = {key: [] for key in runs}
    for rnd in range(args.rounds):
        for key, (eng, sequential) in runs.items():
            b = key[1]
            res = run_one(eng, prompts[:b], args.new, one_at_a_time=sequential)
            for r, want in zip(res["results"], solo):
                if r.token_ids != want:
                    raise AssertionError(f"{key}: a batched request's output differs from its solo output")
            samples[key].append(res)
            print(f"round {rnd} {key[0]:>16} B={b}{' one at a time' if sequential else ''}: "
                  f"{res['aggregate']:.1f} tok/s aggregate", file=sys.stderr, flush=True)

    def med(key, field):
        return statistics.median(s[field] for s in samples[key])

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = ["# Several requests per pass: SmolLM2-135M on the CPU",
             "",
             f"{datetime.date.today()}, commit {commit}, {cpu}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; greedy, {args.new} new tokens per request, chat prompts, medians of "
             f"{args.rounds} interleaved rounds; every batched output equal to its solo output. vs B=1: the "
             "aggregate over the same B prompts served one at a time by the method's max_batch=1 engine, in the "
             "same rounds.",
             "",
             "| method | concurrent requests | aggregate tok/s | vs B=1 (same prompts) | per-request tok/s (median) | "
             "tokens/pass per request | requests per pass | weight GB/s (aggregate passes) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, _ in configs(args):
        for b in batches:
            key = (name, b)
            agg = med(key, "aggregate")
            base = med((name, b, "one at a time") if b > 1 else key, "aggregate")
            tpp = med(key, "tokens_per_pass")
            rpp = med(key, "requests_per_pass")
            # Weight bytes read per second: one read of the target's weights per pass.
            passes_per_s = agg / max(1e-9, tpp * rpp)
            lines.append(f"| {name} | {b} | {agg:.1f} | {agg / base:.2f}x | {med(key, 'per_request'):.1f} | "
                         f"{tpp:.2f} | {rpp:.2f} | {passes_per_s * weight_bytes / 1e9:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{datetime.date.today()}-cpu-batched.md"
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
