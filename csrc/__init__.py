"""Native sources of specexec-rt, shipped inside the package as ``specexec_rt.csrc``.

The C/CUDA files here are compiled on first use (never at install, so a machine without a
compiler still installs and runs, on the PyTorch fallbacks) into a cache folder keyed by the
sources' hash; ``SOURCE_DIR`` is where they are, in a source checkout and in an installed wheel
alike.
"""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent


def source(name: str) -> Path:
    """Path of the native source file ``name`` (e.g. ``"offload.cu"``); raises FileNotFoundError
    naming the folder when the package was installed without it."""
    path = SOURCE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"native source {name} is missing from {SOURCE_DIR}; reinstall specexec-rt")
    return path
