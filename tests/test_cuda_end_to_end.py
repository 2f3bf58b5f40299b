"""The whole runtime on a GPU: Triton kernels inside the model, the engine on device tensors,
an offloaded target. Runs only where CUDA exists (the GPU suite runs it)."""
from __future__ import annotations

import pytest
import torch

from conftest import greedy_decode, random_weights, tiny_config
from specexec_rt.speculative.engine import Engine
from specexec_rt.model import Transformer
from specexec_rt.model.weights import replace_leaves

pytestmark = pytest.mark.cuda


def cuda_pair(dtype=torch.float16, offload=False, noise=0.1):
    """A small target (head_dim 64: the kernel path) and a perturbed draft, both on the GPU."""
    cfg = tiny_config(vocab_size=128, hidden_size=256, intermediate_size=384, n_layers=4,
                      n_heads=4, n_kv_heads=2, head_dim=64)
    w = random_weights(cfg, 0, scale=0.3)
    g = torch.Generator().manual_seed(9)
    dw = replace_leaves(w, lambda _, x: x + noise * x.std() * torch.randn(x.shape, generator=g))
    dev = torch.device("cuda")
    to_dev = lambda ws: replace_leaves(ws, lambda _, x: x.to(dev, dtype))  # noqa: E731
    source = None
    tw = to_dev(w)
    if offload:
        from specexec_rt.offload import make_layer_source

        host = replace_leaves(w, lambda _, x: x.to(dtype))
        source = make_layer_source(host.layers, dev, offload=True, gpu_memory_gb=0)
    target = Transformer(cfg, tw, 512, dev, dtype, layer_source=source)
    return target, Transformer(cfg, to_dev(dw), 512, dev, dtype)


def test_gpu_forward_matches_cpu_reference():
    target, _ = cuda_pair(torch.float16)
    cfg = target.config
    cpu = Transformer(cfg, replace_leaves(target.weights, lambda _, x: x.float().cpu()), 512,
                      torch.device("cpu"), torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (40,))
    got = target.forward(ids.cuda(), torch.arange(40, device="cuda"), target.cache, 0).cpu()
    ref = cpu.forward(ids, torch.arange(40), cpu.cache, 0)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 5e-2 * ref.abs().max()


@pytest.mark.parametrize("method,budget", [("chain", 4), ("specinfer", 8), ("specexec", 16), ("specexec", 128)])
@pytest.mark.parametrize("offload", [False, True])
def test_gpu_greedy_lossless(method, budget, offload):
    target, draft = cuda_pair(offload=offload)
    ids = [5, 17, 42, 9, 77, 3]
    want = greedy_decode(target, ids, 24)
    res = Engine(target, draft, method=method, budget=budget).generate(ids, max_new_tokens=24)
    assert res.token_ids == want
    assert res.stats.target_passes < 24
