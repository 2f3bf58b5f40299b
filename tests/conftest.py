"""Shared fixtures: tiny random models (ours built directly, or HF models saved to disk)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Before anything imports triton (transformers may): the interpreter without a GPU, compiled
# kernels with one. The runtime's own CPU dispatch ignores this (SPECEXEC_TRITON_INTERPRET).
from gpu_env import configure_triton_interpreter  # noqa: E402

configure_triton_interpreter()

# GGUF tokenizers are cached after conversion: keep the suite's cache out of the user's home.
if "SPECEXEC_TOKENIZER_CACHE" not in os.environ:
    import tempfile

    os.environ["SPECEXEC_TOKENIZER_CACHE"] = tempfile.mkdtemp(prefix="specexec-tokcache-")
# Likewise measured int4 plans: the suite must see the default plans, not a user's tuning.
if "SPECEXEC_INT4_TUNING" not in os.environ:
    import tempfile

    os.environ["SPECEXEC_INT4_TUNING"] = os.path.join(tempfile.mkdtemp(prefix="specexec-int4-"), "tuning.json")

# The suite never reaches the Hugging Face hub: a hub id not in the cache fails fast (tests of
# the download path unset this and stand in for the download function).
os.environ["HF_HUB_OFFLINE"] = "1"

from specexec_rt.model.config import ModelConfig  # noqa: E402
from specexec_rt.model import Transformer  # noqa: E402
from specexec_rt.model.weights import LayerWeights, ModelWeights, MoEWeights  # noqa: E402


# A tiny mixture-of-experts layout: layers 0 and 2 with 6 experts (top-2), layer 1 dense.
TINY_MOE = dict(n_layers=3, intermediate_size=64, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, moe_layers=(0, 2),
                qk_norm=True)


def tiny_config(model_type: str = "llama", **overrides) -> ModelConfig:
    if model_type == "qwen3_moe":
        overrides = {**TINY_MOE, **overrides}
    base = dict(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48, n_layers=2,
                n_heads=4, n_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                max_position_embeddings=256, tie_word_embeddings=False,
                qkv_bias=model_type == "qwen2", eos_token_ids=[])
    base.update(overrides)
    return ModelConfig(**base)


def random_weights(cfg: ModelConfig, seed: int = 0, scale: float = 0.2) -> ModelWeights:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * scale

    def norm():
        return 1.0 + 0.1 * torch.randn(cfg.hidden_size, generator=g)

    def head_norm():
        return 1.0 + 0.1 * torch.randn(cfg.head_dim, generator=g) if cfg.qk_norm else None

    layers = []
    for i in range(cfg.n_layers):
        if i in cfg.moe_layers:
            e, inter = cfg.num_experts, cfg.moe_intermediate_size
            mlp = dict(w_gate_up=None, w_down=None, moe=MoEWeights(
                router=r(e, cfg.hidden_size) * 5, gate_up=[r(2 * inter, cfg.hidden_size) for _ in range(e)],
                down=[r(cfg.hidden_size, inter) for _ in range(e)]))
        else:
            mlp = dict(w_gate_up=r(2 * cfg.intermediate_size, cfg.hidden_size),
                       w_down=r(cfg.hidden_size, cfg.intermediate_size))
        layers.append(LayerWeights(
            attn_norm=norm(), wqkv=r(cfg.qkv_size, cfg.hidden_size),
            bqkv=r(cfg.qkv_size) if cfg.qkv_bias else None,
            wo=r(cfg.hidden_size, cfg.n_heads * cfg.head_dim), bo=r(cfg.hidden_size) if cfg.o_bias else None,
            ffn_norm=norm(), q_norm=head_norm(), k_norm=head_norm(), **mlp))
    embed = r(cfg.vocab_size, cfg.hidden_size) * 5
    lm_head = embed if cfg.tie_word_embeddings else r(cfg.vocab_size, cfg.hidden_size)
    return ModelWeights(embed=embed, final_norm=norm(), lm_head=lm_head, layers=layers)


def build_tiny_model(model_type: str = "llama", seed: int = 0, max_len: int = 256, kv_dtype=None,
                     **overrides) -> Transformer:
    """A tiny random float32 model on the CPU, built without any checkpoint (``kv_dtype``: the
    cache's storage dtype, default the runtime's)."""
    cfg = tiny_config(model_type, **overrides)
    return Transformer(cfg, random_weights(cfg, seed), max_len, torch.device("cpu"), torch.float32, kv_dtype=kv_dtype)


def greedy_decode(model: Transformer, ids: list, n: int) -> list:
    """The target's own greedy continuation: prefill, then one plain forward per token (the
    oracle every decoding method is compared with)."""
    dev = model.device
    logits = model.prefill(torch.tensor(ids, device=dev))
    out = []
    for i in range(n):
        out.append(int(logits.argmax()))
        pos = len(ids) + i
        logits = model.forward(torch.tensor(out[-1:], device=dev), torch.tensor([pos], device=dev),
                               model.cache, pos)[0]
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the tiny models are all per-op overhead, and two OpenMP threads on a busy 2-core box run
    them several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(model_type="llama", seed=0, max_len=256, kv_dtype=None, **config_overrides)``."""
    return build_tiny_model


def pytest_collection_modifyitems(config, items):
    """CUDA tests skip without a GPU. Interpreter tests (CPU tensors through the Triton kernels,
    modules with NEEDS_INTERPRETER = True) skip when the interpreter is off, which is the default
    on a GPU machine: run them there in a second process with TRITON_INTERPRET=1."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_interp = pytest.mark.skip(reason="CPU interpreter test: set TRITON_INTERPRET=1 to run it")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "cuda" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(no_gpu)
        elif getattr(item.module, "NEEDS_INTERPRETER", False) and not interpreting:
            item.add_marker(no_interp)
