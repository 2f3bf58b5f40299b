"""The native CPU int4 kernel (csrc/int4_cpu.h via kernels/cpu_native.py, kernels/int4/cpu.py).

- Activation quantization: the library's and the PyTorch emulation's agree bit for bit.
- The matmul against ``int4_matmul_q8_reference`` (the same arithmetic in PyTorch) within an
  fp32 summation bound; against the dequantized weight with float activations within the
  activation-quantization bound; against the float weight within that plus the weight's.
- Every ISA path this CPU has gives bit-identical results (the arithmetic is fixed), for any
  thread count; paths the CPU lacks are skipped by name. Where SIMDe's headers are at hand
  (``$SPECEXEC_SIMDE_INCLUDE`` or the system's), the AVX-512 and VNNI paths also run on an
  AVX2 CPU with their intrinsics emulated, and must match the scalar path bit for bit.
- Shapes: N not a multiple of the 8/16-column tiles, K down to one block, group sizes
  32/64/128, M from 1 to 256, act-order perm, fp16 and fp32 scales.
- The streaming layout (fp16 scales, AVX2): its bytes are the documented permutation, and it
  gives the plain layout's bits at every row count.
- Build: a missing compiler falls back with a logged reason (SPECEXEC_NATIVE_CPU=1 raises), a
  compiler without OpenMP gives a one-thread library, the cache is reused without rebuilding.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import stat
import subprocess

import pytest
import torch

from specexec_rt.csrc.loader import BuildError
from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.int4 import cpu as int4_cpu
from specexec_rt.kernels.int4 import (int4_matmul_cpu, int4_matmul_native, int4_matmul_q8_reference,
                                      quantize_activations_native, quantize_activations_q8)
from specexec_rt.kernels.int4 import quantize_int4

EPS32 = 2.0 ** -23


def _native_or_skip():
    if cpu_native.library() is None:
        pytest.skip(f"native CPU library unavailable here: {cpu_native.unavailable_reason()}")


def _isa_or_skip(isa: str):
    _native_or_skip()
    if isa not in cpu_native.supported_isas():
        pytest.skip(f"this CPU has no {isa} (supported: {cpu_native.supported_isas()})")


def _weight(n, k, group, seed, scale_dtype=torch.float16, perm=False):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2
         + torch.randn(n, 1, generator=g) * 0.1)
    q = quantize_int4(w, group, scale_dtype=scale_dtype)
    if perm:
        q = dataclasses.replace(q, perm=torch.randperm(k, generator=g))
    return w, q


def _x(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3
    if m > 2 and k >= 64:
        x[1, 32:64] = 0          # an all-zero block: d = 0
        x[2, :7] *= 100          # an outlier: the rest of its block quantizes coarsely
    return x


def _tight_bound(x, w):
    """fp32 summation bound of the kernel's arithmetic: (#terms) * eps * sum |terms|, where the
    terms are the per-block ``isum * scale * d`` (at most 15 |s| sum |xhat|) and ``min * xs``."""
    xq, d, _ = quantize_activations_q8(x, w)
    k, g = w.in_features, w.group_size
    xhat = (xq.float().view(x.shape[0], -1, 32) * d[..., None]).reshape(x.shape[0], k)
    coef = (15 * w.scales.float().abs() + w.mins.float().abs()).repeat_interleave(g, 0)  # [K, N]
    terms = xhat.abs() @ coef
    return (k // 32 + k // g + 2) * EPS32 * terms + 1e-30


def _act_bound(x, w):
    """|W (x - xhat)| <= sum_k |W[n, k]| * d_k / 2 (stored K order)."""
    xp = x if w.perm is None else x.index_select(-1, w.perm)
    _, d, _ = quantize_activations_q8(x, w)
    half = (d / 2).repeat_interleave(32, 1)                   # [M, K] stored order
    wd = w.dequantize()
    if w.perm is not None:
        wd = wd[:, w.perm]
    return half @ wd.abs().T + 1e-6 * (xp.abs() @ wd.abs().T)


def _assert_within(y, ref, bound, what):
    assert y.shape == ref.shape, (what, y.shape, ref.shape)
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    err = (y - ref).abs()
    bad = err > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} out of bound, first at {i}: "
                             f"got {y[tuple(i)].item()}, want {ref[tuple(i)].item()}, bound {bound[tuple(i)].item()}")


# ----------------------------------------------------------------------------------------
# Activation quantization
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", cpu_native.ISAS)
@pytest.mark.parametrize("group,perm", [(32, False), (64, True), (128, False)])
def test_activation_quantization_is_bit_exact(isa, group, perm):
    _isa_or_skip(isa)
    _, w = _weight(24, 384, group, seed=group, perm=perm)
    x = _x(5, 384, seed=1)
    x[3, 100] = 0.5 * (x[3, 96:128].abs().max() / 127) * 3   # near a half step: rounding ties
    want = quantize_activations_q8(x, w)
    got = quantize_activations_native(x, w, isa=isa)
    for name, a, b in zip(("xq", "d", "xs"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs ({isa})"
    assert int(want[0].abs().max()) == 127
    if not perm:                                              # x[1, 32:64] = 0: block 1 has d = 0
        assert want[1][1, 1] == 0 and not want[0][1, 32:64].any()


# ----------------------------------------------------------------------------------------
# Matmul
# ----------------------------------------------------------------------------------------
SHAPES = [  # (n, k, group): n not a multiple of 8 or 16, k from one block up
    (1, 32, 32), (7, 64, 32), (16, 64, 64), (100, 256, 64), (257, 384, 128), (40, 1536, 64),
]


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 4, 5, 9, 17, 64, 256])
def test_native_matches_q8_reference_and_float_weight(n, k, group, m):
    _native_or_skip()
    w_float, w = _weight(n, k, group, seed=n * 7 + k + m)
    x = _x(m, k, seed=m)
    ref = int4_matmul_q8_reference(x, w)
    results = {isa: int4_matmul_native(x, w, isa=isa) for isa in cpu_native.supported_isas()}
    y = results[cpu_native.ISAS[cpu_native.isa()]]
    _assert_within(y, ref, _tight_bound(x, w), "vs q8 reference")
    for isa, other in results.items():   # fixed arithmetic: every path rounds alike
        assert torch.equal(other, y), f"{isa} differs from {cpu_native.ISAS[cpu_native.isa()]}"
    # Loose: float activations with the dequantized weight, then the float weight.
    act = _act_bound(x, w) + _tight_bound(x, w)
    _assert_within(y, x @ w.dequantize().T, act, "vs dequantized weight")
    wq_err = x.abs() @ (w.dequantize() - w_float).abs().T
    _assert_within(y, x @ w_float.T, act + wq_err * (1 + 1e-5), "vs float weight")


@pytest.mark.parametrize("isa", cpu_native.ISAS)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 8, 33])
def test_every_isa_path_with_perm_and_scale_dtypes(isa, scale_dtype, m):
    _isa_or_skip(isa)
    _, w = _weight(75, 192, 64, seed=m, scale_dtype=scale_dtype, perm=True)
    x = _x(m, 192, seed=m + 1)
    y = int4_matmul_native(x, w, isa=isa)
    _assert_within(y, int4_matmul_q8_reference(x, w), _tight_bound(x, w), f"{isa} {scale_dtype}")
    assert torch.equal(y, int4_matmul_native(x, w, isa="scalar"))


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_a_row_gives_the_same_bits_alone_and_among_others(m):
    """Decode steps (1 row), small tree levels (2-4 rows) and larger passes take different loops;
    a token's result must not depend on which (greedy output equals the target's own)."""
    _native_or_skip()
    _, w = _weight(75, 192, 64, seed=11)
    x = _x(m, 192, seed=m)
    y = int4_matmul_native(x, w)
    for r in range(m):
        assert torch.equal(int4_matmul_native(x[r:r + 1].clone(), w), y[r:r + 1]), r


def _stream_layout(w) -> torch.Tensor:
    """The streaming layout of csrc/int4_cpu.h (sxc_int4_pack) built in PyTorch: per 16-column
    unit and group, 16 fp16 scales, 16 fp16 mins, then per block 4 operand steps of 16 columns x
    4 bytes (bytes 4u .. 4u+3 of each column's 16-byte block)."""
    n, k, group = w.out_features, w.in_features, w.group_size
    units, ng, bpg = -(-n // 16), k // group, group // 32
    pad = units * 16 - n
    q = torch.nn.functional.pad(w.qweight, (0, 0, 0, pad)).view(units, 16, ng, bpg, 4, 4)  # [U, col, g, bb, u, byte]
    q = q.permute(0, 2, 3, 4, 1, 5).reshape(units, ng, bpg * 256)
    sc = torch.nn.functional.pad(w.scales, (0, pad)).view(ng, units, 16).permute(1, 0, 2).contiguous()
    mn = torch.nn.functional.pad(w.mins, (0, pad)).view(ng, units, 16).permute(1, 0, 2).contiguous()
    head = torch.cat([sc.view(torch.uint8).view(units, ng, 32), mn.view(torch.uint8).view(units, ng, 32)], -1)
    return torch.cat([head, q], -1).reshape(-1)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n", [40, 75])
def test_stream_layout_bytes_and_results(group, n, monkeypatch):
    """The AVX2 kernels read the weight from its streaming layout (one stream per 16 output
    columns): the packed bytes are the documented permutation of the weight's, and every row
    count gives the bits of the plain layout (and of the scalar path)."""
    _native_or_skip()
    k = 256
    _, w = _weight(n, k, group, seed=n + group)
    monkeypatch.setattr(int4_cpu, "STREAM_LAYOUT", True)
    st = int4_cpu.native_weight(w).contents
    packed = w.__dict__["_native_cpu"][5][5]
    assert st.pk == packed.data_ptr()
    assert torch.equal(packed, _stream_layout(w))
    streamed = {m: int4_matmul_native(_x(m, k, seed=m), w) for m in (1, 2, 3, 4, 5, 7, 8, 9, 33)}
    _, plain = _weight(n, k, group, seed=n + group)
    monkeypatch.setattr(int4_cpu, "STREAM_LAYOUT", False)
    assert not int4_cpu.native_weight(plain).contents.pk
    for m, y in streamed.items():
        assert torch.equal(y, int4_matmul_native(_x(m, k, seed=m), plain)), m
        assert torch.equal(y, int4_matmul_native(_x(m, k, seed=m), plain, isa="scalar")), m


def test_fp32_scales_keep_the_plain_layout():
    _native_or_skip()
    _, w = _weight(40, 128, 64, seed=3, scale_dtype=torch.float32)
    assert not int4_cpu.native_weight(w).contents.pk


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_thread_count_does_not_change_the_result(threads):
    _native_or_skip()
    _, w = _weight(200, 128, 32, seed=3)
    x = _x(6, 128, seed=4)
    assert torch.equal(int4_matmul_native(x, w, threads=threads), int4_matmul_native(x, w, threads=1))


def test_shapes_dtypes_and_nonfinite_rows():
    _native_or_skip()
    _, w = _weight(48, 128, 64, seed=5)
    x = _x(6, 128, seed=6)
    y = int4_matmul_native(x, w)
    assert torch.equal(int4_matmul_native(x.view(2, 3, 128), w), y.view(2, 3, 48))   # leading dims
    assert torch.equal(int4_matmul_native(x.t().contiguous().t(), w), y)               # strided rows
    yb = int4_matmul_native(x.to(torch.bfloat16), w)
    assert yb.dtype == torch.bfloat16
    assert int4_matmul_native(x[:0], w).shape == (0, 48)
    bad = x.clone()
    bad[2, 70] = float("inf")
    bad[4, 3] = float("nan")
    yn = int4_matmul_native(bad, w)
    assert torch.isnan(yn[2]).all() and torch.isnan(yn[4]).all()
    others = [0, 1, 3, 5]
    assert torch.equal(yn[others], y[others])


def test_bad_isa_is_named():
    _native_or_skip()
    _, w = _weight(16, 64, 32, seed=1)
    with pytest.raises(ValueError, match="isa must be one of"):
        int4_matmul_native(torch.randn(1, 64), w, isa="sse9")
    missing = [i for i in cpu_native.ISAS if i not in cpu_native.supported_isas()]
    if missing:
        with pytest.raises(ValueError, match=f"isa='{missing[-1]}' is not supported"):
            int4_matmul_native(torch.randn(1, 64), w, isa=missing[-1])
    with pytest.raises(ValueError, match="weight expects in_features=64"):
        int4_matmul_native(torch.randn(1, 65), w)


def test_weight_cache_follows_replaced_tensors():
    """The ctypes view of a weight is cached on the instance; replacing a tensor field (or
    dataclasses.replace) must not leave it pointing at the old memory."""
    _native_or_skip()
    _, w = _weight(32, 64, 32, seed=8)
    x = _x(2, 64, seed=9)
    int4_matmul_native(x, w)
    assert "_native_cpu" in w.__dict__
    assert "_native_cpu" not in dataclasses.replace(w).__dict__
    w.qweight = torch.zeros_like(w.qweight)                  # all nibbles 0: W = mins
    want = int4_matmul_q8_reference(x, w)
    _assert_within(int4_matmul_native(x, w), want, _tight_bound(x, w), "after replacing qweight")


def test_int4_matmul_cpu_dispatch(monkeypatch):
    """Default: native; CPU_COMPUTE_DTYPE or compute_dtype: the aten op (exact with float32)."""
    _native_or_skip()
    _, w = _weight(64, 128, 32, seed=10)
    x = _x(3, 128, seed=11)
    assert torch.equal(int4_matmul_cpu(x, w), int4_matmul_native(x, w))
    assert "_cpu_cache" not in w.__dict__
    exact = x @ w.dequantize().T
    torch.testing.assert_close(int4_matmul_cpu(x, w, compute_dtype=torch.float32), exact, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", torch.float32)
    torch.testing.assert_close(int4_matmul_cpu(x, w), exact, rtol=1e-5, atol=1e-4)
    assert "_cpu_cache" in w.__dict__


# ----------------------------------------------------------------------------------------
# Build, fallback, dispatch selection
# ----------------------------------------------------------------------------------------
@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A clean library decision with a private build cache; restored afterwards."""
    monkeypatch.setenv("SPECEXEC_NATIVE_CACHE", str(tmp_path / "cache"))
    cpu_native.reset()
    yield tmp_path
    cpu_native.reset()


def test_missing_compiler_falls_back_with_a_logged_reason(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_native / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="specexec_rt.kernels.cpu_native"):
        assert cpu_native.library() is None
    assert "no-such-cc is not an executable" in cpu_native.unavailable_reason()
    assert any("PyTorch" in r.message and "no-such-cc" in r.message for r in caplog.records)
    _, w = _weight(32, 64, 32, seed=12)
    x = _x(2, 64, seed=13)
    y = int4_matmul_cpu(x, w)                                 # the aten path, no exception
    assert "_cpu_cache" in w.__dict__ and "_native_cpu" not in w.__dict__
    assert torch.equal(y, int4_matmul_cpu(x, w, compute_dtype=torch.bfloat16))
    cpu_native.reset()
    monkeypatch.setenv("SPECEXEC_NATIVE_CPU", "1")            # strict mode: the error surfaces
    with pytest.raises(BuildError, match="no-such-cc"):
        cpu_native.library()


def test_failing_compiler_falls_back(fresh_native, monkeypatch):
    cc = fresh_native / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'internal compiler error' >&2\nexit 1\n")
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(cc))
    assert cpu_native.library() is None
    assert "internal compiler error" in cpu_native.unavailable_reason()


def test_disabled_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("SPECEXEC_NATIVE_CPU", "0")
    assert cpu_native.library() is None and cpu_native.unavailable_reason() == "SPECEXEC_NATIVE_CPU=0"
    assert cpu_native.supported_isas() == []


def test_isa_can_be_forced_lower(monkeypatch):
    _native_or_skip()
    cpu_native.reset()
    try:
        monkeypatch.setenv("SPECEXEC_CPU_ISA", "scalar")
        assert cpu_native.isa() == 0
        _, w = _weight(40, 64, 32, seed=14)
        x = _x(3, 64, seed=15)
        assert torch.equal(int4_matmul_native(x, w), int4_matmul_native(x, w, isa="scalar"))
        cpu_native.reset()
        monkeypatch.setenv("SPECEXEC_CPU_ISA", "avx512vnni")  # above the CPU: its best, logged
        assert cpu_native.isa() == len(cpu_native.supported_isas()) - 1
    finally:
        cpu_native.reset()


@pytest.mark.slow
def test_cache_is_reused_and_openmp_is_optional(tmp_path, monkeypatch):
    """Two builds into one cache: the second runs no compiler. A compiler that rejects -fopenmp
    gives a one-thread library with the same results."""
    cc, how = cpu_native.find_compiler()
    if cc is None:
        pytest.skip(how)
    _native_or_skip()
    cache = tmp_path / "c1"
    path = cpu_native.build(cache_dir=cache)
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    assert cpu_native.build(cache_dir=cache) == path
    assert not [c for c in calls if "-shared" in c[0]], "the cached library was rebuilt"
    monkeypatch.setattr(subprocess, "run", real_run)

    no_omp = tmp_path / "cc-no-openmp"
    no_omp.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no openmp" >&2; exit 1; }}; done\n'
                      f'exec {cc} "$@"\n')
    no_omp.chmod(no_omp.stat().st_mode | stat.S_IEXEC)
    lib = cpu_native.load(cpu_native.build(cache_dir=tmp_path / "c2", cc=str(no_omp)))
    assert lib.sxc_has_openmp() == 0 and cpu_native.load(path).sxc_has_openmp() == 1
    _, w = _weight(64, 128, 64, seed=16)
    x = _x(5, 128, seed=17)
    want = int4_matmul_native(x, w, threads=2)
    best = lib.sxc_best_isa()
    monkeypatch.setattr(cpu_native, "_state", {"lib": lib, "reason": None, "best": best, "isa": best})
    assert torch.equal(int4_matmul_native(x, w, threads=2), want)


def test_build_key_depends_on_sources_command_and_machine(tmp_path):
    from specexec_rt.csrc.loader import build_key

    a = tmp_path / "a.c"
    a.write_text("int f(void){return 1;}\n")
    k = build_key([a], ["cc", "-O3"], ["gcc 12", "x86_64 avx2"])
    assert k == build_key([a], ["cc", "-O3"], ["gcc 12", "x86_64 avx2"])
    assert k != build_key([a], ["cc", "-O2"], ["gcc 12", "x86_64 avx2"])
    assert k != build_key([a], ["cc", "-O3"], ["gcc 12", "x86_64 avx2 avx512f"])
    a.write_text("int f(void){return 2;}\n")
    assert k != build_key([a], ["cc", "-O3"], ["gcc 12", "x86_64 avx2"])
    assert os.path.basename(str(cpu_native.compile_command("cc", tmp_path / "x.so")[-1])) == "specexec_cpu.c"


def _simde_include():
    for d in (os.environ.get("SPECEXEC_SIMDE_INCLUDE"), "/usr/include", "/usr/local/include"):
        if d and os.path.isfile(os.path.join(d, "simde", "x86", "avx512.h")):
            return d
    return None


@pytest.mark.slow
def test_avx512_paths_under_emulation(tmp_path, monkeypatch):
    """The AVX-512 and AVX-512 VNNI code (lane layout, 16-row unpack, 8-row passes, partial
    tiles, both scale dtypes, perm) run with SIMDe's portable intrinsics on an AVX2 CPU."""
    _isa_or_skip("avx2")
    inc = _simde_include()
    if inc is None:
        pytest.skip("SIMDe headers not found (set SPECEXEC_SIMDE_INCLUDE; Debian: libsimde-dev)")
    emulated = cpu_native.load(cpu_native.build(
        cache_dir=tmp_path / "emu", extra_flags=("-DSXC_EMULATE_AVX512", "-mavx2", "-mfma", "-mf16c", "-I", inc)))
    # fp16 scales on both layouts: up to 8 rows a weight with the streaming layout takes the
    # streamed AVX2 kernels even at an AVX-512 level, so the plain layout is what reaches the
    # AVX-512 kernels there.
    cases = [(n, k, g, m, perm, sd, stream)
             for (n, k, g) in [(1, 32, 32), (100, 256, 64), (257, 384, 128), (40, 1536, 64)]
             for m in (1, 8, 9, 17)
             for perm, sd, stream in [(False, torch.float16, True), (False, torch.float16, False),
                                      (True, torch.float32, False)]]
    want = []
    for i, (n, k, g, m, perm, sd, stream) in enumerate(cases):
        monkeypatch.setattr(int4_cpu, "STREAM_LAYOUT", stream)
        _, w = _weight(n, k, g, seed=i, scale_dtype=sd, perm=perm)
        x = _x(m, k, seed=i)
        want.append((x, w, int4_matmul_native(x, w, isa="scalar")))
        assert bool(int4_cpu.native_weight(w).contents.pk) == (stream and sd == torch.float16)
    monkeypatch.setattr(cpu_native, "_state", {"lib": emulated, "reason": None, "best": 3, "isa": 3})
    for (x, w, y), case in zip(want, cases):
        for isa in ("avx512", "avx512vnni"):
            assert torch.equal(int4_matmul_native(x, w, isa=isa, threads=2), y), (isa, case)


# ----------------------------------------------------------------------------------------
# Fused layer ops (RMSNorm, SiLU * up, residual) in the native call, and their use by ops.py
# ----------------------------------------------------------------------------------------
def _step_bound(x_in, w):
    """Both sides quantize their own float input: where those differ by rounding, an int8 value
    may differ by one step, i.e. up to sum_k |W[n, k]| * d_k."""
    return 2 * _act_bound(x_in, w)


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("norm,swiglu,residual", [(True, False, False), (False, True, True), (True, True, True),
                                                  (False, False, True)])
def test_fused_prologue_and_residual(m, norm, swiglu, residual):
    _native_or_skip()
    from specexec_rt.kernels.int4 import int4_linear_native, int4_linear_q8_reference

    n, k = 100, 192
    _, w = _weight(n, k, 64, seed=m, perm=swiglu)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 2 * k if swiglu else k, generator=g) * 2
    nw = (1 + 0.2 * torch.randn(k, generator=g), 1e-5) if norm else None
    res = torch.randn(m, n, generator=g) if residual else None
    got = {isa: int4_linear_native(x, w, residual=res, norm=nw, swiglu=swiglu, isa=isa)
           for isa in cpu_native.supported_isas()}
    y = got["scalar"]
    assert all(torch.equal(v, y) for v in got.values()), "ISA paths differ"
    want = int4_linear_q8_reference(x, w, residual=res, norm=nw, swiglu=swiglu)
    x_in = torch.nn.functional.silu(x[:, :k]) * x[:, k:] if swiglu else x
    if norm:
        x_in = nw[0] * (x_in * torch.rsqrt(x_in.pow(2).mean(-1, keepdim=True) + nw[1]))
    _assert_within(y, want, _tight_bound(x_in, w) + _step_bound(x_in, w) + 1e-5 * (res.abs() if residual else 0),
                   "fused vs reference")


def test_fused_call_checks_its_arguments():
    _native_or_skip()
    from specexec_rt.kernels.int4 import int4_linear_native

    _, w = _weight(16, 64, 32, seed=1)
    with pytest.raises(ValueError, match=r"x must be a CPU float32 \[M, 128\]"):
        int4_linear_native(torch.randn(2, 64), w, swiglu=True)
    with pytest.raises(ValueError, match=r"residual must be float32 \[2, 16\]"):
        int4_linear_native(torch.randn(2, 64), w, residual=torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"norm weight must be float32 \[64\]"):
        int4_linear_native(torch.randn(2, 64), w, norm=(torch.ones(63), 1e-5))
    x = torch.randn(3, 80)[:, :64]                       # rows with a stride: no copy needed
    assert torch.equal(int4_linear_native(x, w), int4_linear_native(x.contiguous(), w))


def test_ops_fuse_only_for_native_int4(monkeypatch):
    """ops.norm_linear / linear(residual=) / swiglu_linear: one native int4 call for a CPU int4
    weight; the PyTorch composition on the Triton or aten int4 paths."""
    _native_or_skip()
    from specexec_rt.kernels.int4 import int4_linear_q8_reference
    from specexec_rt.model import ops

    _, w = _weight(96, 128, 64, seed=2)
    w_gu = _weight(96, 64, 32, seed=3)[1]
    g = torch.Generator().manual_seed(4)
    x, res, nw = torch.randn(3, 128, generator=g), torch.randn(3, 96, generator=g), 1 + torch.rand(128, generator=g)
    calls = []
    real = ops.run_native_linear
    monkeypatch.setattr(ops, "run_native_linear", lambda *a: calls.append(a) or real(*a))
    y = ops.norm_linear(x, nw, 1e-5, w)
    _assert_within(y, int4_linear_q8_reference(x, w, norm=(nw, 1e-5)), 1e-3 + 1e-3 * y.abs(), "norm_linear")
    ops.linear(x, w, residual=res)
    ops.swiglu_linear(x, w_gu, residual=res)
    # (x, w, residual, norm weight, eps, swiglu) of each native call
    assert [(a[2] is not None, a[3] is not None, a[5]) for a in calls] == [(False, True, False), (True, False, False),
                                                                           (True, False, True)]
    monkeypatch.setattr(ops, "use_triton", lambda device: True)      # the kernels' path keeps the composition
    calls.clear()
    ops.norm_linear(x, nw, 1e-5, w)
    assert not calls
    dense = w.dequantize()
    torch.testing.assert_close(ops.norm_linear(x, nw, 1e-5, dense), ops.linear(ops.rms_norm(x, nw, 1e-5), dense))
    # dense: the float32 few-row kernel, which fuses the same ops (tests/test_dense_cpu.py)
    torch.testing.assert_close(ops.linear(x, dense, residual=res), res + x @ dense.T, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(int4_cpu, "CPU_COMPUTE_DTYPE", torch.float32)   # aten path: composed ops
    calls.clear()
    exact = ops.swiglu_linear(x, w_gu, residual=res)
    assert not calls
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(exact, res + torch.nn.functional.silu(gate) * up @ w_gu.dequantize().T,
                               rtol=1e-5, atol=1e-4)


def test_int4_model_fused_matches_unfused():
    """A tiny int4 model: the fused native forward equals the one that runs RMSNorm, SiLU and the
    residual adds as PyTorch ops around the native matmuls, up to activation rounding."""
    _native_or_skip()
    from conftest import build_tiny_model

    from specexec_rt.model import ops
    from specexec_rt.speculative.drafts import int4_draft

    target = build_tiny_model(hidden_size=64, intermediate_size=96, n_heads=4, n_kv_heads=2, head_dim=16,
                              vocab_size=96)
    draft = int4_draft(target, group_size=32, share_cache=False)   # run on a cache of its own
    assert isinstance(draft.weights.lm_head, type(draft.weights.layers[0].wqkv))
    assert target.weights.lm_head is not draft.weights.lm_head and isinstance(target.weights.lm_head, torch.Tensor)
    assert isinstance(int4_draft(target, group_size=32, lm_head_int4=False).weights.lm_head, torch.Tensor)
    ids = torch.tensor([3, 17, 5, 60, 2, 9])
    fused = draft.forward(ids, torch.arange(6), draft.cache, 0)
    real = ops._native_int4
    try:
        ops._native_int4 = lambda x, w: False
        unfused = draft.forward(ids, torch.arange(6), draft.cache, 0)
    finally:
        ops._native_int4 = real
    assert (fused - unfused).abs().max() <= 2e-2 * unfused.abs().max()
    assert (fused.argmax(-1) == unfused.argmax(-1)).float().mean() >= 5 / 6
