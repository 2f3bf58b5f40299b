"""What the Triton launchers ask of the device they run on, in one place.

``interpreting()``: whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``, set
before Triton is imported): then CPU tensors go through the Triton kernels, which is how the
tests check them without a GPU. ``sm_count(device)``: the streaming multiprocessors a grid
should fill (split-K, flash-decoding splits). Call them through this module
(``device_info.interpreting()``) so that one patch reaches every launcher.
"""
from __future__ import annotations

import functools
import os

import torch

# What sm_count reports off CUDA (the interpreter): small, so tiny test shapes still exercise
# the split paths.
INTERPRETER_SMS = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA ``device`` (cached per device); ``INTERPRETER_SMS`` elsewhere."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
