"""Compile native sources into a shared library in a per-user cache, once per content.

``build_shared`` runs a compiler command into ``<cache>/<key>/<name>`` where ``key`` hashes the
input files' bytes, the exact command line and any extra identity the caller passes (compiler
version, CPU features): a changed source, compiler or machine builds anew, an unchanged one
reuses the cached file without running anything. Publishing is atomic (temporary file, then
``os.replace``), so processes building at once never load a half-written library.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Callable, Optional, Sequence


class BuildError(RuntimeError):
    """The compiler failed (the message carries its output) or could not be run."""


def cache_root() -> Path:
    """``$SPECEXEC_NATIVE_CACHE`` or ``~/.cache/specexec_rt/native``."""
    return Path(os.environ.get("SPECEXEC_NATIVE_CACHE", Path.home() / ".cache" / "specexec_rt" / "native"))


def build_key(inputs: Sequence[Path], command: Sequence[str], extra: Sequence[str] = ()) -> str:
    """16 hex digits over the inputs' bytes, the command line and ``extra``."""
    h = hashlib.sha256()
    for path in inputs:
        h.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    for part in (*command, "\0", *extra):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def build_shared(name: str, inputs: Sequence[Path], command: Callable[[Path], list[str]],
                 extra: Sequence[str] = (), cache_dir: Optional[Path] = None, timeout: float = 600) -> Path:
    """Return the path of library ``name`` built by ``command(out_path)`` from ``inputs``.

    ``command`` must give the same argv for the same output path (the placeholder path
    ``<out>`` is hashed). Raises ``BuildError`` when the compiler is missing or fails.
    """
    key = build_key(inputs, command(Path("<out>")), extra)
    target = Path(cache_dir or cache_root()) / key / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp{target.suffix}")
    argv = command(tmp)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:  # missing binary, not executable, timeout
        raise BuildError(f"could not run {argv[0]!r}: {e}") from e
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, target)
    return target
