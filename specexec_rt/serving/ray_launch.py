"""``specexec-rt serve --replicas N [--ray-address ADDR]``: the server as a Ray Serve application.

Starts a local Ray instance (or joins the cluster at ``--ray-address``), starts Serve's HTTP
proxy on ``--host``/``--port`` with ``ray_proxy``'s middleware, deploys ``ray_serve.build_app``
with N replicas, and serves until Ctrl-C or SIGTERM. Then it deletes the application and, for a
local instance, stops Serve and Ray and waits until every process Ray started has exited
(killing what is left after ``REAP_SECONDS``): nothing of Ray outlives the command.

Every serve flag keeps its meaning: the model flags, ``--max-batch``, ``--max-queue``,
``--api-key`` and ``--served-model-name`` apply to each replica, ``--host``/``--port`` to Ray's
proxy, ``--max-connections`` to the requests in flight in each proxy, ``--verbose`` shows Ray's
and Serve's logs (access log included).
"""
from __future__ import annotations

import http.client
import logging
import os
import signal
import sys
import time

from .error_map import EXIT_INTERRUPTED, EXIT_OK, UsageError

APP_NAME = "specexec-rt"
REAP_SECONDS = 10.0
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class Terminated(KeyboardInterrupt):
    """SIGTERM: shut down like Ctrl-C, but exit 0."""


def serve_replicas(args) -> int:
    """Run ``specexec-rt serve`` with ``args.replicas`` replicas on Ray (flags checked by the caller
    for the model and the API key). Returns the exit code."""
    try:
        from . import ray_serve
    except ImportError as e:
        raise UsageError(str(e)) from None
    import ray
    from ray import serve

    from . import ray_proxy

    local = args.ray_address is None
    _check_before_ray(args, local)
    _install_signal_handlers()
    code, deployed, serve_was_running = EXIT_OK, False, False
    try:
        _start_ray(ray, args, local)
        application = ray_serve.build_app(**_build_kwargs(args))
        status = serve.status()
        serve_was_running = bool(status.proxies or status.applications)
        if APP_NAME in status.applications:
            raise UsageError(f"an application named {APP_NAME!r} already runs on this Ray cluster; delete it "
                             f"first (serve.delete({APP_NAME!r}))")
        serve.start(http_options={"host": args.host, "port": args.port},
                    controller_options={"runtime_env": {"env_vars": ray_proxy.proxy_env(args.max_connections)}},
                    logging_config={"log_level": "INFO" if args.verbose else "WARNING",
                                    "enable_access_log": bool(args.verbose)})
        deployed = True
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")     # returns once every replica is up
        except RuntimeError as e:
            raise UsageError(f"the replicas failed to start: {_start_failure(serve) or e}") from None
        _check_listening(args.host, args.port, serve_was_running)
        if args.host not in LOCAL_HOSTS and not args.api_key:
            print(f"[specexec-rt] warning: listening on {args.host} without --api-key", file=sys.stderr)
        where = "a local Ray instance" if local else f"the Ray cluster at {args.ray_address}"
        print(f"[specexec-rt] serving {args.served_model_name or str(args.model)!r} on "
              f"http://{args.host}:{args.port}/v1 with {args.replicas} replica{'s' * (args.replicas != 1)} on {where} "
              f"(Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)        # until a signal's handler raises
    except KeyboardInterrupt as e:
        code = EXIT_OK if isinstance(e, Terminated) else EXIT_INTERRUPTED
    finally:
        _teardown(ray, serve, local, deployed, serve_was_running)
    print("[specexec-rt] stopped", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------ start
def _check_before_ray(args, local: bool) -> None:
    """What can fail before Ray starts: a device Ray cannot give, and for a local instance a model
    or draft that is not there, GPUs this machine lacks, a port in use."""
    from ..loading import resolve_source
    from ..speculative.drafts import builtin_draft_group
    from .server import bind

    device = args.device or ""
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device}: with --replicas each replica is given a GPU of its own; "
                         f"use --device cuda")
    if not local:
        return                  # a cluster's nodes may hold models and GPUs this machine lacks
    resolve_source(args.model)          # ModelLoadError naming it, in a second rather than per replica
    if args.draft and builtin_draft_group(args.draft) is None:
        resolve_source(args.draft)
    if device.startswith("cuda"):
        import torch

        if args.replicas > torch.cuda.device_count():
            raise UsageError(f"--replicas {args.replicas} on CUDA needs a GPU per replica; this machine has "
                             f"{torch.cuda.device_count()}")
    try:
        bind(args.host, args.port).close()      # Ray's proxy binds it later: fail now, not after loading
    except OSError as e:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there: {e.strerror or e}") from None


def _terminate(signum, frame):
    raise Terminated


def _install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _start_ray(ray, args, local: bool) -> None:
    quiet = logging.INFO if args.verbose else logging.WARNING
    logging.getLogger("ray.serve").setLevel(quiet)
    kwargs = dict(log_to_driver=bool(args.verbose), logging_level=quiet)
    if local:
        # As many CPUs as replicas at least: a CPU replica reserves one core, and more replicas than
        # cores share them rather than wait for ever to be placed.
        kwargs.update(address="local", num_cpus=max(os.cpu_count() or 1, args.replicas), include_dashboard=False)
    else:
        kwargs.update(address=args.ray_address)
    try:
        ray.init(**kwargs)
    except SystemExit as e:
        # ray.init holds SIGTERM with its own handler (sys.exit(SIGTERM)) while it connects.
        if e.code == signal.SIGTERM:
            raise Terminated from None
        raise
    except ConnectionError as e:
        raise UsageError(f"--ray-address {args.ray_address}: cannot join that Ray cluster: {e}") from None
    signal.signal(signal.SIGTERM, _terminate)      # ours again, in place of ray.init's


def _build_kwargs(args) -> dict:
    from .ray_serve import model_flag_names

    kwargs = {name: getattr(args, name) for name in model_flag_names()}
    return dict(kwargs, model=args.model, draft=args.draft, replicas=args.replicas, max_batch=args.max_batch,
                max_queue=args.max_queue, api_key=args.api_key, served_model_name=args.served_model_name)


def _check_listening(host: str, port: int, serve_was_running: bool) -> None:
    """Ray's proxy answers its health route on host:port (a Serve instance that was already
    running on the cluster keeps its own host and port)."""
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        conn = http.client.HTTPConnection(probe, port, timeout=10)
        conn.request("GET", "/-/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
    except OSError:
        ok = False
    if not ok:
        why = (" (Serve was already running on this cluster: it keeps the host and port it was started with)"
               if serve_was_running else "")
        raise UsageError(f"Ray Serve's proxy does not answer on {host}:{port}{why}")


def _start_failure(serve) -> str:
    """The replicas' own error (the last line of their constructor's traceback in Serve's status)."""
    status = serve.status().applications.get(APP_NAME)
    if status is None:
        return ""
    lines = [d.message.strip().splitlines()[-1] for d in status.deployments.values() if d.message.strip()]
    return lines[0] if lines else ""


# ------------------------------------------------------------------------------ stop
def _teardown(ray, serve, local: bool, deployed: bool, serve_was_running: bool) -> None:
    """Delete the application; for a local instance stop Serve and Ray and reap every process
    Ray started. Signals are ignored meanwhile: a second Ctrl-C must not leave Ray half-stopped."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not ray.is_initialized():
            return
        import psutil       # Ray's own (ray/thirdparty_files), importable once ray is

        started = psutil.Process().children(recursive=True) if local else []
        try:
            if local or not serve_was_running:
                serve.shutdown()
            elif deployed:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
        _reap(psutil, started)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _reap(psutil, processes: list) -> None:
    """Wait for ``processes`` to exit; kill what is left after REAP_SECONDS."""
    _, alive = psutil.wait_procs(processes, timeout=REAP_SECONDS)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=REAP_SECONDS)
    if alive:
        print(f"[specexec-rt] warning: Ray processes still running: {sorted(p.pid for p in alive)}",
              file=sys.stderr)
