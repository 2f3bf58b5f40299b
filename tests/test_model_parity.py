"""Our runtime vs HF transformers on tiny random models of every supported architecture."""
from __future__ import annotations

import random

import pytest
import torch

from hf_models import ARCHS, make_hf_model
from tiny_tokenizer import tiny_tokenizer
from specexec_rt import load_model

ATOL = 1e-4
# Tiny models are all per-op overhead: two OpenMP threads on a busy machine only slow them down.
pytestmark = pytest.mark.usefixtures("one_thread")


def random_parents(n: int, rng: random.Random) -> list[int]:
    """A random tree: node i's parent is an earlier node, or -1 (a child of the last prefix token)."""
    return [-1 if i == 0 or rng.random() < 0.15 else rng.randrange(i) for i in range(n)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


def path_of(parents, i):
    path = []
    while i != -1:
        path.append(i)
        i = parents[i]
    return path[::-1]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, directory)
    ours = load_model(directory, device="cpu", dtype=torch.float32, max_len=128, kv_dtype="float32")
    return hf, ours


def hf_logits(hf, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.as_tensor(ids)[None]).logits[0].float()


def test_prefill_and_decode_logits(pair):
    hf, model = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.vocab_size, (24,), generator=g)
    ref = hf_logits(hf, ids)
    prefill = model.forward(ids[:16], torch.arange(16), model.cache, 0)
    torch.testing.assert_close(prefill, ref[:16], atol=ATOL, rtol=0)
    for t in range(16, 24):  # decode one token at a time on top of the cache
        step = model.forward(ids[t:t + 1], torch.tensor([t]), model.cache, t)
        torch.testing.assert_close(step[0], ref[t], atol=ATOL, rtol=0)


def test_tree_pass_matches_each_path(pair):
    hf, model = pair
    rng = random.Random(7)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, model.vocab_size, (10,), generator=g)
    model.forward(prefix, torch.arange(10), model.cache, 0)
    parents = random_parents(14, rng)
    tokens = torch.randint(3, model.vocab_size, (14,), generator=g)
    mask = ancestor_mask(parents)
    depths = mask.sum(1) - 1
    logits = model.forward(tokens, 10 + depths, model.cache, 10, tree_mask=mask)
    for i in range(14):
        path_tokens = tokens[path_of(parents, i)]
        ref = hf_logits(hf, torch.cat([prefix, path_tokens]))[-1]
        torch.testing.assert_close(logits[i], ref, atol=ATOL, rtol=0)


def test_tree_grown_level_by_level(pair):
    """Draft-style growth: each call adds one level whose nodes see ancestors written earlier."""
    hf, model = pair
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, model.vocab_size, (6,), generator=g)
    model.forward(prefix, torch.arange(6), model.cache, 0)
    parents = [-1, -1, 0, 0, 1, 2, 2, 4]
    levels = [[0, 1], [2, 3, 4], [5, 6, 7]]
    tokens = torch.randint(3, model.vocab_size, (8,), generator=g)
    full = ancestor_mask(parents)
    written = 0
    for level in levels:
        idx = torch.tensor(level)
        written = max(level) + 1
        mask = full[idx, :written]
        depth = full[idx].sum(1) - 1
        out = model.forward(tokens[idx], 6 + depth, model.cache, 6, tree_mask=mask, cache_slots=6 + idx)
        for row, i in enumerate(level):
            ref = hf_logits(hf, torch.cat([prefix, tokens[path_of(parents, i)]]))[-1]
            torch.testing.assert_close(out[row], ref, atol=ATOL, rtol=0)


def test_commit_then_continue(pair):
    hf, model = pair
    rng = random.Random(11)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(3, model.vocab_size, (9,), generator=g)
    model.forward(prefix, torch.arange(9), model.cache, 0)
    parents = random_parents(12, rng)
    tokens = torch.randint(3, model.vocab_size, (12,), generator=g)
    mask = ancestor_mask(parents)
    model.forward(tokens, 9 + mask.sum(1) - 1, model.cache, 9, tree_mask=mask)
    deepest = int((mask.sum(1)).argmax())
    path = path_of(parents, deepest)
    new_len = model.cache.commit(9, 9 + torch.tensor(path))
    assert new_len == 9 + len(path)
    nxt = torch.randint(3, model.vocab_size, (3,), generator=g)
    out = model.forward(nxt, torch.arange(new_len, new_len + 3), model.cache, new_len)
    ref = hf_logits(hf, torch.cat([prefix, tokens[path], nxt]))[-3:]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["autoregressive", "specexec"])
def test_engine_greedy_matches_hf_generate(pair, method):
    """Token for token against HF's own greedy ``generate``, through the engine: plain decoding,
    and SpecExec with the default draft (the target re-quantized to int4; a MoE stays a MoE)."""
    from specexec_rt.speculative.drafts import default_draft
    from specexec_rt.speculative.engine import Engine

    hf, model = pair
    prompt = [1, 7, 30, 4, 12, 9]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    draft = default_draft(model) if method == "specexec" else None
    # The checkpoints have no tokenizer files (transformers would make up a Qwen one, with its own
    # end-of-text id): the word tokenizer keeps the config's EOS the only one, as in HF's generate.
    engine = Engine(model, draft, method=method, budget=16, tokenizer=tiny_tokenizer(model.vocab_size))
    got = engine.generate(prompt, max_new_tokens=24).token_ids
    assert got == expected


def test_logits_rows_selects_rows(pair):
    _, model = pair
    ids = torch.arange(3, 15)
    full = model.forward(ids, torch.arange(12), model.cache, 0)
    rows = torch.tensor([11, 4])
    part = model.forward(ids, torch.arange(12), model.cache, 0, logits_rows=rows)
    torch.testing.assert_close(part, full[rows], atol=1e-5, rtol=0)


@pytest.mark.parametrize("m", [1, 2, 3, 64, 128, 129])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_linear_cpu_paths_agree(m, with_bias):
    """ops.dense_linear computes 2..128 CPU float32 rows as (w @ x.T).T: the same product as
    F.linear up to float32 summation order, contiguous, for any row count around the bounds."""
    from specexec_rt.model import ops
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 96, generator=g), torch.randn(200, 96, generator=g)
    bias = torch.randn(200, generator=g) if with_bias else None
    y = ops.dense_linear(x, w, bias)
    assert y.shape == (m, 200) and y.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias), atol=1e-4, rtol=1e-5)
    lo, hi = ops.CPU_TRANSPOSED_ROWS
    assert lo == 2 and hi >= 64
