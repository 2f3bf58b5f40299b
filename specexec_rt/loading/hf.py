"""HF model directories: config.json + single or sharded safetensors (GPTQ 4-bit included)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

import torch

from ..errors import ModelLoadError, UnsupportedModelError
from ..model.config import SUPPORTED_MODEL_TYPES, ModelConfig, config_from_hf


def read_hf_config(directory: Path) -> ModelConfig:
    import transformers

    try:
        hf = transformers.AutoConfig.from_pretrained(str(directory))
    except ValueError as e:
        # AutoConfig raises ValueError for a model_type it does not know; ours is stricter anyway.
        raw = json.loads((directory / "config.json").read_text())
        raise UnsupportedModelError(raw.get("model_type"), supported=SUPPORTED_MODEL_TYPES) from e
    except OSError as e:
        raise ModelLoadError(f"cannot read {directory / 'config.json'}: {e}") from e
    return config_from_hf(hf)


def quantization_config(directory: Path) -> Optional[dict]:
    raw = json.loads((directory / "config.json").read_text())
    return raw.get("quantization_config")


def int4_group(qcfg: Optional[dict]) -> Optional[int]:
    """The group size of a GPTQ/AWQ checkpoint's 4-bit matrices, or None (unquantized, one group
    per row, or act-order, whose groups are not contiguous in the natural input order)."""
    if not qcfg or str(qcfg.get("quant_method", "")).lower() not in ("gptq", "awq") or qcfg.get("desc_act"):
        return None
    group = qcfg.get("group_size", qcfg.get("q_group_size"))
    return int(group) if isinstance(group, int) and group > 0 else None


class SafetensorsCheckpoint:
    """Lazy reader over one or more safetensors shards, by tensor name."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        elif single.is_file():
            shards = [single.name]
            weight_map = None
        else:
            found = sorted(p.name for p in directory.glob("*.safetensors"))
            if not found:
                raise ModelLoadError(f"{directory} holds no safetensors weights (model.safetensors or "
                                     f"model.safetensors.index.json); .bin checkpoints are not supported")
            shards, weight_map = found, None
        self.handles = {}
        for shard in shards:
            path = directory / shard
            if not path.is_file():
                raise ModelLoadError(f"shard {path} named in the index is missing")
            try:
                self.handles[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
                raise ModelLoadError(f"{path} is not a readable safetensors file "
                                     f"(truncated or corrupt?): {e}") from e
        self.weight_map = weight_map or {k: s for s, h in self.handles.items() for k in h.keys()}

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint")
        try:
            return self.handles[shard].get_tensor(name)
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {name!r} from {shard} (truncated or corrupt?): {e}") from e


def hf_getters(directory: Path, cfg: ModelConfig):
    """(get_matrix, get_vector) over an HF checkpoint; GPTQ and AWQ layers come back as Int4Weight."""
    ckpt = SafetensorsCheckpoint(directory)
    qcfg = quantization_config(directory)
    method = None if qcfg is None else str(qcfg.get("quant_method", "")).lower()
    if method not in (None, "gptq", "awq"):
        raise ModelLoadError(f"quantization method {qcfg.get('quant_method')!r} is not supported "
                             f"(supported: gptq and awq 4-bit, or an unquantized checkpoint)")
    if method is not None and int(qcfg.get("bits", qcfg.get("w_bit", 4))) != 4:
        raise ModelLoadError(f"{method.upper()} with bits={qcfg.get('bits', qcfg.get('w_bit'))} is not "
                             f"supported (only 4-bit)")
    if method == "awq":
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm" or qcfg.get("zero_point", True) is False:
            raise ModelLoadError(f"AWQ version={qcfg.get('version')!r} zero_point={qcfg.get('zero_point')!r} is "
                                 f"not supported (only AutoAWQ's GEMM format with zero points)")
    packed_matrix = {"gptq": _gptq_matrix, "awq": _awq_matrix}.get(method)
    rename = _MIXTRAL_NAMES if cfg.model_type == "mixtral" else ()

    def get_one(name: str):
        for ours, theirs in rename:
            name = name.replace(ours, theirs)
        if name.endswith(".weight") and not ckpt.has(name) and packed_matrix is not None:
            base = name[: -len(".weight")]
            if ckpt.has(base + ".qweight"):
                return packed_matrix(ckpt, base, qcfg)
        if name == "lm_head.weight" and not ckpt.has(name) and cfg.tie_word_embeddings:
            return ckpt.get("model.embed_tokens.weight")
        return ckpt.get(name)

    def get_matrix(name: str):
        stack = _EXPERT_STACK.fullmatch(name)
        if stack:   # hub checkpoints store one tensor per expert (GPTQ/AWQ ones too)
            prefix, proj = stack.groups()
            return [get_one(f"{prefix}mlp.experts.{e}.{proj}.weight") for e in range(cfg.num_experts)]
        return get_one(name)

    def get_vector(name: str):
        return ckpt.get(name)

    return get_matrix, get_vector


# An expert stack as assemble.py asks for it: model.layers.{i}.mlp.experts.{gate,up,down}_proj.weight.
_EXPERT_STACK = re.compile(r"(model\.layers\.\d+\.)mlp\.experts\.(gate_proj|up_proj|down_proj)\.weight")
# Mixtral's checkpoint names for what assemble.py asks by Qwen-MoE / Llama names.
_MIXTRAL_NAMES = ((".mlp.experts.", ".block_sparse_moe.experts."), (".gate_proj.", ".w1."), (".up_proj.", ".w3."),
                  (".down_proj.", ".w2."), (".mlp.gate.", ".block_sparse_moe.gate."))


def _gptq_matrix(ckpt: SafetensorsCheckpoint, base: str, qcfg: dict):
    from .int4_formats import from_gptq

    g_idx = ckpt.get(base + ".g_idx") if ckpt.has(base + ".g_idx") else None
    weight, perm = from_gptq(
        ckpt.get(base + ".qweight"), ckpt.get(base + ".qzeros"), ckpt.get(base + ".scales"), g_idx,
        sym=bool(qcfg.get("sym", True)), checkpoint_format=qcfg.get("checkpoint_format", "gptq"),
        # fp32: mins = -zero * scale would round in fp16 (up to 1% of a step); exactness first.
        scale_dtype=torch.float32)
    # Act-order (desc_act): rows were sorted by group at conversion; the kernels gather the
    # activations with the same permutation, so the layer stays 4-bit.
    return weight if perm is None else dataclasses.replace(weight, perm=perm)


def _awq_matrix(ckpt: SafetensorsCheckpoint, base: str, qcfg: dict):
    from .int4_formats import from_awq

    return from_awq(ckpt.get(base + ".qweight"), ckpt.get(base + ".qzeros"), ckpt.get(base + ".scales"))
