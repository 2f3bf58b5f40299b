"""The model: config, weights, static KV cache, the ops, and the one forward path.

| module | what |
| --- | --- |
| ``config`` | ``ModelConfig``: one dataclass for every supported architecture |
| ``weights`` | ``LayerWeights`` / ``ModelWeights`` / ``MoEWeights``: plain tensors or ``Int4Weight``s; ``ResidentLayers`` |
| ``kv_cache`` | ``KVCache``: static K/V indexed by slot, ``commit()`` |
| ``ops`` | ``linear``, ``norm_linear``, ``swiglu_linear``, ``rms_norm``, RoPE, ``prepare_attention``/``attention``/``rope_attention``: kernels or references |
| ``moe`` | the mixture-of-experts MLP: routing (``route``) and the experts computed grouped (``experts_forward``) |
| ``transformer`` | ``Transformer.forward`` / ``forward_batch`` (``forward_segments`` picks one): prefill, decode, draft-tree growth and verification |
"""
from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .kv_cache import KVCache
from .transformer import Segment, Transformer, causal_mask, forward_segments
from .weights import LayerWeights, ModelWeights, MoEWeights, ResidentLayers

__all__ = ["ModelConfig", "SUPPORTED_MODEL_TYPES", "KVCache", "Segment", "Transformer", "causal_mask",
           "forward_segments", "LayerWeights", "ModelWeights", "MoEWeights", "ResidentLayers"]
