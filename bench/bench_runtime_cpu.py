"""Decode and prefill speed of our runtime vs HF transformers on the real SmolLM2-135M (CPU).

Both run side by side in one process, same weights (the GGUF dequantized to float32), same
threads. Decode: greedy, one token per forward, tokens/s over ``--new`` tokens after a short
prompt. Prefill: tokens/s over a ``--prefill`` token prompt.

    python bench/bench_runtime_cpu.py [--new 128] [--prefill 512] [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def our_decode(model, prompt: torch.Tensor, n_new: int) -> float:
    logits = model.prefill(prompt)
    token = logits.argmax().view(1)
    pos = prompt.shape[0]
    t0 = time.perf_counter()
    for i in range(n_new):
        logits = model.forward(token, torch.tensor([pos + i]), model.cache, pos + i)
        token = logits[0].argmax().view(1)   # stays a tensor: no host sync per token
    return n_new / (time.perf_counter() - t0)


def our_prefill(model, prompt: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model.prefill(prompt)
    return prompt.shape[0] / (time.perf_counter() - t0)


def hf_decode(hf, prompt: torch.Tensor, n_new: int) -> float:
    ids = prompt[None]
    with torch.no_grad():
        # generate's own prefill is timed apart and subtracted, so both sides time decode only.
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n_new + 1, min_new_tokens=n_new + 1, do_sample=False, pad_token_id=0)
        return n_new / (time.perf_counter() - t0 - t_prefill)


def hf_prefill(hf, prompt: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        hf(prompt[None], logits_to_keep=1)
        return prompt.shape[0] / (time.perf_counter() - t0)


def run(n_new: int = 128, n_prefill: int = 512, repeats: int = 3) -> list[dict]:
    import transformers

    from specexec_rt import load_model

    model = load_model("smollm2-135m", device="cpu", dtype=torch.float32, max_len=n_prefill + n_new + 8)
    path = model.source.path
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    short = torch.randint(100, 40000, (16,), generator=g)
    long = torch.randint(100, 40000, (n_prefill,), generator=g)
    our_decode(model, short, 8), hf_decode(hf, short, 8)  # warm-up
    rows = []
    for name, ours_fn, hf_fn in [
        (f"decode ({n_new} tokens)", lambda: our_decode(model, short, n_new), lambda: hf_decode(hf, short, n_new)),
        (f"prefill ({n_prefill} tokens)", lambda: our_prefill(model, long), lambda: hf_prefill(hf, long)),
    ]:
        ours = statistics.median(ours_fn() for _ in range(repeats))
        theirs = statistics.median(hf_fn() for _ in range(repeats))
        rows.append({"case": name, "ours_tok_s": ours, "hf_tok_s": theirs, "ratio": ours / theirs})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = run(args.new, args.prefill, args.repeats)
    print(f"SmolLM2-135M float32 on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| case | specexec-rt tok/s | HF transformers tok/s | ratio |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} | {r['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
