"""Drafts derived from the target itself (no second checkpoint needed).

Each has the target's architecture and widths, so by default (``share_cache=None``: whenever the
target's KV cache is resident) it reads the target's KV cache instead of keeping one of its own,
in the target's ``kv_dtype``: its layers attend to the target's committed
K/V of the prefix (a layer-dropped draft, to those of the layers it kept), and only its tree
lives in the cache's scratch slots past the prefix (which the verification pass then overwrites).
Such a draft has no prefix KV, no prompt prefill and no catch-up after a pass (the runner:
``Runner.shares_cache``). The output is exact either way (the draft only shapes the tree);
``share_cache=False`` gives the draft a cache of its own, as a draft from another checkpoint has.
A target whose KV lives in host memory (``offload_kv``) gets a draft with a resident cache of its
own: every draft step would otherwise stream the prefix's K/V from the host; ``share_cache=True``
with such a target is a ValueError.

- ``layer_dropped_draft``: the target with only some transformer layers, sharing the target's
  tensors (no extra weight memory).
- ``int4_draft``: the target's layers (optionally a subset) quantized to 4 bits (a quarter of
  the bytes to read per pass: the cheap draft on a memory-bound GPU).
- ``default_draft``: the choice measured best by ``bench/acceptance.py --drafts`` (int4, at the
  checkpoint's own 4-bit group when it had one).
- ``builtin_draft``: a draft named by a string (the CLI's ``--draft default`` / ``--draft int4:G``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..model.transformer import Transformer
from ..model.weights import LayerWeights, ModelWeights, MoEWeights, layer_matrices


def _resident_layers(target: Transformer) -> list:
    """The target's LayerWeights on its compute device (an offloaded target keeps them on the
    host; the draft must stay resident, so those are copied to the device)."""
    from ..loading.assemble import move_layer

    return [move_layer(layer, target.device) for layer in target.weights.layers]


def _build(target: Transformer, keep: list, layers: list, max_len: Optional[int], share_cache: Optional[bool],
           lm_head=None) -> Transformer:
    cfg = target.config.keep_layers(keep)
    w = target.weights
    weights = ModelWeights(embed=w.embed, final_norm=w.final_norm,
                           lm_head=w.lm_head if lm_head is None else lm_head, layers=layers)
    if share_cache is None:
        share_cache = not target.kv_offload
    if share_cache:
        if target.kv_offload:
            # Every draft step would stream each kept layer's prefix K/V from host memory (and a
            # captured static step cannot copy from the host): the draft keeps its own cache.
            raise ValueError("share_cache=True: the target's KV cache lives in host memory (offload_kv), which a "
                             "draft cannot read per step; leave share_cache unset (or False) for a draft with a "
                             "resident cache of its own")
        if max_len is not None and max_len != target.max_len:
            raise ValueError(f"max_len={max_len}: a draft that reads the target's KV cache has the target's length "
                             f"({target.max_len}); pass share_cache=False for a cache of its own")
        draft = Transformer(cfg, weights, target.max_len, target.device, target.dtype, kv_dtype=target.kv_dtype,
                            kv_layers=keep, own_cache=False)
    else:
        draft = Transformer(cfg, weights, max_len or target.max_len, target.device, target.dtype,
                            kv_dtype=target.kv_dtype)
    # The model whose cache the draft reads (Engine checks it is the engine's target).
    draft.kv_source = target if share_cache else None
    draft.source = target.source        # same tokenizer
    return draft


def reads_target_cache(draft, target) -> bool:
    """Whether ``draft`` attends to ``target``'s KV cache (built from it with ``share_cache``)."""
    return draft is not None and getattr(draft, "kv_source", None) is target


def check_keep(target: Transformer, keep: Sequence[int]) -> list:
    n = target.config.n_layers
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"layer indices must be a non-empty subset of [0, {n}), got {keep}")
    return keep


def layer_dropped_draft(target: Transformer, keep: Sequence[int], max_len: Optional[int] = None,
                        share_cache: Optional[bool] = None) -> Transformer:
    """The target restricted to layers ``keep`` (sorted), sharing the target's weights (and, with
    ``share_cache``, the K/V of those layers in the target's cache)."""
    keep = check_keep(target, keep)
    layers = target.weights.layers if target.layer_source.__class__.__name__ == "ResidentLayers" \
        else _resident_layers(target)
    return _build(target, keep, [layers[i] for i in keep], max_len, share_cache)


def int4_draft(target: Transformer, keep: Optional[Sequence[int]] = None, group_size: int = 64,
               max_len: Optional[int] = None, lm_head_int4: Optional[bool] = None,
               share_cache: Optional[bool] = None) -> Transformer:
    """The target's layers ``keep`` (default all) with every matrix quantized to 4 bits
    (``share_cache``: see the module docstring).

    ``lm_head_int4``: also quantize the draft's own LM head (the embedding stays shared).
    Default: on the CPU when the target's head is dense. A float32 head costs ~11 ms per row
    there (SmolLM2's 49152 x 576, M=1, 2 threads) against ~1.2 ms in int4. A head the target
    already keeps 8-bit (a GGUF's Q8_0) is shared as it is: the native Q8_0 GEMV reads it as
    fast as the int4 one (~1.2 ms), and re-quantizing it cost the draft 12 points of top-1
    agreement on SmolLM2's Q4_1 file (0.974 -> 0.855 with group-32 layers, 6 prompts x 128
    tokens, bench/bench_int4_cpu.py --part agreement). Elsewhere the head stays the target's
    (not measured on GPUs).
    """
    from ..kernels.int4 import Int4Weight, quantize_int4
    from ..kernels.q8 import Q8Weight

    keep = check_keep(target, range(target.config.n_layers) if keep is None else keep)
    if lm_head_int4 is None:
        lm_head_int4 = target.device.type == "cpu" and isinstance(target.weights.lm_head, torch.Tensor)

    def q(m):
        if isinstance(m, Int4Weight):
            return m
        dense = m.dequantize(torch.float32) if isinstance(m, Q8Weight) else m.float()
        return quantize_int4(dense, group_size=group_size).to(target.device)

    def vec(t):
        return None if t is None else t.to(target.device)

    layers = []
    for i in keep:
        lw = target.weights.layers[i]
        # A mixture-of-experts layer stays one: every expert quantized, the router kept as it is.
        moe = None if lw.moe is None else MoEWeights(router=vec(lw.moe.router), gate_up=[q(m) for m in lw.moe.gate_up],
                                                     down=[q(m) for m in lw.moe.down])
        layers.append(LayerWeights(
            attn_norm=vec(lw.attn_norm), wqkv=q(lw.wqkv), bqkv=vec(lw.bqkv), wo=q(lw.wo), bo=vec(lw.bo),
            ffn_norm=vec(lw.ffn_norm), w_gate_up=None if moe else q(lw.w_gate_up), w_down=None if moe else q(lw.w_down),
            q_norm=vec(lw.q_norm), k_norm=vec(lw.k_norm), moe=moe))
    lm_head = q(target.weights.lm_head) if lm_head_int4 else None
    draft = _build(target, keep, layers, max_len, share_cache, lm_head)
    draft.quantization = "int4"
    return draft


def default_keep(n_layers: int) -> list:
    """Layers kept by the fallback layer-dropped draft: the first third and the last two."""
    k = max(1, n_layers // 3)
    return sorted(set(range(k)) | ({n_layers - 2, n_layers - 1} & set(range(n_layers))))


def default_draft(target: Transformer, max_len: Optional[int] = None,
                  share_cache: Optional[bool] = None) -> Transformer:
    """The demo's draft: the target's own weights re-quantized to 4 bits, reading the target's KV
    cache (``share_cache``: see the module docstring).

    The group size is the checkpoint's own 4-bit group when it had one (``source_int4_group``:
    32 for GGUF Q4_0/Q4_1/Q4_K, GPTQ/AWQ's ``group_size``), else 64. A target dequantized from
    a 4-bit file is then reproduced exactly by its draft's layers (min/scale groups are the
    files' form). Measured on SmolLM2-135M-Instruct's Q4_1 file (6 prompts x 128 tokens, teacher
    forced): top-1 agreement with the target 0.974 at group 32 with the target's Q8_0 head
    against 0.707 at group 64 with an int4 head (the previous default), and auto's end-to-end
    speed over plain decoding 1.72x against 1.06x in one run (docs/DESIGN.md). Falls back to a
    layer-dropped copy when the target is already 4-bit (layer-dropped copies of
    SmolLM2 agree 0-2.4%, useless as drafts, but a kept-4-bit target has no cheaper form).
    A mixture-of-experts target's draft has the same experts, each re-quantized, and its router.
    """
    dense = all(isinstance(m, torch.Tensor) for lw in target.weights.layers for m in layer_matrices(lw))
    if dense:
        return int4_draft(target, group_size=int4_group_size(target, target.source_int4_group or 64), max_len=max_len,
                          share_cache=share_cache)
    return layer_dropped_draft(target, default_keep(target.config.n_layers), max_len, share_cache)


def matrix_widths(target: Transformer) -> list:
    """The in_features of the target's layer matrices, sorted (what an int4 group must divide)."""
    return sorted({m.shape[1] for lw in target.weights.layers for m in layer_matrices(lw)})


def int4_group_size(target: Transformer, preferred: int = 64) -> int:
    """``preferred`` if it divides every matrix's in_features, else the largest power of two
    below it that does (a small model's 96-wide MLP takes groups of 32)."""
    from ..errors import UnsupportedModelError
    from ..kernels.int4 import PACK

    widths = matrix_widths(target)
    g = preferred
    while g >= PACK:
        if all(k % g == 0 for k in widths):
            return g
        g //= 2
    raise UnsupportedModelError(target.config.model_type, f"the default int4 draft needs matrix widths divisible "
                                                          f"by {PACK} (got {widths}); pass a draft model")


# Group sizes a named int4 draft (``int4:G``) may take: the native CPU kernel's nibble blocks are
# 32 wide, and these are the ones its tests sweep.
BUILTIN_GROUPS = (32, 64, 128, 256)


def builtin_draft_group(spec: str) -> Optional[int]:
    """The group size a draft name asks for: 0 for ``default`` (the target's widths decide), G
    for ``int4:G``, None when ``spec`` names no built-in draft (a path, a hub id or an alias).
    ValueError for an ``int4:`` name with a group size outside ``BUILTIN_GROUPS``."""
    if spec == "default":
        return 0
    if not spec.startswith("int4:"):
        return None
    text = spec[len("int4:"):]
    if not text.isdigit() or int(text) not in BUILTIN_GROUPS:
        raise ValueError(f"the built-in int4 draft {spec!r} needs a group size of "
                         f"{', '.join(map(str, BUILTIN_GROUPS[:-1]))} or {BUILTIN_GROUPS[-1]} (e.g. int4:32), "
                         f"got {text!r}")
    return int(text)


def builtin_draft(target: Transformer, spec: str, max_len: Optional[int] = None,
                  share_cache: Optional[bool] = None) -> Transformer:
    """The draft ``spec`` names: ``default`` (``default_draft``) or ``int4:G``, the target's layers
    re-quantized to 4 bits in groups of G (``default`` already picks the checkpoint's own group;
    ``int4:G`` overrides it, e.g. to compare group sizes)."""
    from ..errors import UnsupportedModelError

    group = builtin_draft_group(spec)
    if group is None:
        raise ValueError(f"{spec!r} names no built-in draft (default, or int4:G with G in {BUILTIN_GROUPS})")
    if group == 0:
        return default_draft(target, max_len, share_cache)
    widths = matrix_widths(target)
    if any(k % group for k in widths):
        raise UnsupportedModelError(target.config.model_type,
                                    f"draft {spec!r}: group size {group} must divide every matrix width "
                                    f"(this model's: {widths}); pick a smaller one")
    return int4_draft(target, group_size=group, max_len=max_len, share_cache=share_cache)
