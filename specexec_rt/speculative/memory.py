"""Working memory of a generation, estimated before it runs, so a budget that cannot fit fails
with an error that names it instead of an allocator crash (or, on a Linux CPU, the OOM killer).

Weights and KV caches are allocated at load time; what a request adds is transient: the
activations and logits of one forward, the acceptance step's float32 ``[rows, vocab]``
tensors, and the SpecExec ``DraftTree`` whose ancestor matrix is ``capacity**2`` bytes
(``capacity = 1 + max_depth * beams_per_step * branch_width``: 4,097 by default, but 1M with
beams 256, width 64 and depth 64, i.e. a 1 TB matrix). The estimates are upper bounds of what
the code allocates (every per-layer temporary counted as live at once), so a false error needs
the machine to be within a small factor of full. ``tests/test_memory.py`` compares them with
measured peaks (CUDA) and checks that absurd settings are refused before anything allocates.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..errors import MemoryBudgetError

GiB = 1 << 30

# float32 bytes per [rows, vocab] element held by acceptance (engine._accept + sampling):
# greedy: the float copy and the one-hot; sampled: temperature, top-k fill, softmax, the top-p
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
        from ..kernels.int4_gemm import SCRATCH_MAX_ELEMENTS

        total += e * min(SCRATCH_MAX_ELEMENTS, max(h, inter) * max(2 * inter, c.qkv_size, h))
    total += rows * c.vocab_size * (e + 4)      # LM head output and its float32 copy
    return int(total)


def draft_tree_bytes(capacity: int, expand_rows: int) -> int:
    """``DraftTree`` of ``capacity`` nodes: the bool ancestor matrix, the old one while it grows
    (storage doubles on demand), ``add_children``'s ``[expand_rows, capacity]`` row copy,
    per-node vectors."""
    return int(2 * capacity * capacity + expand_rows * capacity + 64 * capacity)


def pass_bytes(engine, budget: Optional[int] = None, sampled: bool = True) -> int:
    """Peak transient bytes of one draft-then-verify pass of ``engine`` at ``budget`` (default:
    its largest), against full KV caches. ``sampled`` counts top-p/top-k sampling's temporaries
    (greedy needs fewer)."""
    p = engine.params
    method = engine.method
    target = engine.target
    v = target.config.vocab_size
    accept = ACCEPT_BYTES_SAMPLED if sampled else ACCEPT_BYTES_GREEDY
    if method == "autoregressive":
        return forward_bytes(target, 1, target.max_len) + v * accept
    if method == "specexec":
        b = engine._max_budget if budget is None else budget
        beams = p["beams_per_step"] if engine._user_beams or not engine.auto else min(b, 32)
        width, depth = p["branch_width"], p["max_depth"]
        capacity = 1 + depth * beams * width
        if p.get("tree") == "sequoia":
            # A static shape expands each of its <= budget + 1 nodes at most once, but one level
            # (one draft step) may hold up to budget nodes.
            beams = b
            capacity = 1 + (b + 1) * width
        verify_rows = 1 + b
        # One draft step: beams new tokens, logits, log-softmax and top-k over them.
        draft = draft_tree_bytes(capacity, beams * width) \
            + forward_bytes(engine.draft, beams, engine.draft.max_len) + beams * v * 8
    else:
        n, depth = (1, p["k"]) if method == "chain" else (p["n"], p["depth"])
        verify_rows = 1 + n * depth
        capacity = verify_rows
        # Sampling keeps the draft's processed distribution of every node for acceptance.
        draft = draft_tree_bytes(capacity, n) + forward_bytes(engine.draft, n, engine.draft.max_len) \
            + (verify_rows * v * 4 if sampled else 0) + n * v * accept
    verify = forward_bytes(target, verify_rows, target.max_len) + verify_rows * v * accept \
        + verify_rows * verify_rows  # the verification tree's mask
    if target.device == engine.draft.device:
        # The draft tree is gone by verification, but the caching allocator keeps its blocks.
        return int(max(draft, verify) if target.device.type == "cpu" else draft + verify)
    return int(max(draft, verify))


def prefill_bytes(engine, prompt_len: int) -> int:
    """The prompt's prefill through the target (and, for speculative methods, the draft)."""
    n = max(1, prompt_len)
    need = forward_bytes(engine.target, n, n, logits_rows=1)
    if engine.draft is not None:
        need = max(need, forward_bytes(engine.draft, n, n, logits_rows=1))
    return int(need)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def largest_fitting_budget(engine, available: int, sampled: bool) -> int:
    """The largest power of two (or the ceiling itself) <= ``engine._max_budget`` whose pass fits
    in ``available`` bytes; 0 if not even a 1-token tree fits."""
    cap = engine._max_budget
    candidates = sorted({cap} | {1 << i for i in range(int(math.log2(cap)) + 1)}, reverse=True)
    for b in candidates:
        if b <= cap and pass_bytes(engine, b, sampled) <= available:
            return b
    return 0


def _fit_or_raise(engine, avail: int, sampled: bool, what: str) -> int:
    """The budget ceiling that fits in ``avail`` bytes: the engine's own if its largest pass
    fits, else (auto) the largest that does; raises MemoryBudgetError otherwise."""
    need = pass_bytes(engine, sampled=sampled)
    if need <= avail:
        return engine._max_budget
    fit = largest_fitting_budget(engine, avail, sampled) if engine.auto else 0
    if fit:
        return fit
    raise MemoryBudgetError(describe(engine, need, avail, what))


def check_engine(engine) -> None:
    """At construction: the largest pass with greedy acceptance must fit. A fixed budget that
    does not raises MemoryBudgetError; ``budget='auto'`` lowers its ceiling (``max_budget``) to
    what fits, like it does for the KV cache."""
    avail = available_bytes(engine.device)
    if avail is not None:
        engine._max_budget = _fit_or_raise(engine, avail, False, "one draft-and-verify pass")


def check_request(engine, prompt_len: int, sampled: bool) -> int:
    """Before a request: its prefill and its passes must fit. Returns the budget ceiling auto
    may use for it (the engine's own for fixed budgets); raises MemoryBudgetError otherwise."""
    avail = available_bytes(engine.device)
    if avail is None:
        return engine._max_budget
    need = prefill_bytes(engine, prompt_len)
    if need > avail:
        raise MemoryBudgetError(
            f"the prompt's prefill ({prompt_len} tokens) needs about {_gib(need)} of working memory on "
            f"{engine.device} but {_gib(avail)} is available; use a shorter prompt or free memory")
    return _fit_or_raise(engine, avail, sampled,
                         "one draft-and-verify pass" + (" with sampling" if sampled else ""))


def setting_and_fix(engine) -> tuple[str, str]:
    """(the engine's size settings, what to lower), for error messages."""
    p = engine.params
    if engine.method == "specexec":
        setting = (f"budget={engine.budget}" + (f" (max_budget={engine._max_budget})" if engine.auto else "")
                   + f", beams_per_step={p['beams_per_step']}, branch_width={p['branch_width']}, "
                     f"max_depth={p['max_depth']}")
        fix = ("lower the budget, or beams_per_step x branch_width x max_depth (the draft tree holds "
               "1 + their product nodes and a bool matrix of that size squared)")
    elif engine.method == "chain":
        setting, fix = f"k={p['k']}", "lower k"
    elif engine.method == "specinfer":
        setting, fix = f"n={p['n']}, depth={p['depth']}", "lower n or depth"
    else:
        setting, fix = "", "load the model with a smaller max_len"
    return setting, fix


def describe(engine, need: int, avail: int, what: str) -> str:
    setting, fix = setting_and_fix(engine)
    return (f"method={engine.method} {setting}: {what} needs about {_gib(need)} of working memory on "
            f"{engine.device} but {_gib(avail)} is available; {fix}")


def describe_failure(engine, error: Exception) -> str:
    """An allocation that failed inside a pass, with the estimate next to what is free now."""
    setting, fix = setting_and_fix(engine)
    avail = available_bytes(engine.device)
    free = f"{_gib(avail)} is available now" if avail is not None else "free memory is unknown"
    return (f"method={engine.method} {setting}: a pass ran out of memory on {engine.device} "
            f"({str(error).splitlines()[0]}); the estimate for one pass is {_gib(pass_bytes(engine))} "
            f"and {free} (another process may hold memory); {fix}")
