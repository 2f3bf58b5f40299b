"""``argmax_rows``: the row-wise argmax that greedy decoding takes of every vocabulary-wide row
(``sxc_argmax_rows`` in ``csrc/argmax_cpu.h``); the reference is ``reference``.

``torch.argmax`` does not vectorize this reduction on a CPU: ~60-110 us per 49152-wide float32
row on a 2-core EPYC, where the native two-sweep scan takes ~10 us. A greedy chain pass of k
draft tokens picks k + 1 rows. Same result as ``torch.argmax(x, -1)``, ties and NaNs included:
the first index of the largest value, or of the first NaN.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .. import cpu_native

# Rows narrower than this go to torch.argmax (its fixed cost is the same as the native call's).
MIN_WIDTH = 1024

cpu_native.declare({
    "sxc_argmax_rows": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_int]),
})


def argmax_rows(x: torch.Tensor, isa: Optional[str] = None) -> torch.Tensor:
    """``x.argmax(-1)`` (int64, ``x.shape[:-1]``) for a 1-D or 2-D tensor; the native scan for CPU
    float32 rows with unit stride when the library is loaded, ``torch.argmax`` otherwise."""
    if not (x.is_cpu and x.dtype is torch.float32 and 1 <= x.dim() <= 2 and x.shape[-1] >= MIN_WIDTH
            and x.stride(-1) == 1 and (x.dim() == 1 or x.stride(0) >= x.shape[1])):
        return x.argmax(-1)
    lib = cpu_native.library()
    if lib is None:
        return x.argmax(-1)
    m = 1 if x.dim() == 1 else int(x.shape[0])
    out = torch.empty(m, dtype=torch.long)
    ldx = x.shape[-1] if x.dim() == 1 else x.stride(0)
    rc = lib.sxc_argmax_rows(x.data_ptr(), m, x.shape[-1], ldx, out.data_ptr(),
                             cpu_native.isa_level(isa))
    if rc != 0:
        raise RuntimeError(f"sxc_argmax_rows failed: {cpu_native.ERRORS.get(rc, rc)}")
    return out[0] if x.dim() == 1 else out
