"""pytest plugin loaded by ``bench/gpu_suite.py`` for its CUDA test runs (``-p suite_pytest_plugin``).

Some test modules set ``TRITON_INTERPRET=1`` at import so their CPU cases run in Triton's
interpreter; in one pytest process that would turn every kernel into an interpreted one, CUDA
tests included. This plugin imports the kernel modules before collection with the interpreter
off (``@triton.jit`` picks compiled or interpreted when the module is imported), clears the
variable again once collection is done, and writes what the kernels actually were to the JSON
file named by ``SPECEXEC_SUITE_PLUGIN_OUT``, so the report can say "compiled" with evidence.
With ``SPECEXEC_BLOCK_IMPORTS`` set (``gpu_machine.py``), the packages it names cannot be
imported in the run, as on the GPU machines.
"""
from __future__ import annotations

import importlib
import json
import os

from gpu_machine import block_imports_from_env

# A CPU dry run standing in for a GPU machine blocks the packages missing there (gpu_quick.py).
block_imports_from_env()

KERNEL_MODULES = ("specexec_rt.kernels.attention.triton_kernels", "specexec_rt.kernels.int4.triton_kernels")
_state: dict = {"import_errors": {}, "interpret_set_during_collection": None}


def _kernel_kinds() -> dict:
    """{module.attr: innermost type name} for every Triton kernel object of every loaded
    ``specexec_rt.kernels`` module (found by prefix: the kernels may move between modules)."""
    kinds = {}
    for name, mod in list(importlib.sys.modules.items()):
        if mod is None or not name.startswith("specexec_rt.kernels"):
            continue
        for attr, obj in vars(mod).items():
            inner, seen = obj, 0
            while hasattr(inner, "fn") and type(inner).__name__ in ("Autotuner", "Heuristics") and seen < 5:
                inner, seen = inner.fn, seen + 1
            kind = type(inner).__name__
            if kind in ("JITFunction", "InterpretedFunction"):
                kinds[f"{name.split('.')[2]}.{attr}"] = kind
    return kinds


def pytest_configure(config):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("SPECEXEC_TRITON_INTERPRET", None)
    for name in KERNEL_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported, the tests will show the failure too
            _state["import_errors"][name] = f"{type(e).__name__}: {e}"


def pytest_collection_finish(session):
    _state["interpret_set_during_collection"] = os.environ.get("TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("SPECEXEC_SUITE_PLUGIN_OUT")
    if not path:
        return
    kinds = _kernel_kinds()
    _state.update(kernel_kinds=kinds,
                  compiled=bool(kinds) and all(k == "JITFunction" for k in kinds.values()),
                  interpret_at_end=os.environ.get("TRITON_INTERPRET"))
    with open(path, "w") as f:
        json.dump(_state, f, indent=1)
