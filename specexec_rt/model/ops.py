"""The few operations the model is made of, each dispatching to a Triton kernel or a PyTorch
reference.

On CUDA the Triton kernels run, except for one-token decode steps, whose attention has no
mask and goes to flash SDPA (``prefix_attention_sdpa``: cheaper than a kernel launch there).
On CPU the references run, unless ``SPECEXEC_TRITON_INTERPRET=1`` is set, which sends CPU
tensors through the Triton kernels in Triton's interpreter, with the same decode exception
(that switch sets ``TRITON_INTERPRET=1`` before Triton is first imported, so set it before
importing specexec_rt). The CPU's matmuls go to the native library where it serves them: int4
and Q8_0 weights, and float32 ones in passes of up to ``dense_cpu.MAX_ROWS`` rows, with the
RMSNorm / SiLU / residual around them fused into the same call (docs/DESIGN.md). CPU float32
passes also take one native call per layer for RoPE, the KV-cache write and attention
(``rope_attention``, planned by ``prepare_attention(native_cpu=True)``), and the transformer
runs all layers in one native call where every matrix is served natively
(``kernels/layers/cpu.py``).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

if os.environ.get("SPECEXEC_TRITON_INTERPRET") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ..kernels.attention import cpu as attention_cpu  # noqa: E402  (after TRITON_INTERPRET is set)
from ..kernels.dense import cpu as dense_cpu  # noqa: E402
from ..kernels.int4.cpu import int4_matmul_cpu, native_active, run_native_linear  # noqa: E402
from ..kernels.int4.gemm import int4_matmul  # noqa: E402
from ..kernels.int4.weight import Int4Weight  # noqa: E402
from ..kernels.q8 import Q8Weight, q8_linear  # noqa: E402


def triton_interpret() -> bool:
    return os.environ.get("SPECEXEC_TRITON_INTERPRET") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether the Triton kernels serve tensors on ``device``."""
    if device.type == "cuda":
        return os.environ.get("SPECEXEC_DISABLE_TRITON") != "1"
    return triton_interpret()


# --------------------------------------------------------------------------- linear layers

def _native_int4(x: torch.Tensor, w) -> bool:
    """A CPU float32 pass over a 4-bit weight that the native kernel serves: then the layer ops
    around the matmul (RMSNorm, SiLU * up, the residual add) run inside the same native call
    instead of as separate PyTorch ops (decode steps are op-bound on the CPU). Cheapest checks
    first: this runs ~120 times per decode step."""
    return (isinstance(w, Int4Weight) and x.is_cpu and x.dtype is torch.float32 and x.dim() == 2
            and x.is_contiguous() and native_active() and not use_triton(_CPU))


_CPU = torch.device("cpu")


def _contiguous_f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or (t.dtype is torch.float32 and t.is_contiguous()) else t.float().contiguous()


def linear(x: torch.Tensor, w, bias: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + (x @ w.T + bias)`` for ``x`` ``[M, in_features]`` and a dense, 4-bit or 8-bit
    ``w`` (``bias``, ``residual`` ``[M, out_features]`` optional)."""
    if isinstance(w, torch.Tensor):
        if dense_cpu.serves(x, w, w.shape[1]):
            if bias is None:
                return dense_cpu.run_f32_native(x, w, _contiguous_f32(residual))
            y = dense_cpu.run_f32_native(x, w) + bias  # as csrc/layers_cpu.h: bias, then residual
        else:
            y = dense_linear(x, w, bias)
    elif isinstance(w, Q8Weight):
        if bias is None:
            return q8_linear(x, w, residual)
        y = q8_linear(x, w) + bias
    elif _native_int4(x, w):
        y = run_native_linear(x, w, _contiguous_f32(residual) if bias is None else None, None, 0.0, False)
        if bias is None:
            return y
        y = y + bias
    else:
        # On CPU the runtime takes the CPU int4 path unless the interpreter switch is on;
        # TRITON_INTERPRET alone (set by kernel tests) must not send whole models through it.
        y = int4_matmul(x, w) if use_triton(x.device) else int4_matmul_cpu(x, w)
        y = y + bias if bias is not None else y
    return y if residual is None else residual + y


# Rows for which a CPU float32 product runs as ``w @ x.T`` (see ``dense_linear``).
CPU_TRANSPOSED_ROWS = (2, 128)


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T + bias`` for a dense ``w``. On the CPU in float32 with 2..128 rows it is computed
    as ``(w @ x.T).T``: the BLAS call then has the weight's rows as its long side, which the CPU
    GEMM handles far better for a few rows than ``x @ w.T`` (measured on a 2-core EPYC, torch
    2.13, 2 threads: SmolLM2's LM head 49152x576 at 2-4 rows 31 -> 10 ms, at 32 rows 53 -> 32 ms,
    at 128 rows 174 -> 112 ms; the layers' own matrices equal or faster). That is what makes a
    tree verification pass cost little more than a one-token pass here. One row stays a GEMV."""
    lo, hi = CPU_TRANSPOSED_ROWS
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and lo <= x.shape[0] <= hi \
            and w.dtype == torch.float32:
        y = torch.mm(w, x.t()).t().contiguous()
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``linear(rms_norm(x, norm_weight, eps), w, bias)``; one native call for a CPU int4 or
    8-bit ``w`` (the final norm and the LM head), or a float32 one with a few rows."""
    if isinstance(w, Q8Weight):
        y = q8_linear(x, w, norm=(norm_weight, eps))
        return y if bias is None else y + bias
    if isinstance(w, torch.Tensor) and dense_cpu.serves(x, w, w.shape[1]):
        y = dense_cpu.run_f32_native(x, w, None, _contiguous_f32(norm_weight), eps)
        return y if bias is None else y + bias
    if _native_int4(x, w):
        y = run_native_linear(x, w, None, _contiguous_f32(norm_weight), eps, False)
        return y if bias is None else y + bias
    return linear(rms_norm(x, norm_weight, eps), w, bias)


def swiglu_linear(gate_up: torch.Tensor, w, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + linear(silu(gate) * up, w)`` for ``gate_up`` ``[M, 2 * in_features]`` = gate
    rows then up rows; one native call for a CPU int4 ``w``, or a float32 one with a few rows."""
    if _native_int4(gate_up, w):
        return run_native_linear(gate_up, w, _contiguous_f32(residual), None, 0.0, True)
    if isinstance(w, torch.Tensor) and dense_cpu.serves(gate_up, w, 2 * w.shape[1]):
        return dense_cpu.run_f32_native(gate_up, w, _contiguous_f32(residual), swiglu=True)
    gate, up = gate_up.chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w, residual=residual)


# --------------------------------------------------------------------------- norms and RoPE

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, like HF Llama: normalise, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def qk_norm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, n_heads: int, n_kv_heads: int,
            head_dim: int, eps: float) -> torch.Tensor:
    """Qwen3's per-head RMSNorm of q and k (each head over its ``head_dim``, before RoPE):
    ``qkv`` ``[n, (H + 2 H_kv) D]`` -> a new contiguous tensor of the same shape, v unchanged
    (the native ``rope_attention`` reads q, k and v from one contiguous row)."""
    n = qkv.shape[0]
    q_end, k_end = n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
    q = rms_norm(qkv[:, :q_end].reshape(n, n_heads, head_dim), q_weight, eps)
    k = rms_norm(qkv[:, q_end:k_end].reshape(n, n_kv_heads, head_dim), k_weight, eps)
    return torch.cat([q.reshape(n, q_end), k.reshape(n, k_end - q_end), qkv[:, k_end:]], dim=1)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with linear or llama3 scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(head_dim: int, theta: float, scaling: Optional[dict], max_len: int, device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[max_len, head_dim]`` in float32, halves repeated (rotate-half layout)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables' rows at ``positions``, cast to ``dtype`` (as HF does) and shaped
    ``[n, 1, head_dim]`` for :func:`apply_rope`: once per forward, not once per layer."""
    return cos[positions].to(dtype)[:, None, :], sin[positions].to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[n, heads, head_dim]`` by ``cos``/``sin`` ``[n, 1, head_dim]`` in x's dtype
    (:func:`rope_rows`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- attention

class AttentionPlan:
    """A pass's attention, planned once per forward for one backend and run by every layer (the
    plan/run split of FlashInfer, which ``kernels.attention.TreeAttentionLaunch`` also follows).
    ``prepare_attention`` picks the backend; ``run(q, k, v)`` is one layer's attention.

    ``segments`` (``kernels.attention.Segments``) describes the pass: one segment per request,
    each with its query rows, the first cache slot of its region, its committed prefix and its
    tree region. One request at the start of the cache is the common case (``single``).
    ``tree_mask``: bool ``[n_q, max n_tree]`` (row bits index the row's own segment). The class
    attributes say which backend a plan is, for the transformer (``native_rows``: the CPU native
    layer call) and for tests."""

    unmasked = False        # flash SDPA, no mask (SdpaDecodeAttention)
    use_kernel = False      # the Triton tree kernel (TritonTreeAttention)
    packed_mask = None
    reference_mask = None
    native_rows = None      # NativeCpuAttention: rope_attention's per-row plan

    def __init__(self, segments, tree_mask: torch.Tensor):
        self.segments = segments
        self.tree_mask = tree_mask

    @property
    def single(self) -> bool:
        return len(self.segments.n_q) == 1 and self.segments.base[0] == 0

    @property
    def prefix_len(self) -> int:
        return self.segments.prefix[0]

    @property
    def n_tree(self) -> int:
        return self.segments.n_tree[0]

    @property
    def n_k(self) -> int:
        """Cache slots the pass reads: ``[0, n_k)``."""
        return max(b + p + t for b, p, t in zip(self.segments.base, self.segments.prefix, self.segments.n_tree))

    def run(self, q: torch.Tensor, kv) -> torch.Tensor:
        """One layer: ``q`` ``[n_q, H, D]`` against ``kv`` (``kernels.attention.KVView``: the
        cache's first ``n_k`` slots in its storage dtype) -> ``[n_q, H, D]``."""
        raise NotImplementedError


class NativeCpuAttention(AttentionPlan):
    """CPU float32 passes with the native library: RoPE, the cache write and attention in one call
    per layer (``rope_attention``, not ``run``); each row's (base, prefix, n_tree), int32
    ``[n_q, 3]``, and the tree mask made contiguous, both once per forward."""

    def __init__(self, segments, tree_mask: torch.Tensor):
        super().__init__(segments, tree_mask)
        self.native_rows = attention_cpu.plan_rows(segments)
        self.native_mask = tree_mask.contiguous()


class SdpaDecodeAttention(AttentionPlan):
    """One-token chain on the kernel's devices whose cache holds q's own dtype: no mask at all,
    flash SDPA straight on the cache (``prefix_attention_sdpa``). Decided on the host once, so a
    layer never syncs to choose."""

    unmasked = True

    def run(self, q: torch.Tensor, kv) -> torch.Tensor:
        from ..kernels import attention as ta

        return ta.prefix_attention_sdpa(q, kv.k, kv.v)


class TritonTreeAttention(AttentionPlan):
    """The Triton tree kernel: the bit-packed tree mask, and the launch planned by the first layer
    and run by every layer (same shapes). ``prefix_dev`` (static-shape passes for CUDA graphs):
    the real prefix length, int32 ``[1]`` on the device; the segment's prefix is then its upper
    bound and the tree region starts at the device value."""

    use_kernel = True

    def __init__(self, segments, tree_mask: torch.Tensor, prefix_dev: Optional[torch.Tensor]):
        from ..kernels import attention as ta

        super().__init__(segments, tree_mask)
        self.prefix_dev = prefix_dev
        check_empty_prefix = self.single and prefix_dev is None
        self.packed_mask = ta.pack_tree_mask(tree_mask, self.prefix_len if check_empty_prefix else None)
        self.launch = None

    def run(self, q: torch.Tensor, kv) -> torch.Tensor:
        if self.launch is None:
            from ..kernels import attention as ta

            if self.single:
                self.launch = ta.TreeAttentionLaunch(q, kv.k, kv.v, self.packed_mask, self.prefix_len, self.n_tree,
                                                     prefix_dev=self.prefix_dev, k_scale=kv.k_scale,
                                                     v_scale=kv.v_scale)
            else:
                self.launch = ta.TreeAttentionLaunch(q, kv.k, kv.v, self.packed_mask, segments=self.segments,
                                                     k_scale=kv.k_scale, v_scale=kv.v_scale)
        return self.launch.run(q, kv.k, kv.v, k_scale=kv.k_scale, v_scale=kv.v_scale)


class ReferenceAttention(AttentionPlan):
    """The PyTorch reference for one request: ``reference_mask`` additive and GQA-folded, or None
    (a one-token decode step sees every slot)."""

    def __init__(self, segments, tree_mask: torch.Tensor, reference_mask: Optional[torch.Tensor]):
        super().__init__(segments, tree_mask)
        self.reference_mask = reference_mask

    def run(self, q: torch.Tensor, kv) -> torch.Tensor:
        from ..kernels import attention as ta

        k, v = kv.values(torch.float32)
        return ta.tree_attention_reference_prepared(q, k, v, self.reference_mask)


class RaggedReferenceAttention(AttentionPlan):
    """The PyTorch reference for several requests: one SDPA per segment, each with its own mask."""

    def __init__(self, segments, tree_mask: torch.Tensor, reference_masks: list):
        super().__init__(segments, tree_mask)
        self.reference_masks = reference_masks

    def run(self, q: torch.Tensor, kv) -> torch.Tensor:
        from ..kernels import attention as ta

        k, v = kv.values(torch.float32)
        return ta.tree_attention_ragged_reference_prepared(q, k, v, self.reference_masks, self.segments)


def prepare_attention(tree_mask: torch.Tensor, prefix_len: Optional[int], group: int, head_dim: int,
                      chain: bool = False, prefix_dev: Optional[torch.Tensor] = None, *,
                      segments=None, native_cpu: bool = False, kv_dtype: Optional[torch.dtype] = None,
                      q_dtype: Optional[torch.dtype] = None) -> AttentionPlan:
    """Plan a pass's attention once. One request: ``tree_mask`` bool ``[n_q, n_tree]`` over the tree
    slots after ``prefix_len`` committed ones; ``chain`` says it is the causal chain of the new
    tokens (known on the host, so a one-token decode step needs no mask at all). Several
    requests: ``segments`` (``kernels.attention.Segments``; ``prefix_len`` None) and the rows'
    masks padded to the widest tree. ``prefix_dev``: see ``TritonTreeAttention``; nothing here
    reads it on the host. ``native_cpu``: the pass is CPU float32 and may take
    ``rope_attention``'s native call (when the library is loaded and the Triton interpreter is off).
    ``kv_dtype``/``q_dtype``: the cache's storage dtype and the queries' (None: the same); flash
    SDPA serves a decode step only when they are equal (it reads the cache as it is), else the
    tree kernel, which reads every storage dtype, does."""
    from ..kernels import attention as ta

    if segments is None:
        segments = ta.Segments.single(tree_mask.shape[0], prefix_len, tree_mask.shape[1])
    elif prefix_len is not None or prefix_dev is not None:
        raise ValueError("with segments, the prefix lengths are the segments'")
    dev = tree_mask.device
    if native_cpu and prefix_dev is None and not use_triton(dev) and attention_cpu.serves(head_dim):
        return NativeCpuAttention(segments, tree_mask)
    single = len(segments.n_q) == 1 and segments.base[0] == 0
    decode = chain and single and tree_mask.shape[0] == 1 and prefix_dev is None
    if decode and use_triton(dev) and kv_dtype == q_dtype:
        # At n_q = 1 the tree kernel's launch cost dominates (~0.12 ms on an H100 vs
        # 0.015-0.05 ms for flash SDPA) and there is nothing to mask: go to flash SDPA.
        return SdpaDecodeAttention(segments, tree_mask)
    # The kernel's tiles need head_dim >= 16; real models have 64-128.
    if use_triton(dev) and head_dim >= 16:
        return TritonTreeAttention(segments, tree_mask, prefix_dev)
    if prefix_dev is not None:
        return ReferenceAttention(segments, tree_mask,
                                  ta.reference_mask_device_prefix(tree_mask, segments.prefix[0], prefix_dev, group))
    if not single:
        return RaggedReferenceAttention(segments, tree_mask, ta.ragged_reference_masks(tree_mask, segments, group))
    return ReferenceAttention(segments, tree_mask, None if decode else ta.reference_mask(tree_mask, segments.prefix[0],
                                                                                        group))


def attention(q: torch.Tensor, kv, plan: AttentionPlan) -> torch.Tensor:
    """Tree-masked attention: ``q`` ``[n_q, H, D]`` against ``kv`` (``kernels.attention.KVView``,
    K/V ``[n_k, H_kv, D]``: the cache's first ``plan.n_k`` slots) -> ``[n_q, H, D]``, by the plan's
    backend."""
    return plan.run(q, kv)


def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv, slots: torch.Tensor,
                   meta: NativeCpuAttention, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """One layer's RoPE + cache write + attention as one native call, for a pass that
    ``prepare_attention`` planned for it (``meta.native_rows`` set): ``qkv`` ``[n, (H + 2 H_kv) D]``
    -> ``[n, H * D]``; ``cos``/``sin`` from :func:`rope_rows`, ``kv`` the layer's whole cache
    (``KVView``, contiguous), ``slots`` int64 contiguous."""
    return attention_cpu.run_rope_attention(qkv, cos, sin, kv.k, kv.v, slots, meta.native_rows,
                                            meta.native_mask, n_heads, n_kv_heads, head_dim,
                                            1.0 / math.sqrt(head_dim), k_scale=kv.k_scale, v_scale=kv.v_scale)
