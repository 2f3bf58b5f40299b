"""One config dataclass for every supported architecture, read from an HF config or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import UnsupportedModelError

# model_type -> what differs between the supported families. Everything else (RMSNorm, SwiGLU,
# rotate-half RoPE, GQA) is shared.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2, Llama 3/3.1/3.2, SmolLM2 (LlamaForCausalLM)",
    "mistral": "Mistral (sliding window only up to the window: max_len <= sliding_window)",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v bias)",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None      # {"rope_type": "llama3", "factor": ..., ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(self.model_type, supported=SUPPORTED_MODEL_TYPES)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                self.model_type, f"rope scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def qkv_size(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim


def _eos_list(value) -> list:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _rope_from_hf(hf) -> tuple[float, Optional[dict]]:
    """transformers 5 stores `rope_parameters` (theta and type inside); 4.x checkpoints carry
    top-level `rope_theta` and `rope_scaling`. Accept both spellings."""
    params = getattr(hf, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        params = dict(params)
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    scaling = getattr(hf, "rope_scaling", None) or params
    scaling = dict(scaling) if scaling else {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling.pop("rope_theta", None)
    if rope_type == "default":
        return float(theta), None
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def config_from_hf(hf) -> ModelConfig:
    """Build a ModelConfig from a `transformers.PretrainedConfig` (or anything with its attributes)."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(model_type, supported=SUPPORTED_MODEL_TYPES)
    n_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    theta, scaling = _rope_from_hf(hf)
    qkv_bias = model_type == "qwen2" or bool(getattr(hf, "attention_bias", False))
    o_bias = model_type != "qwen2" and bool(getattr(hf, "attention_bias", False))
    act = getattr(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(model_type, f"hidden_act={act!r} is not supported (only silu)")
    if getattr(hf, "mlp_bias", False):
        raise UnsupportedModelError(model_type, "mlp_bias=True is not supported")
    sliding = getattr(hf, "sliding_window", None)
    if model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
        sliding = None
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        n_layers=hf.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        rms_norm_eps=getattr(hf, "rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=getattr(hf, "max_position_embeddings", 4096) or 4096,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        sliding_window=sliding,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_eos_list(getattr(hf, "eos_token_id", None)),
    )
