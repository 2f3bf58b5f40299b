"""Tiny random HF checkpoints of every supported architecture, saved as real model directories."""
from __future__ import annotations

import torch
import transformers

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": (transformers.LlamaConfig, dict()),
    "llama3-rope": (transformers.LlamaConfig, dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-linear-rope": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-bias": (transformers.LlamaConfig, dict(attention_bias=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4096)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
}


def make_hf_model(arch: str, directory, seed: int = 0):
    """Build, randomise (biases and norms too, so every weight matters) and save a tiny model."""
    config_cls, extra = ARCHS[arch]
    cfg = config_cls(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(str(directory), safe_serialization=True)
    return model
