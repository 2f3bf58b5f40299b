"""The native CPU attention with RoPE and the cache write (kernels/attention/cpu.py,
csrc/attn_cpu.h) and the one-call layer stack (kernels/layers/cpu.py, csrc/layers_cpu.h).

- Against the PyTorch reference: the cache entries bit for bit (same RoPE arithmetic), the
  output within float32 tolerance; trees, several segments, GQA groups, head sizes on and off
  the 8-lane path.
- Every ISA path and thread count gives the same bits; a row computed alone equals the row
  computed among others, and keys a row does not see cannot change it.
- Bad slots and shapes are refused before anything is written.
- A model's pass through ``NativeLayers`` equals the per-op path bit for bit (float32 and 4-bit
  layers, biases, trees, several requests), and falls back where it does not serve.
"""
from __future__ import annotations

import pytest
import torch

from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.dense import cpu as dense_cpu
from specexec_rt.kernels.attention import Segments
from specexec_rt.kernels.attention import exp_native, rope_attention_cpu, rope_attention_reference
from specexec_rt.model import ops

pytestmark = pytest.mark.usefixtures("one_thread")


def _native_or_skip():
    if cpu_native.library() is None:
        pytest.skip(f"native CPU library unavailable here: {cpu_native.unavailable_reason()}")


def _problem(h, hkv, d, segs, seed=0, max_len=96):
    """Random qkv, cache, per-row RoPE tables, slots and masks for ``segs`` = [(n_q, base, prefix)]:
    each segment's tree is its own new tokens, every row sees itself and a random subset of
    earlier tree rows."""
    g = torch.Generator().manual_seed(seed)
    n = sum(s[0] for s in segs)
    qkv = torch.randn(n, (h + 2 * hkv) * d, generator=g)
    ck, cv = torch.randn(max_len, hkv, d, generator=g), torch.randn(max_len, hkv, d, generator=g)
    cos_t, sin_t = ops.rope_tables(d, 10000.0, None, max_len, "cpu")
    width = max(s[0] for s in segs)
    mask = torch.zeros(n, width, dtype=torch.bool)
    slots, pos, q0 = [], [], 0
    for nq, base, prefix in segs:
        tri = (torch.rand(nq, nq, generator=g) < 0.5).tril_() | torch.eye(nq, dtype=torch.bool)
        mask[q0:q0 + nq, :nq] = tri
        slots.append(base + prefix + torch.arange(nq))
        pos.append(prefix + tri.sum(1) - 1)
        q0 += nq
    pos = torch.cat(pos)
    segments = Segments(tuple(s[0] for s in segs), tuple(s[1] for s in segs), tuple(s[2] for s in segs),
                        tuple(s[0] for s in segs))
    return qkv, cos_t[pos], sin_t[pos], ck, cv, torch.cat(slots), mask, segments


def _run_both(h, hkv, d, segs, seed=0, **kw):
    qkv, cos, sin, ck, cv, slots, mask, segments = _problem(h, hkv, d, segs, seed)
    ck2, cv2 = ck.clone(), cv.clone()
    got = rope_attention_cpu(qkv, cos, sin, ck, cv, slots, mask, segments, h, hkv, **kw)
    want = rope_attention_reference(qkv, cos, sin, ck2, cv2, slots, mask, segments, h, hkv)
    return got, want, (ck, cv), (ck2, cv2)


@pytest.mark.parametrize("h,hkv,d", [(4, 2, 16), (9, 3, 64), (2, 2, 128), (3, 1, 6)])
@pytest.mark.parametrize("segs", [[(1, 0, 40)], [(5, 0, 0)], [(17, 0, 23)], [(3, 0, 10), (1, 30, 5), (6, 50, 0)]])
def test_matches_the_reference(h, hkv, d, segs):
    _native_or_skip()
    got, want, cache, cache_ref = _run_both(h, hkv, d, segs, seed=h * d)
    assert torch.equal(cache[0], cache_ref[0]) and torch.equal(cache[1], cache_ref[1])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_isa_and_thread_count_gives_the_same_bits_and_rows_are_independent(threads):
    _native_or_skip()
    h, hkv, d = 8, 2, 64
    qkv, cos, sin, ck, cv, slots, mask, segments = _problem(h, hkv, d, [(9, 0, 60)], seed=3)
    want = rope_attention_cpu(qkv, cos, sin, ck.clone(), cv.clone(), slots, mask, segments, h, hkv,
                              isa="scalar", threads=1)
    for isa in cpu_native.supported_isas():
        got = rope_attention_cpu(qkv, cos, sin, ck.clone(), cv.clone(), slots, mask, segments, h, hkv,
                                 isa=isa, threads=threads)
        assert torch.equal(got, want), isa
    # Row 8 alone, with the cache the 9-row pass left (its ancestors' K/V are there).
    k_all, v_all = ck.clone(), cv.clone()
    rope_attention_cpu(qkv, cos, sin, k_all, v_all, slots, mask, segments, h, hkv)
    alone = rope_attention_cpu(qkv[8:], cos[8:], sin[8:], k_all, v_all, slots[8:], mask[8:],
                               Segments((1,), (0,), (60,), (9,)), h, hkv, threads=threads)
    assert torch.equal(alone, want[8:])


def test_keys_a_row_does_not_see_cannot_change_it():
    _native_or_skip()
    h, hkv, d = 4, 2, 32
    qkv, cos, sin, ck, cv, slots, mask, segments = _problem(h, hkv, d, [(6, 0, 12)], seed=5)
    a = rope_attention_cpu(qkv, cos, sin, ck.clone(), cv.clone(), slots, mask, segments, h, hkv)
    ck2, cv2 = ck.clone(), cv.clone()
    ck2[30:], cv2[30:] = 1e4, -1e4  # slots past the pass's keys
    b = rope_attention_cpu(qkv, cos, sin, ck2, cv2, slots, mask, segments, h, hkv)
    assert torch.equal(a, b)
    # Row 0 sees only the prefix and itself: other rows' tree keys must not reach it.
    qkv2 = qkv.clone()
    qkv2[1:, (h * d):] = 5.0  # every other row's K and V
    c = rope_attention_cpu(qkv2, cos, sin, ck.clone(), cv.clone(), slots, mask, segments, h, hkv)
    assert torch.equal(c[0], a[0]) and not torch.equal(c[1:], a[1:])


def test_bad_input_is_refused_before_anything_is_written():
    _native_or_skip()
    h, hkv, d = 4, 2, 16
    qkv, cos, sin, ck, cv, slots, mask, segments = _problem(h, hkv, d, [(3, 0, 5)], seed=1, max_len=16)
    before = ck.clone()
    with pytest.raises(RuntimeError, match="outside the cache"):
        rope_attention_cpu(qkv, cos, sin, ck, cv, torch.tensor([5, 6, 16]), mask, segments, h, hkv)
    with pytest.raises(RuntimeError, match="outside the cache"):
        rope_attention_cpu(qkv, cos, sin, ck, cv, slots, mask, Segments((3,), (0,), (14,), (3,)), h, hkv)
    assert torch.equal(ck, before)
    with pytest.raises(ValueError, match="qkv must be"):
        rope_attention_cpu(qkv[:, 1:], cos, sin, ck, cv, slots, mask, segments, h, hkv)
    with pytest.raises(ValueError, match="n_heads=3"):
        rope_attention_cpu(qkv, cos, sin, ck, cv, slots, mask, segments, 3, hkv)
    with pytest.raises(ValueError, match="cos must hold"):
        rope_attention_cpu(qkv, cos[:2], sin, ck, cv, slots, mask, segments, h, hkv)
    with pytest.raises(ValueError, match="float32"):
        rope_attention_cpu(qkv.double(), cos, sin, ck, cv, slots, mask, segments, h, hkv)
    with pytest.raises(ValueError, match="tree_mask must be"):
        rope_attention_cpu(qkv, cos, sin, ck, cv, slots, mask[:, :1], segments, h, hkv)


# --------------------------------------------------------------------------- the layer stack

@pytest.fixture(scope="module", params=["llama", "llama-bias", "qwen2"])
def tiny(request, tmp_path_factory):
    from hf_models import make_hf_model
    from specexec_rt import load_model

    directory = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, directory)
    return load_model(directory, device="cpu", dtype=torch.float32, max_len=64)


def _passes(model, monkeypatch, native: bool):
    """A prefill (20 rows: above dense_cpu.MAX_ROWS), a decode step, a 6-node and a 12-node tree, with
    native layers on or off."""
    from specexec_rt.model.transformer import Segment

    monkeypatch.setenv("SPECEXEC_NATIVE_LAYERS", "1" if native else "0")
    model.cache = model.new_cache()  # zeros, in the model's kv_dtype
    ids = torch.arange(3, 23)
    out = [model.prefill(ids)]
    out.append(model.forward(ids[:1], torch.tensor([20]), model.cache, 20))
    for n in (6, 12):
        mask = (torch.rand(n, n, generator=torch.Generator().manual_seed(n)) < 0.4).tril_() | torch.eye(n, dtype=torch.bool)
        out.append(model.forward(ids[:n], 21 + mask.sum(1) - 1, model.cache, 21, tree_mask=mask))
    segs = [Segment(n_new=2, base=0, prefix_len=21), Segment(n_new=3, base=32, prefix_len=4)]
    out.append(model.forward_batch(ids[:5], torch.tensor([21, 22, 4, 5, 6]), model.cache, segs))
    c = model.cache
    return out + [t.clone() for t in (c.k, c.v, c.k_scale, c.v_scale) if t is not None]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8], ids=str)
@pytest.mark.parametrize("quantize", [False, True])
def test_native_layers_equal_the_per_op_path(tiny, quantize, kv_dtype, monkeypatch):
    _native_or_skip()
    from specexec_rt.speculative.drafts import int4_draft

    monkeypatch.setattr(tiny, "kv_dtype", kv_dtype)
    model = int4_draft(tiny, group_size=32) if quantize else tiny
    assert model.kv_dtype is kv_dtype
    assert model._native_layers(1) is not None
    assert model._native_layers(dense_cpu.MAX_ROWS) is not None
    assert (model._native_layers(dense_cpu.MAX_ROWS + 1) is not None) == quantize  # float32: BLAS above
    want = _passes(model, monkeypatch, native=False)
    got = _passes(model, monkeypatch, native=True)
    assert len(got) == len(want) == 5 + (4 if kv_dtype is torch.int8 else 2)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


def test_without_the_library_the_pytorch_path_runs(tiny, monkeypatch):
    want = [t.clone() for t in _passes(tiny, monkeypatch, native=True)]
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    tiny._layers_plan = ((), None)
    try:
        assert tiny._native_layers(1) is None
        got = _passes(tiny, monkeypatch, native=True)
    finally:
        tiny._layers_plan = ((), None)  # rebuilt with the library by the next pass
    for a, b in zip(got[:-2], want[:-2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_native_exp_is_within_an_ulp_and_the_same_on_every_isa():
    """The softmax and SiLU exp: a fixed operation sequence (vectorised where the ISA allows, with a
    scalar tail), so its bits cannot depend on the path or on where a value sits in the vector."""
    _native_or_skip()
    x = torch.cat([torch.linspace(-87.3, 88.3, 200_003), torch.randn(1001) * 10])
    want = exp_native(x, isa="scalar")
    for isa in cpu_native.supported_isas():
        assert torch.equal(exp_native(x, isa=isa), want), isa
        assert torch.equal(exp_native(x[3:], isa=isa), want[3:]), isa      # shifted against the lanes
    exact = x.double().exp()
    ulp = (torch.nextafter(exact.float(), torch.tensor(float("inf"))) - exact.float()).double()
    assert ((want.double() - exact).abs() <= ulp).all()
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 89.0, -88.0, 0.0, -0.0])
    for isa in cpu_native.supported_isas():
        got = exp_native(special, isa=isa)
        assert got[0].isnan() and got[1] == float("inf") and got[2] == 0 and got[3] == float("inf")
        assert got[4] == 0 and got[5] == 1 and got[6] == 1


# --------------------------------------------------------------------------- KV storage dtypes
#
# The native call stores the new K/V in the cache's dtype with ``kv.encode``'s bits and reads each
# chunk of keys converted to float32, as the reference decodes them: so against the reference on
# the same cache the float32 tolerance holds. What a storage dtype loses against a float32 cache
# (same queries): float16 5e-3, bfloat16 3e-2, int8 5e-2 (absolute and relative, outputs of scale
# ~1, random K/V).
KV_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
STORED_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=5e-3, rtol=5e-3),
              torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.int8: dict(atol=5e-2, rtol=5e-2)}


def _cache_of(ck, cv, kv_dtype):
    """A cache of ``kv_dtype`` holding ``ck``/``cv``: (k, v, k_scale, v_scale)."""
    from specexec_rt.kernels.attention import encode

    (kd, ks), (vd, vs) = encode(ck, kv_dtype), encode(cv, kv_dtype)
    return kd.contiguous(), vd.contiguous(), ks, vs


def _run_dtype(h, hkv, d, segs, kv_dtype, seed=0, max_len=None, **kw):
    """The native call and the reference on the same ``kv_dtype`` cache, and the reference on the
    float32 cache: (native out, reference out, float32 out, native cache, reference cache)."""
    max_len = max_len or max(b + p + n for n, b, p in segs) + 8
    qkv, cos, sin, ck, cv, slots, mask, segments = _problem(h, hkv, d, segs, seed, max_len=max_len)
    a, b = list(_cache_of(ck, cv, kv_dtype)), [None if t is None else t.clone() for t in _cache_of(ck, cv, kv_dtype)]
    got = rope_attention_cpu(qkv, cos, sin, a[0], a[1], slots, mask, segments, h, hkv, k_scale=a[2], v_scale=a[3], **kw)
    want = rope_attention_reference(qkv, cos, sin, b[0], b[1], slots, mask, segments, h, hkv, k_scale=b[2],
                                    v_scale=b[3])
    exact = rope_attention_reference(qkv, cos, sin, ck.clone(), cv.clone(), slots, mask, segments, h, hkv)
    return got, want, exact, a, b


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (4, 2, 16), (3, 1, 6)])
@pytest.mark.parametrize("segs", [[(1, 0, 700)], [(17, 0, 300)], [(3, 0, 10), (1, 30, 250), (6, 300, 0)]],
                         ids=["decode-700", "tree-17-over-300", "ragged"])
def test_every_kv_dtype_matches_the_reference(kv_dtype, h, hkv, d, segs):
    """Prefixes over several 128-key chunks, trees, several segments, GQA, head sizes on and off
    the 8-lane path: the stored entries bit for bit, the output within float32 tolerance of the
    reference on the same cache and within the dtype's tolerance of a float32 cache."""
    _native_or_skip()
    got, want, exact, a, b = _run_dtype(h, hkv, d, segs, kv_dtype, seed=h * d + len(segs))
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)
    torch.testing.assert_close(got, want, **STORED_TOL[torch.float32])
    torch.testing.assert_close(got, exact, **STORED_TOL[kv_dtype])


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_every_kv_dtype_gives_the_same_bits_on_every_isa_thread_count_and_alone(kv_dtype):
    """Several chunks (a 300-key prefix) split over threads: the chunk partials and their merge
    have a fixed order, so no path, thread count or neighbouring row changes a bit."""
    _native_or_skip()
    h, hkv, d = 8, 2, 64
    qkv, cos, sin, ck, cv, slots, mask, segments = _problem(h, hkv, d, [(9, 0, 300)], seed=3, max_len=320)

    def run(rows=slice(None), segs=segments, cache=None, **kw):
        c = cache if cache is not None else [None if t is None else t.clone() for t in _cache_of(ck, cv, kv_dtype)]
        return rope_attention_cpu(qkv[rows], cos[rows], sin[rows], c[0], c[1], slots[rows], mask[rows], segs, h, hkv,
                                  k_scale=c[2], v_scale=c[3], **kw), c

    want, cache = run(isa="scalar", threads=1)
    for isa in cpu_native.supported_isas():
        for threads in (1, 2, 3):
            assert torch.equal(run(isa=isa, threads=threads)[0], want), (isa, threads)
    alone, _ = run(slice(8, None), Segments((1,), (0,), (300,), (9,)), cache=cache, threads=2)
    assert torch.equal(alone, want[8:])


def test_long_passes_run_in_waves_with_the_same_bits():
    """A pass whose chunk partials exceed the kernel's 8 MB bound (here 192 rows x 8 heads x 19
    chunks) runs in waves of rows, each reading the keys again: same bits as the rows alone."""
    _native_or_skip()
    h, hkv, d = 8, 2, 64
    qkv, cos, sin, ck, cv, slots, mask, segments = _problem(h, hkv, d, [(192, 0, 2200)], seed=8, max_len=2400)
    k, v, ks, vs = _cache_of(ck, cv, torch.float16)
    got = rope_attention_cpu(qkv, cos, sin, k, v, slots, mask, segments, h, hkv, threads=2)
    want = rope_attention_reference(qkv, cos, sin, *_cache_of(ck, cv, torch.float16)[:2], slots, mask, segments, h, hkv)
    torch.testing.assert_close(got, want, **STORED_TOL[torch.float32])
    for i in (0, 100, 191):  # each row alone, over the cache the whole pass left
        alone = rope_attention_cpu(qkv[i:i + 1], cos[i:i + 1], sin[i:i + 1], k, v, slots[i:i + 1], mask[i:i + 1],
                                   Segments((1,), (0,), (2200,), (192,)), h, hkv, threads=1)
        assert torch.equal(alone, got[i:i + 1]), i


def test_kv_stores_round_and_clamp_as_torch_does():
    """Values float16 rounds to inf or to subnormals, bfloat16 ties, int8 rows with a zero, a tiny
    and a non-finite value: the native store equals ``kv.encode`` bit for bit (NaN scales both)."""
    _native_or_skip()
    h, hkv, d = 2, 1, 16
    qkv, cos, sin, ck, cv, slots, mask, segments = _problem(h, hkv, d, [(4, 0, 2)], seed=2, max_len=8)
    cos, sin = torch.ones_like(cos), torch.zeros_like(sin)  # RoPE is the identity: K stored as given
    special = torch.tensor([65504.0, 65519.0, 65520.0, 1e5, -7e4, 6e-8, 2.9e-8, 1e-6, 3e-5, 1.0009765625,
                            1.00390625 + 2 ** -9, -0.0, 1e-40, 3.0, -2.5, 0.5])
    qkv[0, h * d:(h + 1) * d] = special
    qkv[1, h * d:(h + 1) * d] = 0.0
    qkv[2, h * d:(h + 1) * d] = torch.linspace(-1e-30, 1e-30, d)
    qkv[3, h * d:(h + 1) * d] = float("inf")
    qkv[3, (h + 1) * d] = float("nan")
    for kv_dtype in KV_DTYPES:
        a = list(_cache_of(ck, cv, kv_dtype))
        rope_attention_cpu(qkv, cos, sin, a[0], a[1], slots, mask, segments, h, hkv, k_scale=a[2], v_scale=a[3])
        b = list(_cache_of(ck, cv, kv_dtype))
        rope_attention_reference(qkv, cos, sin, b[0], b[1], slots, mask, segments, h, hkv, k_scale=b[2], v_scale=b[3])
        for x, y in zip(a, b):
            assert (x is None and y is None) or torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), kv_dtype
        if kv_dtype is torch.int8:
            assert a[2][slots[3]].isnan().all() and (a[0][slots[3]] == 0).all()     # inf row: NaN scale, zeros
            assert (a[2][slots[1]] == 0).all() and (a[0][slots[1]] == 0).all()      # zero row: scale 0


def test_a_bad_kv_cache_is_refused():
    _native_or_skip()
    h, hkv, d = 4, 2, 16
    qkv, cos, sin, ck, cv, slots, mask, segments = _problem(h, hkv, d, [(3, 0, 5)], seed=1, max_len=16)
    k, v, ks, vs = _cache_of(ck, cv, torch.int8)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        rope_attention_cpu(qkv, cos, sin, k, v, slots, mask, segments, h, hkv)
    with pytest.raises(ValueError, match="k_scale must be"):
        rope_attention_cpu(qkv, cos, sin, k, v, slots, mask, segments, h, hkv, k_scale=ks[:3], v_scale=vs)
    with pytest.raises(ValueError, match="one KV storage dtype"):
        rope_attention_cpu(qkv, cos, sin, k, v.half(), slots, mask, segments, h, hkv, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="one KV storage dtype"):
        rope_attention_cpu(qkv, cos, sin, ck.double(), cv.double(), slots, mask, segments, h, hkv)
