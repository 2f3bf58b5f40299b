"""Tree-masked attention: Triton kernel (interpreter on CPU, real on CUDA) vs the reference.

Tolerances: fp32 in the interpreter atol = rtol = 1e-4 (the kernel's online softmax and tile
order differ from SDPA's only by fp32 rounding); fp16/bf16 on CUDA vs a float32 reference:
atol = rtol = 1e-2 (fp16), 2e-2 (bf16).
"""


# Without a GPU the kernels run in Triton's interpreter (set before triton is imported); on a GPU
# machine the CUDA tests run compiled and the CPU-interpreter tests skip (conftest.py) unless
# TRITON_INTERPRET=1 is set for the whole process.
from gpu_env import configure_triton_interpreter  # noqa: E402

configure_triton_interpreter()
NEEDS_INTERPRETER = True

import math  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from specexec_rt.kernels.attention import (  # noqa: E402
    KVView,
    TileConfig,
    pack_tree_mask,
    prefix_attention_sdpa,
    tree_attention,
    tree_attention_packed,
    tree_attention_reference,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FP32_TOL = dict(atol=1e-4, rtol=1e-4)
CUDA_TOL = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# ----------------------------------------------------------------------------- helpers


def random_tree_mask(n_tree: int, n_q: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Ancestor-or-self mask [n_q, n_tree] of a random tree, for its last n_q nodes.

    Node i's parent is < i, or -1 (a root hanging off the prefix). The queries are the
    newest nodes, as when a draft tree grows one level per call.
    """
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, n_tree)]
    anc = torch.zeros(n_tree, n_tree, dtype=torch.bool)
    for i, p in enumerate(parents):
        anc[i, i] = True
        if p >= 0:
            anc[i] |= anc[p]
    return anc[n_tree - n_q:].to(device)


def make_qkv(n_q, n_k, n_heads, n_kv, d, gen, dtype=torch.float32, device="cpu"):
    """q a head slice of a fused [n_q, 2 * n_heads, d] buffer; k, v strided slices of a cache."""
    offset = 3
    fused = torch.randn(n_q, 2 * n_heads, d, generator=gen)
    # An extra head per cache row makes the slices non-contiguous (row stride != n_kv * d).
    cache_k = torch.randn(n_k + offset + 5, n_kv + 1, d, generator=gen)
    cache_v = torch.randn(n_k + offset + 5, n_kv + 1, d, generator=gen)
    q = fused.to(device, dtype)[:, :n_heads]
    k = cache_k.to(device, dtype)[offset:offset + n_k, 1:]
    v = cache_v.to(device, dtype)[offset:offset + n_k, :n_kv]
    return q, k, v


def dense_sdpa(q, k, v, tree_mask, prefix_len, scale=None):
    """Independent check: K/V repeated per query head, additive -inf mask, float64 SDPA."""
    n_q, n_heads, d = q.shape
    group = n_heads // k.shape[1]
    full = torch.ones(n_q, k.shape[0], dtype=torch.bool, device=q.device)
    full[:, prefix_len:] = tree_mask
    bias = torch.zeros(full.shape, dtype=torch.float64, device=q.device).masked_fill(~full, -math.inf)
    qh = q.double().permute(1, 0, 2)
    kh = k.double().repeat_interleave(group, dim=1).permute(1, 0, 2)
    vh = v.double().repeat_interleave(group, dim=1).permute(1, 0, 2)
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale)
    return o.permute(1, 0, 2)


def assert_close(actual, expected, atol, rtol, what=""):
    assert not torch.isnan(actual).any(), f"{what}: NaN in output"
    err = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    bad = err > bound
    if bad.any():
        idx = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} elements off, first at {idx}: "
                             f"{actual[idx].item()} vs {expected[idx].item()}, max err {err.max().item():.3g}")


# ----------------------------------------------------------------------------- kernel vs reference

# (n_q, n_tree, prefix_len, n_kv, group, head_dim, num_splits, config)
KERNEL_CASES = [
    (1, 1, 700, 1, 8, 64, None, None),  # decode, GQA 8, no split
    (1, 5, 700, 2, 4, 128, 6, None),  # decode split-K, several splits
    (7, 20, 130, 1, 4, 64, None, TileConfig(16, 32, 4, 1)),  # 1-word tiles, rows not multiple of 16
    (45, 45, 0, 1, 1, 128, None, None),  # no prefix
    (45, 90, 257, 2, 1, 80, 3, None),  # head_dim 80 (padded), grown tree, split over prefix+tree
    (300, 300, 33, 1, 1, 64, None, None),  # prefill-like causal tree, tail tile of prefix
    (12, 100, 64, 1, 8, 96, 2, TileConfig(32, 64, 4, 1)),  # head_dim 96, split, exact prefix tile
    (300, 400, 700, 1, 8, 128, None, None),  # big GQA group: 2400 packed rows
    (100, 100, 700, 1, 4, 64, 4, TileConfig(64, 32, 4, 1)),  # split-K with many row blocks
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "nq{}-T{}-P{}-kv{}-g{}-d{}-s{}".format(*c[:7]))
def test_kernel_matches_reference(case):
    n_q, n_tree, prefix_len, n_kv, group, d, splits, cfg = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case[:7]).encode()))
    mask = random_tree_mask(n_tree, n_q, gen)
    q, k, v = make_qkv(n_q, prefix_len + n_tree, n_kv * group, n_kv, d, gen)
    assert not (k.is_contiguous() or v.is_contiguous())
    out = torch.full(q.shape, float("nan"))
    got = tree_attention(q, k, v, mask, prefix_len, out=out, num_splits=splits, config=cfg)
    assert got.data_ptr() == out.data_ptr()
    ref = tree_attention_reference(q, k, v, mask, prefix_len)
    assert_close(got, ref, **FP32_TOL, what="kernel vs reference")


def test_kernel_fp16_in_interpreter():
    """Half inputs: P is cast to V's dtype for the second dot and the output to q's dtype."""
    gen = torch.Generator().manual_seed(9)
    mask = random_tree_mask(30, 20, gen)
    q, k, v = make_qkv(20, 130, 8, 2, 64, gen, dtype=torch.float16)
    out = torch.full(q.shape, float("nan"), dtype=torch.float16)
    tree_attention(q, k, v, mask, 100, out=out, num_splits=2)
    assert out.dtype == torch.float16
    assert_close(out, dense_sdpa(q, k, v, mask, 100), **CUDA_TOL[torch.float16], what="fp16")


def test_kernel_arbitrary_mask_and_custom_scale():
    """Non-tree masks: rows that see only late entries, rows and whole blocks seeing no tree
    entry (legal with a prefix); checks the visible-tile range logic of the kernel."""
    gen = torch.Generator().manual_seed(11)
    n_q, n_tree, prefix_len, n_kv, group, d = 40, 150, 40, 1, 2, 64
    mask = torch.rand(n_q, n_tree, generator=gen) < 0.1
    mask[:20] = False  # first 32 rows (block 0 with BLOCK_M=32) see only 2 late entries
    mask[:20, 140:142] = True
    mask[5] = False  # prefix only
    mask[32:] = False  # block 1 sees no tree entry at all
    mask[35, 0] = True
    q, k, v = make_qkv(n_q, prefix_len + n_tree, n_kv * group, n_kv, d, gen)
    for splits in (1, 4):
        got = tree_attention(q, k, v, mask, prefix_len, 0.3, num_splits=splits,
                             config=TileConfig(32, 32, 4, 1))
        assert_close(got, tree_attention_reference(q, k, v, mask, prefix_len, 0.3), **FP32_TOL,
                     what=f"splits={splits}")


def test_packed_mask_reused_across_layers():
    """The model's form: pack once, call per layer with that layer's K/V."""
    gen = torch.Generator().manual_seed(5)
    n_q, n_tree, prefix_len = 9, 30, 50
    mask = random_tree_mask(n_tree, n_q, gen)
    packed = pack_tree_mask(mask, prefix_len)
    for layer in range(2):
        q, k, v = make_qkv(n_q, prefix_len + n_tree, 8, 2, 64, gen)
        out = torch.full(q.shape, float("nan"))
        tree_attention_packed(q, k, v, packed, prefix_len, n_tree, out=out)
        assert_close(out, tree_attention_reference(q, k, v, mask, prefix_len), **FP32_TOL,
                     what=f"layer {layer}")


def test_pack_tree_mask_bits():
    gen = torch.Generator().manual_seed(2)
    for n_tree in (0, 1, 31, 32, 33, 100):
        mask = torch.rand(4, n_tree, generator=gen) < 0.5
        mask[:, 31::32] = True  # bit 31: the int32 sign bit
        packed = pack_tree_mask(mask)
        assert packed.dtype == torch.int32 and packed.shape == (4, (n_tree + 31) // 32)
        bits = (packed.to(torch.int64)[:, :, None] >> torch.arange(32)) & 1
        bits = bits.reshape(4, -1).bool()
        assert torch.equal(bits[:, :n_tree], mask)
        assert not bits[:, n_tree:].any()


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("n_q,n_tree,prefix_len,n_kv,group,d", [
    (1, 1, 300, 2, 8, 64),  # decode
    (512, 512, 0, 2, 4, 64),  # prefill (causal chain)
    (37, 80, 123, 3, 1, 128),
    (5, 0, 17, 1, 4, 80),  # prefix only
])
def test_reference_matches_dense_sdpa(n_q, n_tree, prefix_len, n_kv, group, d):
    gen = torch.Generator().manual_seed(n_q * 1000 + n_tree)
    if n_tree == n_q == 512:
        mask = torch.ones(n_q, n_q, dtype=torch.bool).tril()
    else:
        mask = random_tree_mask(n_tree, n_q, gen) if n_tree else torch.zeros(n_q, 0, dtype=torch.bool)
    q, k, v = make_qkv(n_q, prefix_len + n_tree, n_kv * group, n_kv, d, gen)
    ref = tree_attention_reference(q, k, v, mask, prefix_len)
    assert ref.shape == q.shape and ref.dtype == q.dtype
    assert_close(ref, dense_sdpa(q, k, v, mask, prefix_len), **FP32_TOL, what="reference vs dense")


def test_reference_half_precision_computes_in_fp32():
    gen = torch.Generator().manual_seed(8)
    mask = random_tree_mask(20, 6, gen)
    q, k, v = make_qkv(6, 50, 4, 2, 64, gen, dtype=torch.bfloat16)
    ref = tree_attention_reference(q, k, v, mask, 30)
    assert ref.dtype == torch.bfloat16
    assert_close(ref, dense_sdpa(q, k, v, mask, 30), **CUDA_TOL[torch.bfloat16], what="bf16 reference")


# ----------------------------------------------------------------------------- decode fast path

# SDPA in the inputs' own dtype vs the float32 reference on the same (rounded) inputs.
HALF_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), **CUDA_TOL}


def poisoned_cache_slices(n_q, n_k, n_heads, n_kv, d, gen, dtype, device="cpu"):
    """q a head slice of a fused buffer, k/v strided slices of a [max_len, n_kv + 1, d] cache;
    everything outside the slices is NaN, so a read past them shows up in the output."""
    offset = 5
    fused = torch.full((n_q, 2 * n_heads, d), float("nan"), dtype=dtype, device=device)
    fused[:, :n_heads] = torch.randn(n_q, n_heads, d, generator=gen).to(device, dtype)
    caches = []
    for _ in range(2):
        cache = torch.full((n_k + offset + 7, n_kv + 1, d), float("nan"), dtype=dtype, device=device)
        cache[offset:offset + n_k, 1:] = torch.randn(n_k, n_kv, d, generator=gen).to(device, dtype)
        caches.append(cache[offset:offset + n_k, 1:])
    return fused[:, :n_heads], caches[0], caches[1]


def all_visible_reference(q, k, v):
    """tree_attention_reference with a one-entry, all-True tree region (the decode step's mask)."""
    n_tree = 1
    return tree_attention_reference(q, k, v, torch.ones(q.shape[0], n_tree, dtype=torch.bool, device=q.device),
                                    k.shape[0] - n_tree)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_prefix_attention_sdpa_matches_reference(group, d, dtype):
    gen = torch.Generator().manual_seed(group * 1000 + d)
    n_kv = 2
    for n_k in (1, 2, 31, 64, 65, 300, 701):
        for n_q in (1, 5):
            q, k, v = poisoned_cache_slices(n_q, n_k, n_kv * group, n_kv, d, gen, dtype)
            assert n_k == 1 or not (k.is_contiguous() or v.is_contiguous())
            got = prefix_attention_sdpa(q, k, v)
            assert got.shape == q.shape and got.dtype == dtype
            # A fresh tensor, not a view into the inputs.
            assert all(got.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (q, k, v))
            assert_close(got, all_visible_reference(q, k, v), **HALF_TOL[dtype],
                         what=f"n_k={n_k} n_q={n_q}")


def test_prefix_attention_sdpa_custom_scale():
    gen = torch.Generator().manual_seed(12)
    q, k, v = poisoned_cache_slices(1, 40, 8, 2, 64, gen, torch.float32)
    ref = tree_attention_reference(q, k, v, torch.ones(1, 1, dtype=torch.bool), 39, 0.3)
    assert_close(prefix_attention_sdpa(q, k, v, 0.3), ref, **HALF_TOL[torch.float32])


def _kernel_forbidden(*args, **kwargs):
    raise AssertionError("the one-token chain must not reach this path")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_one_token_chain_takes_the_sdpa_path_when_the_kernel_is_on(monkeypatch, dtype):
    from specexec_rt.model import ops
    from specexec_rt.kernels import attention as ta
    from specexec_rt.model import causal_mask

    gen = torch.Generator().manual_seed(13)
    n_heads, n_kv, d, prefix_len = 12, 4, 64, 333
    q, k, v = poisoned_cache_slices(1, prefix_len + 1, n_heads, n_kv, d, gen, dtype)
    ref = all_visible_reference(q, k, v)

    # Default CPU dispatch is unchanged: the reference, with no mask for a decode step.
    meta = ops.prepare_attention(causal_mask(1, "cpu"), prefix_len, n_heads // n_kv, d, chain=True)
    assert not (meta.unmasked or meta.use_kernel) and meta.reference_mask is None

    monkeypatch.setattr(ops, "use_triton", lambda device: True)
    meta = ops.prepare_attention(causal_mask(1, "cpu"), prefix_len, n_heads // n_kv, d, chain=True)
    assert meta.unmasked and not meta.use_kernel
    assert meta.packed_mask is None and meta.reference_mask is None
    monkeypatch.setattr(ta, "tree_attention_packed", _kernel_forbidden)
    monkeypatch.setattr(ta, "tree_attention_reference_prepared", _kernel_forbidden)
    got = ops.attention(q, KVView(k, v), meta)
    assert got.dtype == dtype
    assert_close(got, ref, **HALF_TOL[dtype], what="ops.attention")


def test_only_one_token_chains_skip_the_kernel(monkeypatch):
    """A one-row tree mask (draft growth) may hide tree entries; a longer chain needs its
    causal mask: both keep the kernel."""
    from specexec_rt.model import ops
    from specexec_rt.model import causal_mask

    monkeypatch.setattr(ops, "use_triton", lambda device: True)
    one_row = torch.tensor([[True, False, True]])
    for mask, chain in ((one_row, False), (causal_mask(1, "cpu"), False), (causal_mask(3, "cpu"), True)):
        meta = ops.prepare_attention(mask, 10, 2, 64, chain=chain)
        assert meta.use_kernel and not meta.unmasked and meta.packed_mask is not None


def test_model_decode_with_kernel_on_matches_the_cpu_path(monkeypatch, tiny_model):
    """Prefill through the interpreted kernel, decode steps through prefix_attention_sdpa:
    same logits as the CPU reference path."""
    from specexec_rt.model import ops
    from specexec_rt.kernels import attention as ta

    def run(model):
        ids = torch.tensor([5, 9, 2, 7, 1, 3])
        logits = [model.prefill(ids)]
        for pos in range(len(ids), len(ids) + 4):
            tok = logits[-1].argmax().view(1)
            logits.append(model.forward(tok, torch.tensor([pos]), model.cache, pos)[0])
        return torch.stack(logits)

    # head_dim >= 16: the kernel's minimum; a float32 cache, which flash SDPA reads as it is.
    want = run(tiny_model(head_dim=16, kv_dtype=torch.float32))
    calls = []

    def counted(q, k, v, scale=None):
        calls.append(k.shape[0])
        return prefix_attention_sdpa(q, k, v, scale)

    monkeypatch.setattr(ops, "use_triton", lambda device: True)
    monkeypatch.setattr(ta, "prefix_attention_sdpa", counted)
    got = run(tiny_model(head_dim=16, kv_dtype=torch.float32))
    assert calls == [n_k for n_k in (7, 8, 9, 10) for _ in range(2)]  # 4 decode steps x 2 layers
    assert_close(got, want, **FP32_TOL, what="logits")
    # A cache in another dtype than the queries' (float16 here) sends decode steps to the tree
    # kernel, which converts K/V as it reads them; flash SDPA would need a converted copy.
    calls.clear()
    half = run(tiny_model(head_dim=16, kv_dtype=torch.float16))
    assert calls == []
    assert_close(half, want, atol=2e-2, rtol=2e-2, what="float16-cache logits")


# ----------------------------------------------------------------------------- errors


def _small(gen, n_q=3, n_tree=4, prefix_len=0, n_heads=4, n_kv=2, d=64):
    q, k, v = make_qkv(n_q, prefix_len + n_tree, n_heads, n_kv, d, gen)
    mask = random_tree_mask(n_tree, n_q, gen)
    return q, k, v, mask


def test_fully_masked_row_is_rejected():
    gen = torch.Generator().manual_seed(3)
    q, k, v, mask = _small(gen)
    mask[1] = False
    with pytest.raises(ValueError, match="see no key"):
        tree_attention(q, k, v, mask, 0)
    with pytest.raises(ValueError, match="see no key"):
        tree_attention_reference(q, k, v, mask, 0)
    with pytest.raises(ValueError, match="see no key"):
        pack_tree_mask(mask, 0)
    packed = pack_tree_mask(mask)  # no prefix_len: no check, the kernel's validate flag does it
    with pytest.raises(ValueError, match="sees no key"):
        tree_attention_packed(q, k, v, packed, 0, 4, validate=True)
    # With a prefix, a row seeing no tree entry is fine (it sees the prefix).
    q, k, v, _ = _small(gen, prefix_len=2)
    out = tree_attention(q, k, v, mask, 2)
    assert_close(out, tree_attention_reference(q, k, v, mask, 2), **FP32_TOL)


def test_bad_shapes_and_heads_are_rejected(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    q, k, v, mask = _small(gen, prefix_len=5)
    for fn in (tree_attention, tree_attention_reference):
        with pytest.raises(ValueError, match="tree_mask shape"):
            fn(q, k, v, mask[:, :-1], 5)
        with pytest.raises(ValueError, match="multiple of n_kv_heads"):
            fn(q[:, :3], k, v, mask, 5)
        with pytest.raises(ValueError, match="k and v shapes"):
            fn(q, k, v[:-1], mask, 5)
        with pytest.raises(ValueError, match="head_dim differs"):
            fn(q[..., :32], k, v, mask, 5)
        with pytest.raises(ValueError, match="prefix_len"):
            fn(q, k, v, mask, k.shape[0] + 1)
        with pytest.raises(TypeError, match="prefix_len must be a Python int"):
            fn(q, k, v, mask, torch.tensor(5))
        with pytest.raises(TypeError, match="dtypes differ"):
            fn(q.double(), k, v, mask, 5)
    packed = pack_tree_mask(mask)
    with pytest.raises(ValueError, match="n_tree"):
        tree_attention_packed(q, k, v, packed, 5, 3)
    with pytest.raises(ValueError, match="packed_mask shape"):
        tree_attention_packed(q, k, v, packed[:2], 5, 4)
    with pytest.raises(TypeError, match="int32"):
        tree_attention_packed(q, k, v, mask, 5, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="tree_attention_reference"):
        tree_attention(q, k, v, mask, 5)


# ----------------------------------------------------------------------------- CUDA


# ----------------------------------------------------------------------------- prefix on the device

def check_device_prefix(n_q, n_tree, bound, prefixes, n_heads, n_kv, d, num_splits, dtype, device, tol):
    """One planned launch over a static [bound + n_tree] key range serves every prefix length
    read from the device: each equals the reference on exactly that prefix. Keys past
    prefix + n_tree are NaN, so reading any of them would show."""
    from specexec_rt.kernels.attention import TreeAttentionLaunch

    gen = torch.Generator().manual_seed(n_q * 7 + n_tree + bound + d)
    mask = random_tree_mask(n_tree, n_q, gen, device=device)
    q, k, v = make_qkv(n_q, bound + n_tree, n_heads, n_kv, d, gen, dtype=dtype, device=device)
    prefix_dev = torch.zeros(1, dtype=torch.int32, device=device)
    packed = pack_tree_mask(mask)
    launch = TreeAttentionLaunch(q, k, v, packed, bound, n_tree, num_splits=num_splits, prefix_dev=prefix_dev)
    for p in prefixes:
        kp, vp = k.clone(), v.clone()
        kp[p + n_tree:] = float("nan")
        vp[p + n_tree:] = float("nan")
        prefix_dev.fill_(p)
        got = launch.run(q, kp, vp)
        ref = tree_attention_reference(q, k[:p + n_tree], v[:p + n_tree], mask, p)
        assert_close(got.float(), ref.float(), **tol, what=f"prefix {p} of bound {bound}")


@pytest.mark.parametrize("n_q,n_tree,bound,prefixes,n_kv,group,d,splits", [
    (4, 13, 150, (0, 1, 64, 97, 150), 2, 2, 64, None),
    (8, 40, 70, (5, 70), 1, 4, 128, 3),          # split-K planned from the bound
    (32, 33, 64, (0, 31, 32, 64), 2, 1, 64, 5),  # tile edges
])
def test_kernel_with_prefix_on_the_device(n_q, n_tree, bound, prefixes, n_kv, group, d, splits):
    check_device_prefix(n_q, n_tree, bound, prefixes, n_kv * group, n_kv, d, splits, torch.float32, "cpu",
                        FP32_TOL)


def test_device_prefix_is_validated():
    from specexec_rt.kernels.attention import TreeAttentionLaunch

    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 10, 2, 1, 64, gen)
    packed = pack_tree_mask(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="int32"):
        TreeAttentionLaunch(q, k, v, packed, 6, 4, prefix_dev=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="host"):
        TreeAttentionLaunch(q, k, v, packed, 6, 4, validate=True, prefix_dev=torch.zeros(1, dtype=torch.int32))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_with_prefix_on_the_device(dtype):
    check_device_prefix(32, 481, 1024, (0, 17, 500, 1024), 32, 32, 128, None, dtype, "cuda", CUDA_TOL[dtype])
    check_device_prefix(16, 100, 3000, (1, 2999), 64, 8, 128, 7, dtype, "cuda", CUDA_TOL[dtype])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_tree,prefix_len,n_heads,n_kv,d", [
    (1, 1, 4096, 64, 8, 128),  # 70B decode: auto split-K
    (16, 64, 4096, 32, 32, 128),  # 7B, small tree, split-K
    (128, 300, 517, 64, 8, 128),
    (1024, 1024, 4096, 64, 8, 128),  # 70B verification
    (333, 333, 1000, 16, 4, 80),
    (77, 200, 300, 12, 12, 96),
    (200, 200, 0, 8, 2, 64),
])
def test_cuda_kernel_matches_reference(dtype, n_q, n_tree, prefix_len, n_heads, n_kv, d):
    gen = torch.Generator().manual_seed(n_q + n_tree + prefix_len + d)
    mask = random_tree_mask(n_tree, n_q, gen, device="cuda")
    q, k, v = make_qkv(n_q, prefix_len + n_tree, n_heads, n_kv, d, gen, dtype=dtype, device="cuda")
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    tree_attention(q, k, v, mask, prefix_len, out=out)
    ref = tree_attention_reference(q, k, v, mask, prefix_len)
    assert_close(out.float(), ref.float(), **CUDA_TOL[dtype], what=f"{dtype}")
    # Forced split count on the same inputs must agree too.
    out2 = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    tree_attention(q, k, v, mask, prefix_len, out=out2, num_splits=3)
    assert_close(out2.float(), ref.float(), **CUDA_TOL[dtype], what=f"{dtype} split 3")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_k,n_heads,n_kv,d", [
    (4097, 64, 8, 128),  # 70B decode
    (513, 32, 32, 128),  # 7B decode
    (100, 12, 4, 64),
    (1, 8, 2, 64),
])
def test_cuda_decode_sdpa_path_matches_reference(monkeypatch, dtype, n_k, n_heads, n_kv, d):
    """The runtime's CUDA decode step: ops picks prefix_attention_sdpa, which computes in the
    cache's dtype without copying K/V (peak memory stays far below one K slice)."""
    from specexec_rt.model import ops
    from specexec_rt.model import causal_mask

    monkeypatch.delenv("SPECEXEC_DISABLE_TRITON", raising=False)
    gen = torch.Generator().manual_seed(n_k + d)
    q, k, v = poisoned_cache_slices(1, n_k, n_heads, n_kv, d, gen, dtype, device="cuda")
    ref = all_visible_reference(q, k, v)
    meta = ops.prepare_attention(causal_mask(1, "cuda"), n_k - 1, n_heads // n_kv, d, chain=True)
    assert meta.unmasked and not meta.use_kernel
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = ops.attention(q, KVView(k, v), meta)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert got.dtype == dtype
    assert_close(got.float(), ref.float(), **CUDA_TOL[dtype], what=f"{dtype}")
    if n_k > 64:
        assert extra < k.shape[0] * n_kv * d * k.element_size() / 2, f"{extra} bytes allocated: K/V copied?"


@cuda
@pytest.mark.cuda
def test_cuda_rejects_fp32_and_cpu_mask():
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(4, 20, 4, 2, 64, gen, device="cuda")
    mask = random_tree_mask(10, 4, gen, device="cuda")
    with pytest.raises(TypeError, match="float16/bfloat16"):
        tree_attention(q, k, v, mask, 10)
    with pytest.raises(ValueError, match="tree_mask is on"):
        tree_attention(q.half(), k.half(), v.half(), mask.cpu(), 10)


# ----------------------------------------------------------------------------- ragged batches


def _ragged_case(n_seg: int, n_heads: int, n_kv: int, d: int, seed: int):
    """A random ragged batch: segments in disjoint regions of one strided cache (with gaps),
    odd prefix / tree / query sizes, one segment with an empty prefix."""
    from specexec_rt.kernels.attention import Segments

    g = torch.Generator().manual_seed(seed)
    n_q, base, prefix, n_tree, masks = [], [], [], [], []
    row = 3
    for s in range(n_seg):
        p = 0 if s == 1 else int(torch.randint(1, 70, (1,), generator=g))
        t = int(torch.randint(1, 45, (1,), generator=g))
        q = int(torch.randint(1, t + 1, (1,), generator=g))
        n_q.append(q), base.append(row), prefix.append(p), n_tree.append(t)
        masks.append(random_tree_mask(t, q, g))
        row += p + t + int(torch.randint(0, 9, (1,), generator=g))
    width = max(n_tree)
    mask = torch.zeros(sum(n_q), width, dtype=torch.bool)
    q0 = 0
    for q, t, m in zip(n_q, n_tree, masks):
        mask[q0:q0 + q, :t] = m
        q0 += q
    segs = Segments(tuple(n_q), tuple(base), tuple(prefix), tuple(n_tree))
    cache = torch.randn(row + 5, n_kv + 1, d, generator=g)
    k = cache[:, :n_kv]                                     # strided, like a cache slice
    v = torch.randn(row + 5, n_kv, d, generator=g)
    q = torch.randn(sum(n_q), n_heads, d, generator=g)
    return q, k, v, mask, segs


def _dense_block_diagonal(q, k, v, mask, segs):
    """SDPA over the whole cache with the dense block-diagonal mask (the oracle's oracle)."""
    vis = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
    q0 = 0
    for nq, b, p, t in zip(*segs):
        vis[q0:q0 + nq, b:b + p] = True
        vis[q0:q0 + nq, b + p:b + p + t] = mask[q0:q0 + nq, :t]
        q0 += nq
    group = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(group, 1).permute(1, 0, 2)
    vv = v.float().repeat_interleave(group, 1).permute(1, 0, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q.float().permute(1, 0, 2), kk, vv, attn_mask=vis)
    return o.permute(1, 0, 2)


@pytest.mark.parametrize("n_seg", [1, 3, 5])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_ragged_kernel_matches_reference_and_dense_sdpa(n_seg, group, d):
    from specexec_rt.kernels.attention import tree_attention_ragged, tree_attention_ragged_reference

    n_kv = 2 if group < 8 else 1
    q, k, v, mask, segs = _ragged_case(n_seg, n_kv * group, n_kv, d, seed=n_seg * 100 + group * 10 + d)
    ref = tree_attention_ragged_reference(q, k, v, mask, segs)
    dense = _dense_block_diagonal(q, k, v, mask, segs)
    torch.testing.assert_close(ref, dense, **FP32_TOL)
    got = tree_attention_ragged(q, k, v, mask, segs)
    torch.testing.assert_close(got, ref, **FP32_TOL)


@pytest.mark.parametrize("splits", [2, 5])
def test_ragged_kernel_split_k_merges_every_segment(splits):
    """Flash-decoding splits over segments of unequal length: splits past a segment's tiles
    contribute nothing, the merge still normalises each row over its own keys."""
    from specexec_rt.kernels.attention import tree_attention_ragged, tree_attention_ragged_reference

    q, k, v, mask, segs = _ragged_case(4, 4, 2, 64, seed=7)
    ref = tree_attention_ragged_reference(q, k, v, mask, segs)
    torch.testing.assert_close(tree_attention_ragged(q, k, v, mask, segs, num_splits=splits), ref, **FP32_TOL)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_seg,group,d,splits", [(1, 8, 128, None), (4, 8, 128, None), (4, 4, 64, 3), (5, 1, 128, 2)])
def test_cuda_ragged_kernel_matches_reference(dtype, n_seg, group, d, splits):
    """The batched engine's verification attention, compiled: each request's tree attends to
    its own region of one cache (strided K, split-K merged per segment)."""
    from specexec_rt.kernels.attention import tree_attention_ragged, tree_attention_ragged_reference

    n_kv = 2 if group < 8 else 1
    q, k, v, mask, segs = _ragged_case(n_seg, n_kv * group, n_kv, d, seed=n_seg * 31 + group + d)
    full = torch.randn(k.shape[0], n_kv + 1, d, generator=torch.Generator().manual_seed(d)).to("cuda", dtype)
    full[:, :n_kv] = k.to("cuda", dtype)
    kd = full[:, :n_kv]                                      # strided on the device too
    qd, vd = q.to("cuda", dtype), v.to("cuda", dtype)
    ref = tree_attention_ragged_reference(qd.float().cpu(), kd.float().cpu(), vd.float().cpu(), mask, segs)
    out = torch.full(qd.shape, float("nan"), dtype=dtype, device="cuda")
    got = tree_attention_ragged(qd, kd, vd, mask.cuda(), segs, out=out, num_splits=splits)
    assert_close(got.float().cpu(), ref, **CUDA_TOL[dtype], what=f"{n_seg} segments {dtype}")


def test_ragged_segments_are_checked():
    from specexec_rt.kernels.attention import Segments, tree_attention_ragged

    q, k, v, mask, segs = _ragged_case(2, 4, 2, 64, seed=3)
    with pytest.raises(ValueError, match="query rows"):
        tree_attention_ragged(q[:-1], k, v, mask[:-1], segs)
    bad = Segments(segs.n_q, (segs.base[0], k.shape[0] - 1), segs.prefix, segs.n_tree)
    with pytest.raises(ValueError, match="exceed"):
        tree_attention_ragged(q, k, v, mask, bad)


# ----------------------------------------------------------------------------- KV storage dtypes
#
# The kernel reads K/V in the cache's storage dtype (kernels/attention/kv.py) and converts each
# tile to q's dtype. Against the reference on the same stored values (decoded alike), the float32
# tolerance holds; against a float32 cache (what the storage loses), per dtype:
KV_STORED_TOL = {torch.float32: FP32_TOL, torch.float16: dict(atol=5e-3, rtol=5e-3),
                 torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.int8: dict(atol=5e-2, rtol=5e-2)}


def _stored(k, v, kv_dtype):
    """k, v as a cache of ``kv_dtype`` stores them: (k, v, k_scale, v_scale)."""
    from specexec_rt.kernels.attention import encode

    (kd, ks), (vd, vs) = encode(k, kv_dtype), encode(v, kv_dtype)
    return kd, vd, ks, vs


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("case", [(1, 1, 300, 2, 3, 64, None), (20, 45, 150, 1, 4, 64, 2), (33, 33, 0, 2, 2, 32, None)],
                         ids=lambda c: "nq{}-T{}-P{}".format(*c[:3]))
def test_kernel_reads_every_kv_dtype(kv_dtype, case):
    n_q, n_tree, prefix_len, n_kv, group, d, splits = case
    gen = torch.Generator().manual_seed(n_q * 31 + prefix_len + d)
    mask = random_tree_mask(n_tree, n_q, gen)
    q, k, v = make_qkv(n_q, prefix_len + n_tree, n_kv * group, n_kv, d, gen)
    kd, vd, ks, vs = _stored(k, v, kv_dtype)
    got = tree_attention(q, kd, vd, mask, prefix_len, num_splits=splits, k_scale=ks, v_scale=vs)
    ref = tree_attention_reference(q, kd, vd, mask, prefix_len, k_scale=ks, v_scale=vs)
    assert_close(got, ref, **FP32_TOL, what=f"kernel vs reference, {kv_dtype} cache")
    exact = tree_attention_reference(q, k, v, mask, prefix_len)
    assert_close(got, exact, **KV_STORED_TOL[kv_dtype], what=f"{kv_dtype} cache vs float32 cache")


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8], ids=str)
def test_ragged_kernel_reads_every_kv_dtype(kv_dtype):
    from specexec_rt.kernels.attention import tree_attention_ragged, tree_attention_ragged_reference

    q, k, v, mask, segs = _ragged_case(3, 8, 2, 64, seed=21)
    kd, vd, ks, vs = _stored(k.contiguous(), v, kv_dtype)
    ref = tree_attention_ragged_reference(q, kd, vd, mask, segs, k_scale=ks, v_scale=vs)
    got = tree_attention_ragged(q, kd, vd, mask, segs, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, ref, **FP32_TOL)
    exact = tree_attention_ragged_reference(q, k, v, mask, segs)
    assert_close(got, exact, **KV_STORED_TOL[kv_dtype], what=f"ragged {kv_dtype} cache vs float32 cache")


def test_int8_kv_needs_its_scales_and_only_int8_takes_them():
    from specexec_rt.kernels.attention import quantize_int8

    gen = torch.Generator().manual_seed(5)
    q, k, v, mask = _small(gen, prefix_len=5)
    (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
    for fn in (tree_attention, tree_attention_reference):
        with pytest.raises(TypeError, match="k_scale and v_scale"):
            fn(q, kq, vq, mask, 5)
        with pytest.raises(TypeError, match="only int8"):
            fn(q, k, v, mask, 5, k_scale=ks, v_scale=vs)
        with pytest.raises(ValueError, match="k_scale must be float32"):
            fn(q, kq, vq, mask, 5, k_scale=ks[:-1], v_scale=vs)
        with pytest.raises(TypeError, match="dtypes differ"):
            fn(q, kq, v, mask, 5, k_scale=ks, v_scale=vs)


@cuda
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.int8], ids=str)
def test_cuda_kernel_reads_every_kv_dtype(kv_dtype):
    """fp16 queries against each storage dtype on the GPU (ragged and single), and the decode plan:
    flash SDPA only for a cache in q's own dtype, the kernel otherwise."""
    from specexec_rt.kernels.attention import tree_attention_ragged, tree_attention_ragged_reference
    from specexec_rt.model import causal_mask, ops

    gen = torch.Generator().manual_seed(17)
    mask = random_tree_mask(40, 24, gen, device="cuda")
    q, k, v = make_qkv(24, 1040, 16, 4, 128, gen, dtype=torch.float16, device="cuda")
    kd, vd, ks, vs = _stored(k, v, kv_dtype)
    got = tree_attention(q, kd, vd, mask, 1000, k_scale=ks, v_scale=vs)
    ref = tree_attention_reference(q, kd, vd, mask, 1000, k_scale=ks, v_scale=vs)
    assert_close(got.float(), ref.float(), **CUDA_TOL[torch.float16], what=f"cuda {kv_dtype}")
    qr, kr, vr, maskr, segs = _ragged_case(3, 8, 2, 64, seed=2)
    kd, vd, ks, vs = _stored(kr.contiguous().cuda(), vr.cuda(), kv_dtype)
    got = tree_attention_ragged(qr.half().cuda(), kd, vd, maskr.cuda(), segs, k_scale=ks, v_scale=vs)
    ref = tree_attention_ragged_reference(qr.half().cuda(), kd, vd, maskr.cuda(), segs, k_scale=ks, v_scale=vs)
    assert_close(got.float(), ref.float(), **CUDA_TOL[torch.float16], what=f"cuda ragged {kv_dtype}")
    plan = ops.prepare_attention(causal_mask(1, "cuda"), 100, 4, 128, chain=True, kv_dtype=kv_dtype,
                                 q_dtype=torch.float16)
    assert plan.unmasked == (kv_dtype is torch.float16) and plan.use_kernel == (kv_dtype is not torch.float16)
