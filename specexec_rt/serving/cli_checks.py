"""Every ``specexec-rt`` argument checked before any model loads.

argparse types catch what is malformed in isolation (``--max-len 0``, ``--port 70000``,
``--budget lots``); ``check_model_args`` / ``check_sampling_args`` catch what only makes sense
together (a method that needs a draft without one, ``--k`` with ``--method specexec``, a CUDA
device on a machine without a GPU) and run the sampling flags through the same validation layer
as the API and the server (``specexec_rt/speculative/params.py``). Loading a model takes seconds
to minutes: nothing that can be known before it may fail after it.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from ..speculative import params
from ..speculative.config import LOOKUP_DRAFT
from ..speculative.drafts import builtin_draft_group
from ..speculative.methods import METHOD_PARAMS, METHODS
from .client_limits import DEFAULT_MAX_CLIENT_PENDING_HEADS
from .error_map import UsageError

# flag -> Engine parameter, for the method parameters
METHOD_FLAGS = {"beams_per_step": "--beams-per-step", "branch_width": "--branch-width", "max_depth": "--max-depth",
                "tree": "--tree", "k": "--k", "n": "--n", "depth": "--depth", "ngram": "--ngram"}
SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
                  "top_k": "--top-k", "seed": "--seed", "stop": "--stop"}


# ------------------------------------------------------------------------ argparse types
def parse_budget(text: str):
    """``--budget``: 'auto' or a positive int."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'auto', got {value}")
    return value


def _int_in(text: str, lo: int, hi: Optional[int], what: str, hint: str = "") -> int:
    """``text`` as an int in ``[lo, hi]`` (``hi`` None: unbounded), else an argparse error saying
    it ``must be {what}``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < lo or (hi is not None and value > hi):
        raise argparse.ArgumentTypeError(f"must be {what}{hint}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_in(text, 1, None, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_in(text, 0, None, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def port_number(text: str) -> int:
    return _int_in(text, 0, 65535, "a port number in [0, 65535]", " (0: any free port)")


# ------------------------------------------------------------------------ combined checks
@dataclass(frozen=True)
class ModelPlan:
    """What the model flags decided, before anything loads."""

    device: Optional[str]
    method: str
    budget: Union[int, str]
    method_params: dict = field(default_factory=dict)


def check_device(text: Optional[str]) -> Optional[str]:
    """``--device``: cpu, cuda or cuda:N that exists on this machine (None: the default)."""
    if text is None:
        return None
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {text!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    if dev.type != "cuda":
        raise UsageError(f"--device {text!r}: the runtime runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA GPU is available here (torch {torch.__version__}); "
                         f"use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text


def check_source(text: Optional[str], flag: str) -> None:
    """A model source flag must name something: ``--model ""`` would otherwise be read as the
    current directory."""
    if text is not None and not text.strip():
        raise UsageError(f"{flag} is empty: give a model directory, a .gguf file, a hub id or an alias "
                         f"such as smollm2-135m")


def check_model_args(args) -> ModelPlan:
    """The model flags together: sources, device, method and its draft, budget, method parameters."""
    check_source(args.model, "--model")
    check_source(args.draft, "--draft")
    device = check_device(args.device)
    method = args.method or ("specexec" if args.draft else "autoregressive")
    spec = METHODS[method]
    if spec.needs_draft and not args.draft:
        raise UsageError(f"--method {method} needs a draft model: add --draft default (the target re-quantized "
                         f"to int4) or --draft SOURCE, or use --method autoregressive")
    if not spec.needs_draft and args.draft:
        raise UsageError(f"--method {method} uses no draft model: drop --draft, or choose a speculative "
                         f"--method (specexec, specinfer, chain)")
    if args.draft:
        try:
            builtin_draft_group(args.draft)
        except ValueError as e:
            raise UsageError(f"--draft: {e}") from None
    if args.draft == LOOKUP_DRAFT and "ngram" not in METHOD_PARAMS[method]:
        raise UsageError(f"--draft {LOOKUP_DRAFT} (prompt lookup) grows SpecExec trees: use --method specexec, "
                         f"not {method}")
    if getattr(args, "ngram", None) and not args.draft:
        raise UsageError(f"--ngram adds prompt-lookup candidates to a draft model's trees: add --draft (e.g. "
                         f"--draft default), or use --draft {LOOKUP_DRAFT} for the lookup alone")
    if args.budget is not None and not spec.needs_draft:
        raise UsageError(f"--budget sizes draft trees: it does not apply to --method {method}")
    budget = args.budget if args.budget is not None else ("auto" if spec.supports_auto else 256)
    if budget == "auto" and not spec.supports_auto:
        raise UsageError(f"--budget auto needs --method specexec, not {method}")
    given = {name: getattr(args, name) for name in METHOD_FLAGS if getattr(args, name) is not None}
    for name in given:
        if name not in METHOD_PARAMS[method]:
            takes = ", ".join(METHOD_FLAGS[p] for p in METHOD_PARAMS[method] if p in METHOD_FLAGS) \
                or "no method flags"
            raise UsageError(f"{METHOD_FLAGS[name]} does not apply to --method {method} (it takes {takes})")
    return ModelPlan(device, method, budget, given)


def check_serve_args(args) -> dict:
    """``serve``'s own flags -> the connection limits for ``make_server``."""
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key, or omit the flag to serve without one")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UsageError("--served-model-name is empty; give a name, or omit the flag to use --model")
    if not args.host.strip():
        raise UsageError("--host is empty; give an address to listen on (0.0.0.0 or :: for every interface)")
    per_client = args.max_client_connections or None         # 0: no per-address limits
    return {"max_connections": args.max_connections, "max_client_connections": per_client,
            "max_client_pending_heads": min(DEFAULT_MAX_CLIENT_PENDING_HEADS, per_client) if per_client else None}


def check_sampling_args(args) -> params.RequestParams:
    """``generate``'s prompt and sampling flags, through the API's own checks."""
    params.check_prompt(args.prompt, name="--prompt")
    return params.check_request(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, args.stop,
                                names=SAMPLING_FLAGS)
