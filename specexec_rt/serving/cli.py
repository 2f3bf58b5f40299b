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

from . import cli_checks
from .cli_checks import non_negative_int, port_number, positive_int
from .client_limits import DEFAULT_MAX_CLIENT_CONNECTIONS, DEFAULT_MAX_CLIENT_PENDING_HEADS, DEFAULT_MAX_CONNECTIONS
from .engine_flags import add_model_args, build_engine  # cli.build_engine: what cmd_* call (tests patch it)
from .error_map import EXIT_INTERRUPTED, EXIT_OK, UsageError, report_cli_error
from .worker import DEFAULT_MAX_QUEUE

EXIT_BROKEN_PIPE = 141          # what a shell reports for a process killed by SIGPIPE


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
    p.add_argument("--max-connections", type=positive_int, default=None,
                   help=f"open connections in all; beyond it: 503 (default {DEFAULT_MAX_CONNECTIONS}, or fewer if "
                        f"the open-file limit, ulimit -n, holds fewer)")
    p.add_argument("--max-client-connections", type=non_negative_int, default=DEFAULT_MAX_CLIENT_CONNECTIONS,
                   help=f"open connections per client address, {DEFAULT_MAX_CLIENT_PENDING_HEADS} of them at most "
                        f"with incomplete request heads; 0: no per-address limits, for a reverse proxy that "
                        f"applies its own (default {DEFAULT_MAX_CLIENT_CONNECTIONS})")
    p.add_argument("--served-model-name", default=None,
                   help="model id reported by /v1/models (default: the --model argument)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.add_argument("--replicas", type=positive_int, default=None,
                   help="serve N replicas (an engine each) as a Ray Serve application on this host and port; "
                        "needs the 'ray' extra. Without it: one process, no Ray")
    p.add_argument("--ray-address", default=None,
                   help="with --replicas: join this Ray cluster ('ray start --head' prints it; 'auto': the one "
                        "started on this machine) instead of starting a local Ray instance")
    p.set_defaults(func=cmd_serve)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (service managers, docker stop): shut down like Ctrl-C, but exit 0."""


def cmd_serve(args) -> int:
    from .server import bind, make_server

    cli_checks.check_model_args(args)
    limits = cli_checks.check_serve_args(args)
    if args.replicas is not None or args.ray_address is not None:
        return _serve_on_ray(args)
    try:
        sock = bind(args.host, args.port)       # before loading: a port in use fails in a second
    except OSError as e:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there: "
                         f"{e.strerror or e}") from None
    try:
        engine = build_engine(args)
        name = args.served_model_name or str(args.model)
        server = make_server(engine, api_key=args.api_key, max_queue=args.max_queue, model_name=name,
                             verbose=args.verbose, sock=sock, **limits)
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


def _serve_on_ray(args) -> int:
    if args.replicas is None:
        raise UsageError("--ray-address needs --replicas N: the replicas to deploy on that cluster")
    from .ray_launch import serve_replicas

    return serve_replicas(args)


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
