"""``StreamedKVCache``: a KV cache kept in (pinned) host memory, streamed per layer to the device.

An offloaded target with a long context can have more KV than fits beside its resident layers
(Llama-2/3-70B at 32k tokens: ~10.7 GB of float16 KV). Then the cache lives on the host, in
one exact-size block per tensor page-locked with ``cudaHostRegister``, and each forward streams
what it reads through ``n_slots`` device slots, one layer at a time, in step with the layer
loop (and so with the layer streamer's weights):

    begin_pass(read, write)    copy layers 0 .. n_slots-1's read spans into slots 0 .. n_slots-1
    layer(i)                   the compute stream waits for layer i's copy; returns its slot
    layer_done(i)              after layer i's work: its write spans (the pass's new tokens) go
                               back to the host, then layer i + n_slots is copied into the slot

    copy stream:    [wait compute_done[s]] write back layer i | copy layer i + n_slots -> s
    compute stream: wait copy_done[s] ... layer i's attention on slot s ... record compute_done[s]

A slot is one layer's whole cache shape on the device (``[max_len, H_kv, D]`` K and V), so slot
indices are cache slots and every attention path reads it as it reads a resident layer; only the
spans a pass reads are copied (each segment's committed prefix and tree region), and only its
tree regions are written back. Host reads of the store (``commit``/``move``) first wait for the
copy stream. On ``device="cpu"`` the same schedule runs with plain copies (CI tests it:
offloaded KV equals resident), and ``trace = []`` records it.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

from ..kernels.attention.kv import KVView
from ..model.kv_cache import KV_STREAM_SLOTS, KVCache
from . import native
from .streamer import _NoEvent


class StreamedKVCache(KVCache):
    """A ``KVCache`` whose ``k``/``v`` (and int8 scales) ``[n_layers, max_len, H_kv, D]`` live in host
    memory, pinned when ``device`` is CUDA; passes read it through ``n_slots`` device slots."""

    resident = False

    def __init__(self, n_layers: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                 kv_dtype: Optional[torch.dtype] = None, n_slots: int = KV_STREAM_SLOTS):
        super().__init__(n_layers, max_len, n_kv_heads, head_dim, dtype, "cpu", kv_dtype)
        self.compute_device = torch.device(device)
        if self.compute_device.type == "cuda" and self.compute_device.index is None:
            self.compute_device = torch.device("cuda", torch.cuda.current_device())
        self.is_cuda = self.compute_device.type == "cuda"
        self.n_layers = n_layers
        self.n_slots = max(1, min(int(n_slots), n_layers))
        self.pinned = False
        if self.is_cuda:
            for t in self._tensors():
                native.host_register(t)
            self.pinned = True
        shape = (self.max_len, n_kv_heads, head_dim)
        scaled = self.k_scale is not None

        def zeros(shape_, dtype_):
            return torch.zeros(shape_, dtype=dtype_, device=self.compute_device)
        self.slots = [KVView(zeros(shape, self.kv_dtype), zeros(shape, self.kv_dtype),
                             zeros(shape[:2], torch.float32) if scaled else None,
                             zeros(shape[:2], torch.float32) if scaled else None) for _ in range(self.n_slots)]
        if self.is_cuda:
            self.copy_stream = torch.cuda.Stream(self.compute_device)
            self.copy_done = [torch.cuda.Event() for _ in range(self.n_slots)]
            self.compute_done = [torch.cuda.Event() for _ in range(self.n_slots)]
        else:
            self.copy_stream = None
            self.copy_done = [_NoEvent() for _ in range(self.n_slots)]
            self.compute_done = [_NoEvent() for _ in range(self.n_slots)]
        self.trace: Optional[list] = None   # test hook: set to [] to record the schedule
        self.bytes_copied = 0               # host -> device
        self.bytes_written = 0              # device -> host
        self._read: list = []
        self._write: list = []
        self._issued = 0                    # layers of the current pass whose copy is enqueued

    @property
    def device(self) -> torch.device:
        return self.compute_device

    @property
    def device_bytes(self) -> int:
        """What the cache holds on the device: its slots."""
        return sum(t.numel() * t.element_size() for s in self.slots for t in s if t is not None)

    # ------------------------------------------------------------ the schedule

    def _log(self, *event) -> None:
        if self.trace is not None:
            self.trace.append(event)

    def _stream(self):
        return torch.cuda.current_stream(self.compute_device) if self.is_cuda else None

    def _copy_spans(self, spans: list, dst: KVView, src: KVView) -> int:
        """Copy rows ``[a, b)`` of every tensor of ``src`` into ``dst`` for each span, on the copy
        stream; returns the bytes copied."""
        copied = 0
        with torch.inference_mode(), (torch.cuda.stream(self.copy_stream) if self.is_cuda else nullcontext()):
            for a, b in spans:
                for d, t in zip(dst, src):
                    if t is not None:
                        d[a:b].copy_(t[a:b], non_blocking=self.is_cuda)
                        copied += t[a:b].numel() * t.element_size()
        return copied

    def _host(self, i: int) -> KVView:
        return super().layer(i)

    def _issue(self) -> None:
        """Copy the next layer's read spans from the host into its slot."""
        i = self._issued
        s = i % self.n_slots
        if self.is_cuda:
            self.copy_stream.wait_event(self.compute_done[s])   # the slot's last reader is done
        self.bytes_copied += self._copy_spans(self._read, self.slots[s], self._host(i))
        self.copy_done[s].record(self.copy_stream)
        self._log("copy", i, s)
        self._issued = i + 1

    def begin_pass(self, read_spans: list, write_spans: list) -> None:
        self._read = [(int(a), int(b)) for a, b in read_spans if b > a]
        self._write = [(int(a), int(b)) for a, b in write_spans if b > a]
        self._issued = 0
        if self.is_cuda:
            # A pass abandoned mid-way (an exception) may leave work on the compute stream that
            # reads a slot: order every copy after it.
            self.copy_stream.wait_stream(self._stream())
        while self._issued < self.n_slots:
            self._issue()

    def layer(self, i: int) -> KVView:
        """Layer ``i``'s slot, once its copy is done (the compute stream waits; the host does not)."""
        while self._issued <= i:
            self._issue()
        s = i % self.n_slots
        if self.is_cuda:
            self._stream().wait_event(self.copy_done[s])
        self._log("compute", i, s)
        return self.slots[s]

    def layer_done(self, i: int) -> None:
        s = i % self.n_slots
        self.compute_done[s].record(self._stream())
        if self.is_cuda:
            self.copy_stream.wait_event(self.compute_done[s])
        self.bytes_written += self._copy_spans(self._write, self._host(i), self.slots[s])
        self._log("write", i, s)
        if self._issued < self.n_layers:
            self._issue()

    def synchronize(self) -> None:
        """Block the host until every copy (both directions) has finished."""
        if self.is_cuda:
            self.copy_stream.synchronize()

    # ------------------------------------------------------------ host-side edits of the store

    def commit(self, prefix_len: int, slots: torch.Tensor) -> int:
        self.synchronize()
        return super().commit(prefix_len, slots.cpu())

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.synchronize()
        super().move(src.cpu(), dst.cpu())

    def close(self) -> None:
        """Finish the copies and unpin the host store."""
        if self.pinned:
            self.synchronize()
            for t in self._tensors():
                native.host_unregister(t)
            self.pinned = False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def streamed_cache_factory(n_slots: int = KV_STREAM_SLOTS):
    """What ``Transformer(cache_factory=...)`` takes to keep its KV caches in host memory."""
    def make(n_layers, max_len, n_kv_heads, head_dim, dtype, device, kv_dtype=None):
        return StreamedKVCache(n_layers, max_len, n_kv_heads, head_dim, dtype, device, kv_dtype, n_slots)
    return make
