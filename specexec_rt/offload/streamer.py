"""Offloading: a pinned host layer store streamed through N persistent GPU slots.

The layer stack is split into ``n_resident`` leading layers that live on the device and streamed
layers packed into ONE exact-size host block (each layer contiguous, each tensor at a
``ALIGN``-byte offset), page-locked with ``cudaHostRegister`` (no power-of-two rounding). A pass
copies streamed layer ``k`` into slot ``c % n_slots`` (``c`` counts copies over the life of the
streamer, so the schedule wraps into the next pass) on a dedicated copy stream:

    copy stream:    [wait compute_done[s]] copy(layer -> slot s) record copy_done[s]
    compute stream: wait copy_done[s]  ...consumer's kernels on slot s...  record compute_done[s]

Copy ``c + n_slots`` is enqueued as soon as the consumer of copy ``c`` has enqueued its work
(when the generator resumes), so ``n_slots`` copies are always in flight, including the first
layers of the next pass while the draft grows its tree. Nothing in the loop waits on the host.

On ``device="cpu"`` the same schedule runs with plain copies and no-op events, so CI exercises
the whole path; ``streamer.trace = []`` records the schedule for tests.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from . import native
from ..model.weights import LayerWeights, ResidentLayers, replace_leaves, tensor_leaves

log = logging.getLogger(__name__)

ALIGN = 256  # bytes: every tensor (and every layer) starts at a multiple of this in host and slot
GiB = 1 << 30


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor leaf lives inside its layer's byte range."""

    path: str
    offset: int        # bytes from the layer start, a multiple of ALIGN
    nbytes: int
    dtype: torch.dtype
    shape: tuple


@dataclass(frozen=True)
class LayerLayout:
    offset: int        # bytes from the start of the host block, a multiple of ALIGN
    nbytes: int        # exact: end of the last tensor, no trailing padding
    tensors: tuple     # tuple[TensorSpec, ...]


def layout_layer(layer) -> tuple[list[TensorSpec], int]:
    """Byte layout of one layer's tensor leaves: (specs, exact byte size of the packed layer)."""
    specs, end = [], 0
    for path, t in tensor_leaves(layer):
        nbytes = t.numel() * t.element_size()
        offset = _align(end)
        specs.append(TensorSpec(path, offset, nbytes, t.dtype, tuple(t.shape)))
        end = offset + nbytes
    return specs, end


def plan_residency(layer_bytes: Sequence[int], budget_bytes: float, reserve_bytes: float = 0,
                   n_slots: int = 2) -> int:
    """Number of leading layers to keep resident.

    The largest ``r`` with ``sum(layer_bytes[:r]) + slots * max(layer_bytes[r:]) + reserve <= budget``
    where ``slots = min(n_slots, len(layer_bytes) - r)`` (no slots when everything is resident).
    Returns 0 when even the slots do not fit (the caller decides whether that is fatal).
    """
    if n_slots < 1:
        raise ValueError(f"n_slots must be >= 1, got {n_slots}")
    if any(b < 0 for b in layer_bytes):
        raise ValueError("layer_bytes must be non-negative")
    n = len(layer_bytes)
    best, prefix = 0, 0
    suffix_max = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix_max[i] = max(suffix_max[i + 1], layer_bytes[i])
    for r in range(n + 1):
        if r:
            prefix += layer_bytes[r - 1]
        need = prefix + min(n_slots, n - r) * suffix_max[r] + reserve_bytes
        if need <= budget_bytes:
            best = r
    return best


class _NoEvent:
    """Stands in for torch.cuda.Event on the CPU device: ordering is program order there."""

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass


class LayerStreamer:
    """Layer source that streams layers ``n_resident..`` through ``n_slots`` device slots.

    Args:
        layers: host ``LayerWeights`` (tensors or Int4Weight-like dataclasses of tensors).
        device: compute device (``cuda[:i]`` or ``cpu`` for the schedule without a GPU).
        n_resident: leading layers moved to ``device`` once and yielded as they are.
        n_slots: device slots (prefetch depth) for streamed layers.
        timing: record CUDA events around copies and waits (read with ``stats()``).
        pin: page-lock the host block (default: on CUDA devices).
        consume: set ``layers[i] = None`` after packing layer ``i`` so its original host memory
            can be freed during packing (halves the peak host memory of a large model).
    """

    def __init__(self, layers: list, device, n_resident: int = 0, n_slots: int = 2,
                 timing: bool = False, pin: Optional[bool] = None, consume: bool = False):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        n = len(layers)
        if not 0 <= n_resident <= n:
            raise ValueError(f"n_resident must be in [0, {n}], got {n_resident}")
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.is_cuda = self.device.type == "cuda"
        self.n_layers = n
        self.n_resident = n_resident
        self.n_streamed = n - n_resident
        self.n_slots = min(n_slots, self.n_streamed) if self.n_streamed else 0
        self.timing = bool(timing) and self.is_cuda
        self.trace: Optional[list] = None  # test hook: set to [] to record the schedule
        self.bytes_copied = 0
        self.copies_enqueued = 0          # c: copies issued over the streamer's life
        self.consumed = 0                 # streamed layers yielded and resumed
        self._closed = False
        self._pass_id = 0                 # bumped per iter_layers(); stale generators go quiet
        self._in_pass = False             # a pass is between its first yield and its end
        self._timed: list = []            # (kind, start_event, end_event, slot)

        self.resident = [_to_device(layers[i], self.device) for i in range(n_resident)]
        self._pack(layers, consume)
        self.pinned = False
        if self.is_cuda and (pin is None or pin) and self.host_bytes:
            native.host_register(self.host_block)
            self.pinned = True
            # A pageable source turns every copy synchronous (docs/ALGORITHM.md, "The offloaded pass").
            if not native.is_pinned(self.host_block):
                raise RuntimeError("host block registration did not page-lock the memory")
        self._make_slots()

    # ------------------------------------------------------------ construction

    def _pack(self, layers: list, consume: bool) -> None:
        layouts, total = [], 0
        self._templates = []
        for i in range(self.n_resident, self.n_layers):
            specs, nbytes = layout_layer(layers[i])
            offset = _align(total) if layouts else 0
            layouts.append(LayerLayout(offset, nbytes, tuple(specs)))
            total = offset + nbytes
        self.layouts: list[LayerLayout] = layouts
        self.host_bytes = total  # exact: what the host block occupies, no rounding
        self.streamed_bytes_per_pass = sum(l.nbytes for l in layouts)
        self.slot_bytes = max((l.nbytes for l in layouts), default=0)
        # A plain CPU allocation is exact-size; it is page-locked afterwards (never rounded).
        self.host_block = torch.empty(total, dtype=torch.uint8)
        for k, layout in enumerate(layouts):
            i = self.n_resident + k
            layer = layers[i]
            for spec, (path, t) in zip(layout.tensors, tensor_leaves(layer)):
                start = layout.offset + spec.offset
                dst = self.host_block[start:start + spec.nbytes]
                if spec.nbytes:
                    dst.view(spec.dtype).view(spec.shape).copy_(t)
            # Keep the dataclass skeleton (non-tensor fields) to rebuild views from; meta
            # tensors keep shapes and dtypes (validated by e.g. Int4Weight) and cost nothing.
            self._templates.append(replace_leaves(layer, lambda p, t: torch.empty_like(t, device="meta")))
            if consume:
                layers[i] = None

    def _make_slots(self) -> None:
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                      for _ in range(self.n_slots)]
        # Views of every (streamed layer, slot) pair, built once: no per-pass Python rebuild.
        self._views = [[self._layer_view(k, s) for s in range(self.n_slots)] for k in range(self.n_streamed)]
        self._host_views = [self.host_block[l.offset:l.offset + l.nbytes] for l in self.layouts]
        if self.is_cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            # The slots were allocated (and may be written, e.g. poisoned by tests) on the
            # current stream: order the copy stream after that before its first copy.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            self.copy_done = [torch.cuda.Event() for _ in range(self.n_slots)]
            self.compute_done = [torch.cuda.Event() for _ in range(self.n_slots)]
        else:
            self.copy_stream = None
            self.copy_done = [_NoEvent() for _ in range(self.n_slots)]
            self.compute_done = [_NoEvent() for _ in range(self.n_slots)]

    def _layer_view(self, k: int, s: int) -> LayerWeights:
        slot = self.slots[s]
        specs = {spec.path: spec for spec in self.layouts[k].tensors}

        def view(path, _):
            spec = specs[path]
            return slot[spec.offset:spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)
        return replace_leaves(self._templates[k], view)

    # ------------------------------------------------------------ the schedule

    def __len__(self) -> int:
        return self.n_layers

    def _log(self, *event) -> None:
        if self.trace is not None:
            self.trace.append(event)

    def _enqueue_copy(self) -> None:
        """Issue copy ``c = copies_enqueued``: streamed layer ``c % n_streamed`` -> slot ``c % n_slots``."""
        c = self.copies_enqueued
        k, s = c % self.n_streamed, c % self.n_slots
        layout = self.layouts[k]
        dst, src = self.slots[s][:layout.nbytes], self._host_views[k]
        if c >= self.n_slots:
            # Write-after-read: the previous occupant's consumer must be done with the slot.
            self._log("wait_compute", s)
            if self.is_cuda:
                self.copy_stream.wait_event(self.compute_done[s])
        self._log("copy", self.n_resident + k, s)
        if self.is_cuda:
            if self.timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
            with torch.inference_mode():
                native.copy_h2d_async(dst, src, self.copy_stream)
            self.copy_done[s].record(self.copy_stream)
            if self.timing:
                end = torch.cuda.Event(enable_timing=True)
                end.record(self.copy_stream)
                self._timed.append(("copy", start, end, layout.nbytes))
        else:
            with torch.inference_mode():  # slots may be inference tensors (built under it)
                dst.copy_(src)
        self.bytes_copied += layout.nbytes
        self.copies_enqueued = c + 1

    def prefetch(self) -> None:
        """Make sure the next ``n_slots`` streamed layers are being copied (idempotent)."""
        if self._closed:
            raise RuntimeError("LayerStreamer is closed")
        while self.n_streamed and self.copies_enqueued < self.consumed + self.n_slots:
            self._enqueue_copy()

    def _skip_to_pass_start(self) -> None:
        """A previous pass was abandoned mid-way: drop in-flight copies until layer 0 is next.

        The abandoned consumer may have enqueued work on its slot without recording
        compute_done, so every slot's compute_done is re-recorded on the current stream first
        (conservative write-after-read ordering for the copies issued below).
        """
        if self.consumed % self.n_streamed == 0 and not self._in_pass:
            return
        stream = torch.cuda.current_stream(self.device) if self.is_cuda else None
        for s in range(self.n_slots):
            self.compute_done[s].record(stream)
            self._log("compute_done", s)
        self._in_pass = False
        while self.consumed % self.n_streamed:
            self._log("skip", self.n_resident + self.consumed % self.n_streamed, self.consumed % self.n_slots)
            self.consumed += 1
            self.prefetch()

    def iter_layers(self) -> Iterator[LayerWeights]:
        """Yield every layer in order; streamed ones are views into a slot (see module docstring)."""
        yield from self.resident
        if not self.n_streamed:
            return
        self._skip_to_pass_start()
        self.prefetch()
        self._pass_id += 1
        my_pass = self._pass_id
        self._in_pass = True
        stream = torch.cuda.current_stream(self.device) if self.is_cuda else None
        for k in range(self.n_streamed):
            c = self.consumed
            s = c % self.n_slots
            self._log("wait_copy", s)
            if self.is_cuda:
                if self.timing:
                    before = torch.cuda.Event(enable_timing=True)
                    before.record(stream)
                stream.wait_event(self.copy_done[s])
                if self.timing:
                    after = torch.cuda.Event(enable_timing=True)
                    after.record(stream)
                    self._timed.append(("wait", before, after, 0))
            self._log("compute", self.n_resident + k, s)
            try:
                yield self._views[k][s]
            finally:
                # Runs on resume and on generator close(): the consumer's work on the slot is
                # ordered before the slot's next copy. A generator superseded by a newer pass
                # (abandoned, then collected late) must not touch the schedule any more.
                if my_pass == self._pass_id:
                    self.compute_done[s].record(stream)
                    self._log("compute_done", s)
                    self.consumed = c + 1
            if my_pass != self._pass_id:
                return
            self.prefetch()
        self._in_pass = False

    # ------------------------------------------------------------ outside the loop

    def synchronize(self) -> None:
        """Block the host until every enqueued copy has finished."""
        if self.is_cuda:
            self.copy_stream.synchronize()

    def stats(self, reset: bool = True) -> dict:
        """Bytes moved and (with ``timing=True``) summed copy and compute-wait times in seconds.

        Synchronises the device: call outside the layer loop.
        """
        out = {"bytes_copied": self.bytes_copied, "copies": self.copies_enqueued,
               "copy_s": None, "wait_s": None}
        if self.timing:
            torch.cuda.synchronize(self.device)
            copy_ms = sum(a.elapsed_time(b) for kind, a, b, _ in self._timed if kind == "copy")
            wait_ms = sum(a.elapsed_time(b) for kind, a, b, _ in self._timed if kind == "wait")
            copied = sum(n for kind, _, _, n in self._timed if kind == "copy")
            out.update(copy_s=copy_ms / 1e3, wait_s=wait_ms / 1e3,
                       copy_gbps=copied / (copy_ms / 1e3) / 1e9 if copy_ms else None)
        if reset:
            self._timed.clear()
        return out

    def close(self) -> None:
        """Finish pending copies and unpin the host block. The streamer is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            if self.pinned:
                native.host_unregister(self.host_block)
                self.pinned = False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def _to_device(layer, device: torch.device):
    return replace_leaves(layer, lambda p, t: t.to(device))


def budget_bytes_for(device: torch.device, gpu_memory_gb: Optional[float]) -> float:
    """The memory the target's layers may use: ``gpu_memory_gb`` GiB, or free device memory now
    (``torch.cuda.mem_get_info``) when None; on CPU, None means no limit."""
    if gpu_memory_gb is not None:
        if gpu_memory_gb < 0:
            raise ValueError(f"gpu_memory_gb must be >= 0, got {gpu_memory_gb}")
        return float(gpu_memory_gb) * GiB
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return float(free)
    return float("inf")


def make_layer_source(layers: list, device, offload: bool, gpu_memory_gb: Optional[float] = None,
                      reserve_bytes: int = 0, n_slots: int = 2, timing: bool = False,
                      consume: bool = False):
    """The model's ``layer_source``: ``ResidentLayers`` on ``device`` or a ``LayerStreamer``.

    With ``offload``, as many leading layers as fit in the budget (``gpu_memory_gb`` GiB, or the
    free device memory when None) minus ``reserve_bytes`` (draft, KV caches, activations of the
    largest tree) stay resident; the rest stream through ``n_slots`` slots. Without ``offload``
    (or when everything fits) every layer is moved to ``device``. ``consume``: see LayerStreamer.
    """
    device = torch.device(device)
    if not offload:
        return ResidentLayers([_to_device(l, device) for l in layers])
    sizes = [layout_layer(l)[1] for l in layers]  # packed size, alignment padding included
    budget = budget_bytes_for(device, gpu_memory_gb)
    r = plan_residency(sizes, budget, reserve_bytes, n_slots)
    if r == len(layers):
        log.info("offload: all %d layers fit in the budget, nothing streamed", r)
        return ResidentLayers([_to_device(l, device) for l in layers])
    need = sum(sizes[:r]) + min(n_slots, len(layers) - r) * max(sizes[r:]) + reserve_bytes
    if need > budget:
        log.warning("offload: budget %.2f GiB is below the %d slots + reserve (%.2f GiB)",
                    budget / GiB, n_slots, need / GiB)
    streamer = LayerStreamer(layers, device, n_resident=r, n_slots=n_slots, timing=timing, consume=consume)
    log.info("offload: %d resident layers, %d streamed (%.2f GiB per pass, host block %.2f GiB, "
             "engine %s)", r, streamer.n_streamed, streamer.streamed_bytes_per_pass / GiB,
             streamer.host_bytes / GiB, native.backend() if device.type == "cuda" else "cpu")
    return streamer
