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
    # Qwen3: q/k norm with GQA, head_dim 24 != hidden / heads = 16.
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24)),
    "qwen3-tied": (transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=True)),
    # Mixture of experts: top-2 of 8 with a dense middle layer (mlp_only_layers), top-1 on every
    # other layer (decoder_sparse_step), top-k = every expert, and Mixtral's top-2.
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                                    moe_intermediate_size=32, norm_topk_prob=False,
                                                    mlp_only_layers=[1], head_dim=24)),
    "qwen3_moe-top1": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
                                                         norm_topk_prob=True, decoder_sparse_step=2)),
    "qwen3_moe-topall": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=4,
                                                           moe_intermediate_size=32, norm_topk_prob=True)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
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


def quantize_checkpoint(directory, hf, pack, quantization_config: dict, select=None) -> dict:
    """Rewrite the checkpoint saved in ``directory`` as a 4-bit one: each matrix ``select(name)``
    picks (default: every ``*_proj.weight``) is replaced by ``pack(name, w) -> (checkpoint tensors
    keyed by suffix, dequantized weight)``, and config.json gets ``quantization_config``. ``hf``
    (None for models whose HF parameters are not the checkpoint's tensors, like stacked experts)
    gets the dequantized weights, so it is the reference for the same weights. Returns every
    tensor as the 4-bit checkpoint represents it (``dequantized_reference`` loads those)."""
    import json

    from safetensors.torch import load_file, save_file

    select = select or (lambda name: name.endswith("_proj.weight"))
    path = f"{directory}/model.safetensors"
    out, plain = {}, {}
    for name, t in load_file(path).items():
        if select(name):
            packed, deq = pack(name, t)
            base = name[: -len(".weight")]
            out.update({f"{base}.{key}": v for key, v in packed.items()})
            if hf is not None:
                hf.get_parameter(name).data.copy_(deq)
            plain[name] = deq
        else:
            out[name] = plain[name] = t
    save_file(out, path, metadata={"format": "pt"})
    with open(f"{directory}/config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config
    with open(f"{directory}/config.json", "w") as f:
        json.dump(cfg, f)
    return plain


def dequantized_reference(directory, plain: dict, out_dir):
    """HF's model of the weights a 4-bit checkpoint in ``directory`` represents (``plain``, from
    ``quantize_checkpoint``), saved unquantized to ``out_dir`` and loaded by transformers."""
    import json

    from safetensors.torch import save_file

    cfg = json.loads(open(f"{directory}/config.json").read())
    cfg.pop("quantization_config", None)
    with open(f"{out_dir}/config.json", "w") as f:
        json.dump(cfg, f)
    save_file({k: v.contiguous() for k, v in plain.items()}, f"{out_dir}/model.safetensors", metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()


def assert_prefill_matches_hf(model, hf, atol: float) -> None:
    """Our prefill logits of a fixed 37-token prompt against the HF model's, through a float32 KV
    cache as HF keeps (the default half-precision cache moves logits by ~1e-3)."""
    ids = torch.arange(3, 40)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    cache = model.new_cache(kv_dtype=torch.float32)
    torch.testing.assert_close(model.forward(ids, torch.arange(37), cache, 0), ref, atol=atol, rtol=0)
