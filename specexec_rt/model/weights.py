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
class MoEWeights:
    """The mixture-of-experts MLP of one layer. Expert ``e``'s matrices are ``gate_up[e]`` and
    ``down[e]`` (dense tensors or ``Int4Weight``s, like a dense layer's); plain lists, so the
    offload streamer packs and streams every expert with its layer."""

    router: torch.Tensor             # [num_experts, hidden], dense in the model's dtype
    gate_up: list                    # num_experts x [2 * moe_intermediate, hidden]: gate rows, then up rows
    down: list                       # num_experts x [hidden, moe_intermediate]

    @property
    def num_experts(self) -> int:
        return len(self.gate_up)


@dataclass
class LayerWeights:
    """One transformer block. Matrices are [out_features, in_features] like nn.Linear.

    A mixture-of-experts layer has ``moe`` set and no dense MLP (``w_gate_up``/``w_down`` None).
    New optional fields go last and default to None: code that serves only some layers (the CPU
    whole-layer native path) refuses a layer with a field it does not know set."""

    attn_norm: torch.Tensor          # [hidden]
    wqkv: Matrix                     # [(n_heads + 2 * n_kv_heads) * head_dim, hidden]
    bqkv: Optional[torch.Tensor]     # [(n_heads + 2 * n_kv_heads) * head_dim] or None
    wo: Matrix                       # [hidden, n_heads * head_dim]
    bo: Optional[torch.Tensor]       # [hidden] or None
    ffn_norm: torch.Tensor           # [hidden]
    w_gate_up: Optional[Matrix]      # [2 * intermediate, hidden]: gate rows, then up rows (None: moe)
    w_down: Optional[Matrix]         # [hidden, intermediate] (None: moe)
    q_norm: Optional[torch.Tensor] = None   # [head_dim]: per-head RMSNorm of q before RoPE (Qwen3)
    k_norm: Optional[torch.Tensor] = None   # [head_dim]: the same for k
    moe: Optional[MoEWeights] = None


def layer_matrices(layer: LayerWeights) -> list:
    """Every matrix of a layer that a draft quantizes: attention's, then the dense MLP's or every
    expert's. Not the router (kept dense: it decides which experts run)."""
    mats = [layer.wqkv, layer.wo]
    if layer.moe is None:
        return mats + [layer.w_gate_up, layer.w_down]
    return mats + list(layer.moe.gate_up) + list(layer.moe.down)


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
