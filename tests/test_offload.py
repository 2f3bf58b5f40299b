"""Offload LayerStreamer: the schedule on a CPU "device" (CI) and on CUDA (marked).

CPU: streamed results equal resident results bit for bit (synthetic consumer and the real
model), the schedule recorded by ``streamer.trace`` obeys the ordering invariants, the
residency split honours the budget, and the host block is sized exactly.
CUDA: the same equality, bandwidth against the pinned-copy peak, overlap, and the CUDA sanitizer.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specexec_rt.offload import native
from specexec_rt.kernels.int4 import Int4Weight, quantize_int4
from specexec_rt.offload.streamer import ALIGN, LayerStreamer, layout_layer, make_layer_source, plan_residency
from specexec_rt.model.weights import LayerWeights, ResidentLayers, tensor_leaves, weights_nbytes

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda


# ------------------------------------------------------------------ helpers

def make_layers(n: int, seed: int, hidden: int = 32, inter: int = 48, dtype=torch.float16,
                int4: bool = False, bias: bool = True) -> list:
    """Random host layers; odd 1-D sizes (hidden + 3) would break packing if alignment were wrong."""
    g = torch.Generator().manual_seed(seed)
    if int4:
        inter = -(-inter // 32) * 32  # Int4Weight needs in_features in whole 32-wide groups

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(dtype)

    def mat(out, inp):
        w = r(out, inp)
        return quantize_int4(w.float(), group_size=32) if int4 else w

    return [LayerWeights(attn_norm=r(hidden), wqkv=mat(3 * hidden, hidden), bqkv=r(3 * hidden) if bias else None,
                         wo=mat(hidden, hidden), bo=r(hidden + 3) if bias else None, ffn_norm=r(hidden),
                         w_gate_up=mat(2 * inter, hidden), w_down=mat(hidden, inter))
            for _ in range(n)]


def consume(x: torch.Tensor, layer) -> torch.Tensor:
    """A synthetic block that reads every byte of every tensor of the layer; ``x`` ``[4, 8]``."""
    for _, t in tensor_leaves(layer):
        f = t.to(x.device).float().reshape(-1)
        m = f[: f.numel() // 8 * 8].reshape(-1, 8)
        x = torch.tanh(x * 0.9 + m.sum(0) * 1e-2 + f[-1] * 1e-3 + f.sum() * 1e-4)
    return x


def run_passes(source, x0: torch.Tensor, passes: int) -> list:
    outs = []
    for _ in range(passes):
        x = x0
        for layer in source.iter_layers():
            x = consume(x, layer)
        outs.append(x)
    return outs


def check_trace(trace: list, n_resident: int, n_layers: int, n_slots: int, passes: int) -> None:
    """The schedule invariants (see specexec_rt/offload/streamer.py):
    - compute of a layer happens on the slot its latest copy went to, after a wait on that copy;
    - a slot is never copied into while its consumer computes, nor before the copy stream waited
      on the previous consumer's compute_done (write-after-read), nor over an unconsumed copy;
    - streamed layers are computed in order, pass after pass;
    - exactly n_slots copies are in flight at every compute (prefetch depth), and after the last
      pass the first n_slots streamed layers of the next pass are already copying.
    """
    m = n_layers - n_resident
    slots = min(n_slots, m)
    content, waited_copy, pending = {}, defaultdict(bool), defaultdict(bool)
    busy, released, waited_compute, n_copies = set(), defaultdict(bool), defaultdict(bool), defaultdict(int)
    computes = []
    for ev in trace:
        kind = ev[0]
        if kind == "copy":
            _, layer, s = ev
            assert s not in busy, f"{ev}: slot overwritten while its consumer computes"
            assert not pending[s], f"{ev}: slot overwritten before its copy was consumed"
            if n_copies[s]:
                assert waited_compute[s], f"{ev}: copy did not wait on the previous compute_done"
            content[s], waited_copy[s], pending[s], waited_compute[s] = layer, False, True, False
            n_copies[s] += 1
        elif kind == "wait_compute":
            assert released[ev[1]], f"{ev}: waiting on a compute_done that was never recorded"
            waited_compute[ev[1]] = True
        elif kind == "wait_copy":
            waited_copy[ev[1]] = True
        elif kind == "compute":
            _, layer, s = ev
            assert content.get(s) == layer and pending[s], f"{ev}: slot holds {content.get(s)}"
            assert waited_copy[s], f"{ev}: compute did not wait on its copy"
            assert sum(pending.values()) == slots, f"{ev}: {sum(pending.values())} copies in flight"
            pending[s], released[s] = False, False
            busy.add(s)
            computes.append(layer)
        elif kind == "compute_done":
            busy.discard(ev[1])
            released[ev[1]] = True
        elif kind == "skip":
            pending[ev[2]] = False
        else:
            raise AssertionError(f"unknown trace event {ev}")
    assert computes == list(range(n_resident, n_layers)) * passes
    in_flight = sorted(content[s] for s in content if pending[s])
    assert in_flight == list(range(n_resident, n_resident + slots)), "next pass not prefetched"


# ------------------------------------------------------------------ CPU schedule

@pytest.mark.parametrize("n_layers,n_resident,n_slots,int4", [
    (5, 0, 2, False), (5, 2, 2, False), (4, 1, 3, False), (5, 0, 1, False), (3, 1, 4, False),
    (4, 0, 2, True), (4, 4, 2, False),
])
def test_streamed_equals_resident_and_trace(n_layers, n_resident, n_slots, int4):
    seed = 100 * n_layers + 10 * n_resident + n_slots + int4
    layers = make_layers(n_layers, seed, int4=int4, bias=n_layers % 2 == 1)
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    expected = run_passes(ResidentLayers(layers), x0, 3)
    streamer = LayerStreamer(layers, "cpu", n_resident=n_resident, n_slots=n_slots)
    for slot in streamer.slots:
        slot.fill_(255)  # poison: 0xFFFF is NaN in fp16, so a layer read before its copy fails
    streamer.trace = []
    got = run_passes(streamer, x0, 3)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert len(streamer) == n_layers
    if n_resident < n_layers:
        check_trace(streamer.trace, n_resident, n_layers, n_slots, 3)
    assert streamer.bytes_copied == sum(
        streamer.layouts[c % streamer.n_streamed].nbytes for c in range(streamer.copies_enqueued))


def test_views_rebuild_dataclasses_with_their_fields():
    layers = make_layers(2, 7, int4=True)
    streamer = LayerStreamer(layers, "cpu", n_resident=0, n_slots=2)
    for src, got in zip(layers, streamer.iter_layers()):
        assert isinstance(got.wqkv, Int4Weight)
        assert (got.wqkv.group_size, got.wqkv.in_features) == (src.wqkv.group_size, src.wqkv.in_features)
        for (pa, a), (pb, b) in zip(tensor_leaves(src), tensor_leaves(got)):
            assert pa == pb and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_prefetch_is_idempotent_and_wraps_into_next_pass():
    layers = make_layers(5, 3)
    streamer = LayerStreamer(layers, "cpu", n_resident=1, n_slots=2)
    streamer.trace = []
    streamer.prefetch()
    streamer.prefetch()
    assert streamer.trace == [("copy", 1, 0), ("copy", 2, 1)]
    for _ in streamer.iter_layers():
        pass
    # The pass ended with layers 1 and 2 of the next pass already enqueued: a prefetch is a no-op.
    n = len(streamer.trace)
    streamer.prefetch()
    assert len(streamer.trace) == n
    assert [e for e in streamer.trace[-6:] if e[0] == "copy"] == [("copy", 1, 0), ("copy", 2, 1)]


def test_abandoned_pass_resynchronises():
    layers = make_layers(6, 11)
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(11))
    expected = run_passes(ResidentLayers(layers), x0, 1)[0]
    streamer = LayerStreamer(layers, "cpu", n_resident=1, n_slots=2)
    streamer.trace = []
    gen = streamer.iter_layers()
    for i, _layer in zip(range(3), gen):  # stop inside the streamed part, generator kept alive
        pass
    got = run_passes(streamer, x0, 2)  # a new pass starts before the old generator is collected
    del gen  # the stale generator's cleanup must not touch the schedule any more
    got += run_passes(streamer, x0, 1)
    for g in got:
        assert torch.equal(g, expected)
    # After the resync the schedule is clean again.
    tail = streamer.trace[[i for i, e in enumerate(streamer.trace) if e[0] == "skip"][-1] + 1:]
    assert [e[1] for e in tail if e[0] == "compute"] == list(range(1, 6)) * 3


def test_host_block_is_exact_size():
    layers = make_layers(4, 5, hidden=24, inter=40)  # odd tensor sizes: padding between tensors
    streamer = LayerStreamer(layers, "cpu", n_resident=1, n_slots=2)
    expected_layer = []
    for layer in layers[1:]:
        end = 0
        for _, t in tensor_leaves(layer):
            end = (end + ALIGN - 1) // ALIGN * ALIGN + t.numel() * t.element_size()
        expected_layer.append(end)
    offsets, total = [], 0
    for nbytes in expected_layer:
        offsets.append((total + ALIGN - 1) // ALIGN * ALIGN)
        total = offsets[-1] + nbytes
    assert streamer.host_bytes == total
    assert streamer.host_block.untyped_storage().nbytes() == total  # no rounding of the allocation
    assert streamer.streamed_bytes_per_pass == sum(expected_layer)
    assert [l.offset for l in streamer.layouts] == offsets
    assert all(s.numel() == max(expected_layer) for s in streamer.slots)
    # Padding is below one ALIGN per tensor: the exact size is close to the raw size.
    raw = sum(weights_nbytes(l) for l in layers[1:])
    n_tensors = sum(len(list(tensor_leaves(l))) for l in layers[1:])
    assert raw <= total < raw + n_tensors * ALIGN
    assert [layout_layer(l)[1] for l in layers[1:]] == expected_layer


def test_consume_releases_packed_layers():
    layers = make_layers(4, 9)
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
    expected = run_passes(ResidentLayers(layers), x0, 1)[0]
    source = list(layers)
    streamer = make_layer_source(source, "cpu", offload=True, gpu_memory_gb=0, consume=True)
    assert source == [None] * 4  # the host copies can be freed while packing
    assert torch.equal(run_passes(streamer, x0, 1)[0], expected)


def test_bad_arguments_raise():
    layers = make_layers(2, 1)
    with pytest.raises(ValueError, match="n_resident"):
        LayerStreamer(layers, "cpu", n_resident=3)
    with pytest.raises(ValueError, match="n_slots"):
        LayerStreamer(layers, "cpu", n_slots=0)
    with pytest.raises(ValueError, match="n_slots"):
        plan_residency([1, 2], 10, 0, n_slots=0)
    with pytest.raises(ValueError, match="gpu_memory_gb"):
        make_layer_source(layers, "cpu", offload=True, gpu_memory_gb=-1)


# ------------------------------------------------------------------ residency planning

def test_plan_residency_cases():
    assert plan_residency([10] * 4, budget_bytes=40, reserve_bytes=0, n_slots=2) == 4
    assert plan_residency([10] * 4, budget_bytes=39, reserve_bytes=0, n_slots=2) == 1  # 10 + 2*10
    assert plan_residency([10] * 4, budget_bytes=50, reserve_bytes=0, n_slots=2) == 4
    assert plan_residency([10] * 4, budget_bytes=50, reserve_bytes=11, n_slots=2) == 1  # 3: 30+10+11
    assert plan_residency([10] * 4, budget_bytes=39, reserve_bytes=10, n_slots=2) == 0
    assert plan_residency([10] * 4, budget_bytes=0, reserve_bytes=0, n_slots=2) == 0
    # One big last layer: every split but "all resident" needs slots of its size.
    assert plan_residency([1, 1, 1, 50], budget_bytes=52, reserve_bytes=0, n_slots=2) == 0
    assert plan_residency([1, 1, 1, 50], budget_bytes=52, reserve_bytes=0, n_slots=1) == 2
    assert plan_residency([1, 1, 1, 50], budget_bytes=53, reserve_bytes=0, n_slots=2) == 4
    assert plan_residency([], budget_bytes=0, reserve_bytes=0, n_slots=2) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 100), max_size=12), st.integers(0, 1500), st.integers(0, 200), st.integers(1, 4))
def test_plan_residency_is_the_largest_feasible_split(sizes, budget, reserve, n_slots):
    def need(r):
        rest = sizes[r:]
        return sum(sizes[:r]) + min(n_slots, len(rest)) * max(rest, default=0) + reserve

    r = plan_residency(sizes, budget, reserve, n_slots)
    assert 0 <= r <= len(sizes)
    if r > 0:
        assert need(r) <= budget
    assert all(need(q) > budget for q in range(r + 1, len(sizes) + 1))


def test_make_layer_source_honours_the_budget():
    layers = make_layers(6, 2)
    size = layout_layer(layers[0])[1]
    assert all(layout_layer(l)[1] == size for l in layers)
    src = make_layer_source(layers, "cpu", offload=False)
    assert isinstance(src, ResidentLayers) and len(src.layers) == 6
    src = make_layer_source(layers, "cpu", offload=True, gpu_memory_gb=None)
    assert isinstance(src, ResidentLayers)  # no limit on the CPU
    src = make_layer_source(layers, "cpu", offload=True, gpu_memory_gb=0)
    assert isinstance(src, LayerStreamer) and src.n_resident == 0 and src.n_streamed == 6
    # Budget for 3 resident + 2 slots + reserve, but not for 4 resident + 2 slots.
    reserve = 1000
    budget_gb = (5 * size + reserve + size // 2) / 2 ** 30
    src = make_layer_source(layers, "cpu", offload=True, gpu_memory_gb=budget_gb, reserve_bytes=reserve)
    assert isinstance(src, LayerStreamer) and src.n_resident == 3
    resident = sum(weights_nbytes(l) for l in src.resident)
    assert resident + src.n_slots * src.slot_bytes + reserve <= budget_gb * 2 ** 30


# ------------------------------------------------------------------ the real model

def _model_pair(device, dtype, n_resident, n_slots, seed=0):
    from conftest import random_weights, tiny_config
    from specexec_rt.model import Transformer

    cfg = tiny_config("llama", n_layers=5, o_bias=True, head_dim=16)  # the CUDA kernel needs head_dim >= 16
    weights = random_weights(cfg, seed)
    weights.layers = [LayerWeights(**{k: (v.to(dtype) if v is not None else None) for k, v in vars(l).items()})
                      for l in weights.layers]
    dev = torch.device(device)
    move = lambda t: t.to(dev, dtype)  # noqa: E731
    base = dict(embed=move(weights.embed), final_norm=move(weights.final_norm), lm_head=move(weights.lm_head))
    from specexec_rt.model.weights import ModelWeights

    resident = Transformer(cfg, ModelWeights(layers=[], **base), 64, dev, dtype,
                           layer_source=make_layer_source(weights.layers, dev, offload=False))
    streamer = LayerStreamer(weights.layers, dev, n_resident=n_resident, n_slots=n_slots)
    offloaded = Transformer(cfg, ModelWeights(layers=[], **base), 64, dev, dtype, layer_source=streamer)
    return cfg, resident, offloaded, streamer


def _forward_both(cfg, resident, offloaded, device, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (7,), generator=g).to(device)
    pos = torch.arange(7, device=device)
    outs = []
    for model in (resident, offloaded):
        a = model.forward(ids, pos, model.cache, 0)
        # a second call: a tree of 3 new tokens on top of the 7-token prefix
        mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool, device=device)
        b = model.forward(ids[:3], torch.tensor([7, 8, 8], device=device), model.cache, 7, tree_mask=mask)
        outs.append((a, b, model.cache.k.clone(), model.cache.v.clone()))
    return outs


@pytest.mark.parametrize("n_resident,n_slots", [(0, 2), (2, 2), (1, 3)])
def test_offloaded_model_forward_equals_resident(n_resident, n_slots):
    cfg, resident, offloaded, streamer = _model_pair("cpu", torch.float32, n_resident, n_slots, seed=n_slots)
    streamer.trace = []
    (a1, b1, k1, v1), (a2, b2, k2, v2) = _forward_both(cfg, resident, offloaded, "cpu", seed=n_resident)
    assert torch.isfinite(a1).all()
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    check_trace(streamer.trace, n_resident, cfg.n_layers, n_slots, passes=2)


# ------------------------------------------------------------------ native engine (CPU side)

def test_native_backend_without_cuda_is_torch():
    if HAS_CUDA:
        pytest.skip("the CPU fallback is selected only without a CUDA device")
    assert native.backend() == "torch"
    with pytest.raises(RuntimeError, match="CUDA"):
        native.probe_bandwidth(1 << 20, "pinned", "h2d")
    with pytest.raises(ValueError, match="host_kind"):
        native.probe_bandwidth(1 << 20, "paged", "h2d")


# ------------------------------------------------------------------ CUDA

@cuda
@pytest.mark.parametrize("int4", [False, True])
def test_cuda_streamed_equals_resident(int4):
    layers = make_layers(6, 21, hidden=256, inter=512, int4=int4)
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(21)).cuda()
    expected = run_passes(make_layer_source(layers, "cuda", offload=False), x0, 3)
    streamer = LayerStreamer(layers, "cuda", n_resident=1, n_slots=2)
    assert streamer.pinned and native.is_pinned(streamer.host_block)
    for s in streamer.slots:
        s.fill_(255)
    torch.cuda.synchronize()  # the poison runs on the compute stream, the copies on the copy stream
    streamer.trace = []
    got = run_passes(streamer, x0, 3)
    torch.cuda.synchronize()
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    check_trace(streamer.trace, 1, 6, 2, 3)
    streamer.close()
    assert not native.is_pinned(streamer.host_block)


@cuda
def test_cuda_offloaded_model_forward_equals_resident():
    cfg, resident, offloaded, streamer = _model_pair("cuda", torch.float16, 1, 2)
    (a1, b1, k1, v1), (a2, b2, k2, v2) = _forward_both(cfg, resident, offloaded, "cuda", seed=3)
    torch.cuda.synchronize()
    assert torch.isfinite(a1).all()
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(k1, k2) and torch.equal(v1, v2)


@cuda
def test_cuda_streamer_bandwidth_and_overlap():
    """Streamer copies reach >= 90% of the pinned peak; with compute shorter than copy a pass
    costs at most 1.1x the copy-only pass."""
    from specexec_rt.offload.profile import run_profile

    res = run_profile(sizes=[256 << 20], shape="llama-2-7b", quantize="none", layers=8, tokens=16,
                      iters=5, passes=3)
    s = res["streamer"]
    peak = max(r["gbps"] for r in res["bandwidth"] if r["kind"] == "pinned" and r["direction"] == "h2d")
    assert s["copy_only_gbps"] >= 0.9 * peak, (s, peak)
    assert s["compute_only_s"] < s["copy_only_s"], s  # the premise of the overlap check
    assert s["streamed_s"] <= 1.1 * s["copy_only_s"], s


@cuda
def test_cuda_streamed_forward_under_sanitizer(tmp_path):
    """TORCH_CUDA_SANITIZER flags unsynchronised cross-stream accesses (copy vs compute)."""
    script = tmp_path / "sanitize.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_offload import make_layers, run_passes\n"
        "from specexec_rt.offload import LayerStreamer\n"
        "layers = make_layers(5, 1, hidden=64, inter=128)\n"
        "s = LayerStreamer(layers, 'cuda', n_resident=1, n_slots=2)\n"
        "x = torch.randn(4, 8, device='cuda')\n"
        "out = run_passes(s, x, 3)\n"
        "torch.cuda.synchronize()\n"
        "print('OK', float(out[-1].sum()))\n")
    env = dict(os.environ, TORCH_CUDA_SANITIZER="1", SPECEXEC_NATIVE="0")  # the sanitizer sees torch ops
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    assert "CSAN" not in proc.stderr and "data race" not in proc.stderr.lower(), proc.stderr


# ------------------------------------------------------------------ profiler

def _cli(argv):
    import argparse

    from specexec_rt.offload import profile as profile_offload

    parser = argparse.ArgumentParser()
    profile_offload.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile-offload", *argv])
    return args.func(args)


def test_profile_dry_runs_and_writes_json(tmp_path, capsys):
    import json

    out = tmp_path / "p.json"
    assert _cli(["--dry", "--sizes", "64K,256K", "--layers", "3", "--tokens", "4", "--passes", "2",
                 "--iters", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["bytes"] for r in res["bandwidth"]] == [65536, 65536, 262144, 262144]
    assert all(r["gbps"] > 0 for r in res["bandwidth"])
    s = res["streamer"]
    assert s["layers"] == 3 and s["bytes_per_pass"] == 3 * s["layer_bytes"]
    for key in ("copy_only_s", "compute_only_s", "streamed_s", "efficiency"):
        assert s[key] > 0, key
    assert "overlap efficiency" in capsys.readouterr().out


def test_profile_dry_int4_shape():
    from specexec_rt.offload.profile import run_profile, synthetic_layer

    res = run_profile(sizes=[4096], shape="tiny", quantize="int4", layers=2, tokens=2, iters=1, passes=1, dry=True)
    layer = synthetic_layer("tiny", "int4")
    dense = synthetic_layer("tiny", "none")
    # 4-bit packing: the int4 layer moves about a quarter of the fp16 bytes (+ scales).
    assert weights_nbytes(layer) < 0.3 * weights_nbytes(dense)
    assert res["streamer"]["quantize"] == "int4" and res["streamer"]["streamed_s"] > 0


def test_profile_without_cuda_exits_2(capsys):
    if HAS_CUDA:
        pytest.skip("needs a machine without CUDA")
    assert _cli([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert _cli(["--dry", "--sizes", "12Q"]) == 2


def test_parse_size():
    from specexec_rt.offload.profile import parse_size

    assert [parse_size(s) for s in ("1M", "16M", "1G", "512K", "4096", "2MiB")] == \
        [1 << 20, 16 << 20, 1 << 30, 512 << 10, 4096, 2 << 20]
    with pytest.raises(ValueError, match="size"):
        parse_size("-1M")
