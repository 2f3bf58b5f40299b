"""Decode speed after a long prompt against after a short one, on the CPU: SmolLM2-135M, greedy,
per KV cache dtype, side by side in one process (rounds interleaved, medians).

Rows: plain decoding of the float32 target, plain decoding of the target kept 4-bit
(``quantize="int4"``), and ``budget="auto"`` with the default draft, each with each ``--kv-dtypes``;
and llama.cpp on the same GGUF (``llama-cpp-python`` in its own virtualenv, found as bench/cpu_e2e.py
finds it; its own default float16 cache; the row is left out, and the table says so, without it),
asked for as many tokens as the first plain row produced for each prompt (its token loop does not
stop at EOS), so every engine decodes the same count.
Prompts: the long one is a summarisation instruction after the first ``--long`` tokens of
docs/DESIGN.md (a document to summarise); the short one is the document's first 16 tokens, whose
continuation runs past ``--new`` tokens as the summary does (an instruction alone is answered in
~40 tokens, too few to time against the noise of two requests' prefills).

Decode speed excludes the prompt: a request of 1 new token and one of ``--new + 1`` run on the
same engine, and the difference of their wall times is the decode time of the extra tokens
(``new tokens / that time``). "kept" is the long prompt's decode speed over the short prompt's.
The targets this is run against: the int4 target keeps >= 0.65 and plain float32 decoding >= 0.85
after ~1500 prompt tokens (main before the float16 cache: 0.33 and 0.67-0.75), and ``auto`` >=
1.5x plain decoding at the long context. Run it on a quiet machine: the numbers are wall time.

    python bench/long_context_cpu.py [--long 1500] [--new 64] [--rounds 3] [--kv-dtypes float32,float16,int8]
        [--rows plain,int4,auto] [--threads N] [--llama-python PY] [--out-md FILE]
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
sys.path.insert(0, str(ROOT / "bench"))
from attention_long_cpu import read_roofline_gbs  # noqa: E402
INSTRUCTION = "Summarize the text above in three sentences."


def build(row: str, kv_dtype: str, max_len: int):
    from specexec_rt import load_model
    from specexec_rt.speculative.drafts import default_draft
    from specexec_rt.speculative.engine import Engine

    if row == "int4":
        target = load_model("smollm2-135m", device="cpu", quantize="int4", max_len=max_len, kv_dtype=kv_dtype)
        return Engine(target, None, method="autoregressive")
    target = load_model("smollm2-135m", device="cpu", max_len=max_len, kv_dtype=kv_dtype)
    if row == "plain":
        return Engine(target, None, method="autoregressive")
    return Engine(target, default_draft(target), method="specexec", budget="auto")


LLAMA_ROW = ("llama.cpp", "f16 (its default)")


def token_bytes(engine, plain_engine, context: int) -> int:
    """Bytes one decoded token reads at ``context``: the target's layers and LM head as held (the
    embedding table gives one row), plus K and V of ``context`` slots in its cache dtype (no
    engine: llama.cpp, i.e. the GGUF file and a float16 cache of ``plain_engine``'s model)."""
    from specexec_rt.model.kv_cache import kv_bytes_per_slot
    from specexec_rt.model.weights import weights_nbytes

    target = (engine or plain_engine).target
    c = target.config
    if engine is None:
        weights, kv_dtype = Path(target.source.path).stat().st_size, torch.float16
    else:
        w = target.weights
        weights, kv_dtype = weights_nbytes(w.layers) + weights_nbytes(w.lm_head), target.kv_dtype
    return weights + context * kv_bytes_per_slot(c.n_layers, c.n_kv_heads, c.head_dim, kv_dtype)


def start_llama(python_arg, gguf: str, n_ctx: int):
    """(a llama.cpp worker on ``gguf``, a sentence for the table) or (None, why not)."""
    from cpu_e2e import LlamaWorker, llama_python

    py = llama_python(python_arg)
    if py is None:
        return None, "llama.cpp: not run (no virtualenv with llama-cpp-python found)."
    worker = LlamaWorker(py, gguf, torch.get_num_threads(), n_ctx)
    version = subprocess.run([py, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    return worker, f"llama.cpp: llama-cpp-python {version}, {torch.get_num_threads()} threads, same GGUF."


def decode_rate(engine, ids: list, new: int) -> tuple[float, int]:
    """(new tokens per second past the first, tokens past the first); NaN when the difference of
    the two wall times is not positive (noise larger than the decode time: raise ``new``)."""
    t0 = time.perf_counter()
    engine.generate(ids, max_new_tokens=1)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = engine.generate(ids, max_new_tokens=new + 1)
    whole = time.perf_counter() - t0
    extra = len(res.token_ids) - 1
    return (extra / (whole - first) if whole > first else float("nan")), extra


def main(argv=None) -> int:
    from specexec_rt import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--long", type=int, default=1500, help="tokens of docs/DESIGN.md before the instruction")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-dtypes", default="float32,float16,int8")
    p.add_argument("--rows", default="plain,int4,auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--llama-python", default=None, help="python of a virtualenv with llama-cpp-python")
    p.add_argument("--out-md", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = load_tokenizer("smollm2-135m")
    instr = tok("\n\n" + INSTRUCTION).input_ids
    doc = tok((ROOT / "docs/DESIGN.md").read_text()).input_ids[:a.long]
    prompts = {"short": doc[:16], "long": doc + instr}
    max_len = len(prompts["long"]) + a.new + 1100   # room for auto's largest trees
    engines = {(row, kv): build(row, kv, max_len) for row in a.rows.split(",") for kv in a.kv_dtypes.split(",")}
    # Warm-up at both lengths: libraries, packing, the caches allocated on first use, and auto's
    # first fits per context bucket all land here, not in the first long round.
    for eng in engines.values():
        for ids in prompts.values():
            decode_rate(eng, ids, 8)
    first = next(iter(engines.values()))
    llama, llama_note = start_llama(a.llama_python, str(first.target.source.path), max_len)
    counts = {which: decode_rate(first, ids, a.new)[1] + 1 for which, ids in prompts.items()}
    rows = list(engines) + ([LLAMA_ROW] if llama else [])
    rates: dict = {(key, which): [] for key in rows for which in prompts}
    for _ in range(a.rounds):
        for key, eng in engines.items():
            for which, ids in prompts.items():
                rates[(key, which)].append(decode_rate(eng, ids, a.new)[0])
        if llama:
            for which, ids in prompts.items():
                one, whole = llama.run(ids, 1)["seconds"], llama.run(ids, counts[which])["seconds"]
                rates[(LLAMA_ROW, which)].append((counts[which] - 1) / (whole - one) if whole > one else float("nan"))
    if llama:
        llama.close()
    # A round whose two requests' wall times do not differ positively gives NaN; statistics.median
    # does not order NaN, so the median is over the rounds that measured something.
    roof = read_roofline_gbs()
    med = {k: statistics.median([r for r in v if r == r] or [float("nan")]) for k, v in rates.items()}
    dropped = sum(r != r for v in rates.values() for r in v)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    lines = [f"# Decode speed after a {len(prompts['long'])}-token prompt vs a {len(prompts['short'])}-token one "
             f"({datetime.date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, {a.rounds} rounds, "
             f"{a.new} tokens)", "", f"Commit {commit}, torch {torch.__version__}: `python bench/long_context_cpu.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             f"Rounds without a measurement (NaN, left out of the medians): {dropped} of {len(rates) * a.rounds}.", "",
             f"Tokens decoded per request: {counts['short']} after the short prompt, {counts['long']} after the long "
             f"one (the first row's counts; every row decodes as many). {llama_note}", "",
             f"Roofline: a plain multithreaded read of cold memory ran at {roof:.1f} GB/s in this run. \"MB/token\" "
             f"is what one decoded token reads at the long context (layers and LM head as held, plus K and V of the "
             f"mean context while decoding; llama.cpp: its GGUF file and a float16 cache); \"GB/s eq.\" is that times "
             f"the long tok/s: plain decoding's achieved read rate, and for speculative rows the rate plain "
             f"decoding would need to match them.", "",
             "| row | kv_dtype | short tok/s | long tok/s | kept | long / plain same kv | MB/token | GB/s eq. |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    ctx = len(prompts["long"]) + a.new // 2
    for (row, kv) in rows:
        s, lg = med[((row, kv), "short")], med[((row, kv), "long")]
        plain = med.get((("plain", kv), "long"))
        vs = f"{lg / plain:.2f}x" if plain else ""
        per_token = token_bytes(engines.get((row, kv)), first, ctx)
        lines.append(f"| {row} | {kv} | {s:.1f} | {lg:.1f} | {lg / s:.2f} | {vs} | {per_token / 1e6:.0f} | "
                     f"{lg * per_token / 1e9:.1f} |")
    print("\n".join(lines))
    if a.out_md:
        Path(a.out_md).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
