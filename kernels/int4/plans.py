"""Launch plans of the CUDA ``int4_matmul`` and the one table of measured plans.

An ``Int4Plan`` says how one call runs (GEMV, tensor-core tiles, or dequantise + cuBLAS; tile
sizes, warps, K splits). ``default_plan`` holds the built-in guesses (for an H100);
``candidate_plans`` the set the tuner measures. This module owns the table of measured plans,
keyed by (GPU model, x dtype, N, K, group size, M bucket): ``register_plan`` fills it (the
tuner, or ``load_tuning`` from the JSON file at ``tuning_path()``), ``plan_for`` reads it, and
``save_tuning`` writes it back.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

log = logging.getLogger(__name__)

# At or above this many rows, CUDA calls dequantise into scratch and use cuBLAS.
DEQUANT_MIN_M = 256

# Launch configuration
# ----------------------------------------------------------------------------------------
# Bucketed M (next power of two) -> (BLOCK_M, BLOCK_N, max BLOCK_K, num_warps) of the default
# plan. BLOCK_M == 1 selects the GEMV kernel. Guesses for H100; measured plans (tuning)
# replace them per GPU model and shape.
_CONFIGS = {
    1: (1, 64, 128, 4),
    2: (16, 64, 128, 4),
    4: (16, 64, 128, 4),
    8: (16, 64, 128, 4),
    16: (16, 64, 128, 4),
    32: (32, 64, 128, 4),
    64: (64, 64, 128, 4),
    128: (64, 128, 64, 8),
    256: (64, 128, 64, 8),
}
_MAX_BUCKET = max(_CONFIGS)
# Plans are tuned per power-of-two M bucket up to this one; larger M shares its plan.
MAX_TUNED_BUCKET = 4096
PATHS = ("gemv", "mma", "dequant")


def m_bucket(m: int) -> int:
    """The power of two >= m (capped at MAX_TUNED_BUCKET) whose plan serves M = m."""
    return min(1 << max(0, (m - 1).bit_length()), MAX_TUNED_BUCKET)


def _config(m: int):
    return _CONFIGS[min(m_bucket(m), _MAX_BUCKET)]


def block_k_for(group_size: int, cap: int) -> int:
    """Largest of 128/64/32 that is <= cap and divides the group (one group per tile)."""
    for bk in (128, 64, 32):
        if bk <= cap and group_size % bk == 0:
            return bk
    return 32


@dataclasses.dataclass(frozen=True)
class Int4Plan:
    """How one int4_matmul call runs on a GPU (or in the interpreter).

    ``path``: ``"gemv"`` (the GEMV kernel, one x row per program), ``"mma"`` (tensor-core
    tiles of ``block_m`` rows) or ``"dequant"`` (dequantise into scratch, then cuBLAS; the
    tile fields are unused). ``block_k`` divides the group or is a multiple of it (GEMV only).
    ``split_k``: 0 chooses the number of K splits from the grid size; n > 0 asks for n.
    """

    path: str
    block_m: int = 1
    block_n: int = 64
    block_k: int = 128
    warps: int = 4
    split_k: int = 0

    def problem(self, k: int, group_size: int) -> Optional[str]:
        """Why this plan cannot run K = k with this group size (None when it can)."""
        if self.path not in PATHS:
            return f"unknown path {self.path!r}"
        if self.path == "dequant":
            return None
        bk, g = self.block_k, group_size
        if bk < 32 or bk & (bk - 1) or self.block_n < 16 or self.block_n & (self.block_n - 1):
            return "block_k and block_n must be powers of two (block_k >= 32, block_n >= 16)"
        if self.warps not in (1, 2, 4, 8, 16) or self.split_k < 0:
            return "warps must be 1..16 (a power of two) and split_k >= 0"
        if self.path == "gemv":
            if self.block_m != 1:
                return "the GEMV path takes block_m = 1"
            if g % bk and (bk % g or k % bk):
                return f"block_k {bk} neither divides the group {g} nor tiles K = {k} in whole groups"
            return None
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            return "tensor-core tiles need block_m >= 16, a power of two"
        if g % bk:
            return f"the tensor-core path needs block_k dividing the group ({bk} vs {g})"
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Int4Plan":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@functools.lru_cache(maxsize=1024)
def default_plan(m: int, k: int, group_size: int, dequant: bool = True) -> Int4Plan:
    """The untuned choice: GEMV at M = 1, tensor cores below ``DEQUANT_MIN_M``, dequantise +
    cuBLAS from there (``dequant=False``, as in the interpreter, keeps the Triton kernels)."""
    if dequant and m >= DEQUANT_MIN_M:
        return Int4Plan("dequant")
    bm, bn, bk_cap, warps = _config(m)
    return Int4Plan("gemv" if bm == 1 else "mma", bm, bn, block_k_for(group_size, bk_cap), warps)


def candidate_plans(m: int, k: int, group_size: int, dequant: bool = True) -> list[Int4Plan]:
    """The small set the tuner measures for M's bucket (the default plan first)."""
    bucket = m_bucket(m)
    plans = [default_plan(bucket, k, group_size, dequant)]
    if bucket == 1:
        for bn in (32, 64, 128):
            for bk in (64, 128, 256, 512):
                for warps in (4, 8):
                    for split in (0, 1, 2, 4, 8, 16):
                        plans.append(Int4Plan("gemv", 1, bn, bk, warps, split))
    else:
        bms = sorted({min(max(16, bucket), 64), 16} | ({128} if bucket >= 256 else set()))
        for bm in bms:
            for bn in (64, 128):
                for bk in (32, 64, 128):
                    for warps in (4, 8):
                        for split in ((0, 1) if bucket < 256 else (1,)):
                            plans.append(Int4Plan("mma", bm, bn, bk, warps, split))
        if dequant and bucket >= 16:
            plans.append(Int4Plan("dequant"))
    seen, out = set(), []
    for p in plans:
        if p not in seen and p.problem(k, group_size) is None:
            seen.add(p)
            out.append(p)
    return out


# Measured plans: (device name, x dtype, N, K, group size, M bucket) -> Int4Plan. Filled by
# tuning (from its JSON file on first use, or by tuning in this process).
_TUNED: dict = {}


# ----------------------------------------------------------------------------------------
# The table of measured plans (this module is its only writer)
# ----------------------------------------------------------------------------------------
FORMAT_VERSION = 1
# (device name, x dtype, N, K, group size, M bucket) -> Int4Plan, and the timings behind it.
_TUNED: dict = {}
_MEASURED: dict = {}
_file_loaded = False


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tuned_key(device: torch.device, dtype: torch.dtype, n: int, k: int, group_size: int, m: int) -> tuple:
    return (device_name(device), _dtype_name(dtype), n, k, group_size, m_bucket(m))


def register_plan(key: tuple, plan: Int4Plan, measured: Optional[dict] = None) -> None:
    """Make ``plan`` the one ``plan_for`` returns for ``key`` (see ``tuned_key``); ``measured``
    (e.g. ``{"ms": ..., "default_ms": ...}``) is saved next to it."""
    _TUNED[key] = plan
    _MEASURED[key] = dict(measured or {})


def tuned_plan(key: tuple) -> Optional[Int4Plan]:
    return _TUNED.get(key)


def tuned_entries() -> Iterator[tuple[tuple, Int4Plan, dict]]:
    """(key, plan, timings) of every registered plan, sorted by key."""
    for key, plan in sorted(_TUNED.items()):
        yield key, plan, _MEASURED.get(key, {})


def clear_tuning() -> None:
    """Forget every registered plan (tests, or a fresh tuning run)."""
    global _file_loaded
    _TUNED.clear()
    _MEASURED.clear()
    _file_loaded = True      # and do not read the file again behind the caller's back


def tuning_path() -> Path:
    return Path(os.environ.get("SPECEXEC_INT4_TUNING",
                               Path.home() / ".cache" / "specexec_rt" / "int4_tuning.json")).expanduser()


def load_tuning(path: Optional[Path] = None) -> int:
    """Register the plans in ``path`` (default ``tuning_path()``); returns how many. A missing
    file is no error; an unreadable one is logged and ignored (the defaults still work)."""
    global _file_loaded
    if path is None:
        _file_loaded = True
    path = Path(path) if path is not None else tuning_path()
    if not path.is_file():
        return 0
    try:
        data = json.loads(path.read_text())
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('version')!r}, expected {FORMAT_VERSION}")
        count = 0
        for e in data["entries"]:
            plan = Int4Plan.from_dict(e["plan"])
            if plan.problem(int(e["K"]), int(e["group_size"])) is not None:
                continue
            key = (e["device"], e["dtype"], int(e["N"]), int(e["K"]), int(e["group_size"]), int(e["m_bucket"]))
            register_plan(key, plan, {k: e[k] for k in ("ms", "default_ms") if k in e})
            count += 1
        return count
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring int4 tuning file %s: %s", path, e)
        return 0


def save_tuning(path: Optional[Path] = None) -> Path:
    """Write every registered plan (loaded or tuned in this process) to ``path``, atomically."""
    path = Path(path) if path is not None else tuning_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    for (device, dtype, n, k, g, bucket), plan, extra in tuned_entries():
        entries.append({"device": device, "dtype": dtype, "N": n, "K": k, "group_size": g, "m_bucket": bucket,
                        "plan": plan.to_dict(), **extra})
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": FORMAT_VERSION, "entries": entries}, indent=1))
    os.replace(tmp, path)
    return path


def plan_for(x2: torch.Tensor, w) -> Int4Plan:
    """The plan ``int4_matmul`` runs for x2 ``[M, K]`` and an ``Int4Weight`` ``w``: the measured
    one if this GPU model and shape were tuned (the file is read on the first call), else
    ``default_plan``."""
    if not _file_loaded:
        load_tuning()
    m = x2.shape[0]
    plan = _TUNED.get(tuned_key(x2.device, x2.dtype, w.out_features, w.in_features, w.group_size, m))
    return plan or default_plan(m, w.in_features, w.group_size, dequant=x2.device.type == "cuda")
