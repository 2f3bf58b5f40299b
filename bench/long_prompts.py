"""Long prompts on the CPU, SmolLM2-135M: the draft that reads the target's cache, prompt-lookup
(n-gram) drafts, and ``budget="auto"`` after a long prompt.

Parts (``--part``, comma-separated; default all):
- ``agreement``: teacher-forced top-1 agreement of the default draft with the target, on the
  held-out chat prompts (bench/prompts/heldout-chat.txt) followed by the target's greedy
  continuation, with a cache of its own (``share_cache=False``: its own K/V for every token) and
  reading the target's cache. A draft in a tree also attends to its own K/V of the tree tokens
  above a node, so the shared cache is measured at chain depth 1, 2, 4 and 8: the draft's own
  K/V for the last 0, 1, 3, 7 tokens, the target's before them.
- ``lookup``: a summarisation prompt and a code-edit prompt (long inputs that the output copies
  from), greedy: plain decoding, the n-gram draft alone (``draft="ngram"``), the model draft alone
  and merged with n-gram candidates (``ngram=True``), at fixed budgets and ``budget="auto"``:
  tokens per pass and tokens/s.
- ``auto``: decode speed after a short prompt and after a ~1500-token one, plain decoding vs
  ``budget="auto"`` (the default draft reading the target's cache) vs ``budget="auto"`` with the
  draft's own cache, side by side in one run, interleaved rounds, medians.

Tokens/s need a quiet machine; tokens per pass and agreement do not.

    python bench/long_prompts.py --part agreement [--new 128]
    python bench/long_prompts.py --part lookup [--new 128] [--rounds 3]
    python bench/long_prompts.py --part auto [--new 128] [--rounds 3] [--long 1500]
    python bench/long_prompts.py --out-md bench/results/DATE-cpu-long-prompts.md
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "bench" / "prompts" / "heldout-chat.txt"


def chat_ids(tok, text: str) -> list:
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return list(tok(chat).input_ids)


def greedy_text(target, ids: list, n_new: int) -> list:
    """``ids`` followed by the target's ``n_new`` greedy tokens."""
    cache = target.new_cache(len(ids) + n_new)
    logits = target.forward(torch.tensor(ids), torch.arange(len(ids)), cache, 0)[-1]
    out = list(ids)
    for _ in range(n_new):
        out.append(int(logits.argmax()))
        pos = len(out) - 1
        logits = target.forward(torch.tensor(out[-1:]), torch.tensor([pos]), cache, pos)[0]
    return out


# ------------------------------------------------------------------------------------ agreement
def agreement(target, tok, n_new: int, depths=(1, 2, 4, 8)) -> dict:
    """Top-1 agreement with the target's greedy choice at every position of each held-out text's
    continuation: ``{"own cache": a, "target's cache, depth d": a, ...}``."""
    from specexec_rt.speculative.drafts import default_draft

    own = default_draft(target, share_cache=False)
    shared = default_draft(target)
    texts = [line.strip() for line in HELDOUT.read_text().splitlines() if line.strip()]
    hits = {"own cache": 0, **{f"target's cache, depth {d}": 0 for d in depths}}
    counts = dict.fromkeys(hits, 0)
    k = max(depths)
    for text in texts:
        ids = chat_ids(tok, text)
        seq = greedy_text(target, ids, n_new)
        n, p = len(seq), len(ids)
        cache = target.new_cache(n + k)
        ref = target.forward(torch.tensor(seq), torch.arange(n), cache, 0).argmax(-1)   # ref[t]: token t + 1
        saved_k, saved_v = cache.k.clone(), cache.v.clone()
        mine = own.forward(torch.tensor(seq), torch.arange(n), own.new_cache(n), 0).argmax(-1)
        hits["own cache"] += int((mine[p - 1:n - 1] == ref[p - 1:n - 1]).sum())
        counts["own cache"] += n - p
        # A chain of j + 1 tokens from position t over the target's prefix [0, t): its row j
        # predicts token t + j + 1 with the draft's own K/V for tokens t .. t + j.
        for t in range(p - 1, n - 1):
            m = min(k, n - 1 - t)
            logits = shared.forward(torch.tensor(seq[t:t + m]), torch.arange(t, t + m), cache, t)
            got = logits.argmax(-1)
            for d in depths:
                if d <= m:
                    key = f"target's cache, depth {d}"
                    hits[key] += int(got[d - 1] == ref[t + d - 1])
                    counts[key] += 1
            cache.k[:, t:t + m], cache.v[:, t:t + m] = saved_k[:, t:t + m], saved_v[:, t:t + m]
        print(f"[agreement] {text[:40]!r}: {n - p} tokens", file=sys.stderr, flush=True)
    return {key: (hits[key] / counts[key], counts[key]) for key in hits}


def agreement_lines(rows: dict, n_new: int) -> list:
    lines = ["## Draft agreement: its own cache vs the target's", "",
             f"Default draft (int4 at the GGUF's 32-wide groups, the target's Q8_0 head), top-1 agreement "
             f"with the target's greedy token, teacher forced on the {len(HELDOUT.read_text().split(chr(10)))} "
             f"held-out chat prompts + {n_new} greedy tokens each. Depth d: the draft reads the target's K/V "
             f"of the prefix and its own K/V of the last d - 1 tokens (a node at depth d of a tree).", "",
             "| draft cache | top-1 agreement | positions |", "| --- | ---: | ---: |"]
    lines += [f"| {key} | {a:.3f} | {n} |" for key, (a, n) in rows.items()]
    return lines + [""]


# ------------------------------------------------------------------------------------ main
def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(date=datetime.date.today().isoformat(), commit=commit, cpu=cpu, threads=torch.get_num_threads(),
                load=os.getloadavg() if hasattr(os, "getloadavg") else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="agreement,lookup,auto", help="agreement, lookup, auto (comma-separated)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians)")
    ap.add_argument("--out-md", default=None, help="write a markdown report here")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = set(parts) - {"agreement", "lookup", "auto"}
    if unknown:
        ap.error(f"--part: unknown part(s) {sorted(unknown)}; choose from agreement, lookup, auto")

    from specexec_rt import load_model, load_tokenizer

    meta = machine()
    target = load_model("smollm2-135m", device="cpu", dtype=torch.float32, max_len=4096)
    tok = load_tokenizer(target)
    lines = [f"# Long prompts on the CPU, SmolLM2-135M ({meta['cpu']})", "",
             f"- {meta['date']}, commit {meta['commit']}, torch {torch.__version__}, {meta['threads']} threads, "
             f"load average {meta['load']}.", f"- `python bench/long_prompts.py {' '.join(argv or sys.argv[1:])}`", ""]
    if "agreement" in parts:
        t = time.perf_counter()
        rows = agreement(target, tok, args.new)
        for key, (a, n) in rows.items():
            print(f"{key:32s} top-1 {a:.3f} ({n} positions)", flush=True)
        lines += agreement_lines(rows, args.new)
        print(f"[agreement] {time.perf_counter() - t:.0f}s", file=sys.stderr)
    if args.out_md:
        Path(args.out_md).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out_md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
