"""``specexec-rt tune-int4``: measure the fastest int4_matmul launch plan for a model's matrices
on this GPU and save them (measured by ``specexec_rt.kernels.int4.tuning``, kept by ``int4.plans``).

    specexec-rt tune-int4 --shape llama-2-70b              # synthetic weights of that shape
    specexec-rt tune-int4 --model path/or/alias            # the shapes of a model (config only)

Later runs on the same GPU model read the file (``SPECEXEC_INT4_TUNING``, default
``~/.cache/specexec_rt/int4_tuning.json``) and use the measured plans; untuned shapes keep
the defaults. Takes ~10 s per matrix (each tile config compiles once).
"""
from __future__ import annotations

import argparse
import sys

from ..errors import SpecExecError
from .error_map import UsageError


class TuningUnavailableError(SpecExecError, RuntimeError):
    pass


def _config_of(source):
    from ..loading.sources import resolve_source

    src = resolve_source(source)
    if src.kind == "gguf":
        from ..loading.gguf_file import gguf_config, open_gguf

        return gguf_config(open_gguf(src.path), src.path), 32     # GGUF Q4_0/Q4_1 blocks
    from ..loading.hf import quantization_config, read_hf_config

    qcfg = quantization_config(src.path) or {}
    return read_hf_config(src.path), int(qcfg.get("group_size") or 0) or None


def shapes_for(model=None, shape=None, group_size=None) -> dict:
    """name -> (N, K, group size) of the int4 matrices to tune."""
    from ..kernels.int4.tuning import model_shapes
    from ..loading.assemble import int4_group_size
    from ..offload.profile import SHAPES

    if model is not None:
        cfg, ckpt_group = _config_of(model)
    else:
        from types import SimpleNamespace

        s = SHAPES[shape]
        cfg, ckpt_group = SimpleNamespace(hidden_size=s["hidden"], head_dim=s["head_dim"], n_heads=s["n_heads"],
                                          n_kv_heads=s["n_kv_heads"], intermediate_size=s["inter"]), None
    shapes = model_shapes(cfg)
    if getattr(cfg, "is_moe", False):
        # A mixture-of-experts model runs its experts' matrices, each over the rows routed to it.
        h, e = cfg.hidden_size, cfg.moe_intermediate_size
        if len(cfg.moe_layers) == cfg.n_layers:      # no dense MLP left
            del shapes["w_gate_up"], shapes["w_down"]
        shapes.update(expert_gate_up=(2 * e, h), expert_down=(h, e))
    out = {}
    for name, (n, k) in shapes.items():
        out[name] = (n, k, group_size or ckpt_group or int4_group_size(k))
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..offload.profile import SHAPES

    p = subparsers.add_parser("tune-int4", help="measure and save the fastest int4 matmul plans on this GPU",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model whose matrix shapes to tune (reads its config only)")
    src.add_argument("--shape", default=None, choices=[s for s in SHAPES if s != "tiny"],
                     help="a named layer shape (default llama-2-7b)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default: the checkpoint's, "
                   "32 for GGUF, else what quantize='int4' uses)")
    p.add_argument("--ms", default=None, help="comma list of M values (default 1,2,4,...,2048)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--out", default=None, help="tuning file to update (default: SPECEXEC_INT4_TUNING or "
                   "~/.cache/specexec_rt/int4_tuning.json)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    import torch

    from ..kernels.int4 import plans as int4_plans, tuning as int4_tuning

    if not torch.cuda.is_available():
        raise TuningUnavailableError("tune-int4 measures GPU kernels and needs a CUDA GPU; "
                                     "without one the CPU path (aten's int4 op) needs no tuning")
    try:
        ms = tuple(int(v) for v in args.ms.split(",")) if args.ms else int4_tuning.DEFAULT_MS
    except ValueError:
        raise UsageError(f"--ms must be a comma list of positive integers, got {args.ms!r}") from None
    if any(m < 1 for m in ms):
        raise UsageError(f"--ms values must be positive, got {ms}")
    shapes = shapes_for(args.model, args.shape or (None if args.model else "llama-2-7b"), args.group_size)
    path = int4_plans.tuning_path() if args.out is None else args.out
    int4_plans.load_tuning(path)           # update the file, keep other GPUs' and shapes' entries
    dtype = getattr(torch, args.dtype)
    print(f"[tune-int4] {torch.cuda.get_device_name()}: {len(shapes)} matrices x {len(ms)} M values",
          file=sys.stderr)
    gains = []
    for name, (n, k, g) in shapes.items():
        print(f"[tune-int4] {name}: N={n} K={k} group {g}", file=sys.stderr)
        for row in int4_tuning.tune_shape(n, k, g, ms, dtype=dtype, device="cuda", progress=True):
            if row["default_ms"]:
                gains.append(row["default_ms"] / row["ms"])
    saved = int4_plans.save_tuning(path)
    if gains:
        print(f"[tune-int4] saved to {saved}; measured plans vs defaults: median {sorted(gains)[len(gains) // 2]:.2f}x, "
              f"best {max(gains):.2f}x", file=sys.stderr)
    return 0
