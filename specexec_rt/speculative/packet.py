"""The one device -> host read of a pass's results: parts appended as the pass goes, read together.

Every value a pass needs on the host after verification (each request's accepted path, its
bonus token, whether its logits were finite, the tree policy's evidence, auto's prediction
curve) is an int64 device tensor whose length is known on the host. ``Packet.add`` appends one
and returns where it will sit; ``Packet.read`` concatenates them and reads them in one sync,
and each reader slices its own part. Floats travel as fixed point, ``FIXED_POINT`` units per 1
(``to_fixed`` / ``from_fixed``): the only scale any part uses.
"""
from __future__ import annotations

from typing import Callable

import torch

FIXED_POINT = 1e6      # float values ride as int64 micro-units


def to_fixed(x: torch.Tensor) -> torch.Tensor:
    """float ``[k]`` -> int64 ``[k]`` in units of ``1 / FIXED_POINT``."""
    return (x * FIXED_POINT).round().long()


def from_fixed(values: list) -> list:
    """Host ints of ``to_fixed`` -> floats."""
    return [v / FIXED_POINT for v in values]


class Packet:
    """int64 device parts, read in one host sync (see the module docstring)."""

    def __init__(self):
        self.parts: list = []
        self.size = 0

    def add(self, part: torch.Tensor) -> slice:
        """Append int64 ``part`` ``[k]``; returns its slice of what ``read`` returns."""
        n = int(part.shape[0])
        where = slice(self.size, self.size + n)
        self.parts.append(part)
        self.size += n
        return where

    def add_all(self, parts: list) -> slice:
        """Append several int64 parts back to back; returns the slice they fill together."""
        start = self.size
        for part in parts:
            self.add(part)
        return slice(start, self.size)

    def read(self, host: Callable[[torch.Tensor], list]) -> list:
        """Every part as host ints, through ``host`` (the pass's counted read); [] and no read
        when nothing was added."""
        return host(torch.cat(self.parts)) if self.parts else []
