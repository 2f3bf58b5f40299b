"""Turn per-tensor getters (HF names) into ModelWeights: fuse q/k/v and gate/up, cast, quantize."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..model.config import ModelConfig
from ..model.weights import LayerWeights, ModelWeights, MoEWeights

# get_matrix(name) -> float tensor [out, in] or Int4Weight (for an expert stack name, a list of
# them, one per expert); get_vector(name) -> tensor or None.
MatrixGetter = Callable[[str], object]
VectorGetter = Callable[[str], Optional[torch.Tensor]]


def int4_group_size(in_features: int) -> int:
    for g in (128, 64, 32):
        if in_features % g == 0:
            return g
    raise ValueError(f"in_features={in_features} is not a multiple of 32: cannot quantize to int4")


def _is_dense(m) -> bool:
    return isinstance(m, torch.Tensor)


def _is_q8(m) -> bool:
    from ..kernels.q8 import Q8Weight

    return isinstance(m, Q8Weight)


def _head_q8(w, quantize: str, device):
    from ..kernels.q8 import with_int8_activations

    return with_int8_activations(w, quantize != "none").to(device)


def fuse_rows(mats: list):
    """Concatenate matrices along out_features (dense or 4-bit; a mix is dequantized to dense)."""
    if all(_is_dense(m) for m in mats):
        return torch.cat(mats, dim=0)
    if not any(_is_dense(m) for m in mats):
        from ..kernels.int4 import Int4Weight

        perms = [m.perm for m in mats]
        if all(p is None for p in perms) or (all(p is not None for p in perms)
                                             and all(torch.equal(p, perms[0]) for p in perms)):
            return Int4Weight.concat_out_features(mats)
        # Act-order permutations that differ cannot share one activation gather: go dense.
    return torch.cat([m if _is_dense(m) else m.dequantize(torch.float32) for m in mats], dim=0)


def finish_matrix(m, dtype: torch.dtype, quantize: str):
    """Cast a dense matrix, quantize it when asked, or dequantize a 4-bit one for quantize="none"."""
    if _is_dense(m):
        if quantize == "int4":
            from ..kernels.int4 import quantize_int4

            return quantize_int4(m.float(), group_size=int4_group_size(m.shape[1]))
        return m.to(dtype)
    if quantize == "none":
        return m.dequantize(torch.float32).to(dtype)
    return m


def expected_shape(cfg: ModelConfig, name: str) -> tuple:
    """The shape a tensor named like HF Llama's must have under ``cfg`` (for an expert stack,
    ``model.layers.{i}.mlp.experts.{gate,up,down}_proj.weight``: each expert's)."""
    h, q, kv, inter = cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size
    if ".mlp.experts." in name:
        e_inter = cfg.moe_intermediate_size
        return {"gate_proj.weight": (e_inter, h), "up_proj.weight": (e_inter, h),
                "down_proj.weight": (h, e_inter)}[name.rsplit(".", 2)[-2] + ".weight"]
    table = {
        "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h), "o_proj.weight": (h, q),
        "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.bias": (h,),
        "gate_proj.weight": (inter, h), "up_proj.weight": (inter, h), "down_proj.weight": (h, inter),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,), "model.norm.weight": (h,),
        "embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
        "q_norm.weight": (cfg.head_dim,), "k_norm.weight": (cfg.head_dim,), "mlp.gate.weight": (cfg.num_experts, h),
    }
    for suffix, shape in table.items():
        if name.endswith(suffix):
            return shape
    raise KeyError(name)


def checked(getter, cfg: ModelConfig):
    """Wrap a getter so a tensor whose shape disagrees with the config fails at load, by name."""
    from ..errors import ModelLoadError

    def check(name: str, t, what: str) -> None:
        shape = tuple(t.shape)
        want = expected_shape(cfg, name)
        if shape != want:
            raise ModelLoadError(f"tensor {what} has shape {list(shape)} but the config "
                                 f"({cfg.model_type}, hidden {cfg.hidden_size}, heads {cfg.n_heads}/"
                                 f"{cfg.n_kv_heads}, head_dim {cfg.head_dim}, experts {cfg.num_experts} x "
                                 f"{cfg.moe_intermediate_size}) implies {list(want)}")

    def get(name: str):
        t = getter(name)
        if isinstance(t, list):   # an expert stack: one matrix per expert
            if len(t) != cfg.num_experts:
                raise ModelLoadError(f"expert stack {name!r} holds {len(t)} experts but the config has "
                                     f"num_experts={cfg.num_experts}")
            for e, m in enumerate(t):
                check(name, m, f"{name!r} (expert {e})")
        else:
            check(name, t, repr(name))
        return t
    return get


def assemble_weights(cfg: ModelConfig, get_matrix: MatrixGetter, get_vector: VectorGetter,
                     dtype: torch.dtype, quantize: str, layer_device, resident_device,
                     desc: str = "loading") -> ModelWeights:
    """Names follow HF Llama: ``model.layers.{i}.self_attn.q_proj.weight`` etc. (Qwen3's
    ``self_attn.q_norm.weight``; a mixture-of-experts layer's ``mlp.gate.weight`` router and
    ``mlp.experts.{gate,up,down}_proj.weight`` stacks, see ``moe_weights``). Layers are placed
    on ``layer_device`` (the host when offloading), the rest on ``resident_device``."""
    get_matrix, get_vector = checked(get_matrix, cfg), checked(get_vector, cfg)
    moe_layers = set(cfg.moe_layers)
    layers = []
    for i in tqdm(range(cfg.n_layers), desc=desc, unit="layer", leave=False):
        p = f"model.layers.{i}."
        att = p + "self_attn."
        wqkv = fuse_rows([get_matrix(att + f"{x}_proj.weight") for x in "qkv"])
        bqkv = None
        if cfg.qkv_bias:
            bqkv = torch.cat([get_vector(att + f"{x}_proj.bias") for x in "qkv"]).to(dtype)
        bo = get_vector(att + "o_proj.bias") if cfg.o_bias else None
        if i in moe_layers:
            mlp = dict(w_gate_up=None, w_down=None, moe=moe_weights(p, get_matrix, dtype, quantize))
        else:
            w_gate_up = fuse_rows([get_matrix(p + "mlp.gate_proj.weight"), get_matrix(p + "mlp.up_proj.weight")])
            mlp = dict(w_gate_up=finish_matrix(w_gate_up, dtype, quantize),
                       w_down=finish_matrix(get_matrix(p + "mlp.down_proj.weight"), dtype, quantize))
        layer = LayerWeights(
            attn_norm=get_vector(p + "input_layernorm.weight").to(dtype),
            wqkv=finish_matrix(wqkv, dtype, quantize),
            bqkv=bqkv,
            wo=finish_matrix(get_matrix(att + "o_proj.weight"), dtype, quantize),
            bo=bo.to(dtype) if bo is not None else None,
            ffn_norm=get_vector(p + "post_attention_layernorm.weight").to(dtype),
            q_norm=get_vector(att + "q_norm.weight").to(dtype) if cfg.qk_norm else None,
            k_norm=get_vector(att + "k_norm.weight").to(dtype) if cfg.qk_norm else None,
            **mlp,
        )
        layers.append(move_layer(layer, layer_device))
    embed = get_matrix("model.embed_tokens.weight")
    # An 8-bit (Q8_0) head is kept as it is for the head's matmul, with int8 activations when
    # the layers quantize theirs (a 4-bit target); the embedding lookup reads float rows.
    embed_q8 = embed if _is_q8(embed) else None
    embed = (embed.dequantize(torch.float32) if not _is_dense(embed) else embed).to(dtype).to(resident_device)
    if cfg.tie_word_embeddings:
        lm_head = embed if embed_q8 is None else _head_q8(embed_q8, quantize, resident_device)
    else:
        lm_head = get_matrix("lm_head.weight")
        if _is_q8(lm_head):
            lm_head = _head_q8(lm_head, quantize, resident_device)
        else:
            lm_head = finish_matrix(lm_head, dtype, "none" if quantize == "none" else "auto")
            lm_head = lm_head.to(resident_device)  # a tensor or an Int4Weight: both have .to
    final_norm = get_vector("model.norm.weight").to(dtype).to(resident_device)
    return ModelWeights(embed=embed, final_norm=final_norm, lm_head=lm_head, layers=layers)


def moe_weights(prefix: str, get_matrix: MatrixGetter, dtype: torch.dtype, quantize: str) -> MoEWeights:
    """A layer's router and experts, read as stacks (``{prefix}mlp.experts.gate_proj.weight``:
    one matrix per expert, whatever the checkpoint's own layout) and fused and finished per
    expert like a dense MLP. The router stays dense whatever ``quantize`` says: it picks the
    experts, and it is small."""
    router = get_matrix(prefix + "mlp.gate.weight")
    router = (router if _is_dense(router) else router.dequantize(torch.float32)).to(dtype)
    gates = get_matrix(prefix + "mlp.experts.gate_proj.weight")
    ups = get_matrix(prefix + "mlp.experts.up_proj.weight")
    gate_up = [finish_matrix(fuse_rows([g, u]), dtype, quantize) for g, u in zip(gates, ups)]
    del gates, ups
    down = [finish_matrix(m, dtype, quantize) for m in get_matrix(prefix + "mlp.experts.down_proj.weight")]
    return MoEWeights(router=router, gate_up=gate_up, down=down)


def move_layer(layer: LayerWeights, device) -> LayerWeights:
    from ..model.weights import replace_leaves

    device = torch.device(device)
    return replace_leaves(layer, lambda _, t: t if t.device == device else t.to(device))
