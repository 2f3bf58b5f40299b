"""A damaged native library in the cache never takes a run down: it is rebuilt, once, with the
reason logged, and the rebuilt library gives the same results.

A truncated, bit-flipped, empty or garbage ``.so`` (a build killed mid-copy, a full disk), or
one without its recorded hash, sits in a private cache; a child process (so that a regression
crashes it, not the test run) loads the CPU library from each such cache in turn and prints
what four kernels compute. The libraries are built at -O0 (``cpu_native.EXTRA_CFLAGS``): the
same sources and code paths, a few times faster to compile.
"""
from __future__ import annotations

import ctypes
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specexec_rt.csrc import loader
from specexec_rt.csrc.loader import BuildError
from specexec_rt.kernels import cpu_native

FAST = ("-O0",)
KINDS = ("truncated", "bit-flipped", "empty", "garbage", "no hash record")

CHILD = r"""
import json, logging, os, sys
import torch
from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.argmax import argmax_rows
from specexec_rt.kernels.dense import f32_linear_native
from specexec_rt.kernels.int4 import int4_matmul_native
from specexec_rt.kernels.int4 import quantize_int4
from specexec_rt.kernels.q8 import q8_linear_native, quantize_q8_0

warnings = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("specexec_rt").addHandler(handler)
cpu_native.EXTRA_CFLAGS = tuple(json.loads(sys.argv[2]))
for case, cache in json.loads(sys.argv[1]).items():
    warnings.clear()
    os.environ["SPECEXEC_NATIVE_CACHE"] = cache
    cpu_native.reset()
    lib = cpu_native.library()
    out = None
    if lib is not None:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(48, 128, generator=g), torch.randn(3, 128, generator=g)
        out = {"int4": int4_matmul_native(x, quantize_int4(w, 64)).tolist(),
               "q8": q8_linear_native(x, quantize_q8_0(w)).tolist(),
               "f32": f32_linear_native(x, w).tolist(),
               "argmax": argmax_rows(torch.randn(2, 4096, generator=g)).tolist()}
    print(json.dumps({"case": case, "lib": lib and lib._name, "reason": cpu_native.unavailable_reason(),
                      "warnings": list(warnings), "out": out}), flush=True)
"""


def _damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "bit-flipped":
        flipped = bytearray(data)
        for off in (20, 40, *range(len(data) // 8, len(data), len(data) // 8)):  # header and code
            flipped[off] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    else:
        loader.hash_record(path).unlink()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(child process, {case: its result}, cache root, library path inside a cache)."""
    cc, how = cpu_native.find_compiler()
    if cc is None:
        pytest.skip(how)
    base = tmp_path_factory.mktemp("native-cache")
    built = cpu_native.build(cache_dir=base / "clean", extra_flags=FAST)
    rel = built.relative_to(base / "clean")
    caches = {"clean": str(base / "clean")}
    for kind in KINDS:
        shutil.copytree(base / "clean", base / kind.replace(" ", "-"))
        _damage(base / kind.replace(" ", "-") / rel, kind)
        caches[kind] = str(base / kind.replace(" ", "-"))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(caches), json.dumps(FAST)],
                          capture_output=True, text=True, timeout=900)
    results = {r["case"]: r for r in map(json.loads, filter(None, proc.stdout.splitlines()))}
    return proc, results, base, rel


def test_an_intact_cache_loads_without_a_rebuild(runs):
    proc, results, base, rel = runs
    assert "clean" in results, f"the child died (exit {proc.returncode}): {proc.stderr[-3000:]}"
    r = results["clean"]
    assert r["lib"] == str(base / "clean" / rel) and r["out"] is not None, r
    assert not r["warnings"], r["warnings"]
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_library_is_rebuilt_once_and_computes_the_same(runs, kind):
    proc, results, base, rel = runs
    assert kind in results, f"the child died before or at {kind!r} (exit {proc.returncode}): {proc.stderr[-3000:]}"
    r = results[kind]
    path = base / kind.replace(" ", "-") / rel
    assert r["reason"] is None and r["lib"] == str(path), r        # native, from its own cache
    want = "no content hash is recorded" if kind == "no hash record" else "does not match the recorded hash"
    rebuilds = [w for w in r["warnings"] if "rebuilding it" in w]
    assert len(rebuilds) == 1 and want in rebuilds[0] and str(path) in rebuilds[0], r["warnings"]
    assert r["out"] == results["clean"]["out"]                      # bit for bit
    assert loader.damage(path) is None                              # rebuilt with its hash beside it


def _tiny_library(tmp_path: Path, version: int):
    """A two-line C library exporting ``int tiny_abi(void)``: (build callable, abi)."""
    cc, how = cpu_native.find_compiler()
    if cc is None:
        pytest.skip(how)
    src = tmp_path / "tiny.c"
    src.write_text(f"int tiny_abi(void) {{ return {version}; }}\n")
    builds = []

    def build():
        builds.append(1)
        return loader.build_shared("libtiny.so", [src], lambda out: [cc, "-shared", "-fPIC", "-o", str(out), str(src)],
                                   cache_dir=tmp_path / "cache", abi=("tiny_abi", version))

    return build, builds


def test_a_library_that_fails_to_open_is_rebuilt_once_then_refused(tmp_path):
    build, builds = _tiny_library(tmp_path, 3)
    opened = []

    def open_fails_once(path):
        opened.append(path)
        if len(opened) == 1:
            raise BuildError("simulated load failure")
        return loader.open_library(path, {}, ("tiny_abi", 3))

    assert loader.load_verified(build, open_fails_once).tiny_abi() == 3
    assert len(builds) == 2 and len(opened) == 2
    builds.clear()
    with pytest.raises(BuildError, match="ABI version 3 != expected 4"):
        loader.load_verified(build, lambda path: loader.open_library(path, {}, ("tiny_abi", 4)))
    assert len(builds) == 2                                          # one rebuild, then the error


def test_a_fresh_build_that_does_not_load_is_never_published(tmp_path):
    build, _ = _tiny_library(tmp_path, 5)
    src = tmp_path / "tiny.c"
    cc = cpu_native.find_compiler()[0]
    with pytest.raises(BuildError, match="reports ABI version '5', expected 6"):
        loader.build_shared("libtiny.so", [src], lambda out: [cc, "-shared", "-fPIC", "-o", str(out), str(src)],
                            cache_dir=tmp_path / "other", abi=("tiny_abi", 6))
    assert not list((tmp_path / "other").rglob("libtiny*")), "a rejected build was left in the cache"
    lib = loader.open_library(build(), {"tiny_abi": (ctypes.c_int, [])}, ("tiny_abi", 5))
    assert lib.tiny_abi() == 5
