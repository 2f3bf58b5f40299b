"""GGUF files (llama.cpp): config from metadata, tensors dequantized or kept 4-bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model.config import ModelConfig
from ..errors import ModelLoadError, UnsupportedModelError

# GGUF architecture -> our model_type (llama.cpp writes Mixtral as "llama" with experts: "mixtral")
GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
# Families whose q/k rows llama.cpp's converter permutes (rotary pairs interleaved). The Qwen
# families use NeoX-style RoPE there, HF's own half-split layout, and are stored as HF has them.
PERMUTED_QK = ("llama", "mistral", "mixtral")
# Kept 4-bit (converted exactly to Int4Weight) when 4-bit weights are wanted, else dequantized.
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
# Dequantized to float on load (gguf-py's numpy dequantizers): the other k-quants of llama.cpp's
# mixed files (Q4_K_M keeps some tensors in Q6_K, Q3_K_M mixes Q3/Q4/Q5_K, ...).
DENSE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "Q6_K",
               "IQ4_NL", "IQ4_XS")

# HF name suffix -> GGUF name suffix, per layer
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    # Mixture-of-experts layers: the router and the experts stacked along a leading axis.
    "mlp.gate": "ffn_gate_inp", "mlp.experts.gate_proj": "ffn_gate_exps", "mlp.experts.up_proj": "ffn_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # truncated files fail in numpy memmap / struct parsing
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from e


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        return default


def gguf_config(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(arch, f"GGUF architecture {arch!r} is not supported "
                                          f"(supported: {', '.join(GGUF_ARCHS)})")

    def req(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    n_heads = int(req("attention.head_count"))
    hidden = int(req("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    names = {t.name for t in reader.tensors}
    scaling = None
    stype = _field(reader, f"{arch}.rope.scaling.type")
    if stype == "linear":
        scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    elif stype not in (None, "none"):
        raise UnsupportedModelError(arch, f"GGUF rope scaling {stype!r} is not supported")
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(arch, "GGUF rope_freqs (llama3 rope scaling baked as a tensor) is not "
                                          "supported; load the HF checkpoint instead")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    moe = _gguf_moe(reader, arch, names, int(req("block_count")))
    model_type = "mixtral" if arch == "llama" and moe else GGUF_ARCHS[arch]
    inter = _field(reader, f"{arch}.feed_forward_length")
    if inter is None and not (moe and len(moe["moe_layers"]) == int(req("block_count"))):
        req("feed_forward_length")      # a dense MLP needs it: raises, naming the key
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(inter if inter is not None else moe["moe_intermediate_size"]),
        n_layers=int(req("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // n_heads)),
        rms_norm_eps=float(req("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
        qk_norm="blk.0.attn_q_norm.weight" in names,
        **moe,
    )


def _gguf_moe(reader, arch: str, names: set, n_layers: int) -> dict:
    """The mixture-of-experts fields from llama.cpp's metadata: a layer with a router
    (``blk.N.ffn_gate_inp``) has experts; softmax gating, top ``expert_used_count``,
    renormalised unless ``expert_weights_norm`` says otherwise (llama.cpp's Qwen3-MoE and
    Mixtral graphs renormalise). Gating and shared experts the runtime lacks are refused by key."""
    layers = tuple(i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" in names)
    if not layers:
        return {}
    gating = _field(reader, f"{arch}.expert_gating_func")
    if gating is not None and int(gating) != 1:
        raise UnsupportedModelError(arch, f"{arch}.expert_gating_func={gating} is not supported (only 1, softmax)")
    if _field(reader, f"{arch}.expert_shared_count"):
        raise UnsupportedModelError(arch, f"{arch}.expert_shared_count is set: shared experts are not supported")
    width = _field(reader, f"{arch}.expert_feed_forward_length")
    if width is None:   # Mixtral's files: the experts are feed_forward_length wide; the tensor says so too
        stack = next((t for t in reader.tensors if t.name == f"blk.{layers[0]}.ffn_gate_exps.weight"), None)
        width = int(stack.shape[1]) if stack is not None else 0
    return dict(num_experts=int(_field(reader, f"{arch}.expert_count", 0)),
                num_experts_per_tok=int(_field(reader, f"{arch}.expert_used_count", 0)),
                moe_intermediate_size=int(width), norm_topk_prob=bool(_field(reader, f"{arch}.expert_weights_norm", True)),
                moe_layers=layers)


def _unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its rotary pairs interleaved; HF's are half-split)."""
    out = rows.shape[0]
    return (rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


# Matrices a Q8_0 copy of which serves the LM head (tied heads are the embedding).
_HEAD_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def gguf_getters(reader, cfg: ModelConfig, path: Path, keep_int4: bool, keep_q8_head: bool = False):
    """``(get_matrix, get_vector)`` by HF name. ``keep_int4``: Q4 matrices come back as
    ``Int4Weight``; ``keep_q8_head``: a Q8_0 embedding or LM head comes back as ``Q8Weight``
    (the caller expands the embedding it looks rows up in)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}

    def gguf_name(hf_name: str) -> str:
        if hf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[hf_name]
        _, _, i, rest = hf_name.split(".", 3)          # model.layers.{i}.{rest}
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{_LAYER_NAMES[module]}.{kind}"

    def lookup(hf_name: str):
        name = gguf_name(hf_name)
        if name not in tensors:
            raise ModelLoadError(f"{path}: tensor {name!r} (for {hf_name}) is missing")
        t = tensors[name]
        qtype = GGMLQuantizationType(t.tensor_type).name
        if qtype not in DENSE_TYPES + INT4_TYPES:
            raise ModelLoadError(f"{path}: tensor {name} has type {qtype}; supported: "
                                 f"{', '.join(DENSE_TYPES + INT4_TYPES)}")
        return name, t, qtype

    permuted = cfg.model_type in PERMUTED_QK

    def n_head_for(hf_name: str):
        if not permuted:
            return None
        if ".q_proj." in hf_name:
            return cfg.n_heads
        if ".k_proj." in hf_name:
            return cfg.n_kv_heads
        return None

    def get_matrix(hf_name: str):
        name, t, qtype = lookup(hf_name)
        rows = np.asarray(t.data)                      # [out_features, bytes or elements per row]
        out_features, in_features = int(t.shape[1]), int(t.shape[0])
        if rows.ndim == 3:                             # an expert stack: [experts, out_features, ...]
            return expert_stack(rows, qtype, t.tensor_type, (out_features, in_features))
        n_head = n_head_for(hf_name)
        if n_head is not None:
            rows = _unpermute_rows(rows, n_head)
        if keep_int4 and qtype in INT4_TYPES:
            return int4_from_gguf(rows, qtype, (out_features, in_features))
        if keep_q8_head and qtype == "Q8_0" and hf_name in _HEAD_NAMES and n_head is None:
            from ..kernels.q8 import from_gguf_q8_0

            blocks = torch.from_numpy(np.array(rows, dtype=np.uint8)).reshape(out_features, in_features // 32, 34)
            return from_gguf_q8_0(blocks, (out_features, in_features))
        w = dequantize(rows, t.tensor_type).reshape(out_features, in_features)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))

    def expert_stack(rows: np.ndarray, qtype: str, tensor_type, shape: tuple) -> list:
        """One matrix per expert: kept 4-bit expert by expert (exact), or dequantized."""
        if keep_int4 and qtype in INT4_TYPES:
            return [int4_from_gguf(rows[e], qtype, shape) for e in range(rows.shape[0])]
        w = dequantize(rows, tensor_type).reshape(rows.shape[0], *shape)
        return [torch.from_numpy(np.ascontiguousarray(w[e], dtype=np.float32)) for e in range(rows.shape[0])]

    def get_vector(hf_name: str):
        name, t, qtype = lookup(hf_name)
        data = dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
        if n_head_for(hf_name) is not None:  # q/k biases are permuted like their rows
            data = _unpermute_rows(data, n_head_for(hf_name))
        return torch.from_numpy(np.array(data, dtype=np.float32))

    return get_matrix, get_vector


def int4_from_gguf(rows: np.ndarray, qtype: str, shape: tuple):
    """A Q4_0 / Q4_1 / Q4_K matrix's raw blocks (``[out_features, bytes per row]``) as an
    ``Int4Weight``, converted exactly."""
    from . import int4_formats as f

    convert = {"Q4_0": f.from_gguf_q4_0, "Q4_1": f.from_gguf_q4_1, "Q4_K": f.from_gguf_q4_k}[qtype]
    return convert(np.ascontiguousarray(rows), shape)


def gguf_int4_block(reader):
    """The block width (32) of the file's 4-bit layer matrices, or None when it has none. A draft
    re-quantized at this width with min/scale groups reproduces those matrices exactly."""
    from gguf import GGMLQuantizationType

    four_bit = any(t.name.startswith("blk.") and GGMLQuantizationType(t.tensor_type).name in INT4_TYPES
                   for t in reader.tensors)
    return 32 if four_bit else None
