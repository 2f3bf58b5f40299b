"""load_model / load_tokenizer: one entry point for HF directories, GGUF files and aliases."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..errors import ModelLoadError
from ..model.kv_cache import KV_STREAM_SLOTS, kv_bytes_per_slot, resolve_kv_dtype
from ..model.transformer import Transformer
from .assemble import assemble_weights
from .sources import ALIASES, Source, resolve_source

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("auto", "none", "int4")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _keeps_q8_head(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a Q8_0 head stays 8-bit: the native CPU kernel serves it (float32 on the CPU)."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    from ..kernels import cpu_native

    return cpu_native.library() is not None


def load_model(source, device=None, dtype: Optional[torch.dtype] = None, max_len: Optional[int] = None,
               quantize: str = "auto", offload: bool = False, gpu_memory_gb: Optional[float] = None,
               offload_reserve_gb: float = 2.0, max_len_cap: int = 4096, kv_dtype=None,
               offload_kv: Optional[bool] = None) -> Transformer:
    """Load a model for inference.

    source: an HF model directory, a ``.gguf`` file, an HF cache entry, or an alias
        (``smollm2-135m``).
    device / dtype: default CUDA + float16 when a GPU exists, else CPU + float32.
    max_len: KV-cache length (default: the model's context, capped at ``max_len_cap``; a draft
        loaded with ``max_len_cap=target.max_len`` gets the target's length or its own shorter
        context).
    quantize: ``"auto"`` keeps 4-bit checkpoints (GPTQ, GGUF Q4_0/Q4_1) 4-bit on CUDA and
        dequantizes them on CPU; ``"none"`` dequantizes everything; ``"int4"`` also quantizes
        dense checkpoints to 4-bit on load. On the CPU in float32, a GGUF embedding or LM head
        stored as Q8_0 is kept 8-bit for the head's matmul whatever ``quantize`` says (the
        product is the dequantized weight's to float32 rounding; with a 4-bit target the
        activations are quantized to int8 as its layers' are; see ``kernels/q8/weight.py``).
    offload: keep transformer layers in pinned host memory and stream them to the GPU each pass
        (``gpu_memory_gb`` caps what stays resident; see docs/OFFLOAD.md).
    kv_dtype: how the KV cache stores K and V: ``"float32"``, ``"float16"``, ``"bfloat16"``,
        ``"int8"`` (per token and KV head scales) or a torch dtype of these; default (``None`` or
        ``"auto"``) half precision wherever the attention kernels read it in place (float16 for a
        float32 model on the CPU with the native library, the model's dtype for a half model; see
        ``model.kv_cache.resolve_kv_dtype``). The output stays the target's own whatever the
        draft's cache holds; the target's own numbers move slightly with a lower precision cache
        (README, "KV cache precision").
    offload_kv: keep the KV cache in (pinned) host memory and stream each layer's part of it to
        the device with that layer (``offload.StreamedKVCache``). Default (None): with
        ``offload``, when the KV at ``max_len`` does not fit in the budget beside the streaming
        slots and ``offload_reserve_gb``; never without ``offload``. True / False force it.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}; choose one of {QUANTIZE_CHOICES}")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but no CUDA device is available")
    dtype = dtype or default_dtype(device)
    kv_dtype = resolve_kv_dtype(kv_dtype, dtype, device)  # checked before anything loads
    if offload_kv is not None and not isinstance(offload_kv, bool):
        raise ValueError(f"offload_kv must be True, False or None (decide from the memory budget), got {offload_kv!r}")
    src = resolve_source(source)
    if quantize == "auto":
        quantize = "keep" if device.type == "cuda" else "none"
    # While loading, offloaded layers stay on the host; the streamer pins and places them.
    layer_device = torch.device("cpu") if offload else device
    if src.kind == "gguf":
        from .gguf_file import gguf_config, gguf_getters, gguf_int4_block, open_gguf

        reader = open_gguf(src.path)
        cfg = gguf_config(reader, src.path)
        source_int4_group = gguf_int4_block(reader)
        get_matrix, get_vector = gguf_getters(reader, cfg, src.path, keep_int4=quantize != "none",
                                              keep_q8_head=_keeps_q8_head(device, dtype))
    else:
        from .hf import hf_getters, int4_group, quantization_config, read_hf_config

        cfg = read_hf_config(src.path)
        source_int4_group = int4_group(quantization_config(src.path))
        get_matrix, get_vector = hf_getters(src.path, cfg)
    max_len = resolve_max_len(cfg, max_len, max_len_cap)
    weights = assemble_weights(cfg, get_matrix, get_vector, dtype, quantize, layer_device, device,
                               desc=f"loading {src.path.name}")
    layer_source, cache_factory = _placement(cfg, weights, device, max_len, kv_dtype, offload, offload_kv,
                                             gpu_memory_gb, offload_reserve_gb)
    model = Transformer(cfg, weights, max_len, device, dtype, layer_source=layer_source, kv_dtype=kv_dtype,
                        cache_factory=cache_factory)
    model.source = src
    model.quantization = "int4" if quantize in ("int4", "keep") else None
    model.source_int4_group = source_int4_group
    return model


def _placement(cfg, weights, device: torch.device, max_len: int, kv_dtype: torch.dtype, offload: bool,
               offload_kv: Optional[bool], gpu_memory_gb: Optional[float], offload_reserve_gb: float):
    """Where the layers and the KV cache live: (layer source or None for resident layers, cache
    factory or None for a resident cache). See ``load_model``'s ``offload`` and ``offload_kv``."""
    layer_source = None
    cache_bytes = max_len * kv_bytes_per_slot(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv_dtype)
    if offload:
        from ..offload import make_layer_source

        reserve = int(offload_reserve_gb * 2**30)
        if offload_kv is None:
            offload_kv = kv_exceeds_budget(weights.layers, device, gpu_memory_gb, cache_bytes, reserve)
        # The reserve covers what is allocated after this point (the KV cache, or its streaming
        # slots when it lives on the host) plus the draft and the activations of the largest tree,
        # which the caller bounds with offload_reserve_gb.
        kv_device = cache_bytes * KV_STREAM_SLOTS // cfg.n_layers if offload_kv else cache_bytes
        layer_source = make_layer_source(weights.layers, device, offload=True, gpu_memory_gb=gpu_memory_gb,
                                         reserve_bytes=kv_device + reserve, consume=True)
    if not offload_kv:
        return layer_source, None
    from ..offload import streamed_cache_factory

    log.info("offload_kv: the KV cache (%.2f GiB at max_len=%d, %s) lives in host memory, streamed per layer",
             cache_bytes / 2**30, max_len, kv_dtype)
    return layer_source, streamed_cache_factory()


def kv_exceeds_budget(layers: list, device: torch.device, gpu_memory_gb: Optional[float], cache_bytes: int,
                      reserve: int) -> bool:
    """Whether an offloaded model's KV at its ``max_len`` (``cache_bytes``) leaves no room for the
    layer streamer's slots and the reserve in the memory budget (``gpu_memory_gb``, or the free
    device memory): then it lives in host memory (``offload_kv``)."""
    from ..offload.streamer import budget_bytes_for, layout_layer

    sizes = [layout_layer(layer)[1] for layer in layers]
    slots = min(KV_STREAM_SLOTS, len(sizes)) * max(sizes, default=0)
    return cache_bytes + slots + reserve > budget_bytes_for(device, gpu_memory_gb)


def context_limit(cfg) -> int:
    """The largest ``max_len`` a model supports: its context, or its sliding window if smaller."""
    limit = cfg.max_position_embeddings
    if cfg.sliding_window:
        limit = min(limit, cfg.sliding_window)
    return limit


def resolve_max_len(cfg, max_len: Optional[int], max_len_cap: int = 4096) -> int:
    limit = context_limit(cfg)
    if max_len is None:
        return min(limit, max_len_cap)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if max_len > limit:
        why = (f"the sliding window ({cfg.sliding_window}) is not supported beyond the window"
               if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings
               else f"the model's context is {cfg.max_position_embeddings}")
        raise ValueError(f"max_len={max_len} exceeds what this model supports: {why}")
    return max_len


def tokenizer_cache_dir() -> Path:
    """Where GGUF tokenizers converted by transformers are kept (``SPECEXEC_TOKENIZER_CACHE``,
    default ``~/.cache/specexec_rt/tokenizers``; set it to ``off`` to disable the cache)."""
    return Path(os.environ.get("SPECEXEC_TOKENIZER_CACHE",
                               Path.home() / ".cache" / "specexec_rt" / "tokenizers")).expanduser()


def _gguf_tokenizer_key(path: Path) -> str:
    """Changes whenever the file or the converter (transformers) could give another tokenizer."""
    import transformers

    st = path.resolve().stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|transformers {transformers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


# One tokenizer per source and process (an Engine and its vocabulary check share it), keyed
# with the files' sizes and mtimes so a tokenizer rewritten on disk is read again.
_TOKENIZERS: dict = {}


def _files_fingerprint(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()
                                                 and not p.name.endswith(".safetensors"))
    out = []
    for p in files:
        st = p.stat()
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_tokenizer(source):
    """The model's tokenizer through transformers.

    A GGUF file's tokenizer is rebuilt from its metadata by transformers, which takes ~10 s for
    SmolLM2's 49k-token vocabulary; the result is saved under ``tokenizer_cache_dir()`` (keyed by
    the file's path, size and mtime and the transformers version) and later loads take ~0.5 s.
    """
    import transformers

    src = source.source if isinstance(source, Transformer) else resolve_source(source)
    memo_key = (src.kind, str(src.path), _files_fingerprint(src.path))
    if memo_key in _TOKENIZERS:
        return _TOKENIZERS[memo_key]
    try:
        if src.kind == "gguf":
            tok = _load_gguf_tokenizer(src.path)
        else:
            tok = transformers.AutoTokenizer.from_pretrained(str(src.path))
    except Exception as e:
        raise ModelLoadError(f"cannot build a tokenizer for {src.path}: {type(e).__name__}: {e}") from e
    _TOKENIZERS[memo_key] = tok
    return tok


def _load_gguf_tokenizer(path: Path):
    import transformers

    root = tokenizer_cache_dir()
    cached = None if str(root) == "off" else root / _gguf_tokenizer_key(path)
    if cached is not None and (cached / "tokenizer.json").is_file():
        try:
            return transformers.AutoTokenizer.from_pretrained(str(cached))
        except Exception as e:   # a damaged entry: rebuild it below
            log.warning("tokenizer cache entry %s unreadable (%s); rebuilding it", cached, e)
            shutil.rmtree(cached, ignore_errors=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if cached is not None:
        # Save to a private directory, then rename: a concurrent process sees a whole entry or none.
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        try:
            tok.save_pretrained(str(tmp))
            os.replace(tmp, cached)
        except OSError as e:     # read-only home, a racing writer that won: the cache is optional
            log.info("tokenizer not cached at %s: %s", cached, e)
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


__all__ = ["load_model", "load_tokenizer", "context_limit", "tokenizer_cache_dir", "resolve_source", "Source",
           "ALIASES"]
