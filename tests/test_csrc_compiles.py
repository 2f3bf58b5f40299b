"""csrc/ compiles with nvcc and exports the C ABI native.py declares (nothing runs on a GPU).

CI has nvcc; without it the test is skipped with the reason. The library is loaded with
ctypes even without a GPU (cudart is linked statically): the ABI version must match and a
CUDA call must fail with a readable error instead of crashing.
"""
from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

from specexec_rt.offload import native

NVCC = native.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


@needs_nvcc
def test_csrc_compiles_with_warnings_as_errors(tmp_path):
    out = tmp_path / "lib.so"
    cmd = native.nvcc_command(NVCC, out)
    # -Werror on the host compiler too: a warning in csrc is a bug waiting to happen.
    cmd[1:1] = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.stat().st_size > 0


@needs_nvcc
def test_build_caches_and_exports_the_abi(tmp_path):
    path = native.build(cache_dir=tmp_path)
    assert native.build(cache_dir=tmp_path) == path  # cached by source hash: no rebuild
    lib = native.load_library(path)
    assert lib.sx_abi_version() == native.ABI_VERSION
    for name in ("sx_host_alloc", "sx_host_free", "sx_host_register", "sx_host_unregister", "sx_is_pinned",
                 "sx_memcpy_h2d_async", "sx_memcpy_d2h_async", "sx_probe_bandwidth", "sx_device_count"):
        assert hasattr(lib, name), name
    assert lib.sx_error_string(0).decode() == "no error"
    assert "invalid argument" in lib.sx_error_string(1).decode()
    # Argument checks happen before any CUDA call, so they hold on a machine without a GPU.
    ptr = ctypes.c_void_p()
    assert lib.sx_host_alloc(0, ctypes.byref(ptr)) == 1 and not ptr.value
    assert lib.sx_host_register(None, 16) == 1
    out = (ctypes.c_float * 1)()
    assert lib.sx_probe_bandwidth(0, 0, 1, 0, 1, out) == 1
    assert lib.sx_probe_bandwidth(0, 1 << 20, 7, 0, 1, out) == 1
    if not torch.cuda.is_available():
        n = ctypes.c_int(-1)
        code = lib.sx_device_count(ctypes.byref(n))
        assert code != 0 and lib.sx_error_string(code)  # an error code and its text, no crash
        with pytest.raises(native.NativeError, match="CUDA error"):
            native._check(lib, code, "cudaGetDeviceCount")
