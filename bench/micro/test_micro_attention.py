"""Tree-masked attention: ours against the PyTorch reference and, as the floor, mask-free SDPA
over the same keys (what flash attention costs with nothing to mask).

CPU: one layer of SmolLM2-135M (9 query heads, 3 KV heads, head dim 64) through the native call
with RoPE and the cache write: a decode step (1 row, 512 keys) and a draft tree level (32 rows
over a 256-token prefix and a 32-node tree); at long context (4096 keys) a decode step and a
17-row tree with the cache in float32, float16 and int8, cold, bound by the bytes of K/V read.
CUDA: a Llama-2-70B layer (64 / 8 heads, dim 128, fp16) through the planned Triton launch: a
verification tree (256 rows over a 2048-token prefix and the 256-node tree) and a short query
set over a long prefix (16 rows, 4096 + 16 keys).
"""
from __future__ import annotations

import math

import pytest
import torch

from micro_common import run_case
from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.attention import (Segments, TreeAttentionLaunch, pack_tree_mask, prefix_attention_sdpa,
                                           rope_attention_cpu, rope_attention_reference, tree_attention_reference)

CPU_H, CPU_HKV, CPU_D = 9, 3, 64
CPU_SHAPES = {"decode": (1, 511), "tree": (32, 256)}  # rows, committed prefix (the rows follow it)
CUDA_H, CUDA_HKV, CUDA_D = 64, 8, 128
CUDA_SHAPES = {"verify": (256, 2048), "decode-splits": (16, 4096)}


def _tree_mask(n: int, g: torch.Generator) -> torch.Tensor:
    """A random tree's ancestor mask: node i's parent is a random earlier node."""
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        parent = int(torch.randint(0, i, (1,), generator=g))
        mask[i] |= mask[parent]
    return mask


def _attention_flops(n_q: int, n_k: int, heads: int, d: int) -> int:
    return 4 * n_q * n_k * heads * d  # QK^T and PV, every key (the mask-free floor's work)


@pytest.mark.parametrize("case", list(CPU_SHAPES))
@pytest.mark.parametrize("impl", ["ours", "reference", "sdpa-unmasked"])
def test_rope_attention_cpu(benchmark, impl, case):
    if impl == "ours" and cpu_native.library() is None:
        pytest.skip("the native CPU library is unavailable (see the logged reason)")
    n, prefix = CPU_SHAPES[case]
    h, hkv, d = CPU_H, CPU_HKV, CPU_D
    g = torch.Generator().manual_seed(n)
    n_k, max_len = prefix + n, prefix + n + 64
    qkv = torch.randn(n, (h + 2 * hkv) * d, generator=g)
    pos = torch.arange(prefix, prefix + n, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.cat([pos[:, None] * inv[None, :]] * 2, dim=-1)
    cos, sin = ang.cos(), ang.sin()
    cache_k, cache_v = torch.randn(max_len, hkv, d, generator=g), torch.randn(max_len, hkv, d, generator=g)
    slots = torch.arange(prefix, prefix + n)
    mask = _tree_mask(n, g)
    segments = Segments.single(n, prefix, n)
    args = (qkv, cos, sin, cache_k, cache_v, slots, mask, segments, h, hkv)
    if impl == "ours":
        fn = lambda: rope_attention_cpu(*args)  # noqa: E731
    elif impl == "reference":
        fn = lambda: rope_attention_reference(*args)  # noqa: E731
    else:
        q = qkv[:, :h * d].reshape(n, h, d)
        fn = lambda: prefix_attention_sdpa(q, cache_k[:n_k], cache_v[:n_k])  # noqa: E731
    run_case(benchmark, fn, group=f"rope-attention cpu {case} n_q={n} n_k={n_k}",
             impl="peer" if impl == "sdpa-unmasked" else impl,
             shape=dict(n_q=n, n_k=n_k, heads=h, kv_heads=hkv, head_dim=d),
             nbytes=2 * n_k * hkv * d * 4 + qkv.nbytes + n * h * d * 4, flops=_attention_flops(n, n_k, h, d),
             bound="memory" if n == 1 else "compute")
    if impl == "ours":
        want = rope_attention_reference(qkv, cos, sin, cache_k.clone(), cache_v.clone(), slots, mask, segments, h, hkv)
        torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4)


LONG_KEYS = 4096


@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("rows", [1, 17])
def test_rope_attention_cpu_long_context(benchmark, kv_dtype, rows):
    """A SmolLM2 layer after a 4096-token prompt: a decode step (1 row) and a budget-16 tree (17
    rows), the cache in each storage dtype, cold (a rotation of copies past the last-level cache,
    as the layers of a step are). Bound by the K/V bytes it must read in that dtype (``GB/s``)."""
    if cpu_native.library() is None:
        pytest.skip("the native CPU library is unavailable (see the logged reason)")
    from micro_common import cold_copies, rotating
    from specexec_rt.kernels.attention import KV_DTYPES, encode

    dtype = KV_DTYPES[kv_dtype]
    h, hkv, d = CPU_H, CPU_HKV, CPU_D
    g = torch.Generator().manual_seed(rows)
    prefix, max_len = LONG_KEYS - rows, LONG_KEYS + 8
    qkv = torch.randn(rows, (h + 2 * hkv) * d, generator=g)
    pos = torch.arange(prefix, LONG_KEYS, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.cat([pos[:, None] * inv[None, :]] * 2, dim=-1)
    cos, sin = ang.cos(), ang.sin()
    (k, ks), (v, vs) = encode(torch.randn(max_len, hkv, d, generator=g), dtype), \
        encode(torch.randn(max_len, hkv, d, generator=g), dtype)
    per_key = 2 * hkv * (d * k.element_size() + (4 if ks is not None else 0))
    cache = (k, v, ks, vs)
    caches = cold_copies(benchmark, cache, lambda c: tuple(None if t is None else t.clone() for t in c),
                         max_len * per_key)
    slots = torch.arange(prefix, LONG_KEYS)
    mask = _tree_mask(rows, g)
    segments = Segments.single(rows, prefix, rows)

    def call(c):
        return rope_attention_cpu(qkv, cos, sin, c[0], c[1], slots, mask, segments, h, hkv, k_scale=c[2],
                                  v_scale=c[3])

    got = run_case(benchmark, rotating(call, caches), group=f"rope-attention cpu long n_q={rows} n_k={LONG_KEYS}",
                   impl="ours", shape=dict(n_q=rows, n_k=LONG_KEYS, heads=h, kv_heads=hkv, head_dim=d, kv_dtype=kv_dtype),
                   nbytes=LONG_KEYS * per_key, flops=_attention_flops(rows, LONG_KEYS, h, d),
                   bound="memory" if rows == 1 else "compute", copies=len(caches))
    want = rope_attention_reference(qkv, cos, sin, *(None if t is None else t.clone() for t in cache[:2]), slots,
                                    mask, segments, h, hkv, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CUDA_SHAPES))
@pytest.mark.parametrize("impl", ["ours", "reference", "sdpa-unmasked"])
def test_tree_attention_cuda(benchmark, impl, case):
    n, prefix = CUDA_SHAPES[case]
    h, hkv, d = CUDA_H, CUDA_HKV, CUDA_D
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(n)
    n_k = prefix + n
    q = torch.randn(n, h, d, generator=g).to(dev, torch.float16)
    k = torch.randn(n_k, hkv, d, generator=g).to(dev, torch.float16)
    v = torch.randn(n_k, hkv, d, generator=g).to(dev, torch.float16)
    mask = _tree_mask(n, g).to(dev)
    if impl == "ours":
        launch = TreeAttentionLaunch(q, k, v, pack_tree_mask(mask, prefix), prefix, n)
        fn = lambda: launch.run(q, k, v)  # noqa: E731 - planned once per forward, run per layer
    elif impl == "reference":
        fn = lambda: tree_attention_reference(q, k, v, mask, prefix, validate=False)  # noqa: E731
    else:
        fn = lambda: prefix_attention_sdpa(q, k, v, 1.0 / math.sqrt(d))  # noqa: E731
    run_case(benchmark, fn, group=f"tree-attention cuda {case} n_q={n} n_k={n_k}",
             impl="peer" if impl == "sdpa-unmasked" else impl,
             shape=dict(n_q=n, n_k=n_k, heads=h, kv_heads=hkv, head_dim=d, dtype="float16"),
             nbytes=2 * n_k * hkv * d * 2 + 2 * q.nbytes, flops=_attention_flops(n, n_k, h, d),
             bound="compute" if n >= 128 else "memory", device=dev)
