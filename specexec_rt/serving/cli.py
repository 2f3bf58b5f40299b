"""The ``specexec-rt`` command: generate, serve, profile-offload, tune-int4."""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import SpecExecError
from ..offload import profile
from . import tune_int4

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def parse_budget(text: str):
    """``--budget``: 'auto' or a positive int, checked before any model loads."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'auto', got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every subcommand that loads models."""
    p.add_argument("--model", "--target", dest="model", default="smollm2-135m",
                   help="target model: HF directory, .gguf file, hub id in the local HF cache, or alias "
                        "(default: smollm2-135m)")
    p.add_argument("--draft", default=None,
                   help="draft model source, or 'default' for the built-in draft derived from the target; "
                        "omit for autoregressive decoding")
    p.add_argument("--method", default=None, choices=["autoregressive", "chain", "specinfer", "specexec"],
                   help="decoding method (default: specexec with a draft, autoregressive without)")
    p.add_argument("--budget", default=None, type=parse_budget,
                   help="draft tokens per pass: an int, or 'auto' (specexec only; sized before every pass "
                        "from measured costs). Default: auto for specexec, 256 for chain/specinfer")
    p.add_argument("--beams-per-step", type=int, default=None, help="specexec: nodes expanded per draft step")
    p.add_argument("--branch-width", type=int, default=None, help="specexec: children per expanded node")
    p.add_argument("--max-depth", type=int, default=None, help="specexec: maximum tree depth")
    p.add_argument("--tree", default=None, choices=["calibrated", "softmax", "sequoia"],
                   help="specexec tree policy: calibrated (default: ranked by acceptance learned from "
                        "verification), softmax (by the draft's probability), sequoia (optimal static tree)")
    p.add_argument("--k", type=int, default=None, help="chain: draft tokens per pass")
    p.add_argument("--n", type=int, default=None, help="specinfer: root candidates")
    p.add_argument("--depth", type=int, default=None, help="specinfer: chain length per candidate")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights/activations dtype")
    p.add_argument("--max-len", type=int, default=None, help="KV cache length (default: min(context, 4096))")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int4"],
                   help="auto keeps 4-bit checkpoints 4-bit on CUDA; int4 also quantizes dense ones")
    p.add_argument("--offload", action="store_true", help="stream the target's layers from pinned host RAM")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU memory the offloaded target may use")


def build_engine(args):
    """Load target (and draft) and make an Engine from parsed CLI flags."""
    import torch

    from ..loading import load_model
    from ..speculative.engine import Engine

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    t0 = time.perf_counter()
    target = load_model(args.model, device=args.device, dtype=dtype, max_len=args.max_len,
                        quantize=args.quantize, offload=args.offload, gpu_memory_gb=args.gpu_memory_gb)
    draft = None
    if args.draft == "default":
        from ..speculative.drafts import default_draft

        draft = default_draft(target)
    elif args.draft:
        draft = load_model(args.draft, device=target.device, dtype=target.dtype, max_len=target.max_len,
                           quantize=args.quantize)
    method = args.method or ("specexec" if draft is not None else "autoregressive")
    params = {k: getattr(args, k) for k in ("beams_per_step", "branch_width", "max_depth", "tree", "k", "n", "depth")
              if getattr(args, k) is not None}
    budget = args.budget if args.budget is not None else ("auto" if method == "specexec" else 256)
    engine = Engine(target, draft, method=method, budget=budget, **params)
    print(f"[specexec-rt] loaded {args.model}" + (f" + draft {args.draft}" if draft is not None else "")
          + f" on {target.device} in {time.perf_counter() - t0:.1f}s; method={method}"
          + (f" budget={budget}" if method != "autoregressive" else ""), file=sys.stderr)
    return engine


def cmd_generate(args) -> int:
    engine = build_engine(args)
    prompt = args.prompt
    if not args.raw:
        prompt = engine.apply_chat_template([{"role": "user", "content": prompt}])
    t0 = time.perf_counter()
    result = None
    for piece in engine.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    result = engine.last_result
    elapsed = time.perf_counter() - t0
    sys.stdout.write("\n")
    s = result.stats
    n = len(result.token_ids)
    print(f"[specexec-rt] {n} tokens, {s.target_passes} target passes, {s.tokens_per_pass:.2f} tokens/pass, "
          f"{n / elapsed:.1f} tok/s (draft {s.draft_seconds:.2f}s, target {s.target_seconds:.2f}s)",
          file=sys.stderr)
    return 0


def add_serve_parser(subparsers) -> None:
    from .server import DEFAULT_MAX_QUEUE

    p = subparsers.add_parser("serve", help="serve the engine over an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 request")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for the engine; beyond it: 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--served-model-name", default=None,
                   help="model id reported by /v1/models (default: the --model argument)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .server import make_server

    if args.max_queue < 0:
        raise SystemExit("specexec-rt serve: --max-queue must be >= 0")
    engine = build_engine(args)
    name = args.served_model_name or str(args.model)
    server = make_server(engine, args.host, args.port, api_key=args.api_key, max_queue=args.max_queue,
                         model_name=name, verbose=args.verbose)
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"[specexec-rt] warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"[specexec-rt] serving {name!r} on http://{host}:{port}/v1 (Ctrl-C to stop)", file=sys.stderr)
    import signal

    def _terminate(signum, frame):
        raise KeyboardInterrupt     # SIGTERM (service managers, docker stop) shuts down like Ctrl-C

    signal.signal(signal.SIGTERM, _terminate)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("[specexec-rt] shutting down: the request in flight stops at its next pass", file=sys.stderr)
        idle = server.close(timeout=10.0)
        if not idle:
            print("[specexec-rt] the engine did not go idle within 10 s; exiting anyway", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="specexec-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=cmd_generate)

    add_serve_parser(sub)
    profile.add_parser(sub)
    tune_int4.add_parser(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SpecExecError as e:
        print(f"specexec-rt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
