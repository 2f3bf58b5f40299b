"""The native copy engine (``csrc/offload.cu``): built on demand, with a PyTorch fallback.

``backend()`` is ``"csrc"`` when the library was built (nvcc + ctypes, cached under
``~/.cache/specexec_rt/native``) and loaded on a machine with a CUDA device, else ``"torch"``:
the same operations through ``torch.cuda.cudart()`` and ``Tensor.copy_``. Building, caching and
the hash check before loading are ``specexec_rt.csrc.loader``'s (shared with the CPU kernels). Both pin memory at
its exact size (``cudaHostRegister``), copy on a given stream, and probe bandwidth with CUDA
events. ``SPECEXEC_NATIVE=0`` forces the fallback; ``SPECEXEC_NATIVE=1`` makes a failed build an
error instead of a fallback.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from ..csrc import SOURCE_DIR
from ..csrc.loader import build_shared, load_verified, open_library

log = logging.getLogger(__name__)

# The sources ship inside the package (specexec_rt.csrc), so an installed wheel builds too.
CSRC = SOURCE_DIR
SOURCES = ("offload.cu", "offload.h")
ABI_VERSION = 2  # csrc/offload.h SX_ABI_VERSION
ABI = ("sx_abi_version", ABI_VERSION)
LIB_NAME = "libspecexec_offload.so"

HOST_KINDS = {"pageable": 0, "pinned": 1, "registered": 2}
DIRECTIONS = {"h2d": 0, "d2h": 1}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_backend: Optional[str] = None
_registered: dict[int, int] = {}  # data_ptr -> bytes, so unregister is idempotent


class NativeError(RuntimeError):
    """A CUDA call in the native library failed; the message carries CUDA's error string."""


def find_nvcc() -> Optional[str]:
    """Path of nvcc from $CUDA_HOME, torch's CUDA_HOME, /usr/local/cuda or $PATH; None if absent."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        candidates.insert(0, CUDA_HOME)
    except Exception:  # pragma: no cover - cpp_extension import problems just skip this hint
        pass
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_command(nvcc: str, out: Path) -> list[str]:
    """The one build command (also used by tests/test_csrc_compiles.py)."""
    return [nvcc, "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
            "-I", str(CSRC), "-o", str(out), str(CSRC / "offload.cu")]


def build(cache_dir: Optional[Path] = None, nvcc: Optional[str] = None) -> Path:
    """Compile ``csrc/offload.cu`` into a shared library (cached by source hash); return its path.

    Raises FileNotFoundError without nvcc and ``csrc.loader.BuildError`` with the compiler output
    on failure.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    return build_shared(LIB_NAME, [CSRC / name for name in SOURCES], lambda out: nvcc_command(nvcc, out),
                        cache_dir=cache_dir, abi=ABI)


def signatures() -> dict:
    """The library's functions: name -> (restype, argtypes)."""
    c_int_p = ctypes.POINTER(ctypes.c_int)
    return {
        "sx_error_string": (ctypes.c_char_p, [ctypes.c_int]),
        "sx_device_count": (ctypes.c_int, [c_int_p]),
        "sx_host_alloc": (ctypes.c_int, [ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]),
        "sx_host_free": (ctypes.c_int, [ctypes.c_void_p]),
        "sx_host_register": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]),
        "sx_host_unregister": (ctypes.c_int, [ctypes.c_void_p]),
        "sx_is_pinned": (ctypes.c_int, [ctypes.c_void_p, c_int_p]),
        "sx_memcpy_h2d_async": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_size_t, ctypes.c_void_p]),
        "sx_memcpy_d2h_async": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_size_t, ctypes.c_void_p]),
        "sx_probe_bandwidth": (ctypes.c_int, [ctypes.c_int, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                              ctypes.c_int, ctypes.POINTER(ctypes.c_float)]),
    }


def load_library(path: Path) -> ctypes.CDLL:
    """Open a built library and check its ABI version (works without a GPU: nothing runs)."""
    return open_library(path, signatures(), ABI)


def load_cached(cache_dir: Optional[Path] = None) -> ctypes.CDLL:
    """Build or find the library, check it against its recorded hash, open it (a damaged cached
    file is rebuilt once)."""
    return load_verified(lambda: build(cache_dir), load_library)


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise NativeError(f"{what} failed: CUDA error {code}: {lib.sx_error_string(code).decode()}")


def _select() -> str:
    global _lib, _backend
    mode = os.environ.get("SPECEXEC_NATIVE", "auto")
    if mode == "0":
        log.info("offload copy engine: torch (SPECEXEC_NATIVE=0)")
        return "torch"
    if not torch.cuda.is_available():
        log.info("offload copy engine: torch (no CUDA device)")
        return "torch"
    try:
        lib = load_cached()
        n = ctypes.c_int()
        _check(lib, lib.sx_device_count(ctypes.byref(n)), "cudaGetDeviceCount")
        _lib = lib
        log.info("offload copy engine: csrc (%s)", lib._name)
        return "csrc"
    except Exception as e:
        if mode == "1":
            raise
        log.warning("offload copy engine: torch (native build/load not possible: %s)", e)
        return "torch"


def backend() -> str:
    """``"csrc"`` or ``"torch"``; decided (and logged) once per process."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = _select()
        return _backend


def _torch_check(res, what: str) -> None:
    code = int(getattr(res, "value", res))
    if code != 0:
        name = getattr(res, "name", str(code))
        raise NativeError(f"{what} failed: CUDA error {code} ({name})")


# ---------------------------------------------------------------- host memory

def host_register(t: torch.Tensor) -> None:
    """Page-lock the memory of a contiguous CPU tensor at its exact size (no rounding)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"host_register needs a contiguous CPU tensor, got {t.device} "
                         f"contiguous={t.is_contiguous()}")
    nbytes = t.numel() * t.element_size()
    ptr = t.data_ptr()
    if nbytes == 0 or ptr in _registered:
        return
    if backend() == "csrc":
        _check(_lib, _lib.sx_host_register(ptr, nbytes), f"cudaHostRegister({nbytes} bytes)")
    else:
        _torch_check(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1),  # 1 = portable
                     f"cudaHostRegister({nbytes} bytes)")
    _registered[ptr] = nbytes


def host_unregister(t: torch.Tensor) -> None:
    """Undo ``host_register`` (idempotent). Copies reading the memory must have finished."""
    ptr = t.data_ptr()
    if _registered.pop(ptr, None) is None:
        return
    if backend() == "csrc":
        _check(_lib, _lib.sx_host_unregister(ptr), "cudaHostUnregister")
    else:
        _torch_check(torch.cuda.cudart().cudaHostUnregister(ptr), "cudaHostUnregister")


def is_pinned(t: torch.Tensor) -> bool:
    """True when the tensor's memory is page-locked (allocated pinned or registered)."""
    if t.device.type != "cpu" or not torch.cuda.is_available():
        return False
    if backend() == "csrc":
        out = ctypes.c_int()
        _check(_lib, _lib.sx_is_pinned(t.data_ptr(), ctypes.byref(out)), "cudaPointerGetAttributes")
        return bool(out.value)
    return bool(t.is_pinned())


# ---------------------------------------------------------------- copies

def copy_h2d_async(dst: torch.Tensor, src: torch.Tensor, stream: "torch.cuda.Stream") -> None:
    """Enqueue ``dst.copy_(src)`` (same byte count, both contiguous) on ``stream``; no host sync.

    ``src`` must be pinned for the copy to overlap compute (the caller checks that once).
    """
    nbytes = src.numel() * src.element_size()
    if dst.numel() * dst.element_size() != nbytes or not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError(f"copy_h2d_async: {nbytes} source bytes vs "
                         f"{dst.numel() * dst.element_size()} destination bytes (both must be contiguous)")
    if backend() == "csrc":
        _check(_lib, _lib.sx_memcpy_h2d_async(dst.device.index, dst.data_ptr(), src.data_ptr(), nbytes,
                                              stream.cuda_stream),
               f"cudaMemcpyAsync H2D ({nbytes} bytes)")
    else:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)


# ---------------------------------------------------------------- bandwidth probe

def probe_bandwidth(nbytes: int, host_kind: str, direction: str, iters: int = 10,
                    device: Optional[torch.device] = None) -> list[float]:
    """Times (ms) of ``iters`` copies of ``nbytes`` between the GPU and host memory of ``host_kind``
    (pageable / pinned / registered) in ``direction`` (h2d / d2h), each timed with CUDA events
    after one warm-up copy."""
    if host_kind not in HOST_KINDS or direction not in DIRECTIONS:
        raise ValueError(f"host_kind must be one of {list(HOST_KINDS)} and direction one of "
                         f"{list(DIRECTIONS)}, got {host_kind!r}, {direction!r}")
    if nbytes <= 0 or iters <= 0:
        raise ValueError(f"nbytes and iters must be positive, got {nbytes}, {iters}")
    if not torch.cuda.is_available():
        raise RuntimeError("probe_bandwidth needs a CUDA device")
    device = torch.device(device if device is not None else "cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if backend() == "csrc":
        out = (ctypes.c_float * iters)()
        _check(_lib, _lib.sx_probe_bandwidth(index, nbytes, HOST_KINDS[host_kind], DIRECTIONS[direction],
                                             iters, out), f"bandwidth probe ({host_kind} {direction})")
        return [float(v) for v in out]
    return _probe_torch(nbytes, host_kind, direction, iters, torch.device("cuda", index))


def _probe_torch(nbytes: int, host_kind: str, direction: str, iters: int, device) -> list[float]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=host_kind == "pinned")
    host.fill_(1)  # fault the pages in before timing
    if host_kind == "registered":
        host_register(host)
    try:
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device)
        dst, src = (dev, host) if direction == "h2d" else (host, dev)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            stream.synchronize()
            for _ in range(iters):
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                stop.record(stream)
                stop.synchronize()
                times.append(start.elapsed_time(stop))
        return times
    finally:
        if host_kind == "registered":
            host_unregister(host)
