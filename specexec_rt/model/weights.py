"""Weight containers: plain dataclasses of tensors, so that moving, packing and streaming them
is a generic walk over their fields (see ``tensor_leaves`` / ``replace_leaves``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch

# A matrix is either a dense tensor [out_features, in_features] or an Int4Weight (a dataclass of
# tensors from specexec_rt.kernels.int4.weight); both are handled by ops.linear.
Matrix = Union[torch.Tensor, "object"]


@dataclass
class LayerWeights:
    """One transformer block. Matrices are [out_features, in_features] like nn.Linear."""

    attn_norm: torch.Tensor          # [hidden]
    wqkv: Matrix                     # [(n_heads + 2 * n_kv_heads) * head_dim, hidden]
    bqkv: Optional[torch.Tensor]     # [(n_heads + 2 * n_kv_heads) * head_dim] or None
    wo: Matrix                       # [hidden, n_heads * head_dim]
    bo: Optional[torch.Tensor]       # [hidden] or None
    ffn_norm: torch.Tensor           # [hidden]
    w_gate_up: Matrix                # [2 * intermediate, hidden]: gate rows, then up rows
    w_down: Matrix                   # [hidden, intermediate]


@dataclass
class ModelWeights:
    """Everything outside the blocks stays resident on the compute device."""

    embed: torch.Tensor              # [vocab, hidden]
    final_norm: torch.Tensor         # [hidden]
    lm_head: Matrix                  # [vocab, hidden]; the same tensor as embed when tied
    layers: list                     # list[LayerWeights]


def tensor_leaves(obj, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (dotted path, tensor) for every tensor reachable through dataclass fields."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from tensor_leaves(item, f"{prefix}.{i}" if prefix else str(i))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.metadata.get("cache"):
                continue  # derived per-device caches are rebuilt, never moved
            value = getattr(obj, f.name)
            if value is not None:
                yield from tensor_leaves(value, f"{prefix}.{f.name}" if prefix else f.name)


def replace_leaves(obj, fn: Callable[[str, torch.Tensor], torch.Tensor], prefix: str = ""):
    """Rebuild ``obj`` with every tensor leaf replaced by ``fn(path, tensor)``."""
    if isinstance(obj, torch.Tensor):
        return fn(prefix, obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(replace_leaves(item, fn, f"{prefix}.{i}" if prefix else str(i))
                         for i, item in enumerate(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("cache"):
                changes[f.name] = None
                continue
            value = getattr(obj, f.name)
            if value is not None and (isinstance(value, (torch.Tensor, list, tuple))
                                      or dataclasses.is_dataclass(value)):
                changes[f.name] = replace_leaves(value, fn, f"{prefix}.{f.name}" if prefix else f.name)
        return dataclasses.replace(obj, **changes)
    return obj


def weights_nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensor_leaves(obj))


class ResidentLayers:
    """The default layer source: every layer already lives on the compute device."""

    def __init__(self, layers: list):
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def iter_layers(self) -> Iterator[LayerWeights]:
        yield from self.layers
