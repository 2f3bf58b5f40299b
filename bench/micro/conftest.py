"""pytest-benchmark suites of the kernels (see README.md beside this file).

CPU cases run by default; the CUDA cases are marked ``cuda`` and run with ``--device cuda``,
which refuses to start without a GPU rather than skipping everything silently.
"""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="which kernels to benchmark: the CPU cases (default) or the CUDA ones (needs a GPU)")


def pytest_configure(config):
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            "bench/micro --device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False). "
            "Run the CPU cases without --device, or run on a machine with a GPU.")


def pytest_collection_modifyitems(config, items):
    device = config.getoption("--device")
    for item in items:
        if ("cuda" in item.keywords) != (device == "cuda"):
            reason = ("a CUDA case: run with --device cuda on a GPU machine" if device == "cpu"
                      else "a CPU case: run without --device cuda")
            item.add_marker(pytest.mark.skip(reason=reason))
