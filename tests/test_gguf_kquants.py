"""GGUF k-quant files (llama.cpp's Q4_K_M and friends) on a tiny hand-written GGUF.

Q4_K tensors stay 4-bit, converted exactly (the Int4Weight dequantizes to gguf-py's own
dequantization, bit for bit, Q/K row permutation undone); Q5_K/Q6_K tensors are dequantized.
gguf-py cannot quantize k-quants, so blocks are random bytes with sane fp16 scales.
"""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

from specexec_rt import load_model  # noqa: E402
from specexec_rt.errors import ModelLoadError  # noqa: E402
from specexec_rt.kernels.int4 import Int4Weight  # noqa: E402
from specexec_rt.loading.int4_formats import from_gguf_q4_k  # noqa: E402
from specexec_rt.loading.gguf_file import gguf_config, gguf_getters, open_gguf  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, LAYERS = 256, 512, 4, 2, 64, 2
HEAD_DIM = HIDDEN // HEADS
# Offsets of the fp16 super-block scales in each block type (the rest is random bytes).
FP16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ2_XXS: (0,)}


def random_blocks(qtype, n, k, rng, scale=3e-4):
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    nb = n * k // block
    raw = rng.integers(0, 256, size=(nb, nbytes), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        d = rng.uniform(scale / 4, scale, nb).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(n, k // block * nbytes)


def write_tiny_gguf(path, types, rng):
    """A two-layer Llama in GGUF; ``types`` maps a tensor suffix (attn_q, ffn_down, output...)
    to its GGML type (default Q4_K for layer matrices)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)

    def f32(*shape, scale=0.1, offset=0.0):
        return (rng.standard_normal(shape) * scale + offset).astype(np.float32)

    def mat(name, n, k):
        qtype = types.get(name.split(".")[-2], T.Q4_K)
        w.add_tensor(name, random_blocks(qtype, n, k, rng), raw_dtype=qtype)

    w.add_tensor("token_embd.weight", f32(VOCAB, HIDDEN, scale=0.5))
    w.add_tensor("output_norm.weight", f32(HIDDEN, offset=1.0))
    mat("output.weight", VOCAB, HIDDEN)
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", f32(HIDDEN, offset=1.0))
        w.add_tensor(p + "ffn_norm.weight", f32(HIDDEN, offset=1.0))
        for name, n, k in (("attn_q", HIDDEN, HIDDEN), ("attn_k", kv, HIDDEN), ("attn_v", kv, HIDDEN),
                           ("attn_output", HIDDEN, HIDDEN), ("ffn_gate", INTER, HIDDEN),
                           ("ffn_up", INTER, HIDDEN), ("ffn_down", HIDDEN, INTER)):
            mat(p + name + ".weight", n, k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# As in llama.cpp's Q4_K_M: v and down in Q6_K, output in Q6_K, the rest Q4_K (here also Q5_K).
Q4_K_M = {"attn_v": T.Q6_K, "ffn_down": T.Q5_K, "output": T.Q6_K}


@pytest.fixture(scope="module")
def q4km(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q4km.gguf", Q4_K_M, np.random.default_rng(0))


@pytest.mark.parametrize("n,k", [(3, 256), (16, 768), (5, 1024)])
def test_from_gguf_q4_k_is_exact(n, k):
    rng = np.random.default_rng(n * k)
    raw = random_blocks(T.Q4_K, n, k, rng, scale=1e-2)
    want = quants.dequantize(raw, T.Q4_K).reshape(n, k)
    w = from_gguf_q4_k(raw, (n, k))
    assert (w.group_size, w.shape) == (32, (n, k))
    np.testing.assert_array_equal(w.dequantize().numpy(), want)


def test_from_gguf_q4_k_scales_are_fp16_only_when_exact():
    rng = np.random.default_rng(1)
    raw = random_blocks(T.Q4_K, 4, 256, rng)
    raw = raw.reshape(4, 144)
    raw[:, 4:16] = 1                      # every 6-bit scale and min = 1 (or 1 + 16 for 4-7): d*sc exact in fp16
    w = from_gguf_q4_k(raw, (4, 256))
    assert w.scales.dtype == torch.float16
    np.testing.assert_array_equal(w.dequantize().numpy(), quants.dequantize(raw, T.Q4_K).reshape(4, 256))
    with pytest.raises(ValueError, match="bytes for shape"):
        from_gguf_q4_k(raw[:, :100], (4, 256))
    with pytest.raises(ValueError, match="multiple of 256"):
        from_gguf_q4_k(raw, (8, 128))


def test_q4_k_tensors_stay_4bit_and_exact(q4km):
    reader = open_gguf(q4km)
    cfg = gguf_config(reader, q4km)
    get_int4, _ = gguf_getters(reader, cfg, q4km, keep_int4=True)
    get_dense, _ = gguf_getters(reader, cfg, q4km, keep_int4=False)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        hf = f"model.layers.1.{name}.weight"
        packed, dense = get_int4(hf), get_dense(hf)
        assert isinstance(packed, Int4Weight), name
        torch.testing.assert_close(packed.dequantize(), dense, rtol=0, atol=0, msg=name)
    for name in ("self_attn.v_proj", "mlp.down_proj"):            # Q6_K, Q5_K: dequantized
        assert isinstance(get_int4(f"model.layers.0.{name}.weight"), torch.Tensor)


def test_q4_k_m_model_loads_both_ways(q4km, monkeypatch):
    from specexec_rt.kernels.int4 import cpu as int4_cpu

    dense = load_model(q4km, device="cpu", quantize="none", max_len=64)
    packed = load_model(q4km, device="cpu", quantize="int4", max_len=64)
    for i in range(LAYERS):
        a, b = dense.weights.layers[i], packed.weights.layers[i]
        # Q4_K matrices are kept as they are (no re-quantization): exactly the dense weights.
        for field in ("wo", "w_gate_up"):
            assert isinstance(getattr(b, field), Int4Weight)
            torch.testing.assert_close(getattr(b, field).dequantize(), getattr(a, field), rtol=0, atol=0)
        # q/k (Q4_K) + v (Q6_K) fuse to dense and, like down (Q5_K), are quantized on request.
        assert isinstance(b.wqkv, Int4Weight) and isinstance(b.w_down, Int4Weight)
        a.wqkv, a.w_down = b.wqkv.dequantize(), b.w_down.dequantize()
    # Same weights, two paths (int4 kernels vs float matmuls): equal logits. fp32 compute in
    # the CPU int4 op, so only the path differs.
    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", torch.float32)
    ids = torch.tensor([1, 5, 9, 3])
    la = dense.forward(ids, torch.arange(4), dense.cache, 0)
    lb = packed.forward(ids, torch.arange(4), packed.cache, 0)
    assert torch.isfinite(la).all()
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)


def test_4bit_file_sets_the_default_drafts_group(q4km):
    """A GGUF with 4-bit layer matrices records their 32-wide blocks even when dequantized on
    load; the default draft re-quantizes at that group (64 otherwise, which 256/512 allow)."""
    from specexec_rt.speculative.drafts import default_draft

    dense = load_model(q4km, device="cpu", quantize="none", max_len=64)
    assert dense.source_int4_group == 32
    assert {getattr(lw, f).group_size for lw in default_draft(dense).weights.layers
            for f in ("wqkv", "wo", "w_gate_up", "w_down")} == {32}


def test_unsupported_gguf_type_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "iq2.gguf", {"ffn_up": T.IQ2_XXS}, np.random.default_rng(2))
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_up\.weight has type IQ2_XXS; supported: .*Q4_K"):
        load_model(path, device="cpu", max_len=64)
