"""End to end on the CPU, side by side with what CPU users run: SmolLM2-135M, three chat prompts,
greedy (or sampled: ``--temperature``), one process, interleaved rounds, medians.

Rows (tokens/s of generated tokens, prompt prefill included, as a user sees it):
- HF transformers ``generate`` (float32, the GGUF dequantized), HF prompt-lookup decoding
  (``prompt_lookup_num_tokens=10``) and HF assisted generation (assistant: the same model with
  its linear layers dynamically quantized to int8, the closest HF analogue of our int4 draft);
- ours: autoregressive (float32), ``budget="auto"``, SpecExec at fixed budgets, chain k=4, all
  with the default draft (the target re-quantized at its GGUF's own 32-wide blocks, so its layers
  are this Q4_1 target's weights, sharing the target's Q8_0 head; ``--draft-groups G`` adds auto
  with the int4 draft at other group sizes, ``--previous-default`` auto with the default draft
  before 2026-12-01: group 64, head re-quantized to int4); and our autoregressive decoding of a target kept 4-bit
  (``quantize="int4"``: the GGUF's Q4_1 tensors stay packed);
- llama.cpp on the same GGUF through ``llama-cpp-python`` (2 threads), run in its own
  virtualenv (it builds llama.cpp from source, so it is never a dependency of ours): the
  bench uses ``--llama-python`` (or ``$SPECEXEC_LLAMA_PYTHON``, or ``.llama-venv/bin/python``)
  and says so when none is found.

Every engine gets the same prompt token ids (llama.cpp too: its worker evaluates ids, it does not
tokenize the chat text) and generates exactly as many new tokens as our autoregressive
decoding did for that prompt and seed (``--new``, or fewer where it stopped at EOS): HF is held
to that count with ``min_new_tokens``, llama.cpp's token loop stops there, ours stop at the same
EOS when their text is the same. Every one of our outputs is checked against our autoregressive
output (lossless; sampled too: every pass draws position t's token from the seed and t alone);
HF's and llama.cpp's outputs are compared with it and mismatches counted and shown (the first
differing token, decoded), not failed (different kernels; llama.cpp different weights).
Sampled, the rows ``specexec b=B, uncoupled`` (trees grown from the draft's probabilities
alone) and ``chain k=K, rejection sampling`` (drafts drawn independently, verified by
rejection sampling: another text from the same distribution) show what coupling buys.

    python bench/cpu_e2e.py [--new 96] [--rounds 3] [--budgets 4,16,64] [--chains 4] [--out-md ...] [--out-png ...]
    python bench/cpu_e2e.py --temperature 0.7 --top-p 0.9 ...   # sampled: every engine, one seed per round and prompt
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
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
    "What are the main differences between Python lists and tuples?",
    "Give me three tips for a good night's sleep.",
]

# Runs inside the llama-cpp-python virtualenv: JSON lines in (prompt token ids, n), JSON lines
# out (the n generated token ids, and the request's seconds, its prefill included). The token
# loop evaluates our ids and stops after exactly n tokens (EOS does not stop it: the count is
# the one our autoregressive decoding produced).
LLAMA_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[3]) if len(sys.argv) > 3 else 1024, n_threads=int(sys.argv[2]),
            verbose=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t = req.get("temperature", 0.0)
    if t > 0:
        llm.set_seed(req["seed"])
        sampling = dict(temp=t, top_p=req["top_p"], top_k=0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
    else:
        sampling = dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
    out = []
    # generate() would keep the KV of the longest common prefix with the last request and skip
    # its prefill; ours prefill every request, so llama.cpp starts from an empty cache too.
    llm.reset()
    t0 = time.perf_counter()
    if req["n"] > 0:
        for tok in llm.generate(req["ids"], reset=True, **sampling):
            out.append(int(tok))
            if len(out) == req["n"]:
                break
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "ids": out}), flush=True)
"""


def llama_python(arg):
    for cand in (arg, os.environ.get("SPECEXEC_LLAMA_PYTHON"), str(ROOT / ".llama-venv" / "bin" / "python")):
        if cand and Path(cand).is_file():
            ok = subprocess.run([cand, "-c", "import llama_cpp"], capture_output=True).returncode == 0
            if ok:
                return cand
            print(f"[cpu_e2e] {cand} cannot import llama_cpp; llama.cpp rows skipped", file=sys.stderr)
    return None


class LlamaWorker:
    def __init__(self, python: str, gguf: str, threads: int, n_ctx: int = 1024):
        self.proc = subprocess.Popen([python, "-c", LLAMA_WORKER, gguf, str(threads), str(n_ctx)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        json.loads(self.proc.stdout.readline())

    def run(self, ids: list, n: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> dict:
        self.proc.stdin.write(json.dumps({"ids": list(ids), "n": n, "temperature": temperature, "top_p": top_p,
                                          "seed": seed}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budgets", default="4,16,64")
    ap.add_argument("--chains", default="4", help="chain lengths k (comma-separated)")
    ap.add_argument("--draft-groups", default="",
                    help="also run budget=auto with the built-in int4 draft at these group sizes (e.g. 32: "
                         "the GGUF's own Q4_1 blocks, so that draft reproduces this target's weights)")
    ap.add_argument("--previous-default", action="store_true",
                    help="also run budget=auto with the default draft before 2026-12-01 (group 64 whatever the "
                         "file's blocks, LM head re-quantized to int4), side by side with today's")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (0: greedy); every engine, the same seed per round and prompt")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--llama-python", default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF rows (quicker)")
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--out-png", default=None)
    args = ap.parse_args()
    threads = torch.get_num_threads()

    import transformers

    from specexec_rt import Engine, default_draft, load_model, load_tokenizer

    target = load_model("smollm2-135m", device="cpu", dtype=torch.float32, max_len=1024)
    target4 = load_model("smollm2-135m", device="cpu", dtype=torch.float32, max_len=1024, quantize="int4")
    draft = default_draft(target)
    tok = load_tokenizer(target)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    prompt_ids = [tok(p).input_ids for p in prompts]
    gguf = str(target.source.path)

    runners: dict = {}
    ours = {"ours autoregressive": Engine(target, method="autoregressive", tokenizer=tok),
            "ours autoregressive, int4 target": Engine(target4, method="autoregressive", tokenizer=tok),
            "ours budget=auto": Engine(target, draft, budget="auto", tokenizer=tok)}
    for g in (int(x) for x in args.draft_groups.split(",") if x):
        from specexec_rt.speculative.drafts import builtin_draft

        ours[f"ours budget=auto, int4:{g} draft"] = Engine(target, builtin_draft(target, f"int4:{g}"), budget="auto",
                                                           tokenizer=tok)
    if args.previous_default:
        from specexec_rt.speculative.drafts import int4_draft

        ours["ours budget=auto, previous default draft (int4:64, int4 head)"] = Engine(
            target, int4_draft(target, group_size=64, lm_head_int4=True), budget="auto", tokenizer=tok)
    sampled = args.temperature > 0
    for b in (int(x) for x in args.budgets.split(",") if x):
        ours[f"ours specexec b={b}"] = Engine(target, draft, budget=b, tokenizer=tok)
        if sampled:     # the tree grown from the draft's probabilities alone, as before coupling
            ours[f"ours specexec b={b}, uncoupled"] = Engine(target, draft, budget=b, coupled=False, tokenizer=tok)
    for k in [int(v) for v in args.chains.split(",") if v]:
        ours[f"ours chain k={k}"] = Engine(target, draft, method="chain", budget=k, tokenizer=tok)
        if sampled:
            ours[f"ours chain k={k}, rejection sampling"] = Engine(target, draft, method="chain", budget=k,
                                                                   coupled=False, tokenizer=tok)
    sampling = dict(temperature=args.temperature, top_p=args.top_p)
    # Every runner: (prompt index, seed, new tokens) -> (token ids, seconds, stats or None).
    for name, eng in ours.items():
        def run_ours(i, seed, n, eng=eng):
            t0 = time.perf_counter()
            res = eng.generate(prompt_ids[i], n, seed=seed, **sampling)
            return res.token_ids, time.perf_counter() - t0, res.stats
        runners[name] = run_ours

    if not args.no_hf:
        path = target.source.path
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
        assistant = torch.ao.quantization.quantize_dynamic(
            transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval(),
            {torch.nn.Linear}, dtype=torch.qint8)
        eos = tok.eos_token_id

        def hf_run(i, seed, n, **kw):
            ids = torch.tensor([prompt_ids[i]])
            if sampled:
                torch.manual_seed(seed)
                kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
            else:
                kw.update(do_sample=False)
            with torch.no_grad():
                t0 = time.perf_counter()
                # Exactly n tokens: n is where our text stopped (EOS or --new); HF wanting EOS
                # earlier means its text already differs from ours.
                out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, pad_token_id=eos, **kw)
                dt = time.perf_counter() - t0
            return out[0, ids.shape[1]:].tolist(), dt, None

        runners["HF generate"] = hf_run
        runners["HF prompt lookup"] = lambda i, seed, n: hf_run(i, seed, n, prompt_lookup_num_tokens=10)
        runners["HF assisted (int8 assistant)"] = lambda i, seed, n: hf_run(i, seed, n, assistant_model=assistant)

    llama = None
    lp = llama_python(args.llama_python)
    if lp:
        llama = LlamaWorker(lp, gguf, threads)

        def llama_run(i, seed, n):
            r = llama.run(prompt_ids[i], n, args.temperature, args.top_p, seed)
            return r["ids"], r["seconds"], None
        runners["llama.cpp (llama-cpp-python)"] = llama_run
    else:
        print("[cpu_e2e] llama-cpp-python not found (pass --llama-python or set SPECEXEC_LLAMA_PYTHON); "
              "llama.cpp rows skipped", file=sys.stderr)

    ref = "ours autoregressive"       # first runner: its output fixes every other runner's count
    assert next(iter(runners)) == ref

    def one_round(seed_of, indices=range(len(prompts))):
        """Every runner on these prompts; the reference first, the others held to its count."""
        got = {}
        for i in indices:
            ref_out = runners[ref](i, seed_of(i), args.new)
            got[(ref, i)] = ref_out
            for name, fn in runners.items():
                if name != ref:
                    got[(name, i)] = fn(i, seed_of(i), len(ref_out[0]))
        return got

    one_round(lambda i: 0, [0])      # warm-up
    samples = {name: [[] for _ in prompts] for name in runners}
    outputs: dict = {}          # (engine, prompt) -> (reference ids, ids): the last round's
    for rnd in range(args.rounds):
        got = one_round(lambda i: 1000 * rnd + i)
        for (name, i), (out, dt, extra) in got.items():
            samples[name][i].append((len(out) / dt, extra, len(out)))
            outputs[(name, i)] = (got[(ref, i)][0], list(out))
        for i in range(len(prompts)):
            print(f"[cpu_e2e] round {rnd} prompt {i}: " + ", ".join(
                f"{k} {samples[k][i][-1][0]:.1f}" for k in runners), file=sys.stderr, flush=True)
    if llama:
        llama.close()

    rows, differences = [], []
    for name in runners:
        per_prompt = [statistics.median(s[0] for s in samples[name][i]) for i in range(len(prompts))]
        ratios = [per_prompt[i] / statistics.median(s[0] for s in samples[ref][i]) for i in range(len(prompts))]
        differs = [i for i in range(len(prompts)) if outputs[(name, i)][0] != outputs[(name, i)][1]]
        for i in differs:
            want, out = outputs[(name, i)]
            k = next((j for j, (a, b) in enumerate(zip(want, out)) if a != b), min(len(want), len(out)))
            differences.append(f"- {name}, prompt {i}: first difference at new token {k} of {len(want)}: ours "
                               f"{tok.decode(want[k:k + 8])!r}..., this engine {tok.decode(out[k:k + 8])!r}...")
        stats = [s[1] for i in range(len(prompts)) for s in samples[name][i] if hasattr(s[1], "tokens_per_pass")]
        tpp = statistics.median(s.tokens_per_pass for s in stats) if stats else None
        rows.append(dict(name=name, tok_s=statistics.median(per_prompt), per_prompt=per_prompt,
                         vs_ours_ar=statistics.median(ratios), min_vs_ours_ar=min(ratios), tokens_per_pass=tpp,
                         new_tokens="/".join(str(samples[name][i][-1][2]) for i in range(len(prompts))),
                         mismatches=len(differs)))
        # Every walk-verified engine (plain, coupled chains, SpecExec trees, auto) gives our
        # autoregressive text, sampled too (the seed fixes it); rejection sampling draws another
        # text from the same distribution.
        if name.startswith("ours") and differs and "int4 target" not in name and "rejection" not in name:
            raise AssertionError(f"{name}: output differs from our autoregressive output")
    # Roofline: weight bytes read per token by our float32 autoregressive decoding, as stored
    # (float32 layers; the LM head as loaded: the GGUF's Q8_0 kept 8-bit on the CPU).
    from specexec_rt.model.weights import weights_nbytes

    fp32_bytes = sum(weights_nbytes(lw) for lw in target.weights.layers) + weights_nbytes(target.weights.lm_head)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = ["# CPU end to end: SmolLM2-135M, ours vs what CPU users run", "",
             f"{datetime.date.today()}, commit {commit}, {cpu}, {threads} threads, torch {torch.__version__}; "
             f"{f'sampled (temperature {args.temperature}, top-p {args.top_p}, seed per round and prompt)' if sampled else 'greedy'}, "
             f"{args.new} new tokens, {len(prompts)} chat prompts, medians of {args.rounds} interleaved "
             f"rounds (per prompt, then the median over prompts). Roofline: our float32 autoregressive decoding reads "
             f"{fp32_bytes / 1e6:.0f} MB of weights per token (float32 layers, the Q8_0 LM head as stored); the GB/s "
             "column is tokens/s times that (an equivalent for the other rows, not their own traffic). Every engine got "
             "the same prompt token ids and generated the new-token count of our autoregressive output for the prompt "
             "and seed (last round's counts per prompt shown)." + ("" if lp else " llama.cpp: not installed, skipped."),
             "", "| engine | tok/s | vs ours autoregressive (median / worst prompt) | tokens per pass | "
             f"weight GB/s equivalent | new tokens per prompt | {'output' if sampled else 'greedy output'} differs from "
             "ours autoregressive (prompts) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tpp = f"{r['tokens_per_pass']:.2f}" if r["tokens_per_pass"] else ""
        lines.append(f"| {r['name']} | {r['tok_s']:.1f} | {r['vs_ours_ar']:.2f}x / {r['min_vs_ours_ar']:.2f}x | {tpp} | "
                     f"{r['tok_s'] * fp32_bytes / 1e9:.1f} | {r['new_tokens']} | {r['mismatches']} |")
    if differences:
        lines += ["", "Outputs that differ from ours autoregressive (last round):", ""] + differences
    text = "\n".join(lines) + "\n"
    print(text)
    stem = ROOT / "bench" / "results" / f"{datetime.date.today()}-cpu-e2e"
    Path(args.out_md or f"{stem}.md").write_text(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
        names = [r["name"] for r in rows]
        ax.barh(names, [r["tok_s"] for r in rows], color=["C0" if n.startswith("ours") else "C7" for n in names])
        ax.invert_yaxis()
        ax.set_xlabel(f"tokens/s ({f'T={args.temperature}, top-p {args.top_p}' if sampled else 'greedy'}, SmolLM2-135M, CPU)")
        ax.set_title(f"{cpu}, {threads} threads")
        fig.tight_layout()
        # Beside the markdown unless told otherwise (a --out-md elsewhere must not overwrite the default plot).
        png = args.out_png or (str(Path(args.out_md).with_suffix(".png")) if args.out_md else f"{stem}.png")
        fig.savefig(png, dpi=110)
    except ImportError:
        print("[cpu_e2e] matplotlib missing: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
