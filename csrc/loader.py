"""Native libraries: compiled into a per-user cache once per content, verified, loaded with ctypes.

Every native library of the package (the CPU kernels, the CUDA copy engine) goes through here:

- ``build_shared`` runs a compiler command into ``<cache>/<key>/<name>``, ``key`` hashing the
  input files' bytes, the exact command line and any extra identity the caller passes (compiler
  version, CPU features): a changed source, compiler or machine builds anew, an unchanged one
  reuses the cached file without running anything. A fresh build is loaded once in a child
  process (so a library that crashes on load never reaches this one), its SHA-256 is written
  beside it (``<name>.sha256``), and both are published atomically (temporary file, then
  ``os.replace``): processes building at once never load a half-written library.
- ``load_verified`` checks the cached file against its recorded hash *before* ``dlopen`` and
  loads it; a mismatch (a truncated, bit-flipped, empty or garbage file: a build killed
  mid-copy, a full disk), a missing record or a failed load discards the file and rebuilds it
  once, with the reason logged. ``dlopen`` maps the file, so a damaged one can raise SIGBUS or
  SIGSEGV later in the process, where no exception handler reaches: it must never be opened.
"""
from __future__ import annotations

import _ctypes
import ctypes
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

HASH_SUFFIX = ".sha256"
# Loads a library in a child process and prints what its ABI-version function returns.
_PROBE = "import ctypes, sys; print(getattr(ctypes.CDLL(sys.argv[1]), sys.argv[2])())"


class BuildError(RuntimeError):
    """The compiler failed (the message carries its output) or could not be run, or the library
    it made cannot be loaded."""


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


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hash_record(path: Path) -> Path:
    """Where the content hash of library ``path`` is recorded."""
    return path.with_name(path.name + HASH_SUFFIX)


def _probe(path: Path, abi: tuple[str, int], timeout: float) -> None:
    """Load ``path`` in a child process and check its ABI version there (BuildError if not)."""
    symbol, version = abi
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), symbol], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"could not load {path} in a child process: {e}") from e
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise BuildError(f"the library just built at {path} fails to load ({how}): {proc.stderr.strip()[-500:]}")
    if proc.stdout.strip() != str(version):
        raise BuildError(f"the library just built at {path} reports ABI version {proc.stdout.strip()!r}, "
                         f"expected {version}")


def build_shared(name: str, inputs: Sequence[Path], command: Callable[[Path], list[str]],
                 extra: Sequence[str] = (), cache_dir: Optional[Path] = None, timeout: float = 600,
                 abi: Optional[tuple[str, int]] = None) -> Path:
    """Return the path of library ``name`` built by ``command(out_path)`` from ``inputs``.

    ``command`` must give the same argv for the same output path (the placeholder path
    ``<out>`` is hashed). ``abi`` (symbol, version): a fresh build is loaded in a child process
    and must return ``version`` from the ``int symbol(void)`` it exports. A cached file is
    returned as it is: ``load_verified`` checks it. Raises ``BuildError`` when the compiler is
    missing or fails, or the fresh library does not load.
    """
    key = build_key(inputs, command(Path("<out>")), extra)
    target = Path(cache_dir or cache_root()) / key / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp{target.suffix}")
    argv = command(tmp)
    try:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as e:  # missing binary, not executable, timeout
            raise BuildError(f"could not run {argv[0]!r}: {e}") from e
        if proc.returncode != 0 or not tmp.is_file():
            raise BuildError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        if abi is not None:
            _probe(tmp, abi, timeout)
        # The record first: once the library appears under its name, its hash is there to check.
        record_tmp = hash_record(tmp)
        record_tmp.write_text(file_hash(tmp) + "\n")
        os.replace(record_tmp, hash_record(target))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        hash_record(tmp).unlink(missing_ok=True)
    return target


def damage(path: Path) -> Optional[str]:
    """Why the cached library ``path`` must not be opened (None when its bytes are the ones its
    build recorded)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"it cannot be read ({e})"
    try:
        want = hash_record(path).read_text().strip()
    except OSError:
        return "no content hash is recorded beside it (an interrupted build, or an older version's)"
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        return (f"its content ({len(data)} bytes, SHA-256 {got[:12]}) does not match the recorded hash "
                f"{want[:12]!r}: the file is truncated, corrupted or not the one built")
    return None


def discard(path: Path) -> None:
    """Remove a cached library and its hash record (a rebuild then makes them anew)."""
    for p in (Path(path), hash_record(Path(path))):
        p.unlink(missing_ok=True)


def open_library(path: Path, signatures: Mapping[str, tuple], abi: tuple[str, int]) -> ctypes.CDLL:
    """``dlopen`` ``path``, declare ``signatures`` (name -> (restype, argtypes)) and check that
    ``abi[0]()`` returns ``abi[1]``. On any failure the library is closed again (so a rebuilt
    file at the same path is really opened anew) and BuildError raised."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"{path}: {e}") from e
    try:
        for name, (res, args) in {abi[0]: (ctypes.c_int, []), **signatures}.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        version = getattr(lib, abi[0])()
        if version != abi[1]:
            raise BuildError(f"{path}: ABI version {version} != expected {abi[1]}")
    except (AttributeError, BuildError) as e:
        _ctypes.dlclose(lib._handle)
        raise BuildError(str(e)) from e
    return lib


def load_verified(build: Callable[[], Path], open_: Callable[[Path], ctypes.CDLL]) -> ctypes.CDLL:
    """Build (or find in the cache) with ``build()``, check the file's hash, open it with
    ``open_``. A damaged file, a missing hash record or a failed open discards the file and
    rebuilds it once (the reason logged); BuildError if the rebuilt one fails too."""
    path = build()
    reason = damage(path)
    if reason is None:
        try:
            return open_(path)
        except BuildError as e:
            reason = f"it fails to load: {e}"
    log.warning("native library %s: %s; rebuilding it", path, reason)
    discard(path)
    path = build()
    reason = damage(path)
    if reason is not None:
        raise BuildError(f"{path} was rebuilt, but {reason}")
    return open_(path)
