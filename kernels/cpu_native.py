"""The native CPU library (``csrc/specexec_cpu.c``, which includes one file per op:
``int4_cpu.h``, ``q8_cpu.h``, ``f32_cpu.h``, ``attn_cpu.h``, ``layers_cpu.h``, ``argmax_cpu.h``,
and the helpers they share, ``cpu_common.h``): compiled on first use, loaded with ctypes.

``library()`` returns the loaded library, or None with the reason logged once (no C compiler,
a failed build, ``SPECEXEC_NATIVE_CPU=0``); callers then take their PyTorch paths. With
``SPECEXEC_NATIVE_CPU=1`` a failed build raises instead. The build goes into
``~/.cache/specexec_rt/native`` (``$SPECEXEC_NATIVE_CACHE``), keyed by the sources, the compiler
(``$CC``, else ``cc``/``gcc``/``clang``) and its version, and the CPU's features; no torch headers
are involved, so any C compiler will do. OpenMP is used when the compiler has it (else one
thread, logged). Building, the cache's hash check before ``dlopen`` and the one rebuild of a
damaged file are ``specexec_rt.csrc.loader``'s, shared with the CUDA copy engine.

The library picks its code path at run time from the CPU's features (``ISAS``, lowest first);
``SPECEXEC_CPU_ISA=<name>`` forces a lower one (tests and benchmarks run every path the CPU has).
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import shutil
import subprocess
import threading
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)
# specexec_rt.csrc is imported inside the functions that build: kernels/ must stay importable as
# a top-level package too (transformers probes the name "kernels" from the repo root).

ENTRY = "specexec_cpu.c"  # the library; it includes the rest
SOURCES = (ENTRY, "cpu_common.h", "int4_cpu.h", "int4_cpu_avx512.h", "q8_cpu.h", "f32_cpu.h", "attn_cpu.h",
           "layers_cpu.h", "argmax_cpu.h")
LIB_NAME = "libspecexec_cpu.so"
ABI_VERSION = 9  # csrc/specexec_cpu.c SXC_ABI_VERSION
ABI = ("sxc_abi_version", ABI_VERSION)
ISAS = ("scalar", "avx2", "avx512", "avx512vnni")  # the library's levels 0..3
ACT_NONE, ACT_SWIGLU = 0, 1  # the library's prologue activations
ERRORS = {-1: "ISA level not supported by this CPU", -2: "out of memory", -3: "invalid argument"}
# CPU flags the build key includes (the code dispatches at run time; the key keeps builds apart
# across machines that share a home directory).
_FEATURE_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")


# Compiler flags added to every build of library() (the tests build at -O0: same results, faster).
EXTRA_CFLAGS: tuple = ()

_lock = threading.Lock()
_state: dict = {}  # "lib", "reason", "isa" once decided
# The functions every op uses; each op's module declares its own (declare).
_signatures: dict = {
    "sxc_has_openmp": (ctypes.c_int, []),
    "sxc_best_isa": (ctypes.c_int, []),
    "sxc_exp": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]),
}


def find_compiler() -> tuple[Optional[str], str]:
    """(path of the C compiler, how it was found); path None when there is none."""
    cc = os.environ.get("CC")
    if cc:
        path = shutil.which(cc)
        return path, f"CC={cc}" if path else f"CC={cc} is not an executable"
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path, name
    return None, "no C compiler (cc, gcc, clang) on PATH and CC unset"


@lru_cache(maxsize=None)
def compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


@lru_cache(maxsize=None)
def cpu_features() -> str:
    """The machine and the build-relevant CPU flags, e.g. ``x86_64 avx2 f16c fma``."""
    flags: set = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return " ".join([platform.machine(), *sorted(f for f in _FEATURE_FLAGS if f in flags)])


def compile_command(cc: str, out: Path, openmp: bool = True, extra_flags: Sequence[str] = ()) -> list[str]:
    """The build command (``-ffp-contract=off``: the kernel's float operations are explicit, so
    every ISA path rounds alike). ``extra_flags``: e.g. the tests' AVX-512 emulation build."""
    from ..csrc import SOURCE_DIR, source

    return [cc, "-O3", "-std=c11", "-ffp-contract=off", "-fPIC", "-shared", *(["-fopenmp"] if openmp else []),
            *extra_flags, "-I", str(SOURCE_DIR), "-o", str(out), str(source(ENTRY))]


def build(cache_dir: Optional[Path] = None, cc: Optional[str] = None, extra_flags: Sequence[str] = ()) -> Path:
    """Build (or find in the cache) the library; returns its path. Tries with OpenMP first, then
    without. Raises ``specexec_rt.csrc.loader.BuildError`` (no compiler, or both builds failed)."""
    from ..csrc import source
    from ..csrc.loader import BuildError, build_shared

    if cc is None:
        cc, how = find_compiler()
        if cc is None:
            raise BuildError(how)
    inputs = [source(name) for name in SOURCES]
    extra = (compiler_version(cc), cpu_features())
    try:
        return build_shared(LIB_NAME, inputs, lambda out: compile_command(cc, out, True, extra_flags), extra,
                            cache_dir, abi=ABI)
    except BuildError as with_omp:
        try:
            path = build_shared(LIB_NAME, inputs, lambda out: compile_command(cc, out, False, extra_flags), extra,
                                cache_dir, abi=ABI)
        except BuildError:
            raise with_omp from None
        log.warning("native CPU library built without OpenMP (one thread): %s", str(with_omp).splitlines()[0])
        return path


def load(path: Path) -> ctypes.CDLL:
    """Open a built library, declare its functions and check its ABI version (BuildError if
    not). No hash check: ``load_cached`` is the path that verifies the cache."""
    from ..csrc.loader import open_library

    return open_library(path, signatures(), ABI)


def load_cached(cache_dir: Optional[Path] = None, cc: Optional[str] = None,
                extra_flags: Sequence[str] = ()) -> ctypes.CDLL:
    """Build or find the library in the cache, check it against its recorded hash, open it; a
    damaged cached file is rebuilt once (``csrc.loader.load_verified``)."""
    from ..csrc.loader import load_verified

    return load_verified(lambda: build(cache_dir, cc, extra_flags), load)


def declare(functions: dict) -> None:
    """Register functions of the library, name -> (restype, argtypes): each op's module declares
    its own, beside its entry point (the loaded library, if any, gets them at once)."""
    _signatures.update(functions)
    lib = _state.get("lib")
    if lib is not None:
        for name, (res, args) in functions.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args


def signatures() -> dict:
    """The library's functions declared so far: name -> (restype, argtypes)."""
    return dict(_signatures)


def isa_level(name: Optional[str]) -> int:
    """The level a kernel call runs at, for its ``isa=`` argument: ``isa()`` for None, else the
    named one, checked (ValueError for an unknown name or one this CPU lacks)."""
    if name is None:
        return isa()
    if name not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {name!r}")
    if name not in supported_isas():
        raise ValueError(f"isa={name!r} is not supported on this CPU (supported: {supported_isas()})")
    return ISAS.index(name)


def _requested_isa(best: int) -> int:
    want = os.environ.get("SPECEXEC_CPU_ISA")
    if not want:
        return best
    if want not in ISAS:
        log.warning("SPECEXEC_CPU_ISA=%s is not one of %s; using %s", want, ISAS, ISAS[best])
        return best
    if ISAS.index(want) > best:
        log.warning("SPECEXEC_CPU_ISA=%s is above what this CPU supports; using %s", want, ISAS[best])
        return best
    return ISAS.index(want)


def _select() -> None:
    mode = os.environ.get("SPECEXEC_NATIVE_CPU", "auto")
    if mode == "0":
        _state.update(lib=None, reason="SPECEXEC_NATIVE_CPU=0")
        log.info("CPU int4 kernel: PyTorch (SPECEXEC_NATIVE_CPU=0)")
        return
    try:
        lib = load_cached(extra_flags=EXTRA_CFLAGS)
    except Exception as e:  # any failure means the PyTorch fallback, never a crash
        if mode == "1":
            raise
        _state.update(lib=None, reason=f"native build/load not possible: {e}")
        log.warning("CPU int4 kernel: PyTorch (native build/load not possible: %s)", e)
        return
    best = lib.sxc_best_isa()
    _state.update(lib=lib, reason=None, best=best, isa=_requested_isa(best))
    log.info("CPU int4 kernel: native %s (%s, OpenMP %s)", ISAS[_state["isa"]], lib._name,
             "on" if lib.sxc_has_openmp() else "off")


def library() -> Optional[ctypes.CDLL]:
    """The loaded library, or None (the reason is in ``unavailable_reason()``). Decided once."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _select()
    return _state["lib"]


def unavailable_reason() -> Optional[str]:
    library()
    return _state["reason"]


def isa() -> int:
    """The ISA level calls use by default (the CPU's best, or ``SPECEXEC_CPU_ISA``)."""
    return _state["isa"] if library() is not None else 0


def supported_isas() -> list[str]:
    """Every ISA path this CPU can run, lowest first (empty without the library)."""
    return list(ISAS[:_state["best"] + 1]) if library() is not None else []


def reset() -> None:
    """Forget the decision (tests: rebuild with another CC or environment)."""
    with _lock:
        _state.clear()
