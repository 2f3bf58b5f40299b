"""A GPTQ checkpoint (act-order, asymmetric, v1 zeros) loads 4-bit and matches HF on its weights."""
from __future__ import annotations

import pytest
import torch

from hf_models import assert_prefill_matches_hf, dequantized_reference, make_hf_model, quantize_checkpoint
from specexec_rt import load_model
from specexec_rt.kernels.int4 import cpu as int4_cpu
from specexec_rt.kernels.int4 import Int4Weight

GROUP = 32


def gptq_pack(w: torch.Tensor, g_idx: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Quantize nn.Linear weight ``w`` [N, K] GPTQ-style with act-order ``g_idx``.
    Returns the checkpoint tensors and the dequantized weight they represent."""
    n, k = w.shape
    wt = w.T.float()                                                   # [K, N]
    lo = torch.stack([wt[g_idx == i].amin(0) for i in range(k // GROUP)])
    hi = torch.stack([wt[g_idx == i].amax(0) for i in range(k // GROUP)])
    scales = ((hi - lo) / 15).clamp_min(1e-4).half()
    zeros = torch.round(-lo / scales.float()).clamp(1, 15).to(torch.int32)
    q = torch.round(wt / scales.float()[g_idx] + zeros[g_idx]).clamp(0, 15).to(torch.int32)
    deq = scales.float()[g_idx] * (q - zeros[g_idx]).float()          # [K, N]
    qweight = torch.zeros(k // 8, n, dtype=torch.int32)
    qzeros = torch.zeros(k // GROUP, n // 8, dtype=torch.int32)
    for j in range(8):
        qweight |= q[j::8] << (4 * j)
        qzeros |= (zeros[:, j::8] - 1) << (4 * j)                     # v1 format stores zero - 1
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx.clone()), deq.T.contiguous()


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq")
    hf = make_hf_model("llama", d)
    g = torch.Generator().manual_seed(5)
    g_idx = {}

    def pack(name, t):
        # Layers reading the same input share GPTQ's act-order (same Hessian): q/k/v, gate/up.
        key = name.rsplit(".", 2)[0] + {"q": "qkv", "k": "qkv", "v": "qkv", "g": "gu", "u": "gu"}.get(
            name.rsplit(".", 2)[1][0], name.rsplit(".", 2)[1])
        if key not in g_idx:
            g_idx[key] = (torch.randperm(t.shape[1], generator=g) % (t.shape[1] // GROUP)).to(torch.int32)
        return gptq_pack(t, g_idx[key])

    quantize_checkpoint(d, hf, pack, {"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                      "desc_act": True, "sym": False, "checkpoint_format": "gptq"})
    return d, hf.eval()


def test_gptq_dequantized_matches_hf(gptq_dir):
    d, hf = gptq_dir
    assert_prefill_matches_hf(load_model(d, device="cpu", quantize="none", max_len=64), hf, atol=2e-4)


def test_gptq_stays_4bit_with_act_order(gptq_dir, monkeypatch):
    d, hf = gptq_dir
    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", torch.float32)   # exact CPU int4 path
    model = load_model(d, device="cpu", quantize="int4", max_len=64)
    layer = model.weights.layers[0]
    assert isinstance(layer.wqkv, Int4Weight) and layer.wqkv.perm is not None
    assert isinstance(layer.w_down, Int4Weight) and layer.w_down.perm is not None
    assert_prefill_matches_hf(model, hf, atol=2e-3)


def test_source_group_only_where_groups_are_contiguous(gptq_dir):
    """The default draft re-quantizes at the checkpoint's group only when that group is a run
    of consecutive inputs: act-order (``desc_act``) scatters each group across the row."""
    from specexec_rt.loading.hf import int4_group

    d, _ = gptq_dir
    assert load_model(d, device="cpu", quantize="none", max_len=64).source_int4_group is None   # act-order
    assert int4_group({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}) == 128
    assert int4_group({"quant_method": "awq", "w_bit": 4, "q_group_size": 64}) == 64
    assert int4_group({"quant_method": "gptq", "group_size": -1}) is None        # one group per row
    assert int4_group(None) is None


@pytest.fixture(scope="module")
def gptq_mixtral_dir(tmp_path_factory):
    """Mixtral with its attention and every expert's w1/w2/w3 in GPTQ, act-order; the matrices
    that read the same input share it (q/k/v; an expert's w1 and w3), so they fuse 4-bit."""
    d = tmp_path_factory.mktemp("gptq-mixtral")
    make_hf_model("mixtral", d)
    g = torch.Generator().manual_seed(6)
    g_idx = {}

    def pack(name, t):
        parent, module = name.rsplit(".", 2)[:2]
        key = parent + {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "w1": "gu", "w3": "gu"}.get(module, module)
        if key not in g_idx:
            g_idx[key] = (torch.randperm(t.shape[1], generator=g) % (t.shape[1] // GROUP)).to(torch.int32)
        return gptq_pack(t, g_idx[key])

    plain = quantize_checkpoint(d, None, pack, {"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                                "desc_act": True, "sym": False, "checkpoint_format": "gptq"},
                                select=lambda name: name.endswith(("_proj.weight", ".w1.weight", ".w2.weight",
                                                                   ".w3.weight")))
    return d, dequantized_reference(d, plain, tmp_path_factory.mktemp("gptq-mixtral-reference"))


def test_gptq_mixtral_dequantized_matches_hf(gptq_mixtral_dir):
    d, hf = gptq_mixtral_dir
    assert_prefill_matches_hf(load_model(d, device="cpu", quantize="none", max_len=64), hf, atol=2e-4)


def test_gptq_mixtral_experts_stay_4bit(gptq_mixtral_dir, monkeypatch):
    d, hf = gptq_mixtral_dir
    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", torch.float32)   # exact CPU int4 path
    model = load_model(d, device="cpu", quantize="int4", max_len=64)
    moe = model.weights.layers[1].moe
    assert all(isinstance(m, Int4Weight) and m.perm is not None for m in moe.gate_up + moe.down)
    assert model.source_int4_group is None       # act-order: the default draft keeps its own group
    assert_prefill_matches_hf(model, hf, atol=2e-3)
