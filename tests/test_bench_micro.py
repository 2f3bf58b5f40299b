"""bench/micro (the pytest-benchmark suites of the kernels) keeps collecting and running: every
case once with ``--benchmark-disable``, the JSON of a minimal timed run carries each case's group,
shape and roofline figure, and ``--device cuda`` refuses clearly without a GPU."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _pytest(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "bench/micro", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_case_runs_once_with_benchmarks_disabled():
    proc = _pytest("--benchmark-disable")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " failed" not in proc.stdout and " passed" in proc.stdout, proc.stdout[-1000:]


def test_timed_json_has_groups_of_ours_beside_a_reference_or_peer(tmp_path):
    out = tmp_path / "micro.json"
    proc = _pytest("-k", "argmax", "--benchmark-only", f"--benchmark-json={out}",
                   "--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    benches = json.loads(out.read_text())["benchmarks"]
    assert len(benches) == 4, [b["name"] for b in benches]
    impls = Counter((b["group"], b["extra_info"]["impl"]) for b in benches)
    for group in {b["group"] for b in benches}:
        assert impls[(group, "ours")] == 1 and impls[(group, "reference")] == 1, group
    for b in benches:
        info = b["extra_info"]
        assert info["shape"] and info["bound"] == "memory" and info["GB/s"] > 0, (b["name"], info)
        assert info["GB/s"] == pytest.approx(info["bytes"] / b["stats"]["median"] / 1e9, rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_clearly():
    proc = _pytest("--device", "cuda", timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr           # pytest's usage-error exit
    assert "no CUDA GPU is visible" in proc.stderr + proc.stdout
