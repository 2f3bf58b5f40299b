"""Offloading: the target's layers in pinned host memory, streamed to the GPU every pass.

| module | what |
| --- | --- |
| ``streamer`` | ``LayerStreamer`` (pinned host store, GPU slots, copy stream), ``make_layer_source`` |
| ``native`` | the native copy engine (``csrc/offload.cu``, built on first use) or its PyTorch fallback |
| ``profile`` | ``specexec-rt profile-offload``: PCIe bandwidth and how well the streamer hides it |
"""
from .streamer import LayerStreamer, layout_layer, make_layer_source, plan_residency

__all__ = ["LayerStreamer", "layout_layer", "make_layer_source", "plan_residency"]
