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
    parser.addoption("--threads", type=int, default=None,
                     help="CPU threads for every implementation (torch.set_num_threads; the native kernels use "
                          "the same count). Default: torch's. 1 steadies the numbers on a machine others share, "
                          "where a descheduled thread of a team stalls the whole call")


def pytest_configure(config):
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            "bench/micro --device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False). "
            "Run the CPU cases without --device, or run on a machine with a GPU.")
    threads = config.getoption("--threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"bench/micro --threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    device = config.getoption("--device")
    for item in items:
        if ("cuda" in item.keywords) != (device == "cuda"):
            reason = ("a CUDA case: run with --device cuda on a GPU machine" if device == "cpu"
                      else "a CPU case: run without --device cuda")
            item.add_marker(pytest.mark.skip(reason=reason))
