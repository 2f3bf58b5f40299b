"""Where the Triton launchers run: the GPU's SM count and whether Triton's interpreter is on
(one definition for every kernel module)."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; 4 elsewhere (Triton's interpreter: small,
    so tiny test shapes still exercise split-K)."""
    if device.type != "cuda":
        return 4
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
