"""The OpenAI-compatible server as a Ray Serve application: N replicas, one Engine each.

Each replica (``SpecExecReplica``, a Serve deployment with the server's FastAPI app as its
``@serve.ingress``) runs what ``specexec-rt serve`` runs in one process: the engine built from the
serve flags, its worker thread, the tokenizer pool, and ``server.build_app``'s app behind its
RequestGuard (API key, body limits). Ray's HTTP proxy accepts the connections and routes each
request to a replica; ``ray_proxy`` makes the proxy's own answers the server's JSON ones.

    from ray import serve
    from specexec_rt.serving.ray_serve import build_app
    serve.run(build_app(model="smollm2-135m", draft="default", replicas=2, max_batch=4), route_prefix="/")

or, from the shell, ``serve run specexec_rt.serving.ray_serve:app model=smollm2-135m draft=default
replicas=2`` (``app`` takes the serve flags as ``key=value``), or ``specexec-rt serve --replicas 2``
(``ray_launch``). The engine comes from the same flags as in one process (``engine_flags``).

Admission: each replica takes ``max_batch`` requests into its passes and lets ``max_queue`` more
wait, as the single server does, and answers 429 ``queue_full`` (``Retry-After: 1``) beyond.
Serve's ``max_ongoing_requests`` is set above that (``CONTROL_HEADROOM``) so that the replica,
not Ray's router, decides: the router sends each request to the less loaded of two replicas it
samples (with two replicas: both), so a 429 means the replicas it looked at were full.
"""
from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from typing import Optional

RAY_MISSING = "Ray Serve is not installed; serving with replicas needs the extra: pip install 'specexec-rt[ray]'"
try:
    import ray
    from ray import serve
except ImportError as e:
    raise ImportError(f"{RAY_MISSING} ({type(e).__name__}: {e})") from e

from . import cli_checks, engine_flags
from .error_map import UsageError
from .server import ServerState, build_app as build_http_app
from .tokenize_pool import TokenizerPool
from .worker import DEFAULT_MAX_QUEUE, EngineWorker

DEPLOYMENT_NAME = "SpecExec"
# Requests a replica may hold beyond its engine's max_batch + max_queue: /health, /v1/models and
# the 429s themselves, so that Serve's router never holds requests back from a replica that would
# answer them at once.
CONTROL_HEADROOM = 8
# Serve's drain on shutdown: requests in flight get this long to finish, like the single
# server's wait for its engine.
DRAIN_SECONDS = 10.0


@dataclass(frozen=True)
class ReplicaSettings:
    """What each replica is built from (pickled to the replicas)."""

    engine_args: dict           # the model flags and max_batch (engine_flags.build_engine reads them)
    max_queue: int
    api_key: Optional[str]
    model_name: str
    gpu: bool                   # the replica holds one GPU (else CPU cores)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SpecExecReplica:
    """One replica: an Engine, its worker thread, its tokenizer pool and the server's app."""

    def __init__(self, settings: ReplicaSettings):
        import torch

        context = serve.get_replica_context()
        self.replica_name = f"{context.deployment}#{context.replica_id.unique_id}"
        args = argparse.Namespace(**settings.engine_args)
        if args.device is None:
            # Ray shows a GPU replica only its own GPU; a CPU replica runs on the CPU even on a
            # node that has GPUs.
            args.device = "cuda" if settings.gpu else "cpu"
        if not settings.gpu:
            cores = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch.set_num_threads(max(1, int(cores)))      # the cores Ray reserved, not the node's
        engine = engine_flags.build_engine(args)
        self._tokens = TokenizerPool(getattr(engine, "tokenizer", None))
        self._worker = EngineWorker(engine, settings.max_queue)
        self._state = ServerState(engine, self._worker, self._tokens, settings.model_name)
        self._state.stats_extra["replica"] = self.replica_name
        self._http_app = NamedReplica(build_http_app(self._state, settings.api_key), self.replica_name)

    def __serve_build_asgi_app__(self):
        return self._http_app

    def __del__(self):
        # Serve calls this after its drain (DRAIN_SECONDS): stop what still runs at its next pass.
        state, worker, tokens = (getattr(self, name, None) for name in ("_state", "_worker", "_tokens"))
        if state is not None:
            state.closing = True
        if worker is not None:
            worker.shutdown(timeout=DRAIN_SECONDS)
        if tokens is not None:
            tokens.close()


class NamedReplica:
    """ASGI middleware: every answer carries ``x-specexec-replica: <name>`` in its headers, so a
    client (or a test) knows which replica holds a stream from its first byte; the ``specexec``
    statistics name it too, but only at the end."""

    HEADER = b"x-specexec-replica"

    def __init__(self, app, name: str):
        self.app, self.name = app, name.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named_send(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (self.HEADER, self.name)])
            await send(message)

        await self.app(scope, receive, named_send)


# ------------------------------------------------------------------------------ building
def build_app(model: str = "smollm2-135m", draft: Optional[str] = None, replicas: Optional[int] = None,
              max_batch: int = 1, *, max_queue: int = DEFAULT_MAX_QUEUE, api_key: Optional[str] = None,
              served_model_name: Optional[str] = None, autoscaling_config: Optional[dict] = None,
              ray_actor_options: Optional[dict] = None, **engine_args) -> "serve.Application":
    """The Serve application for ``serve.run(app, route_prefix="/")``.

    ``model``, ``draft``, ``max_batch``, ``max_queue``, ``api_key``, ``served_model_name`` and
    ``engine_args`` (``method``, ``budget``, ``device``, ``dtype``, ``max_len``, ``offload``, ...)
    mean what the ``specexec-rt serve`` flags of the same names mean, and are checked the same way
    here, before any replica loads a model (``UsageError`` naming the flag).

    ``replicas`` (default 1) or ``autoscaling_config`` (Serve's: ``min_replicas``,
    ``max_replicas``, ``target_ongoing_requests``, ...; ``max_batch`` is a natural target).
    ``ray_actor_options`` default: one GPU per replica when it runs on CUDA (``device`` cuda, or
    left unset on a cluster or machine with GPUs), else one CPU core per replica; given, it decides
    where a replica without a ``device`` runs (on CUDA if it asks for GPUs).
    """
    unknown = sorted(set(engine_args) - set(model_flag_names()))
    if unknown:
        raise TypeError(f"build_app() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"engine arguments are the serve flags: {', '.join(model_flag_names())}")
    args = parse_model_flags(dict(model=model, draft=draft, **engine_args))
    args.max_batch = _checked(cli_checks.positive_int, "max_batch", max_batch)
    args.max_queue = _checked(cli_checks.non_negative_int, "max_queue", max_queue)
    args.api_key, args.served_model_name = api_key, served_model_name
    plan = cli_checks.check_model_args(args)
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise UsageError("api_key is empty or not a string; give a key, or None to serve without one")
    if plan.device is not None and plan.device.startswith("cuda:"):
        raise UsageError(f"device {plan.device!r}: under Ray each replica is given a GPU of its own; "
                         f"use device='cuda'")
    options = dict(max_ongoing_requests=args.max_batch + args.max_queue + CONTROL_HEADROOM,
                   graceful_shutdown_timeout_s=DRAIN_SECONDS)
    if autoscaling_config is not None:
        if replicas is not None:
            raise UsageError("give replicas or autoscaling_config, not both")
        if not isinstance(autoscaling_config, dict):
            raise UsageError(f"autoscaling_config must be a dict of Serve's autoscaling settings, "
                             f"got {type(autoscaling_config).__name__}")
        options["autoscaling_config"] = autoscaling_config
    else:
        replicas = 1 if replicas is None else replicas
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise UsageError(f"replicas must be a positive integer, got {replicas!r}")
        options["num_replicas"] = replicas
    if ray_actor_options is None:
        gpu = _uses_gpu(plan.device)
        options["ray_actor_options"] = {"num_gpus": 1} if gpu else {"num_cpus": 1}
    else:           # the caller's resources decide where a replica without a device runs
        options["ray_actor_options"] = dict(ray_actor_options)
        gpu = plan.device.startswith("cuda") if plan.device else options["ray_actor_options"].get("num_gpus", 0) > 0
    settings = ReplicaSettings(engine_args=_engine_args(args), max_queue=args.max_queue, api_key=args.api_key,
                               model_name=args.served_model_name or str(args.model), gpu=gpu)
    try:
        deployment = SpecExecReplica.options(**options)
    except (TypeError, ValueError) as e:      # Serve's own checks (autoscaling_config, actor options)
        raise UsageError(f"Ray Serve refused the deployment options: {e}") from None
    return deployment.bind(settings)


def app(args: dict) -> "serve.Application":
    """The application builder for ``serve run specexec_rt.serving.ray_serve:app key=value ...``
    (or a Serve config file's ``args``): ``build_app``'s arguments, with ``-`` or ``_`` in their
    names; strings are read as the serve flags read them, ``autoscaling_config`` as JSON."""
    kwargs = {}
    for key, value in dict(args).items():
        name = key.replace("-", "_")
        if name == "replicas" and isinstance(value, str):
            value = _parse_with(cli_checks.positive_int, "replicas", value)
        elif name == "autoscaling_config" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise UsageError(f"autoscaling_config is not JSON: {e}") from None
        kwargs[name] = value
    return build_app(**kwargs)


@functools.lru_cache(maxsize=1)
def model_flag_names() -> tuple:
    """The model flags' names but ``model`` and ``draft`` (``engine_flags.add_model_args``), as
    keyword arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    engine_flags.add_model_args(parser)
    return tuple(a.dest for a in parser._actions if a.dest not in ("model", "draft"))


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_model_flags(values: dict) -> argparse.Namespace:
    """The model flags' namespace from Python values: each value goes through its flag's own
    parsing and checks (``max_len=0`` fails as ``--max-len 0`` does). None leaves the default."""
    parser = _RaisingParser(prog="build_app", add_help=False)
    engine_flags.add_model_args(parser)
    argv = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def _checked(parse, name: str, value):
    """An int argument through the flag's own check (``parse`` reads the text a flag would get)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    return _parse_with(parse, name, str(value))


def _parse_with(parse, name: str, text: str):
    try:
        return parse(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{name}: {e}") from None


def _engine_args(args: argparse.Namespace) -> dict:
    """What ``engine_flags.build_engine`` reads from the namespace: the model flags and max_batch."""
    names = ["model", "draft", "max_batch", *model_flag_names()]
    return {name: getattr(args, name) for name in names}


def _uses_gpu(device: Optional[str]) -> bool:
    """Whether replicas run on CUDA: ``device`` says so, or (unset) the Ray cluster has GPUs
    (this machine's, when Ray is not running yet)."""
    if device is not None:
        return device.startswith("cuda")
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()
