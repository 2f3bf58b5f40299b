"""``NativeLayers``: a CPU float32 pass through every transformer layer in one native call
(``sxc_forward_layers`` in ``csrc/layers_cpu.h``).

Each layer runs the same native calls as the per-op path of ``model/transformer.py``
(``ops.norm_linear``, ``ops.rope_attention``, ``ops.linear``, ``ops.swiglu_linear`` on the
native kernels), in the same order, so the result is bit-identical to it; what goes away is the
Python, ctypes and tensor allocation around five calls per layer, which on a small model was
about a quarter of a decode step. Plan once per model (``NativeLayers.build``: the matrices as
C structs), run per pass.

A layer here is any object with the fields of ``model.weights.LayerWeights`` (``attn_norm``,
``wqkv``, ``bqkv``, ``wo``, ``bo``, ``ffn_norm``, ``w_gate_up``, ``w_down``). A layer dataclass
with any other field set (Qwen3's q/k norms, mixture-of-experts weights) is a block this call
does not compute: ``build`` refuses it, logs why, and the per-op path runs.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
from typing import Optional, Sequence

import torch

from .. import cpu_native
from ..attention.kv import NATIVE_CODES
from ..dense import cpu as dense_cpu
from ..int4.cpu import SxcWeight, native_active, native_weight
from ..int4.weight import Int4Weight

MAT_F32, MAT_INT4 = 0, 1
# The layer fields sxc_forward_layers computes; a layer with another field set is not served.
SERVED_FIELDS = ("attn_norm", "wqkv", "bqkv", "wo", "bo", "ffn_norm", "w_gate_up", "w_down")

log = logging.getLogger(__name__)


def unserved_fields(layer) -> tuple:
    """The fields of a layer dataclass, outside ``SERVED_FIELDS``, that are set (not None): parts
    of the block the native layer stack would silently skip. Empty when there are none."""
    if not dataclasses.is_dataclass(layer):
        return ()
    return tuple(f.name for f in dataclasses.fields(layer)
                 if f.name not in SERVED_FIELDS and getattr(layer, f.name) is not None)


class SxcMat(ctypes.Structure):
    """Mirror of ``sxc_mat`` in csrc/layers_cpu.h: a float32 (kind 0) or 4-bit (kind 1) matrix."""

    _fields_ = [("kind", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
                ("f32", ctypes.c_void_p), ("q4", ctypes.POINTER(SxcWeight))]


class SxcLayer(ctypes.Structure):
    """Mirror of ``sxc_layer`` in csrc/layers_cpu.h: one transformer block as pointers."""

    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("bqkv", ctypes.c_void_p),
                ("bo", ctypes.c_void_p), ("wqkv", SxcMat), ("wo", SxcMat), ("w_gate_up", SxcMat),
                ("w_down", SxcMat)]


cpu_native.declare({
    "sxc_forward_layers": (ctypes.c_int, [ctypes.POINTER(SxcLayer), ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                          ctypes.c_int32, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_void_p, ctypes.c_int32, ctypes.c_float, ctypes.c_int,
                                          ctypes.c_int]),
})


def enabled() -> bool:
    """``SPECEXEC_NATIVE_LAYERS=0`` keeps the per-op path (benchmarks split a step's time with it)."""
    return os.environ.get("SPECEXEC_NATIVE_LAYERS", "1") != "0"


def _f32(t: Optional[torch.Tensor]) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and t.dtype is torch.float32 and t.is_cpu
                         and t.is_contiguous())


def _mat(w, keep: list) -> Optional[SxcMat]:
    """The C struct of one matrix, or None when the native kernels do not take it."""
    if isinstance(w, Int4Weight):
        if not native_active() or w.qweight.device.type != "cpu":
            return None
        return SxcMat(MAT_INT4, w.out_features, w.in_features, None, native_weight(w))
    if isinstance(w, torch.Tensor) and w.dim() == 2 and _f32(w) and w.shape[1] % 16 == 0:
        keep.append(w)
        return SxcMat(MAT_F32, w.shape[0], w.shape[1], w.data_ptr(), None)
    return None


class NativeLayers:
    """The layers of one model as an array of ``SxcLayer`` structs (pointers into the weights'
    tensors, which it keeps referenced)."""

    def __init__(self, layers: Sequence, structs, keep: list, any_f32: bool, any_int4: bool):
        self.layers = tuple(layers)
        self.structs = structs
        self.keep = keep
        self.any_f32 = any_f32
        self.any_int4 = any_int4

    @classmethod
    def build(cls, layers: Sequence) -> Optional["NativeLayers"]:
        """The plan for ``layers``, or None when some matrix or vector is not one the native
        kernels take (then the per-op path runs)."""
        if cpu_native.library() is None or not layers:
            return None
        for i, layer in enumerate(layers):
            fields = unserved_fields(layer)
            if fields:
                log.info("CPU layers in one native call: not for this model (layer %d has %s, which the native "
                         "layer stack does not compute); the per-op path runs", i, ", ".join(map(repr, fields)))
                return None
        keep: list = []
        structs = (SxcLayer * len(layers))()
        any_f32 = any_int4 = False
        for s, layer in zip(structs, layers):
            mats = [_mat(getattr(layer, name), keep) for name in ("wqkv", "wo", "w_gate_up", "w_down")]
            vecs = [getattr(layer, name) for name in ("attn_norm", "ffn_norm", "bqkv", "bo")]
            if any(m is None for m in mats) or not all(_f32(v) for v in vecs) or vecs[0] is None or vecs[1] is None:
                return None
            any_f32 |= any(m.kind == MAT_F32 for m in mats)
            any_int4 |= any(m.kind == MAT_INT4 for m in mats)
            keep.extend(v for v in vecs if v is not None)
            s.attn_norm, s.ffn_norm = vecs[0].data_ptr(), vecs[1].data_ptr()
            s.bqkv = None if vecs[2] is None else vecs[2].data_ptr()
            s.bo = None if vecs[3] is None else vecs[3].data_ptr()
            s.wqkv, s.wo, s.w_gate_up, s.w_down = mats
        return cls(layers, structs, keep, any_f32, any_int4)

    def serves(self, rows: int) -> bool:
        """Whether a pass of ``rows`` new tokens runs here: float32 matrices only up to
        ``dense_cpu.MAX_ROWS`` rows (above, BLAS is faster and the per-op path takes it); 4-bit
        ones while the native int4 kernel is the CPU path (``int4_cpu.native_active``)."""
        return (enabled() and (not self.any_f32 or rows <= dense_cpu.MAX_ROWS)
                and (not self.any_int4 or native_active()))

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
            cache_v: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
            n_heads: int, n_kv_heads: int, head_dim: int, intermediate: int, eps: float,
            threads: Optional[int] = None, isa_level: Optional[int] = None,
            k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` float32 ``[n, hidden]`` (a new tensor, updated in place and returned) through
        every layer; ``cache_k``/``cache_v`` contiguous ``[n_layers, max_len, H_kv, D]`` in a KV
        storage dtype (``attention.kv``; int8 with ``k_scale``/``v_scale`` ``[n_layers, max_len,
        H_kv]``); the rest as ``attention.cpu.run_rope_attention`` (softmax scale
        ``1 / sqrt(head_dim)``)."""
        lib = cpu_native.library()
        n, hidden = x.shape
        rc = lib.sxc_forward_layers(self.structs, len(self.layers), x.data_ptr(), n, hidden, n_heads, n_kv_heads,
                                    head_dim, intermediate, eps, cos.data_ptr(), sin.data_ptr(), cache_k.data_ptr(),
                                    cache_v.data_ptr(), None if k_scale is None else k_scale.data_ptr(),
                                    None if v_scale is None else v_scale.data_ptr(), NATIVE_CODES[cache_k.dtype],
                                    cache_k.shape[1], slots.data_ptr(), rows.data_ptr(), mask.data_ptr(), mask.shape[1],
                                    1.0 / math.sqrt(head_dim), threads or torch.get_num_threads(),
                                    cpu_native.isa() if isa_level is None else isa_level)
        if rc != 0:
            raise RuntimeError(f"sxc_forward_layers failed: {cpu_native.ERRORS.get(rc, rc)} (a cache slot or a "
                               f"segment outside the cache of {cache_k.shape[1]} slots, or inconsistent shapes)")
        return x
