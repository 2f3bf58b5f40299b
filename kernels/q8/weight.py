"""The 8-bit weight format ``Q8Weight`` (llama.cpp's Q8_0) and its quantizers.

Format, for a weight ``W`` ``[N, K]`` = ``[out_features, in_features]``:

- ``qweight`` int8 ``[N, K]``;
- ``scales`` fp16 ``[N, K/32]``: ``W[n, k] = qweight[n, k] * scales[n, k // 32]``.

GGUF files store tied embeddings / LM heads this way (34-byte blocks: fp16 scale, 32 int8);
``specexec_rt.loading`` keeps such a head 8-bit on the CPU instead of expanding it to float32,
because the head is the largest matrix of a small model and the matmul is bound by the bytes
it reads (SmolLM2's 49152 x 576 head: 113 MB in float32, 30 MB as Q8_0).

Paths:
- the native kernel (``sxc_q8_linear`` in ``csrc/q8_cpu.h``; ``cpu.q8_linear_native``): float32
  activations times the int8 weights, the block scale applied per 32 weights, so the result is
  the dequantized weight's up to float32 rounding (no activation quantization, unlike the int4
  kernel); the final RMSNorm and a residual can be fused into the call;
- with ``int8_activations`` set on the weight, the kernel quantizes the activations as the int4
  kernel does (int8 per row and 32-block) and multiplies them exactly in integers, as llama.cpp
  multiplies Q8_0 by Q8_0: several times faster, for targets whose layers already run on int8
  activations (the int4 target); ``reference.q8_linear_q8_reference`` is that arithmetic in PyTorch;
- ``reference.q8_linear_reference``: the dequantized weight through ``torch.nn.functional.linear`` (the
  fallback without the native library, and on other devices; the dequantized copy is cached on
  the instance).
"""
from __future__ import annotations

import dataclasses
import torch

from ..int4.weight import PackedMatrix

BLOCK = 32  # weights per scale along K


@dataclasses.dataclass
class Q8Weight(PackedMatrix):
    """An 8-bit weight ``[out_features, in_features]``; see the module docstring for layout.

    Only tensor fields and ints (the generic weight walks move and count them); caches live in
    non-field attributes, which ``dataclasses.replace`` drops."""

    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # fp16 [N, K/32]
    out_features: int
    in_features: int
    # The native kernel quantizes activations to int8 (faster, not float32-exact); see above.
    int8_activations: bool = False

    def __post_init__(self):
        n, k = self.out_features, self.in_features
        if k % BLOCK:
            raise ValueError(f"Q8Weight: in_features ({k}) must be a multiple of {BLOCK}")
        if self.qweight.dtype != torch.int8 or tuple(self.qweight.shape) != (n, k):
            raise ValueError(f"Q8Weight.qweight must be int8 [{n}, {k}], got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != (n, k // BLOCK):
            raise ValueError(f"Q8Weight.scales must be fp16 [{n}, {k // BLOCK}], got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")

    def to(self, device, non_blocking: bool = False) -> "Q8Weight":
        return dataclasses.replace(self, qweight=self.qweight.to(device, non_blocking=non_blocking),
                                   scales=self.scales.to(device, non_blocking=non_blocking))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W`` ``[out_features, in_features]`` in ``dtype`` (computed in float32: exact)."""
        n, k = self.shape
        w = self.qweight.view(n, k // BLOCK, BLOCK).float() * self.scales.float()[..., None]
        return w.reshape(n, k).to(dtype)


def with_int8_activations(w: Q8Weight, on: bool = True) -> Q8Weight:
    """The same weight (tensors shared) with the activation mode set."""
    return dataclasses.replace(w, int8_activations=on)


def quantize_q8_0(w: torch.Tensor) -> Q8Weight:
    """Quantize a float ``[N, K]`` matrix as llama.cpp's Q8_0, byte for byte: per 32-block
    ``d = amax / 127`` (float32), ``q = round_half_away(w * (1 / d))``, ``d`` stored fp16.
    Re-quantizing a dequantized Q8_0 matrix gives it back."""
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"quantize_q8_0: w must be [N, K] with K a multiple of {BLOCK}, got {list(w.shape)}")
    n, k = w.shape
    b = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = b.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    v = b * inv[..., None]
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp_(-127, 127).to(torch.int8)
    return Q8Weight(q.reshape(n, k).contiguous(), d.to(torch.float16).contiguous(), n, k)


def from_gguf_q8_0(blocks: torch.Tensor, shape) -> Q8Weight:
    """GGUF Q8_0 blocks (uint8 ``[N, K/32, 34]``: fp16 scale, then 32 int8) as a ``Q8Weight``."""
    n, k = int(shape[0]), int(shape[1])
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n, k // BLOCK, 34) or k % BLOCK:
        raise ValueError(f"from_gguf_q8_0: expected uint8 blocks [{n}, {k // BLOCK}, 34] for shape {(n, k)}, "
                         f"got {blocks.dtype} {list(blocks.shape)}")
    scales = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    q = blocks[..., 2:34].contiguous().view(torch.int8).reshape(n, k)
    return Q8Weight(q.contiguous(), scales.contiguous(), n, k)
