"""A static KV cache: allocated once, indexed by slot; speculation only moves entries around.

K and V are kept in a storage dtype of their own (``kv_dtype``: float32, float16, bfloat16, or
int8 with a float32 scale per token and KV head; ``specexec_rt.kernels.attention.kv``), which
every attention path writes and reads in place.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..errors import ContextLengthError
from ..kernels.attention.kv import KV_DTYPES, KVView, kv_dtype_name

KV_DTYPE_CHOICES = ("auto",) + tuple(KV_DTYPES)
# Device slots of a KV cache kept in host memory (offload.StreamedKVCache): layers in flight.
KV_STREAM_SLOTS = 2


def resolve_kv_dtype(kv_dtype: Union[None, str, torch.dtype], dtype: torch.dtype, device) -> torch.dtype:
    """The storage dtype ``kv_dtype`` names for a model computing in ``dtype`` on ``device``.

    ``None``/``"auto"``: half precision wherever the attention kernels read it in place. A
    float16/bfloat16 model keeps its own dtype (the CUDA kernels and flash SDPA read it as is). A
    float32 model on the CPU with the native library stores float16: its attention converts each
    chunk of keys to float32 in cache-resident buffers (F16C, one instruction per 8 values), so
    the cache costs half the bytes to hold and to read, and float16's 10-bit mantissa (llama.cpp's
    default cache type too) keeps 3 more bits than bfloat16 at K/V magnitudes far below float16's
    65504. Without the native library (the PyTorch fallback, which would convert the whole
    prefix every layer) and on other devices a float32 model keeps float32.
    ValueError naming ``kv_dtype`` for anything else than ``KV_DTYPE_CHOICES`` or their torch dtypes.
    """
    if kv_dtype is None or (isinstance(kv_dtype, str) and kv_dtype == "auto"):
        device = torch.device(device)
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
        if device.type == "cpu" and dtype is torch.float32:
            from ..kernels import cpu_native

            if cpu_native.library() is not None:
                return torch.float16
        return dtype
    if isinstance(kv_dtype, torch.dtype) and kv_dtype in KV_DTYPES.values():
        return kv_dtype
    if isinstance(kv_dtype, str) and kv_dtype in KV_DTYPES:
        return KV_DTYPES[kv_dtype]
    raise ValueError(f"kv_dtype={kv_dtype!r}: choose one of {', '.join(KV_DTYPE_CHOICES)} "
                     f"(or torch.float32 / torch.float16 / torch.bfloat16 / torch.int8)")


def kv_bytes_per_slot(n_layers: int, n_kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    """Bytes one cache slot (one token) takes over all layers: K and V, plus int8's scales."""
    per_head = head_dim * torch.empty((), dtype=kv_dtype).element_size() + (4 if kv_dtype is torch.int8 else 0)
    return 2 * n_layers * n_kv_heads * per_head


class KVCache:
    """K and V for every layer: ``[n_layers, max_len, n_kv_heads, head_dim]`` each, in ``kv_dtype``
    (int8: with float32 ``k_scale``/``v_scale`` ``[n_layers, max_len, n_kv_heads]``).

    Slots ``[0, prefix_len)`` hold the committed text; the slots after it are scratch space for
    the current draft tree or verification pass. The caller owns ``prefix_len`` (an int on the
    host), so nothing here needs to read the device. ``layer(i)`` is layer ``i`` as the attention
    backends take it (``KVView``).

    A forward brackets its layer loop with ``begin_pass(read_spans, write_spans)`` and
    ``layer_done(i)`` after each layer's work is enqueued: nothing to do for this resident cache;
    a cache kept in host memory (``offload.StreamedKVCache``, ``resident = False``) streams each
    layer's spans through a few device slots there.
    """

    resident = True

    def __init__(self, n_layers: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, kv_dtype: Optional[torch.dtype] = None):
        self.max_len = int(max_len)
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        if self.kv_dtype not in KV_DTYPES.values():
            raise ValueError(f"kv_dtype={self.kv_dtype}: choose one of {', '.join(KV_DTYPES)}")
        shape = (n_layers, self.max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.k_scale = self.v_scale = None
        if self.kv_dtype is torch.int8:
            self.k_scale = torch.zeros(shape[:3], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:3], dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def kv_dtype_name(self) -> str:
        return kv_dtype_name(self.kv_dtype)

    @property
    def nbytes(self) -> int:
        scales = 0 if self.k_scale is None else 2 * self.k_scale.numel() * 4
        return 2 * self.k.numel() * self.k.element_size() + scales

    def layer(self, i: int) -> KVView:
        """Layer ``i``'s K and V (views): ``[max_len, n_kv_heads, head_dim]`` each."""
        if self.k_scale is None:
            return KVView(self.k[i], self.v[i])
        return KVView(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

    def begin_pass(self, read_spans: list, write_spans: list) -> None:
        """A forward is about to read slots ``[a, b)`` for each ``(a, b)`` of ``read_spans`` and
        write inside ``write_spans`` (every layer)."""

    def layer_done(self, i: int) -> None:
        """Layer ``i``'s work of the pass is enqueued."""

    def check_fits(self, n_slots: int) -> None:
        if n_slots > self.max_len:
            raise ContextLengthError(
                f"{n_slots} cache slots needed but the KV cache holds max_len={self.max_len}; "
                f"load the model with a larger max_len or use a shorter prompt / smaller budget")

    def _tensors(self) -> list:
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def commit(self, prefix_len: int, slots: torch.Tensor) -> int:
        """Move the entries at ``slots`` (int64 ``[n]``, in path order) to
        ``prefix_len .. prefix_len + n - 1`` in every layer at once. Returns the new prefix length.

        Slots may overlap their destinations: the gather materialises before the scatter.
        """
        n = int(slots.shape[0])
        self.check_fits(prefix_len + n)
        if n == 0:
            return prefix_len
        slots = slots.to(device=self.k.device, dtype=torch.long)
        dst = slice(prefix_len, prefix_len + n)
        for t in self._tensors():
            t[:, dst] = t.index_select(1, slots)
        return prefix_len + n

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the entries at slots ``src`` to slots ``dst`` (int64 ``[n]`` each) in every layer
        at once: several requests' commits into their own regions in one call. The gather
        materialises before the scatter, so sources may overlap destinations."""
        for t in self._tensors():
            t[:, dst] = t.index_select(1, src)
