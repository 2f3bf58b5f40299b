"""Tree attention: the Triton kernel (``triton_kernels``, planned and launched by ``launch``), the
native CPU call with RoPE and the cache write (``cpu``), and their PyTorch references
(``reference``); ``inputs`` holds ``Segments`` and the checks both sides share, ``kv`` the KV
cache's storage formats (float32, float16, bfloat16, int8 with per-token, per-head scales) that
every path writes and reads."""
from .cpu import exp_native, plan_rows, rope_attention_cpu, run_rope_attention
from .inputs import Segments
from .kv import KV_DTYPES, KVView, decode, encode, quantize_int8
from .launch import (TileConfig, TreeAttentionLaunch, pack_tree_mask, tree_attention, tree_attention_packed,
                     tree_attention_ragged)
from .reference import (prefix_attention_sdpa, ragged_reference_masks, reference_mask, reference_mask_device_prefix,
                        rope_attention_reference, tree_attention_ragged_reference,
                        tree_attention_ragged_reference_prepared, tree_attention_reference,
                        tree_attention_reference_prepared)

__all__ = [
    "KV_DTYPES", "KVView", "encode", "decode", "quantize_int8",
    "Segments", "TileConfig", "TreeAttentionLaunch", "pack_tree_mask", "tree_attention", "tree_attention_packed",
    "tree_attention_ragged", "prefix_attention_sdpa", "reference_mask", "reference_mask_device_prefix",
    "ragged_reference_masks", "tree_attention_reference", "tree_attention_reference_prepared",
    "tree_attention_ragged_reference", "tree_attention_ragged_reference_prepared",
    "rope_attention_cpu", "rope_attention_reference", "run_rope_attention", "plan_rows", "exp_native",
]
