"""The ``specexec-rt`` command: generate, serve, profile-offload, tune-int4.

Every argument is checked before any model loads (``cli_checks``), and no error prints a
traceback: a known one (``SpecExecError``, a bad flag) prints one ``specexec-rt: error: ...``
line and exits 2, an unexpected one prints a short line saying how to see the traceback
(``SPECEXEC_DEBUG=1``) and exits 1, Ctrl-C exits 130 (``error_map``).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from ..errors import SpecExecError
from ..speculative.methods import METHODS
from ..speculative.tree_policy import POLICIES
from . import cli_checks
from .cli_checks import non_negative_int, parse_budget, port_number, positive_float, positive_int
from .error_map import EXIT_INTERRUPTED, EXIT_OK, UsageError, report_cli_error
from .worker import DEFAULT_MAX_QUEUE

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
EXIT_BROKEN_PIPE = 141          # what a shell reports for a process killed by SIGPIPE


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every subcommand that loads models."""
    p.add_argument("--model", "--target", dest="model", default="smollm2-135m",
                   help="target model: HF directory, .gguf file, hub id in the local HF cache, or alias "
                        "(default: smollm2-135m)")
    p.add_argument("--draft", default=None,
                   help="draft model source, or a built-in draft derived from the target: 'default' (its "
                        "layers re-quantized to int4 at the checkpoint's own 4-bit group, 32 for a GGUF "
                        "Q4_0/Q4_1/Q4_K, else 64), or 'int4:G' (groups of G = 32, 64, 128 or 256). Omit for "
                        "autoregressive decoding")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help="decoding method (default: specexec with a draft, autoregressive without)")
    p.add_argument("--budget", default=None, type=parse_budget,
                   help="draft tokens per pass: an int, or 'auto' (specexec only; sized before every pass "
                        "from measured costs). Default: auto for specexec, 256 for chain/specinfer")
    p.add_argument("--beams-per-step", type=positive_int, default=None, help="specexec: nodes expanded per draft step")
    p.add_argument("--branch-width", type=positive_int, default=None, help="specexec: children per expanded node")
    p.add_argument("--max-depth", type=positive_int, default=None, help="specexec: maximum tree depth")
    p.add_argument("--tree", default=None, choices=list(POLICIES),
                   help="specexec tree policy: calibrated (default: ranked by acceptance learned from "
                        "verification), softmax (by the draft's probability), sequoia (optimal static tree)")
    p.add_argument("--k", type=positive_int, default=None, help="chain: draft tokens per pass")
    p.add_argument("--n", type=positive_int, default=None, help="specinfer: root candidates")
    p.add_argument("--depth", type=positive_int, default=None, help="specinfer: chain length per candidate")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights/activations dtype")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="the target's KV cache length (default: min(context, 4096)); the draft gets the same, "
                        "or its own context if shorter")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int4"],
                   help="auto keeps 4-bit checkpoints 4-bit on CUDA; int4 also quantizes dense ones")
    p.add_argument("--offload", action="store_true", help="stream the target's layers from pinned host RAM")
    p.add_argument("--gpu-memory-gb", type=positive_float, default=None,
                   help="GPU memory the offloaded target may use")


def build_engine(args):
    """Load the target (and the draft) and make an Engine from parsed flags (checked first)."""
    import torch

    from ..loading import load_model, resolve_source
    from ..speculative.drafts import builtin_draft, builtin_draft_group
    from ..speculative.engine import Engine

    plan = cli_checks.check_model_args(args)

    # Both sources first: a draft path with a typo fails before the target spends time loading.
    target_src = resolve_source(args.model)
    builtin = args.draft is not None and builtin_draft_group(args.draft) is not None
    draft_src = resolve_source(args.draft) if args.draft and not builtin else None
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    t0 = time.perf_counter()
    target = _load(load_model, target_src, "--max-len", device=plan.device, dtype=dtype, max_len=args.max_len,
                   quantize=args.quantize, offload=args.offload, gpu_memory_gb=args.gpu_memory_gb)
    draft = None
    if builtin:
        draft = builtin_draft(target, args.draft)
    elif draft_src is not None:
        # The target's max_len or the draft's own context if shorter: a draft with a shorter
        # context still loads, and the engine's context and vocabulary checks decide what fits.
        draft = _load(load_model, draft_src, "--draft", device=target.device, dtype=target.dtype,
                      max_len_cap=target.max_len, quantize=args.quantize)
    engine = Engine(target, draft, method=plan.method, budget=plan.budget,
                    max_batch=getattr(args, "max_batch", 1), **plan.method_params)
    print(f"[specexec-rt] loaded {args.model}" + (f" + draft {args.draft}" if draft is not None else "")
          + f" on {target.device} in {time.perf_counter() - t0:.1f}s; method={plan.method}"
          + (f" budget={plan.budget}" if draft is not None else ""), file=sys.stderr)
    return engine


def _load(load_model, source, flag: str, **kwargs):
    """load_model, with its plain ValueErrors (the flags are checked, so what is left is a
    max_len beyond the model's context) named as the usage errors they are."""
    try:
        return load_model(source, **kwargs)
    except ValueError as e:
        if isinstance(e, SpecExecError):
            raise
        raise UsageError(f"{flag}: {e} ({source})") from e


def cmd_generate(args) -> int:
    cli_checks.check_model_args(args)
    req = cli_checks.check_sampling_args(args)
    engine = build_engine(args)
    prompt = args.prompt
    if not args.raw:
        try:
            prompt = engine.apply_chat_template([{"role": "user", "content": prompt}])
        except (ValueError, TypeError) as e:     # transformers: the tokenizer has no chat template
            raise UsageError(f"cannot apply the model's chat template ({e}); pass --raw to use the prompt as is") \
                from e
    kwargs = dict(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                  top_k=req.top_k, seed=req.seed, stop=list(req.stop) or None)
    baseline = None
    if args.compare:
        from ..speculative.engine import Engine

        baseline = Engine(engine.target, method="autoregressive", tokenizer=engine.tokenizer)
        # Warm both (first-call costs: kernels, caches, native code) so the timed runs compare
        # steady states; 4 tokens each.
        for e in (engine, baseline):
            e.generate(prompt, **{**kwargs, "max_new_tokens": min(4, req.max_new_tokens), "stop": None})
    t0 = time.perf_counter()
    for piece in engine.stream(prompt, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    result = engine.last_result
    elapsed = time.perf_counter() - t0
    sys.stdout.write("\n")
    sys.stdout.flush()
    s = result.stats
    n = len(result.token_ids)
    print(f"[specexec-rt] {n} tokens, {s.target_passes} target passes, {s.tokens_per_pass:.2f} tokens/pass, "
          f"{n / elapsed:.1f} tok/s (draft {s.draft_seconds:.2f}s, target {s.target_seconds:.2f}s)",
          file=sys.stderr)
    if baseline is not None:
        t0 = time.perf_counter()
        plain = baseline.generate(prompt, **kwargs)
        plain_s = time.perf_counter() - t0
        ours, theirs = n / elapsed, len(plain.token_ids) / plain_s
        same = "same text" if plain.token_ids == result.token_ids else (
            "sampled: texts differ" if req.temperature > 0 else "TEXT DIFFERS")
        print(f"[specexec-rt] compare: {engine.method} {ours:.1f} tok/s vs autoregressive {theirs:.1f} tok/s "
              f"on this machine: {ours / theirs:.2f}x ({same})", file=sys.stderr)
    return EXIT_OK


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the engine over an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port to bind (0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request but /health")
    p.add_argument("--max-batch", type=positive_int, default=1,
                   help="requests that share each engine pass (each owns a region of the KV caches; "
                        "default 1)")
    p.add_argument("--max-queue", type=non_negative_int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a free slot; beyond it: 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-connections", type=positive_int, default=64,
                   help="open connections served at once; beyond it: 503 (default 64)")
    p.add_argument("--served-model-name", default=None,
                   help="model id reported by /v1/models (default: the --model argument)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (service managers, docker stop): shut down like Ctrl-C, but exit 0."""


def cmd_serve(args) -> int:
    from .server import bind, make_server

    cli_checks.check_model_args(args)
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key, or omit the flag to serve without one")
    try:
        sock = bind(args.host, args.port)       # before loading: a port in use fails in a second
    except OSError as e:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there: "
                         f"{e.strerror or e}") from None
    try:
        engine = build_engine(args)
        name = args.served_model_name or str(args.model)
        server = make_server(engine, api_key=args.api_key, max_queue=args.max_queue, model_name=name,
                             verbose=args.verbose, sock=sock, max_connections=args.max_connections)
    except BaseException:
        sock.close()
        raise
    def _terminate(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, _terminate)
    code = EXIT_OK
    try:
        if args.verbose:
            logging.basicConfig(level=logging.INFO, format="[specexec-rt serve] %(message)s")
        host, port = server.server_address
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            print(f"[specexec-rt] warning: listening on {args.host} without --api-key", file=sys.stderr)
        # "serving" is printed once uvicorn listens and holds the signals (a Ctrl-C inside its
        # start-up could hang it); a signal then stops it gracefully and it returns.
        server.serve_forever(on_started=lambda: print(
            f"[specexec-rt] serving {name!r} on http://{host}:{port}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True))
        if signal.SIGINT in server.received_signals:
            code = EXIT_INTERRUPTED
    except KeyboardInterrupt as e:        # before uvicorn holds the signals
        code = EXIT_OK if isinstance(e, _Terminated) else EXIT_INTERRUPTED
    finally:
        idle = server.close(timeout=10.0)
    print("[specexec-rt] stopped" + ("" if idle else " (the engine did not go idle within 10 s)"), file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    from ..offload import profile
    from . import tune_int4

    parser = argparse.ArgumentParser(prog="specexec-rt", description=__doc__.split("\n\n")[0])
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
    gen.add_argument("--compare", action="store_true",
                     help="also decode the same prompt autoregressively (same target, no draft) and print "
                          "both speeds and their ratio")
    gen.set_defaults(func=cmd_generate)

    add_serve_parser(sub)
    profile.add_parser(sub)
    tune_int4.add_parser(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)     # argparse: a usage line and exit 2 on bad flags
        return args.func(args)
    except SystemExit:
        raise
    except BrokenPipeError:         # the reader of stdout left (| head): nothing more to say
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except BaseException as e:      # noqa: BLE001 - the one place errors become exit codes
        return report_cli_error(e)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
