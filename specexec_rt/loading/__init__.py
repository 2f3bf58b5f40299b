"""load_model / load_tokenizer: one entry point for HF directories, GGUF files and aliases."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ModelLoadError
from ..model import Transformer
from .assemble import assemble_weights
from .sources import ALIASES, Source, resolve_source

QUANTIZE_CHOICES = ("auto", "none", "int4")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def load_model(source, device=None, dtype: Optional[torch.dtype] = None, max_len: Optional[int] = None,
               quantize: str = "auto", offload: bool = False, gpu_memory_gb: Optional[float] = None,
               offload_reserve_gb: float = 2.0) -> Transformer:
    """Load a model for inference.

    source: an HF model directory, a ``.gguf`` file, an HF cache entry, or an alias
        (``smollm2-135m``).
    device / dtype: default CUDA + float16 when a GPU exists, else CPU + float32.
    max_len: KV-cache length (default: the model's context, capped at 4096).
    quantize: ``"auto"`` keeps 4-bit checkpoints (GPTQ, GGUF Q4_0/Q4_1) 4-bit on CUDA and
        dequantizes them on CPU; ``"none"`` dequantizes everything; ``"int4"`` also quantizes
        dense checkpoints to 4-bit on load.
    offload: keep transformer layers in pinned host memory and stream them to the GPU each pass
        (``gpu_memory_gb`` caps what stays resident; see docs/OFFLOAD.md).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}; choose one of {QUANTIZE_CHOICES}")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but no CUDA device is available")
    dtype = dtype or default_dtype(device)
    src = resolve_source(source)
    if quantize == "auto":
        quantize = "keep" if device.type == "cuda" else "none"
    # While loading, offloaded layers stay on the host; the streamer pins and places them.
    layer_device = torch.device("cpu") if offload else device
    if src.kind == "gguf":
        from .gguf_file import gguf_config, gguf_getters, open_gguf

        reader = open_gguf(src.path)
        cfg = gguf_config(reader, src.path)
        get_matrix, get_vector = gguf_getters(reader, cfg, src.path, keep_int4=quantize != "none")
    else:
        from .hf import hf_getters, read_hf_config

        cfg = read_hf_config(src.path)
        get_matrix, get_vector = hf_getters(src.path, cfg)
    max_len = resolve_max_len(cfg, max_len)
    weights = assemble_weights(cfg, get_matrix, get_vector, dtype, quantize, layer_device, device,
                               desc=f"loading {src.path.name}")
    layer_source = None
    if offload:
        from ..offload import make_layer_source

        # The reserve covers what is allocated after this point (the KV cache) plus the draft and
        # the activations of the largest tree, which the caller bounds with offload_reserve_gb.
        cache_bytes = 2 * cfg.n_layers * max_len * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
        layer_source = make_layer_source(
            weights.layers, device, offload=True, gpu_memory_gb=gpu_memory_gb,
            reserve_bytes=cache_bytes + int(offload_reserve_gb * 2**30), consume=True)
    model = Transformer(cfg, weights, max_len, device, dtype, layer_source=layer_source)
    model.source = src
    model.quantization = "int4" if quantize in ("int4", "keep") else None
    return model


def resolve_max_len(cfg, max_len: Optional[int]) -> int:
    limit = cfg.max_position_embeddings
    if cfg.sliding_window:
        limit = min(limit, cfg.sliding_window)
    if max_len is None:
        return min(limit, 4096)
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if max_len > limit:
        why = (f"the sliding window ({cfg.sliding_window}) is not supported beyond the window"
               if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings
               else f"the model's context is {cfg.max_position_embeddings}")
        raise ValueError(f"max_len={max_len} exceeds what this model supports: {why}")
    return max_len


def load_tokenizer(source):
    """The model's tokenizer through transformers (GGUF tokenizers are rebuilt from metadata)."""
    import transformers

    src = source.source if isinstance(source, Transformer) else resolve_source(source)
    try:
        if src.kind == "gguf":
            return transformers.AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
        return transformers.AutoTokenizer.from_pretrained(str(src.path))
    except Exception as e:
        raise ModelLoadError(f"cannot build a tokenizer for {src.path}: {type(e).__name__}: {e}") from e


__all__ = ["load_model", "load_tokenizer", "resolve_source", "Source", "ALIASES"]
