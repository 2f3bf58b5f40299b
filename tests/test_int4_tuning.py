"""Launch plans of int4_matmul (kernels/int4/plans.py) and their measured choice (kernels/int4/tuning.py).

Every plan the tuner may pick must be exact, so all candidate tile configs run here in
Triton's interpreter; the choice itself is tested with an injected timer (the interpreter's
timings mean nothing), and a CUDA test tunes for real on a GPU.
"""
from gpu_env import configure_triton_interpreter

configure_triton_interpreter()
NEEDS_INTERPRETER = True

import json  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from specexec_rt.kernels.int4 import gemm as int4_gemm  # noqa: E402
from specexec_rt.kernels.int4 import plans as int4_plans  # noqa: E402
from specexec_rt.kernels import int4  # noqa: E402
from specexec_rt.kernels.int4 import tuning as int4_tuning  # noqa: E402

REL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _weight(n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) + torch.randn(n, 1, generator=g) * 0.1
    return int4.quantize_int4(w, group)


def _x(m, k, dtype, seed):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check(y, x, w, dtype, what):
    w_deq = w.dequantize()
    ref = x.float() @ w_deq.T
    bound = REL[dtype] * (x.float().abs() @ w_deq.abs().T) + 1e-6
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), f"{what}: max err {err.max():.3g}, bound {bound.max():.3g}"


@pytest.fixture
def fresh_tuning(monkeypatch, tmp_path):
    """No registered plans, and a private tuning file."""
    monkeypatch.setattr(int4_plans, "_TUNED", {})
    monkeypatch.setattr(int4_plans, "_MEASURED", {})
    monkeypatch.setattr(int4_plans, "_file_loaded", True)
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("SPECEXEC_INT4_TUNING", str(path))
    return path


def _distinct_tiles(plans):
    """One plan per tile shape (warps change nothing in the interpreter), so the sweep covers
    every tile config the tuner may pick."""
    seen, out = {}, []
    for p in plans:
        key = (p.path, p.block_m, p.block_n, p.block_k)
        if key not in seen:
            seen[key] = p
            out.append(p)
    return out


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_gemv_candidate_is_exact(group, dtype):
    # K = 1024 admits every GEMV tile (up to 512 = 4 groups of 128); N = 40 is no tile multiple.
    n, k = 40, 1024
    w = _weight(n, k, group, group + 1)
    plans = [p for p in int4_plans.candidate_plans(1, k, group) if p.path == "gemv"]
    assert {p.block_k for p in plans} >= {128, 256, 512}, "multi-group GEMV tiles are candidates"
    for i, plan in enumerate(_distinct_tiles(plans)):
        x = _x(2, k, dtype, i)  # two rows: the GEMV grid's row axis too
        for split in (plan.split_k, 3):  # 3: uneven K splits
            out = torch.full((2, n), float("nan"), dtype=dtype)
            y = int4_gemm._launch_fused(x, w, out=out, plan=plan, split_k=split)
            _check(y, x, w, dtype, f"{plan} split {split}")


@pytest.mark.parametrize("m", [5, 33])
@pytest.mark.parametrize("group", [32, 128])
def test_every_mma_candidate_is_exact(m, group):
    n, k = 72, 256
    w = _weight(n, k, group, m + group)
    x = _x(m, k, torch.float32, m)
    plans = [p for p in int4_plans.candidate_plans(m, k, group, dequant=False) if p.path == "mma"]
    assert plans
    for plan in _distinct_tiles(plans):
        out = torch.full((m, n), float("nan"))
        _check(int4_gemm.run_plan(x, w, plan, out), x, w, torch.float32, str(plan))


def test_plan_validation():
    ok = int4_plans.Int4Plan("gemv", 1, 64, 256, 4)
    assert ok.problem(1024, 128) is None
    assert "tiles K" in int4_plans.Int4Plan("gemv", 1, 64, 256, 4).problem(384, 128)   # 384 % 256
    assert "dividing the group" in int4_plans.Int4Plan("mma", 16, 64, 128, 4).problem(512, 64)
    assert "block_m >= 16" in int4_plans.Int4Plan("mma", 8, 64, 64, 4).problem(512, 64)
    assert "unknown path" in int4_plans.Int4Plan("magic").problem(512, 64)
    assert int4_plans.Int4Plan("dequant").problem(96, 32) is None
    w = _weight(16, 384, 128, 0)
    with pytest.raises(ValueError, match="cannot run"):
        int4_gemm._launch_fused(_x(1, 384, torch.float32, 0), w, plan=int4_plans.Int4Plan("gemv", 1, 64, 256, 4))
    for m in (1, 2, 16, 100, 256, 3000):
        for p in int4_plans.candidate_plans(m, 1024, 128):
            assert p.problem(1024, 128) is None
            assert int4_plans.Int4Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_buckets():
    assert [int4_plans.m_bucket(m) for m in (1, 2, 3, 4, 5, 300, 4096, 10000)] == [1, 2, 4, 4, 8, 512, 4096, 4096]


def test_tuner_picks_the_fastest_correct_plan_and_persists_it(fresh_tuning):
    n, k, group = 48, 512, 64
    w = _weight(n, k, group, 3)
    fast = int4_plans.Int4Plan("gemv", 1, 32, 256, 4, 2)
    slow = int4_plans.Int4Plan("gemv", 1, 64, 64, 4, 1)
    times = {fast: 1.0, slow: 2.0}
    calls = []

    def timer(fn):
        fn()                      # the timed call must run (and be correct)
        calls.append(fn)
        plan = fn.__defaults__[0]
        return times.get(plan, 3.0)

    rows = int4_tuning.tune_shape(n, k, group, ms=[1], dtype=torch.float32, device="cpu", timer=timer,
                                  plans=lambda m: [slow, fast], weight=w)
    (row,) = rows
    assert row["plan"] == fast and row["ms"] == 1.0 and row["default_ms"] == 3.0
    assert row["candidates"] == 3 and len(calls) == 3       # default + two candidates
    x = _x(1, k, torch.float32, 9)
    assert int4_plans.plan_for(x, w) == fast
    _check(int4_gemm.int4_matmul(x, w), x, w, torch.float32, "tuned plan through int4_matmul")
    # Other M buckets and other shapes keep the default plan.
    assert int4_plans.plan_for(_x(2, k, torch.float32, 9), w) == int4_plans.default_plan(2, k, group, dequant=False)
    # Saved, forgotten, loaded: the same plan for the same key, with its timings.
    path = int4_plans.save_tuning()
    assert path == fresh_tuning
    saved = json.loads(path.read_text())
    assert saved["version"] == int4_plans.FORMAT_VERSION and saved["entries"][0]["ms"] == 1.0
    int4_plans._TUNED.clear()
    assert int4_plans.plan_for(x, w) != fast
    assert int4_plans.load_tuning() == 1
    assert int4_plans.plan_for(x, w) == fast


def test_tuner_never_picks_a_wrong_plan(fresh_tuning, monkeypatch):
    n, k, group = 32, 256, 128
    broken = int4_plans.Int4Plan("gemv", 1, 32, 128, 4, 1)
    good = int4_plans.Int4Plan("gemv", 1, 64, 128, 4, 1)
    real_run = int4_gemm.run_plan

    def run_plan(x2, w, plan, out=None):
        y = real_run(x2, w, plan, out)
        return y + 1.0 if plan == broken else y          # a fast wrong kernel

    def failing_compile(x2, w, plan, out=None):
        if plan.block_n == 16:
            raise RuntimeError("out of resources")         # a config this GPU cannot run
        return run_plan(x2, w, plan, out)

    monkeypatch.setattr(int4_tuning, "run_plan", failing_compile)
    odd = int4_plans.Int4Plan("gemv", 1, 16, 128, 4, 1)
    timer = lambda fn: {broken: 0.1, odd: 0.05}.get(fn.__defaults__[0], 1.0)  # noqa: E731
    (row,) = int4_tuning.tune_shape(n, k, group, ms=[1], dtype=torch.float32, device="cpu", timer=timer,
                                    plans=lambda m: [broken, odd, good])
    assert row["plan"] != broken and row["plan"] != odd
    reasons = dict(row["rejected"])
    assert "max error" in reasons[broken] and "out of resources" in reasons[odd]


def test_unreadable_tuning_file_is_ignored(fresh_tuning, caplog):
    fresh_tuning.write_text("{ not json")
    with caplog.at_level(logging.WARNING):
        assert int4_plans.load_tuning() == 0
    assert "ignoring int4 tuning file" in caplog.text
    fresh_tuning.write_text(json.dumps({"version": 99, "entries": []}))
    assert int4_plans.load_tuning() == 0
    # An entry whose plan cannot run its shape is skipped, the rest load.
    bad = {"device": "cpu", "dtype": "float32", "N": 8, "K": 384, "group_size": 128, "m_bucket": 1,
           "plan": int4_plans.Int4Plan("gemv", 1, 64, 256, 4).to_dict()}
    good = dict(bad, K=512)
    fresh_tuning.write_text(json.dumps({"version": 1, "entries": [bad, good]}))
    assert int4_plans.load_tuning() == 1


def test_model_shapes_are_the_runtime_matrices():
    from conftest import build_tiny_model

    model = build_tiny_model("llama")
    shapes = int4_tuning.model_shapes(model.config)
    lw = model.weights.layers[0]
    assert shapes == {name: tuple(getattr(lw, name).shape) for name in shapes}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tuning_round(fresh_tuning):
    """A real (small) tuning run on the GPU: every bucket gets a plan that beats or equals
    the default, and int4_matmul then uses it and stays exact."""
    n, k, group = 1024, 4096, 128
    rows = int4_tuning.tune_shape(n, k, group, ms=[1, 16, 512], dtype=torch.float16, device="cuda")
    w = int4.quantize_int4(torch.randn(n, k, device="cuda") * 0.02, group)
    for row in rows:
        assert row["ms"] <= row["default_ms"] * 1.0001
        x = torch.randn(row["m"], k, device="cuda", dtype=torch.float16)
        assert int4_plans.plan_for(x, w) == row["plan"]
        y = int4_gemm.int4_matmul(x, w).float()
        ref = x.float() @ w.dequantize().T
        assert (y - ref).abs().max() <= 3e-3 * (x.float().abs() @ w.dequantize().abs().T).max() + 1e-3


def test_tune_cli_shapes_and_cpu_error(tmp_path, capsys):
    from specexec_rt.serving import cli
    from specexec_rt.serving.tune_int4 import shapes_for

    assert shapes_for(shape="llama-2-70b") == {"wqkv": (10240, 8192, 128), "wo": (8192, 8192, 128),
                                               "w_gate_up": (57344, 8192, 128), "w_down": (8192, 28672, 128)}
    assert shapes_for(shape="llama-2-7b", group_size=64)["w_down"] == (4096, 11008, 64)
    if torch.cuda.is_available():
        return
    rc = cli.main(["tune-int4", "--shape", "llama-2-7b", "--out", str(tmp_path / "t.json")])
    assert rc == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_shapes_of_a_moe_model_are_its_experts(tmp_path):
    from hf_models import make_hf_model
    from specexec_rt.serving.tune_int4 import shapes_for

    make_hf_model("mixtral", tmp_path)            # every layer has experts: no dense MLP shapes
    assert shapes_for(model=str(tmp_path)) == {"wqkv": (128, 64, 64), "wo": (64, 64, 64),
                                               "expert_gate_up": (192, 64, 64), "expert_down": (64, 96, 32)}
