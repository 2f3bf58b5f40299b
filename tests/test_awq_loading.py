"""An AutoAWQ (GEMM) checkpoint loads 4-bit and matches HF on its weights."""
from __future__ import annotations

import json

import pytest
import torch

from hf_models import assert_prefill_matches_hf, dequantized_reference, make_hf_model, quantize_checkpoint
from specexec_rt import load_model
from specexec_rt.errors import ModelLoadError
from specexec_rt.kernels.int4 import cpu as int4_cpu
from specexec_rt.kernels.int4 import Int4Weight
from specexec_rt.loading.int4_formats import from_awq

GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]    # AutoAWQ's pack order: nibble i <- column 8c + AWQ_ORDER[i]


def awq_pack_columns(v: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] of nibbles -> int32 [R, C/8], written as AutoAWQ's pack loop does."""
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int32)
    for i, col in enumerate(AWQ_ORDER):
        out |= v[:, col::8] << (4 * i)
    return out


def awq_pack(w: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Quantize nn.Linear weight ``w`` [N, K] AWQ-style (asymmetric, group 32 along K)."""
    n, k = w.shape
    wt = w.T.float().reshape(k // GROUP, GROUP, n)                     # [G, 32, N]
    lo, hi = wt.amin(1), wt.amax(1)
    scales = ((hi - lo) / 15).clamp_min(1e-4).half()                   # [K/G, N]
    zeros = torch.round(-lo / scales.float()).clamp(0, 15).to(torch.int32)
    q = torch.round(wt / scales.float()[:, None] + zeros[:, None]).clamp(0, 15).to(torch.int32).reshape(k, n)
    deq = ((q.reshape(k // GROUP, GROUP, n) - zeros[:, None]) * scales.float()[:, None]).reshape(k, n)
    return dict(qweight=awq_pack_columns(q), qzeros=awq_pack_columns(zeros), scales=scales), deq.T.contiguous()


def test_from_awq_round_trip():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    packed, deq = awq_pack(w)
    got = from_awq(packed["qweight"], packed["qzeros"], packed["scales"])
    assert (got.out_features, got.in_features, got.group_size) == (48, 96, GROUP)
    torch.testing.assert_close(got.dequantize(), deq, rtol=0, atol=0)
    with pytest.raises(ValueError, match="qzeros"):
        from_awq(packed["qweight"], packed["qzeros"][:, :2], packed["scales"])
    with pytest.raises(TypeError, match="int32"):
        from_awq(packed["qweight"].float(), packed["qzeros"], packed["scales"])


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("awq")
    hf = make_hf_model("llama", d)
    quantize_checkpoint(d, hf, lambda _, w: awq_pack(w),
                        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True})
    return d, hf.eval()


def test_awq_dequantized_matches_hf(awq_dir):
    d, hf = awq_dir
    assert_prefill_matches_hf(load_model(d, device="cpu", quantize="none", max_len=64), hf, atol=2e-4)


def test_awq_stays_4bit(awq_dir, monkeypatch):
    d, hf = awq_dir
    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", torch.float32)   # exact CPU int4 path
    model = load_model(d, device="cpu", quantize="int4", max_len=64)
    layer = model.weights.layers[0]
    assert all(isinstance(m, Int4Weight) for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    assert_prefill_matches_hf(model, hf, atol=2e-4)


@pytest.mark.parametrize("change,match", [({"version": "gemv"}, "GEMM format"), ({"bits": 3}, "only 4-bit"),
                                          ({"quant_method": "bitsandbytes"}, "not supported")])
def test_unsupported_quantization_configs_are_named(awq_dir, tmp_path, change, match):
    import shutil

    d, _ = awq_dir
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=match):
        load_model(tmp_path, device="cpu", max_len=64)


@pytest.fixture(scope="module")
def awq_moe_dir(tmp_path_factory):
    """Qwen3-MoE (experts in layers 0 and 2, a dense layer 1) with every projection, experts'
    included, in AutoAWQ's format; the router stays dense, as AutoAWQ leaves it."""
    d = tmp_path_factory.mktemp("awq-moe")
    make_hf_model("qwen3_moe", d)
    plain = quantize_checkpoint(d, None, lambda _, w: awq_pack(w),
                                {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm",
                                 "zero_point": True})
    return d, dequantized_reference(d, plain, tmp_path_factory.mktemp("awq-moe-reference"))


def test_awq_moe_dequantized_matches_hf(awq_moe_dir):
    d, hf = awq_moe_dir
    assert_prefill_matches_hf(load_model(d, device="cpu", quantize="none", max_len=64), hf, atol=2e-4)


def test_awq_moe_experts_stay_4bit(awq_moe_dir, monkeypatch):
    d, hf = awq_moe_dir
    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", torch.float32)   # exact CPU int4 path
    model = load_model(d, device="cpu", quantize="int4", max_len=64)
    moe = model.weights.layers[0].moe
    assert len(moe.gate_up) == 8 and all(isinstance(m, Int4Weight) for m in moe.gate_up + moe.down)
    assert isinstance(moe.router, torch.Tensor) and isinstance(model.weights.layers[1].w_down, Int4Weight)
    assert model.source_int4_group == GROUP
    assert_prefill_matches_hf(model, hf, atol=2e-4)
