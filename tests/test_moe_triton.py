"""A mixture-of-experts model with 4-bit experts through the Triton kernels (the CUDA path: the
int4 GEMM once per expert over its rows, tree attention), in Triton's interpreter on CPU tensors:
the same logits as the CPU path with exact float32 int4 products."""
from __future__ import annotations

import torch

from conftest import build_tiny_model
from specexec_rt.kernels.int4 import cpu as int4_cpu
from specexec_rt.kernels.int4.weight import Int4Weight
from specexec_rt.model import ops
from specexec_rt.speculative.drafts import int4_draft

NEEDS_INTERPRETER = True


def test_int4_moe_through_the_triton_kernels_matches_the_cpu_path(monkeypatch):
    target = build_tiny_model("qwen3_moe", seed=2, vocab_size=48, head_dim=16, hidden_size=64, max_len=64)
    model = int4_draft(target, group_size=32, lm_head_int4=False, share_cache=False)
    assert all(isinstance(m, Int4Weight) for m in model.weights.layers[0].moe.gate_up)
    ids = torch.tensor([3, 9, 1, 17, 4, 22])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)

    def run():
        a = model.forward(ids, torch.arange(6), model.cache, 0)
        b = model.forward(ids[:4], torch.tensor([6, 7, 7, 8]), model.cache, 6, tree_mask=mask)
        return torch.cat([a, b])

    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", torch.float32)      # exact int4 products
    want = run()
    calls = []
    from specexec_rt.kernels.int4 import gemm as int4_gemm

    real = int4_gemm.run_plan
    monkeypatch.setattr(int4_gemm, "run_plan", lambda x, w, *a: calls.append(x.shape[0]) or real(x, w, *a))
    monkeypatch.setattr(ops, "use_triton", lambda device: True)
    got = run()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    # Per pass: 2 attention matrices x 3 layers + the dense layer's 2, and per MoE layer 2 calls
    # for each expert that got rows (never one per token).
    assert len(calls) < 2 * (6 + 2 + 2 * 2 * 6) and sum(calls) > 0
