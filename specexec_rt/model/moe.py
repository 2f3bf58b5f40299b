"""The mixture-of-experts MLP (Qwen3-MoE, Mixtral): each token goes to its top-k experts, and the
experts run grouped.

Grouped means: the ``n * k`` (token, expert) pairs of a pass are sorted by expert, and each expert
that received tokens runs once over all of them (its gate/up matmul, then SiLU x up fused into
its down matmul: the same ``ops`` calls as a dense MLP, so a CPU 4-bit expert takes the native
int4 kernel over its rows and a CUDA one the Triton int4 GEMM). Nothing runs token by token, and
an expert no token chose costs nothing. The rows come back weighted by the router and summed
per token.

The layer sees only rows, never positions or masks, so every pass of the one forward path
(prefill chunks, decode steps, draft-tree levels, verification trees, ragged batches) goes
through it unchanged. The one cost of that: the host reads how many rows each expert got (one
small device-to-host copy per mixture-of-experts layer on CUDA), which is why a model with
experts is not captured as a CUDA graph (``Transformer.capturable``).
"""
from __future__ import annotations

import torch

from . import ops
from .weights import LayerWeights, MoEWeights


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts of each row of ``x`` ``[n, hidden]`` (already normalised) and their weights:
    ``(weights [n, top_k] in x's dtype, experts int64 [n, top_k])``, highest first.

    As HF: router logits in the model's dtype, softmax over all experts in float32, the top-k
    probabilities, divided by their sum when ``renormalize`` (Qwen3-MoE's ``norm_topk_prob``;
    Mixtral always, which is its softmax over the top-k logits)."""
    probs = torch.softmax(ops.linear(x, router), dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


def experts_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, moe: MoEWeights) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{experts[t, j]}(x[t])`` for every row ``t`` of ``x``
    ``[n, hidden]``, the experts run grouped (module docstring). Returns ``[n, hidden]`` in x's
    dtype."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)       # pairs grouped by expert, tokens in order within one
    rows = order // k                               # the token of each sorted pair
    # The host needs each expert's row count to slice its group: the one read of the layer.
    counts = torch.bincount(flat, minlength=moe.num_experts).tolist()
    xs = x.index_select(0, rows)
    ys = torch.empty_like(xs)
    start = 0
    for e, count in enumerate(counts):
        if count:
            end = start + count
            gate_up = ops.linear(xs[start:end], moe.gate_up[e])
            ys[start:end] = ops.swiglu_linear(gate_up, moe.down[e])
            start = end
    ys.mul_(weights.reshape(-1)[order].unsqueeze(1))
    return torch.zeros_like(x).index_add_(0, rows, ys)


def moe_mlp(x: torch.Tensor, layer: LayerWeights, top_k: int, renormalize: bool, eps: float) -> torch.Tensor:
    """The MLP half of a mixture-of-experts block: ``x + experts(rms_norm(x))``, ``x`` ``[n, hidden]``."""
    h = ops.rms_norm(x, layer.ffn_norm, eps)
    weights, experts = route(h, layer.moe.router, top_k, renormalize)
    return x + experts_forward(h, weights, experts, layer.moe)
