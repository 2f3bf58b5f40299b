"""Working memory of a generation, estimated before it runs, so a budget that cannot fit fails
with an error that names it instead of an allocator crash (or, on a Linux CPU, the OOM killer).

Weights and KV caches are allocated at load time; what a request adds is transient: the
activations and logits of one forward, the acceptance step's float32 ``[rows, vocab]``
tensors, and the SpecExec ``DraftTree`` whose ancestor matrix is ``capacity**2`` bytes
(``capacity = 1 + max_depth * beams_per_step * branch_width``: 8,193 by default, but 1M with
beams 256, width 64 and depth 64, i.e. a 1 TB matrix; storage grows on demand up to it). The estimates are upper bounds of what
the code allocates (every per-layer temporary counted as live at once), so a false error needs
the machine to be within a small factor of full. ``tests/test_memory.py`` compares them with
measured peaks (CUDA) and checks that absurd settings are refused before anything allocates.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import MemoryBudgetError

GiB = 1 << 30

# float32 bytes per [rows, vocab] element held by acceptance (Runner._accept + sampling):
# greedy: the float copy, and a one-hot's worth kept as headroom (acceptance takes the logits'
# argmax and builds none); sampled: temperature, top-k fill, softmax, the top-p
# sort (values + int64 indices), cumsum, mask, renormalised probs, exponential noise, ratio.
ACCEPT_BYTES_GREEDY = 12
ACCEPT_BYTES_SAMPLED = 56


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def available_bytes(device) -> Optional[int]:
    """Memory a request can still allocate on ``device``: free device memory plus what PyTorch's
    caching allocator holds unused (CUDA), or ``MemAvailable`` (Linux CPU). None when unknown.
    ``SPECEXEC_AVAILABLE_MEMORY_GB`` overrides it (tests, and users who share the machine)."""
    override = os.environ.get("SPECEXEC_AVAILABLE_MEMORY_GB")
    if override:
        return int(float(override) * GiB)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def forward_bytes(model, n_q: int, n_k: int, logits_rows: Optional[int] = None) -> int:
    """Transient bytes of one ``model.forward`` of ``n_q`` new tokens that attend to ``n_k``
    cache slots and return ``logits_rows`` rows of logits (default ``n_q``)."""
    from ..model import ops

    c = model.config
    e = _itemsize(model.dtype)
    rows = n_q if logits_rows is None else logits_rows
    hq, hkv, d = c.n_heads, c.n_kv_heads, c.head_dim
    h, inter = c.hidden_size, c.intermediate_size
    # Residual stream, both norms (fp32 copies), qkv, RoPE (cos/sin, rotate-half, products),
    # attention output, o-proj, gate/up, silu, product, down: all counted as live together.
    per_token = e * (4 * h + c.qkv_size + 4 * (hq + hkv) * d + 2 * hq * d + 4 * inter) + 4 * (3 * h + 2 * d)
    total = n_q * per_token
    if ops.use_triton(model.device) and d >= 16:
        n_tree = max(1, n_k)
        # Bit-packed mask plus flash-decoding partials (at most 128 splits, fp32 m, l, acc).
        total += n_q * (n_tree + 31) // 32 * 4 + 128 * n_q * hq * (d + 2) * 4
    else:
        # Reference path: the additive mask (GQA-folded) and, if SDPA falls back to its math
        # kernel, one fp32 score matrix per head, plus fp32 copies of q, k and v.
        total += 4 * n_q * n_k * (hq // hkv) + 4 * n_q * n_k * hq + 4 * (n_q * hq + 2 * n_k * hkv) * d
    # Dense-M int4 layers on CUDA dequantise into one scratch buffer (kept between calls).
    if model.device.type == "cuda" and getattr(model, "quantization", None) == "int4" and n_q >= 256:
        from ..kernels.int4.gemm import SCRATCH_MAX_ELEMENTS

        total += e * min(SCRATCH_MAX_ELEMENTS, max(h, inter) * max(2 * inter, c.qkv_size, h))
    if c.is_moe:
        total += n_q * moe_bytes_per_token(c, e)
    total += rows * c.vocab_size * (e + 4)      # LM head output and its float32 copy
    return int(total)


def moe_bytes_per_token(c, e: int) -> int:
    """What a mixture-of-experts layer adds per token (``model/moe.py``): router logits and
    float32 probabilities, the top-k weights and indices, the sort, each of the token's k rows
    gathered, through its expert (gate/up, SiLU x up, down) and weighted, and the summed output."""
    k, inter, h = c.num_experts_per_tok, c.moe_intermediate_size, c.hidden_size
    return int(c.num_experts * (e + 4) + k * (4 + 8 * 4) + k * e * (2 * h + 4 * inter) + 2 * e * h)


def draft_tree_bytes(capacity: int, expand_rows: int) -> int:
    """``DraftTree`` of ``capacity`` nodes: the bool ancestor matrix, prune's same-sized
    temporary, ``add_children``'s ``[expand_rows, capacity]`` row copy, per-node vectors."""
    return int(2 * capacity * capacity + expand_rows * capacity + 64 * capacity)


@dataclass(frozen=True)
class PassShape:
    """The sizes of one pass that its working memory depends on (a decoding method gives it
    for a budget; see ``methods/``).

    verify_rows: target rows one request verifies (the root included).
    draft_rows: new tokens of one draft call for one request (0: no draft).
    tree_capacity: nodes of one request's ``DraftTree`` (its ancestor matrix is this squared).
    keeps_draft_probs: sampling keeps the draft's processed distribution of every node.
    n_requests: requests sharing the pass (their rows add up; each has its own tree).
    coupled: sampled draft rows are processed like the target's and raced against the
    request's position noise (``sampling.coupled_children``).
    noise_rows: rows of position noise a sampled request keeps (``sampling.PositionNoise``).
    """

    verify_rows: int
    draft_rows: int = 0
    tree_capacity: int = 0
    keeps_draft_probs: bool = False
    n_requests: int = 1
    coupled: bool = False
    noise_rows: int = 0


def kv_bytes(model, slots: int) -> int:
    """Device bytes of a KV cache of ``slots`` slots for ``model``, in its ``kv_dtype`` (int8's
    scales included). A model whose KV lives in host memory (``kv_offload``) holds only its
    streaming slots on the device: ``n_slots`` layers' worth."""
    from ..model.kv_cache import kv_bytes_per_slot

    c = model.config
    per_slot = kv_bytes_per_slot(c.n_layers, c.n_kv_heads, c.head_dim, model.kv_dtype)
    if getattr(model, "kv_offload", False):
        from ..model.kv_cache import KV_STREAM_SLOTS

        return int(slots * per_slot // c.n_layers * min(KV_STREAM_SLOTS, c.n_layers))
    return int(slots * per_slot)


def engine_kv_bytes(target, draft, max_batch: int) -> int:
    """Device bytes of the KV caches an engine of ``max_batch`` request slots has yet to allocate:
    with one slot the models' own caches (``max_len`` each) unless already allocated, with more a
    pool of ``max_batch`` regions per model (``Runner``). A draft that reads the target's cache
    (``own_cache=False``) has none."""
    total = 0
    for model in (target, draft):
        if model is None or not model.own_cache:
            continue
        if max_batch == 1:
            total += 0 if model.cache_allocated else kv_bytes(model, model.max_len)
        else:
            total += kv_bytes(model, max_batch * model.max_len)
    return total


def describe_kv(target, draft, max_batch: int, need: int, avail: int) -> str:
    """The error for KV caches that do not fit, with what each model's takes and the settings to lower."""
    parts = [f"target max_len={target.max_len} kv_dtype={target.cache_dtype_name}"]
    if draft is not None and draft.own_cache:
        parts.append(f"draft max_len={draft.max_len} kv_dtype={draft.cache_dtype_name}")
    return (f"the KV caches of max_batch={max_batch} requests ({'; '.join(parts)}) need {_gib(need)} on "
            f"{target.device} but {_gib(avail)} is available; lower max_batch or max_len, use kv_dtype='int8', "
            f"or keep the target's KV in host memory (offload_kv=True)")


def pass_bytes(target, draft, shape: PassShape, sampled: bool = True) -> int:
    """Peak transient bytes of one draft-then-verify pass of this ``shape`` against full KV
    caches. ``sampled`` counts top-p/top-k sampling's temporaries (greedy needs fewer)."""
    v = target.config.vocab_size
    b = shape.n_requests
    accept = ACCEPT_BYTES_SAMPLED if sampled else ACCEPT_BYTES_GREEDY
    verify_rows = b * shape.verify_rows
    verify = forward_bytes(target, verify_rows, target.max_len) + verify_rows * v * accept \
        + b * shape.verify_rows ** 2  # the verification trees' masks
    if sampled:
        verify += b * shape.noise_rows * v * 4
    if draft is None or not shape.draft_rows:
        return int(verify)
    rows = b * shape.draft_rows
    # One draft step: its new tokens, logits, log-softmax and top-k over them (or the kept
    # distributions of chain/SpecInfer sampling).
    draft_b = b * draft_tree_bytes(shape.tree_capacity, shape.draft_rows * 8) \
        + forward_bytes(draft, rows, draft.max_len) + rows * v * 8
    if shape.keeps_draft_probs and sampled:
        draft_b += verify_rows * v * 4 + rows * v * accept
    if shape.coupled and sampled:
        # process_logits' temporaries, the gathered noise rows and the race keys of each step.
        draft_b += rows * v * (accept + 8) + b * shape.noise_rows * v * 4
    if target.device == draft.device:
        # The draft trees are gone by verification, but the caching allocator keeps their blocks.
        return int(max(draft_b, verify) if target.device.type == "cpu" else draft_b + verify)
    return int(max(draft_b, verify))


def prefill_bytes(target, draft, prompt_len: int) -> int:
    """The prompt's prefill through the target (and, for speculative methods, the draft)."""
    n = max(1, prompt_len)
    need = forward_bytes(target, n, n, logits_rows=1)
    if draft is not None:
        need = max(need, forward_bytes(draft, n, n, logits_rows=1))
    return int(need)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def largest_fitting_budget(fits, cap: int) -> int:
    """The largest power of two (or ``cap`` itself) <= ``cap`` for which ``fits(budget)``; 0 if none."""
    candidates = sorted({cap} | {1 << i for i in range(int(math.log2(cap)) + 1)}, reverse=True)
    for b in candidates:
        if b <= cap and fits(b):
            return b
    return 0


def fit_budget(target, draft, method, cap: int, auto: bool, avail: int, sampled: bool, what: str,
               n_requests: int = 1) -> int:
    """The budget ceiling that fits in ``avail`` bytes: ``cap`` if its largest pass fits, else
    (auto) the largest that does; raises MemoryBudgetError otherwise."""
    need = pass_bytes(target, draft, method.pass_shape(cap, n_requests), sampled)
    if need <= avail:
        return cap
    fit = largest_fitting_budget(
        lambda b: pass_bytes(target, draft, method.pass_shape(b, n_requests), sampled) <= avail, cap) if auto else 0
    if fit:
        return fit
    raise MemoryBudgetError(describe(method, target.device, need, avail, what))


def check_request(target, draft, method, cap: int, auto: bool, prompt_len: int, sampled: bool,
                  n_requests: int = 1) -> int:
    """Before a request: its prefill and its passes must fit. Returns the budget ceiling auto
    may use for it (``cap`` for fixed budgets); raises MemoryBudgetError otherwise."""
    avail = available_bytes(target.device)
    if avail is None:
        return cap
    need = prefill_bytes(target, draft, prompt_len)
    if need > avail:
        raise MemoryBudgetError(
            f"the prompt's prefill ({prompt_len} tokens) needs about {_gib(need)} of working memory on "
            f"{target.device} but {_gib(avail)} is available; use a shorter prompt or free memory")
    return fit_budget(target, draft, method, cap, auto, avail, sampled,
                      "one draft-and-verify pass" + (" with sampling" if sampled else ""), n_requests)


def describe(method, device, need: int, avail: int, what: str) -> str:
    setting, fix = method.settings()
    return (f"method={method.name} {setting}: {what} needs about {_gib(need)} of working memory on "
            f"{device} but {_gib(avail)} is available; {fix}")


def describe_failure(target, draft, method, cap: int, error: Exception) -> str:
    """An allocation that failed inside a pass, with the estimate next to what is free now."""
    setting, fix = method.settings()
    avail = available_bytes(target.device)
    free = f"{_gib(avail)} is available now" if avail is not None else "free memory is unknown"
    est = pass_bytes(target, draft, method.pass_shape(cap))
    return (f"method={method.name} {setting}: a pass ran out of memory on {target.device} "
            f"({str(error).splitlines()[0]}); the estimate for one pass is {_gib(est)} "
            f"and {free} (another process may hold memory); {fix}")
