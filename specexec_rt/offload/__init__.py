"""Offloading: the target's layers in pinned host memory, streamed to the GPU every pass.

| module | what |
| --- | --- |
| ``streamer`` | ``LayerStreamer`` (pinned host store, GPU slots, copy stream), ``make_layer_source`` |
| ``kv_stream`` | ``StreamedKVCache``: a KV cache in pinned host memory, each layer's spans streamed with the layer (``offload_kv``) |
| ``native`` | the native copy engine (``csrc/offload.cu``, built on first use) or its PyTorch fallback |
| ``profile`` | ``specexec-rt profile-offload``: PCIe bandwidth and how well the streamer hides it |
"""
from .kv_stream import StreamedKVCache, streamed_cache_factory
from .streamer import LayerStreamer, layout_layer, make_layer_source, plan_residency

__all__ = ["LayerStreamer", "StreamedKVCache", "layout_layer", "make_layer_source", "plan_residency",
           "streamed_cache_factory"]
