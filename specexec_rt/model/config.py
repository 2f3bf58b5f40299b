"""One config dataclass for every supported architecture, read from an HF config or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ..errors import UnsupportedModelError

# model_type -> what differs between the supported families. Everything else (RMSNorm, SwiGLU,
# rotate-half RoPE, GQA) is shared.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2, Llama 3/3.1/3.2, SmolLM2 (LlamaForCausalLM)",
    "mistral": "Mistral (sliding window only up to the window: max_len <= sliding_window)",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v bias)",
    "qwen3": "Qwen3 dense (per-head q/k RMSNorm before RoPE, explicit head_dim)",
    "qwen3_moe": "Qwen3-MoE (q/k norm; mixture-of-experts layers: softmax router, top-k, norm_topk_prob)",
    "mixtral": "Mixtral (mixture-of-experts layers: top-k experts, softmax over the k)",
}
# Families whose attention RMS-normalises each q and k head (their own weights) before RoPE.
QK_NORM_TYPES = ("qwen3", "qwen3_moe")
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
    # Per-head q/k RMSNorm before RoPE (Qwen3): the layers carry q_norm / k_norm [head_dim].
    qk_norm: bool = False
    # Mixture-of-experts (HF's names): the layers listed in ``moe_layers`` replace the MLP by
    # ``num_experts`` SwiGLU experts of ``moe_intermediate_size``, of which each token takes the
    # ``num_experts_per_tok`` with the highest router softmax, weighted by those probabilities,
    # renormalised to sum to 1 when ``norm_topk_prob`` (Mixtral's "softmax over the top-k logits"
    # is the same numbers). The other layers keep a dense MLP of ``intermediate_size``.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(self.model_type, supported=SUPPORTED_MODEL_TYPES)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        self.moe_layers = tuple(sorted(int(i) for i in self.moe_layers))
        if self.moe_layers:
            self._check_moe()
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                self.model_type, f"rope scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    def _check_moe(self) -> None:
        """A mixture-of-experts layout the runtime cannot serve fails here, naming the field."""
        def bad(detail):
            raise UnsupportedModelError(self.model_type, detail)

        if self.num_experts < 1:
            bad(f"num_experts={self.num_experts}: a mixture-of-experts layer needs at least one expert")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            bad(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_experts="
                f"{self.num_experts}")
        if self.moe_intermediate_size < 1:
            bad(f"moe_intermediate_size={self.moe_intermediate_size}: the experts' width must be positive")
        if self.moe_layers[0] < 0 or self.moe_layers[-1] >= self.n_layers:
            bad(f"mixture-of-experts layers {list(self.moe_layers)} outside the model's {self.n_layers} layers")

    @property
    def qkv_size(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def keep_layers(self, keep) -> "ModelConfig":
        """The config of a model made of layers ``keep`` (sorted indices) of this one: a draft
        that drops or re-quantizes layers keeps each kept layer's kind (dense or experts)."""
        moe = set(self.moe_layers)
        return replace(self, n_layers=len(keep), moe_layers=tuple(j for j, i in enumerate(keep) if i in moe))


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
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not getattr(hf, "use_sliding_window", False):
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
        qk_norm=model_type in QK_NORM_TYPES,
        **_moe_from_hf(hf, model_type),
    )


def _moe_from_hf(hf, model_type: str) -> dict:
    """The mixture-of-experts fields of ``ModelConfig`` from an HF config: which layers have
    experts (Qwen3-MoE: every ``decoder_sparse_step``-th layer not in ``mlp_only_layers``, as HF
    builds them; Mixtral: all), and the routing. Options the runtime does not implement are
    refused here by name."""
    if model_type not in ("qwen3_moe", "mixtral"):
        return {}
    n_layers = hf.num_hidden_layers
    n_experts = int(getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None) or 0)
    top_k = int(getattr(hf, "num_experts_per_tok", 0) or 0)
    if getattr(hf, "shared_expert_intermediate_size", 0):
        raise UnsupportedModelError(model_type, "shared_expert_intermediate_size is set: shared experts are not "
                                                "supported")
    if model_type == "mixtral":
        return dict(num_experts=n_experts, num_experts_per_tok=top_k, moe_intermediate_size=hf.intermediate_size,
                    norm_topk_prob=True, moe_layers=tuple(range(n_layers)) if n_experts else ())
    step = getattr(hf, "decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise UnsupportedModelError(model_type, f"decoder_sparse_step={step!r} must be a positive int")
    dense_only = set(getattr(hf, "mlp_only_layers", None) or ())
    layers = tuple(i for i in range(n_layers) if n_experts > 0 and i not in dense_only and (i + 1) % step == 0)
    return dict(num_experts=n_experts, num_experts_per_tok=top_k,
                moe_intermediate_size=int(getattr(hf, "moe_intermediate_size", 0) or 0),
                norm_topk_prob=bool(getattr(hf, "norm_topk_prob", False)), moe_layers=layers)
