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
def heldout_texts() -> list:
    return [line.strip() for line in HELDOUT.read_text().splitlines() if line.strip()]


def agreement(target, tok, n_new: int, depths=(1, 2, 4, 8)) -> dict:
    """Top-1 agreement with the target's greedy choice at every position of each held-out text's
    continuation: ``{"own cache": a, "target's cache, depth d": a, ...}``."""
    from specexec_rt.speculative.drafts import default_draft

    own = default_draft(target, share_cache=False)
    shared = default_draft(target)
    texts = heldout_texts()
    hits = {"own cache": 0, **{f"target's cache, depth {d}": 0 for d in depths}}
    counts = dict.fromkeys(hits, 0)
    k = max(depths)
    for text in texts:
        ids = chat_ids(tok, text)
        seq = greedy_text(target, ids, n_new)
        n, p = len(seq), len(ids)
        cache = target.new_cache(n + k)
        ref = target.forward(torch.tensor(seq), torch.arange(n), cache, 0).argmax(-1)   # ref[t]: token t + 1
        # K, V and int8's scales: the draft's chain overwrites slots [t, t + m) of each.
        tensors = [x for x in (cache.k, cache.v, cache.k_scale, cache.v_scale) if x is not None]
        saved = [x.clone() for x in tensors]
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
            for x, keep in zip(tensors, saved):
                x[:, t:t + m] = keep[:, t:t + m]
        print(f"[agreement] {text[:40]!r}: {n - p} tokens", file=sys.stderr, flush=True)
    # A depth deeper than every continuation (a short --new) has no positions: NaN.
    return {key: (hits[key] / counts[key] if counts[key] else float("nan"), counts[key]) for key in hits}


def agreement_lines(rows: dict, n_new: int) -> list:
    lines = ["## Draft agreement: its own cache vs the target's", "",
             f"Default draft (int4 at the GGUF's 32-wide groups, the target's Q8_0 head), top-1 agreement "
             f"with the target's greedy token, teacher forced on the {len(heldout_texts())} "
             f"held-out chat prompts + {n_new} greedy tokens each. Depth d: the draft reads the target's K/V "
             f"of the prefix and its own K/V of the last d - 1 tokens (a node at depth d of a tree).", "",
             "| draft cache | top-1 agreement | positions |", "| --- | ---: | ---: |"]
    lines += [f"| {key} | {a:.3f} | {n} |" for key, (a, n) in rows.items()]
    return lines + [""]


# ------------------------------------------------------------------------------------ timing
PROMPTS = ROOT / "bench" / "prompts"
QUESTIONS = [
    "Explain in three sentences why the sky is blue.",
    "What are the main differences between Python lists and tuples?",
    "Give me three tips for a good night's sleep.",
]


def run(engine, ids: list, n_new: int) -> tuple:
    """``(token_ids, seconds, tokens per pass)`` of one greedy request."""
    t = time.perf_counter()
    res = engine.generate(ids, max_new_tokens=n_new)
    return res.token_ids, time.perf_counter() - t, res.stats.tokens_per_pass


def decode_rate(engine, ids: list, n_new: int) -> dict:
    """Decode speed after the prompt: ``(n_new - 1) / (T(n_new) - T(1))``, the prefill (and the
    first token, which every engine decodes alone) taken out; plus the request's tokens per pass."""
    ids_out, seconds, tpp = run(engine, ids, n_new)
    _, first, _ = run(engine, ids, 1)
    # NaN, not a huge rate, when noise exceeds the decode time (raise --new).
    tok_s = (len(ids_out) - 1) / (seconds - first) if seconds > first else float("nan")
    return dict(tokens=ids_out, tok_s=tok_s, tpp=tpp)


def interleaved(engines: dict, prompts: dict, n_new: int, rounds: int) -> dict:
    """``{(engine, prompt): [decode_rate per round]}``, engines interleaved within each round;
    every engine's text is checked against the first engine's (plain decoding)."""
    out, ref = {}, {}
    # Warm-up, untimed: the caches allocated on first use and auto's first fits per context
    # bucket land here, not in round 0.
    for ids in prompts.values():
        for engine in engines.values():
            run(engine, ids, 2)
    for rnd in range(rounds):
        for pname, ids in prompts.items():
            for ename, engine in engines.items():
                r = decode_rate(engine, ids, n_new)
                ref.setdefault(pname, r["tokens"])
                if r["tokens"] != ref[pname]:
                    raise SystemExit(f"{ename} on {pname}: the text differs from plain decoding (a bug)")
                out.setdefault((ename, pname), []).append(r)
                print(f"[round {rnd}] {pname:>10s} {ename:24s} {r['tok_s']:6.1f} tok/s {r['tpp']:5.2f} tok/pass",
                      file=sys.stderr, flush=True)
    return out


def med(rows: list, key: str) -> float:
    return statistics.median(r[key] for r in rows)


# ------------------------------------------------------------------------------------ lookup
def lookup_prompts(tok) -> dict:
    article = (PROMPTS / "summarise-article.txt").read_text().strip()
    code = (PROMPTS / "code-edit.txt").read_text().strip()
    return {"summarise": chat_ids(tok, f"{article}\n\nSummarize the article above in a few sentences."),
            "code edit": chat_ids(tok, f"Here is a Python module:\n\n```python\n{code}\n```\n\nRewrite the whole "
                                       f"module, adding a one-line docstring to every function. Output the complete "
                                       f"code.")}


def lookup_engines(target, budgets: list) -> dict:
    from specexec_rt import Engine, default_draft

    draft = default_draft(target)
    engines = {"plain": Engine(target, None, method="autoregressive")}
    engines["ngram, auto"] = Engine(target, "ngram", budget="auto")
    engines.update({f"ngram b={b}": Engine(target, "ngram", budget=b) for b in budgets})
    engines["draft, auto"] = Engine(target, draft, budget="auto")
    engines.update({f"draft b={b}": Engine(target, draft, budget=b) for b in budgets})
    engines["merged, auto"] = Engine(target, draft, budget="auto", ngram=True)
    engines.update({f"merged b={b}": Engine(target, draft, budget=b, ngram=True) for b in budgets})
    return engines


def lookup_lines(rows: dict, prompts: dict, engines: dict, n_new: int, rounds: int) -> list:
    lines = ["## Prompt lookup: n-gram draft alone, model draft alone, merged", "",
             f"Greedy, {n_new} new tokens, medians of {rounds} interleaved rounds; decode tok/s = "
             f"(new - 1) / (T(new) - T(1)) (the prefill taken out). `ngram`: `draft=\"ngram\"` (no model); `draft`: "
             f"the default draft (reads the target's cache); `merged`: the default draft with `ngram=True` "
             f"(at a fixed budget one tree budget for both; with auto on the CPU, per pass the draft's chain or the "
             f"lookup's trie alone, by the lookup's measured hit rate). Every engine's text equals plain decoding's "
             f"(checked).", ""]
    for pname, ids in prompts.items():
        plain = med(rows[("plain", pname)], "tok_s")
        lines += [f"### {pname} ({len(ids)} prompt tokens)", "", "| engine | tokens/pass | decode tok/s | vs plain |",
                  "| --- | ---: | ---: | ---: |"]
        for ename in engines:
            rs = rows[(ename, pname)]
            lines.append(f"| {ename} | {med(rs, 'tpp'):.2f} | {med(rs, 'tok_s'):.1f} | {med(rs, 'tok_s') / plain:.2f}x |")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------ auto
def long_context(tok, n_tokens: int) -> str:
    """The first ``n_tokens`` tokens of the bench's documents (an article, a module, notes, then
    docs/DESIGN.md: the three alone hold ~1400 tokens)."""
    files = [PROMPTS / name for name in ("summarise-article.txt", "code-edit.txt", "notes-bees.txt")]
    docs = "\n\n".join(f.read_text().strip() for f in files + [ROOT / "docs" / "DESIGN.md"])
    ids = tok(docs).input_ids
    if len(ids) < n_tokens:
        raise SystemExit(f"--long {n_tokens}: the documents hold only {len(ids)} tokens")
    return tok.decode(ids[:n_tokens])


def auto_engines(target) -> dict:
    from specexec_rt import Engine, default_draft

    return {"plain": Engine(target, None, method="autoregressive"),
            "auto (draft reads the target's cache)": Engine(target, default_draft(target), budget="auto"),
            "auto (draft's own cache)": Engine(target, default_draft(target, share_cache=False), budget="auto"),
            "auto + ngram": Engine(target, default_draft(target), budget="auto", ngram=True)}


def auto_lines(rows: dict, engines: dict, n_new: int, rounds: int, n_long: int, lens: dict) -> list:
    plain = {c: med([r for q in range(len(QUESTIONS)) for r in rows[("plain", f"{c} {q}")]], "tok_s")
             for c in ("short", "long")}
    lines = ["## Decode speed after a short and after a long prompt", "",
             f"Greedy, the {len(QUESTIONS)} questions of bench/cpu_e2e.py alone (short: {lens['short']} prompt "
             f"tokens on average) and after {n_long} tokens of documents (long: {lens['long']}), {n_new} new tokens, "
             f"medians over questions x {rounds} interleaved rounds; decode tok/s = (new - 1) / (T(new) - T(1)).", "",
             "| engine | short tok/s | long tok/s | kept | vs plain, short | vs plain, long | tokens/pass short / long |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for ename in engines:
        got = {c: [r for q in range(len(QUESTIONS)) for r in rows[(ename, f"{c} {q}")]] for c in ("short", "long")}
        s, lg = med(got["short"], "tok_s"), med(got["long"], "tok_s")
        lines.append(f"| {ename} | {s:.1f} | {lg:.1f} | {lg / s:.2f} | {s / plain['short']:.2f}x | "
                     f"{lg / plain['long']:.2f}x | {med(got['short'], 'tpp'):.2f} / {med(got['long'], 'tpp'):.2f} |")
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
    ap.add_argument("--budgets", default="4,8,16", help="lookup: fixed budgets compared (comma-separated)")
    ap.add_argument("--long", type=int, default=1500, help="auto: tokens of documents before the question")
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
    if "lookup" in parts:
        prompts = lookup_prompts(tok)
        engines = lookup_engines(target, [int(b) for b in args.budgets.split(",")])
        rows = interleaved(engines, prompts, args.new, args.rounds)
        lines += lookup_lines(rows, prompts, engines, args.new, args.rounds)
    if "auto" in parts:
        docs = long_context(tok, args.long)
        prompts = {}
        for q, question in enumerate(QUESTIONS):
            prompts[f"short {q}"] = chat_ids(tok, question)
            prompts[f"long {q}"] = chat_ids(tok, f"{docs}\n\nQuestion: {question}")
        lens = {c: sum(len(v) for k, v in prompts.items() if k.startswith(c)) // len(QUESTIONS)
                for c in ("short", "long")}
        engines = auto_engines(target)
        rows = interleaved(engines, prompts, args.new, args.rounds)
        lines += auto_lines(rows, engines, args.new, args.rounds, args.long, lens)
    print("\n".join(lines))
    if args.out_md:
        Path(args.out_md).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out_md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
