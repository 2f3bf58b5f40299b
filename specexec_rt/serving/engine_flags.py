"""The model flags every model-loading command shares, and the Engine they build.

``add_model_args`` puts the flags on a parser (``generate``, ``serve``); ``build_engine`` checks
them (``cli_checks``) and loads the target and the draft. Used by the ``specexec-rt`` command and by
each Ray Serve replica (``ray_serve``), which builds its engine from the same flags.
"""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import SpecExecError
from ..model.kv_cache import KV_DTYPE_CHOICES
from ..speculative.methods import METHODS
from ..speculative.tree_policy import POLICIES
from . import cli_checks
from .cli_checks import parse_budget, positive_float, positive_int
from .error_map import UsageError

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every subcommand that loads models."""
    p.add_argument("--model", "--target", dest="model", default="smollm2-135m",
                   help="target model: HF directory, .gguf file, hub id in the local HF cache, or alias "
                        "(default: smollm2-135m)")
    p.add_argument("--draft", default=None,
                   help="draft model source, or a built-in draft derived from the target: 'default' (its "
                        "layers re-quantized to int4 at the checkpoint's own 4-bit group, 32 for a GGUF "
                        "Q4_0/Q4_1/Q4_K, else 64; it reads the target's KV cache), or 'int4:G' (groups of G = "
                        "32, 64, 128 or 256); or 'ngram': prompt-lookup candidates alone (tokens that followed "
                        "earlier occurrences of the text's last few tokens), no draft model. Omit for "
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
    p.add_argument("--ngram", action="store_const", const=True, default=None,
                   help="specexec: also propose prompt-lookup candidates (n-gram matches in the prompt and the text "
                        "so far): in the draft's trees under the same budget, or with --budget auto on a CPU, as "
                        "passes of their own between the draft's chains when the lookup's hit rate pays")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights/activations dtype")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="the target's KV cache length (default: min(context, 4096)); the draft gets the same, "
                        "or its own context if shorter")
    p.add_argument("--kv-dtype", default="auto", choices=list(KV_DTYPE_CHOICES),
                   help="how the KV caches store K and V: auto (float16 for a float32 model on the CPU, the model's "
                        "dtype for a half one), float32, float16, bfloat16, or int8 (per token and head scales); "
                        "the output stays the target's, whose own numbers move slightly below float32")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int4"],
                   help="auto keeps 4-bit checkpoints 4-bit on CUDA; int4 also quantizes dense ones")
    p.add_argument("--offload", action="store_true", help="stream the target's layers from pinned host RAM")
    p.add_argument("--gpu-memory-gb", type=positive_float, default=None,
                   help="GPU memory the offloaded target may use")
    p.add_argument("--offload-kv", action="store_true", default=None,
                   help="keep the target's KV cache in pinned host memory, streamed per layer with its weights "
                        "(default with --offload: when the KV at --max-len does not fit the GPU budget)")


def build_engine(args):
    """Load the target (and the draft) and make an Engine from parsed flags (checked first)."""
    import torch

    from ..loading import load_model, resolve_source
    from ..speculative.config import LOOKUP_DRAFT
    from ..speculative.drafts import builtin_draft, builtin_draft_group
    from ..speculative.engine import Engine

    plan = cli_checks.check_model_args(args)

    # Both sources first: a draft path with a typo fails before the target spends time loading.
    target_src = resolve_source(args.model)
    lookup = args.draft == LOOKUP_DRAFT            # prompt lookup alone: no draft model to load
    builtin = args.draft is not None and not lookup and builtin_draft_group(args.draft) is not None
    draft_src = resolve_source(args.draft) if args.draft and not builtin and not lookup else None
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    t0 = time.perf_counter()
    target = _load(load_model, target_src, "--max-len", device=plan.device, dtype=dtype, max_len=args.max_len,
                   quantize=args.quantize, offload=args.offload, gpu_memory_gb=args.gpu_memory_gb,
                   kv_dtype=args.kv_dtype, offload_kv=args.offload_kv)
    draft = LOOKUP_DRAFT if lookup else None
    if builtin:
        draft = builtin_draft(target, args.draft)
    elif draft_src is not None:
        # The target's max_len or the draft's own context if shorter: a draft with a shorter
        # context still loads, and the engine's context and vocabulary checks decide what fits.
        draft = _load(load_model, draft_src, "--draft", device=target.device, dtype=target.dtype,
                      max_len_cap=target.max_len, quantize=args.quantize, kv_dtype=target.kv_dtype)
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
