"""Tests of the int4 kernels (kernels/int4/) and the checkpoint converters (specexec_rt/loading/int4_formats.py).

The Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is set
before anything imports Triton). In the interpreter bf16 tensor-core dots are upcast to
fp32 inside the kernel (the interpreter's bf16 tl.dot is wrong); the bf16 loads, the
rounding of the dequantised weight to bf16 and the bf16 stores are still exercised.
CUDA-marked tests run the compiled kernels at real sizes.
"""

# Without a GPU the kernels run in Triton's interpreter (set before triton is imported); on a GPU
# machine the CUDA tests run compiled and the CPU-interpreter tests skip (conftest.py) unless
# TRITON_INTERPRET=1 is set for the whole process.
from gpu_env import configure_triton_interpreter  # noqa: E402

configure_triton_interpreter()
NEEDS_INTERPRETER = True

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from specexec_rt.kernels.int4 import gemm as int4_gemm  # noqa: E402
from specexec_rt.loading.int4_formats import from_gguf_q4_0, from_gguf_q4_1, from_gptq  # noqa: E402
from specexec_rt.kernels.int4 import int4_matmul_cpu  # noqa: E402
from specexec_rt.kernels.int4 import int4_matmul  # noqa: E402
from specexec_rt.kernels.int4 import Int4Weight, int4_matmul_reference, quantize_int4  # noqa: E402

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Per-dtype relative error factor against |x| @ |W|.T: the kernels round the dequantised
# weight to x's dtype (tensor-core path) and round the output once.
REL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rand_weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    # Rows with different magnitudes and offsets so scales and mins vary per group.
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2 + \
        torch.randn(n, 1, generator=g) * 0.1


def _rand_x(m, k, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(device)


def _assert_close_bound(y, ref, bound, what):
    assert y.shape == ref.shape, (what, y.shape, ref.shape)
    assert torch.isfinite(y).all(), f"{what}: non-finite output (unwritten or overflow)"
    err = (y.float() - ref.float()).abs()
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements out of bound, first at {idx}: "
            f"got {y.float()[tuple(idx)]:.6g}, want {ref.float()[tuple(idx)]:.6g}, "
            f"bound {bound[tuple(idx)]:.3g}, max err {err.max():.3g}")


def _dtype_bound(x, w_deq, dtype):
    """Rounding bound of x @ W.T in `dtype` relative to the fp32 reference."""
    return REL[dtype] * (x.float().abs() @ w_deq.abs().T) + 1e-6


def _quant_bound(x, w: Int4Weight):
    """|x @ (W_float - W_q).T| <= |x| @ (scale/2 per element).T (plus scale-rounding slack)."""
    half_step = (w.scales.float().T / 2).repeat_interleave(w.group_size, dim=1) * 1.001
    return x.float().abs() @ half_step.T + 1e-5


# ----------------------------------------------------------------------------------------
# Triton kernels (interpreter)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 5, 33, 300])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_matmul_triton_matches_reference(m, group, dtype):
    n, k = 96 + 13 * (group // 32), 256  # N not a multiple of any tile
    seed = m * 1000 + group + list(REL).index(dtype)
    w_float = _rand_weight(n, k, seed)
    w = quantize_int4(w_float, group)
    x = _rand_x(m, k, dtype, seed + 1)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y = int4_matmul(x, w, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    w_deq = w.dequantize()
    ref = x.float() @ w_deq.T
    _assert_close_bound(y, ref, _dtype_bound(x, w_deq, dtype), f"vs dequantised m={m} {dtype}")
    # Against the unquantised weight: bounded by half a quantisation step per weight.
    ref_float = x.float() @ w_float.T
    bound = _quant_bound(x, w) + _dtype_bound(x, w_deq, dtype)
    _assert_close_bound(y, ref_float, bound, f"vs float weight m={m} {dtype}")
    # And the returned-tensor form agrees with the out= form.
    y2 = int4_matmul(x, w)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)


@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("cfg", [(1, 32, 64, 4), (16, 32, 128, 4), (32, 64, 64, 4)])
def test_fused_kernel_split_k_and_configs(split_k, cfg):
    """Every split of K and both kernels give the same result (fp32 partials summed)."""
    n, k, group = 80, 512, 128
    w = quantize_int4(_rand_weight(n, k, 7 + split_k), group)
    x = _rand_x(3, k, torch.float32, 11 + split_k)
    out = torch.full((3, n), float("nan"))
    y = int4_gemm._launch_fused(x, w, split_k=split_k, cfg=cfg, out=out)
    w_deq = w.dequantize()
    _assert_close_bound(y, x @ w_deq.T, _dtype_bound(x, w_deq, torch.float32), "split-K")


def test_strided_and_batched_x():
    n, k = 64, 256
    w = quantize_int4(_rand_weight(n, k, 3), 64)
    big = _rand_x(2 * 4, 2 * k, torch.float16, 4).view(2, 4, 2 * k)
    x = big[..., :k]  # rows strided by 2k
    y = int4_matmul(x, w)
    assert y.shape == (2, 4, n)
    w_deq = w.dequantize()
    ref = x.float() @ w_deq.T
    _assert_close_bound(y, ref, _dtype_bound(x, w_deq, torch.float16), "strided x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequant_then_matmul_path(dtype, monkeypatch):
    """The large-M path (dequantise into scratch + matmul), whole and in N chunks."""
    n, k = 72, 256
    w = quantize_int4(_rand_weight(n, k, 5), 64)
    x = _rand_x(20, k, dtype, 6)
    w_deq = w.dequantize()
    ref = x.float() @ w_deq.T
    scratch = torch.full((n, k), float("nan"), dtype=dtype)
    # The kernel computes (1024 + q) * s + (min - 1024 s) for 16-bit outputs: equal up to
    # the output rounding.
    torch.testing.assert_close(int4_gemm.dequantize_into(w, scratch).float(), w_deq,
                               rtol=torch.finfo(dtype).eps, atol=1e-5)
    for max_elems in (n * k, 30 * k):  # one piece; three chunks of rows (30, 30, 12)
        monkeypatch.setattr(int4_gemm, "SCRATCH_MAX_ELEMENTS", max_elems)
        int4_gemm._scratch.clear()
        int4_gemm._get_scratch(x.device, dtype, n * k).fill_(float("nan"))
        out = torch.full((20, n), float("nan"), dtype=dtype)
        y = int4_gemm._dequant_matmul(x, w, out)
        # CPU fp16 matmul accumulates like the kernels: same relative bound.
        _assert_close_bound(y, ref, _dtype_bound(x, w_deq, dtype), f"dequant path {max_elems}")


# ----------------------------------------------------------------------------------------
# CPU aten fallback (the native kernel, the default, is tested in test_int4_cpu.py)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [96, 100])  # 100: N % 16 != 0, the op refuses -> fallback
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_fast_path(n, group, dtype, monkeypatch):
    from specexec_rt.kernels.int4 import cpu as int4_cpu

    k = 256
    w = quantize_int4(_rand_weight(n, k, n + group), group)
    x = _rand_x(7, k, dtype, group)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the runtime's CPU dispatch
    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", int4_cpu.ATEN_DEFAULT_DTYPE)  # the aten path
    out = torch.full((7, n), float("nan"), dtype=dtype)
    y = int4_matmul(x, w, out=out)
    used_op = "_cpu_cache" in w.__dict__
    assert used_op == (n % 16 == 0), "aten int4 op should be used exactly when supported"
    w_deq = w.dequantize()
    ref = x.float() @ w_deq.T
    # bf16 compute: x, scales and zeros rounded to bf16 (|zero| <= group max |w|).
    gmax = w_deq.abs().view(n, k // group, group).amax(-1).repeat_interleave(group, 1)
    bound = 2e-2 * (x.float().abs() @ gmax.T) + 1e-5
    _assert_close_bound(y, ref, bound, f"cpu path {dtype}")
    if used_op:
        y32 = int4_matmul_cpu(x.float(), w, compute_dtype=torch.float32)
        _assert_close_bound(y32, ref, _dtype_bound(x, w_deq, torch.float32), "cpu fp32 op")


def test_cpu_cache_is_not_a_field():
    from specexec_rt.kernels import cpu_native

    w = quantize_int4(_rand_weight(32, 128, 1), 32)
    int4_matmul_cpu(_rand_x(2, 128, torch.float32, 2), w, compute_dtype=torch.bfloat16)
    int4_matmul_cpu(_rand_x(2, 128, torch.float32, 2), w)
    caches = ["_cpu_cache"] + (["_native_cpu"] if cpu_native.library() is not None else [])
    assert all(c in w.__dict__ for c in caches)
    names = {f.name for f in dataclasses.fields(w)}
    assert names == {"qweight", "scales", "mins", "out_features", "in_features", "group_size", "perm"}
    assert not any(c in dataclasses.replace(w).__dict__ for c in caches)


# ----------------------------------------------------------------------------------------
# Container, quantisation
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_quantize_round_trip_within_half_step(group, scale_dtype):
    n, k = 40, 384
    w = _rand_weight(n, k, group) * 3
    w[0, :group] = 0.25  # constant group: exact
    q = quantize_int4(w, group, scale_dtype=scale_dtype)
    assert q.scales.dtype == scale_dtype and q.shape == (n, k)
    err = (q.dequantize() - w).abs().view(n, k // group, group).amax(-1)
    # Half a step, plus the rounding of the min to scale_dtype and fp32 arithmetic.
    eps = torch.finfo(scale_dtype).eps
    slack = q.mins.float().T.abs() * eps + w.abs().view(n, k // group, group).amax(-1) * 1e-6
    assert (err <= q.scales.float().T / 2 + slack).all(), (err - q.scales.float().T / 2).max()
    assert err[0, 0] == 0
    levels = q.unpack()
    assert int(levels.max()) <= 15 and int(levels.min()) >= 0
    # Each non-constant group uses both ends of the range (scale is not wasteful).
    lv = levels.view(n, k // group, group)
    assert (lv.amin(-1)[1:] == 0).all() and (lv.amax(-1)[1:] >= 14).all()


def test_flatten_and_rebuild_generically():
    """What the offload streamer does: walk fields, rebuild from views of one buffer."""
    w = quantize_int4(_rand_weight(48, 256, 9), 64)
    tensors = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)
               if isinstance(getattr(w, f.name), torch.Tensor)}
    assert set(tensors) == {"qweight", "scales", "mins"}
    flat = torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in tensors.values()])
    views, off = {}, 0
    for name, t in tensors.items():
        views[name] = flat[off:off + t.nbytes].view(t.dtype).view(t.shape)
        off += t.nbytes
    assert off == w.nbytes
    rebuilt = dataclasses.replace(w, **views)
    torch.testing.assert_close(rebuilt.dequantize(), w.dequantize(), rtol=0, atol=0)
    moved = w.to("cpu")
    assert moved.shape == w.shape and moved.group_size == 64


def test_concat_out_features():
    k = 256
    parts = [quantize_int4(_rand_weight(n, k, n), 64) for n in (64, 16, 40)]
    parts[1] = quantize_int4(_rand_weight(16, k, 3), 64, scale_dtype=torch.float32)
    cat = Int4Weight.concat_out_features(parts)
    assert cat.shape == (120, k) and cat.scales.dtype == torch.float32
    torch.testing.assert_close(cat.dequantize(), torch.cat([p.dequantize() for p in parts]),
                               rtol=0, atol=0)
    x = _rand_x(3, k, torch.float32, 4)
    w_deq = cat.dequantize()
    _assert_close_bound(int4_matmul(x, cat), x @ w_deq.T,
                        _dtype_bound(x, w_deq, torch.float32), "concat matmul")
    with pytest.raises(ValueError, match="in_features"):
        Int4Weight.concat_out_features([parts[0], quantize_int4(_rand_weight(8, 128, 1), 64)])


def test_validation_errors():
    w = quantize_int4(_rand_weight(32, 256, 1), 64)
    with pytest.raises(ValueError, match="in_features"):
        int4_matmul(torch.randn(2, 128), w)
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        int4_matmul(torch.ones(2, 256, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(8, 200), 64)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(8, 256), 48)
    with pytest.raises(TypeError):
        quantize_int4(torch.ones(8, 256, dtype=torch.int64), 64)
    with pytest.raises(ValueError, match="out must be"):
        int4_matmul(torch.randn(2, 256), w, out=torch.empty(2, 31))
    with pytest.raises(ValueError, match="qweight"):
        dataclasses.replace(w, qweight=w.qweight[:, :-1])


# ----------------------------------------------------------------------------------------
# GPTQ converter
# ----------------------------------------------------------------------------------------
def _pack_gptq_k(q_kn: np.ndarray) -> torch.Tensor:
    """[K, N] nibbles -> int32 [K/8, N], value j of a word at bits 4j (packed along K)."""
    k, n = q_kn.shape
    words = np.zeros((k // 8, n), dtype=np.uint32)
    for j in range(8):
        words |= q_kn[j::8].astype(np.uint32) << np.uint32(4 * j)
    return torch.from_numpy(words.view(np.int32))


def _pack_gptq_n(z_gn: np.ndarray) -> torch.Tensor:
    """[G, N] nibbles -> int32 [G, N/8] (packed along N)."""
    g, n = z_gn.shape
    words = np.zeros((g, n // 8), dtype=np.uint32)
    for j in range(8):
        words |= z_gn[:, j::8].astype(np.uint32) << np.uint32(4 * j)
    return torch.from_numpy(words.view(np.int32))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_from_gptq(fmt, sym, act_order):
    rng = np.random.default_rng(hash((fmt, sym, act_order)) % 2**32)
    k, n, group = 256, 48, 64
    q = rng.integers(0, 16, size=(k, n))
    if sym:
        z = np.full((k // group, n), 8)
    else:  # v1 stores z - 1 in a nibble, so it can only express z in 1..16
        z = rng.integers(1, 16, size=(k // group, n)) if fmt == "gptq" else \
            rng.integers(0, 16, size=(k // group, n))
    s = (rng.random((k // group, n)) * 0.05 + 0.001).astype(np.float16)
    g_idx = (rng.permutation(k) // group) if act_order else (np.arange(k) // group)
    # Reference dequantisation, straight from the format's definition: [K, N].
    w_kn = s[g_idx].astype(np.float64) * (q - z[g_idx])
    stored_z = z - 1 if fmt == "gptq" else z
    args = (_pack_gptq_k(q), _pack_gptq_n(stored_z), torch.from_numpy(s))
    gi = torch.from_numpy(g_idx.astype(np.int32))

    w32, perm = from_gptq(*args, g_idx=gi, sym=sym, checkpoint_format=fmt,
                          scale_dtype=torch.float32)
    assert w32.shape == (n, k) and w32.group_size == group
    assert (perm is None) == (not act_order)
    x = torch.from_numpy(rng.standard_normal((5, k))).float()
    want = x.double() @ torch.from_numpy(w_kn)
    x_in = x if perm is None else x[:, perm]
    torch.testing.assert_close((x_in.double() @ w32.dequantize().double().T), want,
                               rtol=1e-6, atol=1e-6)
    if perm is None:
        torch.testing.assert_close(w32.dequantize().double(), torch.from_numpy(w_kn).T,
                                   rtol=1e-6, atol=1e-7)
    else:
        torch.testing.assert_close(w32.dequantize().double(), torch.from_numpy(w_kn)[perm].T,
                                   rtol=1e-6, atol=1e-7)
    # Default fp16 mins: error per weight <= 2**-11 * |z * s| (the rounding of -z*s).
    w16, _ = from_gptq(*args, g_idx=gi, sym=sym, checkpoint_format=fmt)
    diff = (w16.dequantize() - w32.dequantize()).abs()
    zs = (torch.from_numpy((z * s.astype(np.float32)).T.copy()).float()
          .repeat_interleave(group, 1))
    if perm is not None:
        zs = torch.from_numpy((z[g_idx[perm.numpy()]] * s[g_idx[perm.numpy()]]
                               .astype(np.float32)).T.copy())
    assert (diff <= zs.abs() * 2.0 ** -11 + 1e-7).all()
    # The kernel on a converted weight (act-order: activations permuted).
    y = int4_matmul(x_in, w32)
    _assert_close_bound(y, want.float(), _dtype_bound(x, w32.dequantize(), torch.float32),
                        "kernel on GPTQ weight")


def test_from_gptq_errors():
    q = torch.zeros(32, 16, dtype=torch.int32)
    zeros = _pack_gptq_n(np.full((2, 16), 7))  # v1 symmetric: stored 7
    s = torch.ones(2, 16, dtype=torch.float16)
    from_gptq(q, zeros, s, sym=True, checkpoint_format="gptq")
    with pytest.raises(ValueError, match="sym=True"):
        from_gptq(q, zeros, s, sym=True, checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match="bits"):
        from_gptq(q, zeros, s, bits=8)
    with pytest.raises(ValueError, match="g_idx"):
        from_gptq(q, zeros, s, g_idx=torch.zeros(256, dtype=torch.int32))
    with pytest.raises(TypeError):
        from_gptq(q.float(), zeros, s)


# ----------------------------------------------------------------------------------------
# GGUF converters, checked against gguf.quants
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_from_gguf_matches_gguf_dequantize(qtype):
    # Imported here: the GPU machines that run this file's CUDA tests have no gguf package (it is
    # a dependency of the project, so CI always runs this test).
    gguf = pytest.importorskip("gguf")
    from gguf import quants as gguf_quants

    t = getattr(gguf.GGMLQuantizationType, qtype)
    n, k = 24, 320
    rng = np.random.default_rng(1 if qtype == "Q4_0" else 2)
    w = (rng.standard_normal((n, k)) * rng.random((n, 1)) + rng.standard_normal((n, 1)) * 0.3)
    raw = gguf_quants.quantize(w.astype(np.float32), t)  # [N, bytes]: rows are out_features
    want = gguf_quants.dequantize(raw, t)
    assert want.shape == (n, k)
    conv = from_gguf_q4_0 if qtype == "Q4_0" else from_gguf_q4_1
    iw = conv(raw, (n, k))
    assert iw.shape == (n, k) and iw.group_size == 32
    np.testing.assert_allclose(iw.dequantize().numpy(), want, rtol=1e-6, atol=1e-7)
    iw_t = conv(torch.from_numpy(raw.reshape(-1)), (n, k))  # flat tensor input too
    torch.testing.assert_close(iw_t.dequantize(), iw.dequantize(), rtol=0, atol=0)
    x = _rand_x(4, k, torch.float32, 3)
    ref = x.double() @ torch.from_numpy(want).double().T
    _assert_close_bound(int4_matmul(x, iw), ref.float(),
                        _dtype_bound(x, iw.dequantize(), torch.float32), f"kernel on {qtype}")
    with pytest.raises(ValueError, match="bytes"):
        conv(raw[:, :-1], (n, k))
    with pytest.raises(TypeError):
        conv(raw.astype(np.int16), (n, k))


# ----------------------------------------------------------------------------------------
# CUDA (compiled kernels at real sizes)
# ----------------------------------------------------------------------------------------
@cuda
@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 64, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_large(m, dtype):
    n = k = 4096
    w_float = _rand_weight(n, k, m).cuda()
    w = quantize_int4(w_float, 128)
    x = _rand_x(m, k, dtype, m + 1, device="cuda")
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    y = int4_matmul(x, w, out=out)
    w_deq = w.dequantize()
    ref = x.float() @ w_deq.T
    _assert_close_bound(y, ref, _dtype_bound(x, w_deq, dtype), f"cuda m={m} {dtype}")
    ref_ref = int4_matmul_reference(x, w)
    assert ref_ref.dtype == dtype


@cuda
@needs_cuda
@pytest.mark.parametrize("m", [1, 3, 17, 100, 300])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_cuda_odd_shapes(m, group):
    n, k = 1000, 1536
    w = quantize_int4(_rand_weight(n, k, group).cuda(), group)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = _rand_x(m, k, dtype, m, device="cuda")
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        y = int4_matmul(x, w, out=out)
        w_deq = w.dequantize()
        # fp32 on the GPU: the dequant path's cuBLAS may use TF32 if the user enabled it.
        rel = REL[dtype] if dtype != torch.float32 else 2e-3
        bound = rel * (x.float().abs() @ w_deq.abs().T) + 1e-5
        _assert_close_bound(y, x.float() @ w_deq.T, bound, f"cuda odd m={m} {dtype}")


def test_act_order_perm_kept_4bit_matches_float():
    """GPTQ act-order: the permuted Int4Weight (perm field) computes x @ W.T in every path."""
    _check_act_order(torch.device("cpu"))


@pytest.mark.cuda
def test_cuda_act_order_perm():
    _check_act_order(torch.device("cuda"))


def _check_act_order(device):
    g = torch.Generator().manual_seed(11)
    n, k, gs = 48, 128, 32
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(k // gs, n, generator=g) * 0.05 + 0.01).half()
    zeros = torch.randint(1, 16, (k // gs, n), generator=g, dtype=torch.int32)  # v1 stores zero - 1 >= 0
    g_idx = torch.randperm(k, generator=g) % (k // gs)
    w_true = scales.float()[g_idx] * (q.float() - zeros.float()[g_idx])   # [K, N]
    qweight = torch.zeros(k // 8, n, dtype=torch.int32)
    for j in range(8):
        qweight |= q[j::8] << (4 * j)
    qzeros = torch.zeros(k // gs, n // 8, dtype=torch.int32)
    for j in range(8):
        qzeros |= (zeros[:, j::8] - 1) << (4 * j)                          # v1 stores zero - 1
    w, perm = from_gptq(qweight, qzeros, scales, g_idx.to(torch.int32), scale_dtype=torch.float32)
    assert perm is not None
    w = dataclasses.replace(w, perm=perm)
    torch.testing.assert_close(w.dequantize(), w_true.T, atol=1e-5, rtol=0)
    fused = Int4Weight.concat_out_features([w, w])
    assert torch.equal(fused.perm, perm)
    x = torch.randn(5, k, generator=g)
    ref = x @ w_true
    torch.testing.assert_close(int4_matmul_reference(x, w), ref, atol=1e-3, rtol=1e-4)
    if device.type == "cuda":
        for m in (1, 5, 300):  # GEMV, tensor-core and dequantize+matmul paths
            xc = torch.randn(m, k, generator=g)
            got = int4_matmul(xc.to(device, torch.float16), w.to(device)).float().cpu()
            torch.testing.assert_close(got, xc @ w_true, atol=2e-2, rtol=2e-2)
    else:
        torch.testing.assert_close(int4_matmul(x, w), ref, atol=1e-3, rtol=1e-4)   # Triton (interpreter)
        torch.testing.assert_close(int4_matmul_cpu(x, w, compute_dtype=torch.float32), ref, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="permutations differ"):
        Int4Weight.concat_out_features([w, dataclasses.replace(w, perm=None)])
