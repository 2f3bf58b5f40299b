"""What a lower-precision KV cache does to the target's own numbers: teacher-forced top-1 agreement
of SmolLM2-135M with each ``kv_dtype`` against the same model with a float32 cache.

The output of speculative decoding is always the target's own (the target verifies with its own
cache); but the target itself is a slightly different function with a float16 / bfloat16 / int8
cache. Measured here: the float32-cache target's greedy continuation of each held-out prompt
(``bench/prompts/heldout-chat.txt``, chat template applied), then prompt + continuation teacher
forced through the model with each cache dtype; at every continuation position, whether its
argmax equals the float32 cache's (top-1 agreement), and the largest logit difference. With
``--context N`` the prompts are preceded by the first N tokens of docs/DESIGN.md, so the
positions read a long cache (what long prompts meet).

llama.cpp keeps its cache in float16 by default (``--cache-type-k/v f16``), so the float16 row is
the analogue of llama.cpp's default against an f32 cache.

    python bench/kv_agreement.py [--new 128] [--context 0,1500] [--dtypes float16,bfloat16,int8] [--out-md FILE]
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def prompts(tok, context: int) -> list:
    """Token ids of each held-out chat prompt, after ``context`` tokens of docs/DESIGN.md."""
    lines = [ln.strip() for ln in (ROOT / "bench/prompts/heldout-chat.txt").read_text().splitlines() if ln.strip()]
    doc = tok((ROOT / "docs/DESIGN.md").read_text()).input_ids[:context] if context else []
    out = []
    for q in lines:
        chat = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        out.append(doc + tok(chat).input_ids)
    return out


def continuation(model, ids: list, n: int) -> list:
    """The model's greedy continuation (its own cache dtype)."""
    from specexec_rt.speculative.engine import Engine

    return Engine(model, None, method="autoregressive").generate(ids, max_new_tokens=n).token_ids


def teacher_forced(model, ids: list, cont: list, kv_dtype) -> torch.Tensor:
    """Logits ``[len(cont), vocab]`` at the continuation's positions, prompt + continuation in one
    forward through a cache of ``kv_dtype``."""
    seq = torch.tensor(ids + cont)
    cache = model.new_cache(max_len=len(seq) + 1, kv_dtype=kv_dtype)
    rows = torch.arange(len(ids) - 1, len(seq) - 1)
    return model.forward(seq, torch.arange(len(seq)), cache, 0, logits_rows=rows)


def main(argv=None) -> int:
    from specexec_rt import load_model, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--context", default="0,1500", help="tokens of docs/DESIGN.md before each prompt (comma list)")
    p.add_argument("--dtypes", default="float16,bfloat16,int8")
    p.add_argument("--out-md", default=None)
    a = p.parse_args(argv)
    model = load_model("smollm2-135m", device="cpu", max_len=8192, kv_dtype="float32")
    tok = load_tokenizer("smollm2-135m")
    dtypes = a.dtypes.split(",")
    lines = [f"# Teacher-forced top-1 agreement with a float32 KV cache ({datetime.date.today()})", "",
             f"SmolLM2-135M (GGUF Q4_1, float32 compute), {len(prompts(tok, 0))} held-out chat prompts x {a.new} "
             "greedy tokens of the float32-cache model, teacher forced with each cache dtype.", "",
             "| context tokens | kv_dtype | positions | top-1 agreement | max abs logit diff |", "|---:|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for context in map(int, a.context.split(",")):
        ps = prompts(tok, context)
        conts = [continuation(model, ids, a.new) for ids in ps]
        ref = [teacher_forced(model, ids, c, torch.float32) for ids, c in zip(ps, conts)]
        for name in dtypes:
            agree = total = 0
            worst = 0.0
            for ids, c, r in zip(ps, conts, ref):
                got = teacher_forced(model, ids, c, name)
                agree += int((got.argmax(-1) == r.argmax(-1)).sum())
                total += len(c)
                worst = max(worst, float((got - r).abs().max()))
            line = f"| {context} | {name} | {total} | {agree / total:.4f} | {worst:.3g} |"
            print(line, flush=True)
            lines.append(line)
    if a.out_md:
        Path(a.out_md).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
