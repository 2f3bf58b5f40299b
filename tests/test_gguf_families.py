"""GGUF files of the Qwen3, Qwen3-MoE and Mixtral families, written with gguf-py's writer the way
llama.cpp's converter lays them out, load and match the safetensors checkpoint they came from.

llama.cpp's layout: Mixtral is architecture ``llama`` with ``expert_count``; experts are stacked
along a leading axis (``blk.N.ffn_{gate,up,down}_exps``, the router ``blk.N.ffn_gate_inp``); Q/K
rows are permuted for the ``llama`` architecture only (the Qwen families keep HF's layout); Qwen3's
q/k norms are ``attn_{q,k}_norm``. Expert stacks in Q4_0 / Q4_1 / Q4_K stay 4-bit, each expert
converted exactly (equal to gguf-py's own dequantization), and the other types are dequantized.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

from hf_models import make_hf_model  # noqa: E402
from specexec_rt import load_model  # noqa: E402
from specexec_rt.errors import UnsupportedModelError  # noqa: E402
from specexec_rt.kernels.int4 import cpu as int4_cpu  # noqa: E402
from specexec_rt.kernels.int4.weight import Int4Weight  # noqa: E402
from specexec_rt.loading.gguf_file import gguf_config, gguf_getters, open_gguf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "mixtral": "llama"}
# HF module -> llama.cpp tensor, per layer (experts: Qwen-MoE names; Mixtral's are mapped first)
LAYER_TENSORS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp"}
MIXTRAL = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj."))
STACKS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's Q/K permutation (rotary pairs interleaved) for the llama architecture."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype) -> tuple:
    """(data, raw_dtype) for the writer: float32 as it is, else quantized by gguf-py along the rows."""
    if qtype == T.F32:
        return w.astype(np.float32), None
    flat = quants.quantize(w.reshape(-1, w.shape[-1]).astype(np.float32), qtype)
    return flat.reshape(*w.shape[:-1], flat.shape[-1]), qtype


def write_gguf(path, cfg: dict, tensors: dict, types: dict = None, extra_kv=None):
    """A GGUF of an HF checkpoint (``cfg`` its config.json, ``tensors`` its float tensors by HF
    name) in llama.cpp's layout. ``types``: llama.cpp tensor suffix -> GGML type (default F32)."""
    types = types or {}
    model_type = cfg["model_type"]
    arch = GGUF_ARCH[model_type]
    if model_type == "mixtral":
        renamed = {}
        for name, t in tensors.items():
            for a, b in MIXTRAL:
                name = name.replace(a, b)
            renamed[name] = t
        tensors = renamed
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    n_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if model_type == "qwen3_moe" and not cfg.get("norm_topk_prob"):
            w.add_expert_weights_norm(False)
    for key, value in (extra_kv or {}).items():
        getattr(w, key)(value)

    def add(name, t, kind):
        data, raw = encode(t, types.get(kind, T.F32) if t.ndim > 1 else T.F32)
        w.add_tensor(name, data, raw_dtype=raw)

    add("token_embd.weight", tensors["model.embed_tokens.weight"], "token_embd")
    add("output_norm.weight", tensors["model.norm.weight"], "output_norm")
    if "lm_head.weight" in tensors and not cfg.get("tie_word_embeddings"):
        add("output.weight", tensors["lm_head.weight"], "output")
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for hf, ours in LAYER_TENSORS.items():
            for kind in ("weight", "bias"):
                t = tensors.get(f"{p}{hf}.{kind}")
                if t is None:
                    continue
                if arch == "llama" and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                    t = permute(t, heads if hf == "self_attn.q_proj" else kv_heads)
                add(f"blk.{i}.{ours}.{kind}", t, ours)
        for proj, ours in STACKS.items():
            experts = [tensors[f"{p}mlp.experts.{e}.{proj}.weight"] for e in range(n_experts)
                       if f"{p}mlp.experts.{e}.{proj}.weight" in tensors]
            if experts:
                add(f"blk.{i}.{ours}.weight", np.stack(experts), ours)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def checkpoint(directory) -> tuple:
    from safetensors.numpy import load_file

    return json.loads((directory / "config.json").read_text()), load_file(str(directory / "model.safetensors"))


# ---------------------------------------------------------------------- whole models

@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "qwen3_moe-topall", "mixtral", "qwen2"])
def test_gguf_matches_safetensors(tmp_path, arch):
    make_hf_model(arch, tmp_path)
    cfg, tensors = checkpoint(tmp_path)
    path = write_gguf(tmp_path / "model.gguf", cfg, tensors)
    st = load_model(tmp_path, device="cpu", max_len=64)
    gg = load_model(path, device="cpu", max_len=64)
    a, b = st.config, gg.config
    assert (b.model_type, b.qk_norm, b.moe_layers, b.num_experts, b.num_experts_per_tok, b.moe_intermediate_size,
            b.norm_topk_prob, b.head_dim) == (a.model_type, a.qk_norm, a.moe_layers, a.num_experts,
                                              a.num_experts_per_tok, a.moe_intermediate_size, a.norm_topk_prob,
                                              a.head_dim)
    ids = torch.tensor([1, 9, 4, 33, 2, 17, 60, 5])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    for m in (st, gg):
        m.forward(ids, torch.arange(8), m.cache, 0)
    torch.testing.assert_close(gg.forward(ids[:3], torch.tensor([8, 9, 9]), gg.cache, 8, tree_mask=mask),
                               st.forward(ids[:3], torch.tensor([8, 9, 9]), st.cache, 8, tree_mask=mask),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_4bit_experts_stay_4bit_and_equal_their_dequantized_model(tmp_path, qtype, monkeypatch):
    """Mixtral with Q4 experts and Q8_0 attention: ``quantize="int4"`` keeps every expert 4-bit
    as stored (each exactly the dequantized one); with float32 compute both paths agree."""
    make_hf_model("mixtral", tmp_path)
    cfg, tensors = checkpoint(tmp_path)
    q = getattr(T, qtype)
    path = write_gguf(tmp_path / "q.gguf", cfg, tensors, types={"ffn_gate_exps": q, "ffn_up_exps": q,
                                                                "ffn_down_exps": q, "attn_q": T.Q8_0})
    dense = load_model(path, device="cpu", quantize="none", max_len=64)
    packed = load_model(path, device="cpu", quantize="int4", max_len=64)
    assert packed.source_int4_group == 32
    for a, b in zip(dense.weights.layers, packed.weights.layers):
        assert b.moe is not None and all(isinstance(m, Int4Weight) for m in b.moe.gate_up + b.moe.down)
        for ma, mb in zip(a.moe.gate_up + a.moe.down, b.moe.gate_up + b.moe.down):
            torch.testing.assert_close(mb.dequantize(), ma, rtol=0, atol=0)
        assert torch.equal(a.moe.router, b.moe.router)
    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", torch.float32)
    ids = torch.tensor([1, 5, 9, 3, 44])
    # The attention matrices were re-quantized to 4 bits in the int4 model: compare on the
    # experts alone by giving the dense model the same attention weights.
    for a, b in zip(dense.weights.layers, packed.weights.layers):
        a.wqkv, a.wo = b.wqkv.dequantize(), b.wo.dequantize()
    f32 = torch.float32   # caches without rounding of their own: the paths' float32 arithmetic compared
    torch.testing.assert_close(packed.forward(ids, torch.arange(5), packed.new_cache(kv_dtype=f32), 0),
                               dense.forward(ids, torch.arange(5), dense.new_cache(kv_dtype=f32), 0), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- expert stacks, type by type

HIDDEN, E_INTER, N_EXPERTS = 256, 256, 3


def random_blocks(qtype, rows: int, k: int, rng) -> np.ndarray:
    """Raw blocks of a k-quant gguf-py cannot quantize: random bytes with sane fp16 super-block scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * k // block, nbytes), dtype=np.uint8)
    raw[:, 0:4] = rng.uniform(1e-3, 1e-2, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, k // block * nbytes)


def synthetic_moe_gguf(path, qtype, rng) -> dict:
    """A one-layer Qwen3-MoE GGUF whose three expert stacks are ``qtype``; returns their raw data."""
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for add, v in (("add_block_count", 1), ("add_context_length", 64), ("add_embedding_length", HIDDEN),
                   ("add_head_count", 4), ("add_head_count_kv", 2), ("add_layer_norm_rms_eps", 1e-6),
                   ("add_vocab_size", 32), ("add_expert_count", N_EXPERTS), ("add_expert_used_count", 2),
                   ("add_expert_feed_forward_length", E_INTER)):
        getattr(w, add)(v)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    w.add_tensor("token_embd.weight", f32(32, HIDDEN))
    w.add_tensor("output_norm.weight", f32(HIDDEN) + 1)
    for name, n, k in (("attn_q", HIDDEN, HIDDEN), ("attn_k", 128, HIDDEN), ("attn_v", 128, HIDDEN),
                       ("attn_output", HIDDEN, HIDDEN), ("ffn_gate_inp", N_EXPERTS, HIDDEN)):
        w.add_tensor(f"blk.0.{name}.weight", f32(n, k))
    for name in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{name}.weight", f32(HIDDEN) + 1)
    raw = {}
    for name, n, k in (("ffn_gate_exps", E_INTER, HIDDEN), ("ffn_up_exps", E_INTER, HIDDEN),
                       ("ffn_down_exps", HIDDEN, E_INTER)):
        if qtype == T.Q4_K:
            data = np.stack([random_blocks(qtype, n, k, rng) for _ in range(N_EXPERTS)])
        else:
            data = quants.quantize(f32(N_EXPERTS * n, k), qtype).reshape(N_EXPERTS, n, -1)
        raw[name] = data
        w.add_tensor(f"blk.0.{name}.weight", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0])
def test_expert_stack_against_gguf_dequantization(tmp_path, qtype):
    """Each expert of a 4-bit stack is an ``Int4Weight`` equal to gguf-py's dequantization, bit for
    bit; other types come back dense, the same numbers."""
    path = tmp_path / "experts.gguf"
    raw = synthetic_moe_gguf(path, qtype, np.random.default_rng(int(qtype)))
    reader = open_gguf(path)
    cfg = gguf_config(reader, path)
    assert (cfg.model_type, cfg.moe_layers, cfg.num_experts, cfg.moe_intermediate_size) == ("qwen3_moe", (0,), 3, 256)
    kept, _ = gguf_getters(reader, cfg, path, keep_int4=True)
    dense, _ = gguf_getters(reader, cfg, path, keep_int4=False)
    for proj, name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
        hf = f"model.layers.0.mlp.experts.{proj}.weight"
        want = quants.dequantize(raw[name], qtype)                       # [experts, out, in]
        a, b = kept(hf), dense(hf)
        assert len(a) == len(b) == N_EXPERTS
        for e in range(N_EXPERTS):
            if qtype == T.Q8_0:
                assert isinstance(a[e], torch.Tensor)
            else:
                assert isinstance(a[e], Int4Weight) and a[e].group_size == 32
                np.testing.assert_array_equal(a[e].dequantize().numpy(), want[e])
            np.testing.assert_array_equal(b[e].numpy(), want[e])
    model = load_model(path, device="cpu", max_len=32, quantize="int4")
    assert torch.isfinite(model.forward(torch.tensor([1, 2, 3]), torch.arange(3), model.cache, 0)).all()


@pytest.mark.parametrize("key,value,match", [("add_expert_gating_func", gguf.ExpertGatingFuncType.SIGMOID,
                                              r"qwen3moe\.expert_gating_func=2 is not supported"),
                                             ("add_expert_shared_count", 1, r"qwen3moe\.expert_shared_count")])
def test_gguf_moe_options_it_cannot_serve_are_named(tmp_path, key, value, match):
    make_hf_model("qwen3_moe-topall", tmp_path)
    cfg, tensors = checkpoint(tmp_path)
    path = write_gguf(tmp_path / "model.gguf", cfg, tensors, extra_kv={key: value})
    with pytest.raises(UnsupportedModelError, match=match):
        load_model(path, device="cpu", max_len=32)
