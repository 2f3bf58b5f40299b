"""The KV cache's storage dtypes at the model and engine level (``kv_dtype``).

- ``kv.encode``/``decode``: float16/bfloat16 are torch's rounding; int8 is within half a step of
  its per-row scale, and a non-finite row reads back as NaN.
- ``KVCache`` holds each dtype (int8 with scales), and ``commit``/``move`` carry the scales.
- The default: half precision where the kernels read it; bad values are refused by name before
  anything loads; a model's drafts and engine pools inherit it.
- Decoding stays the target's own whatever the caches hold (greedy, every dtype; the draft
  included), prompts exactly at the context limit fit and one token more is a named error, and
  an engine whose KV caches cannot fit says which settings to lower.
"""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, greedy_decode
from specexec_rt import ContextLengthError, load_model
from specexec_rt.errors import MemoryBudgetError
from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.attention import decode, encode, quantize_int8
from specexec_rt.model.kv_cache import KVCache, resolve_kv_dtype
from specexec_rt.speculative.engine import Engine

KV_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
GiB = 1 << 30


def test_encode_is_torch_rounding_and_int8_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.logspace(-3, 3, 50)[:, None, None]
    for dtype in (torch.float16, torch.bfloat16):
        data, scale = encode(x, dtype)
        assert scale is None and torch.equal(data, x.to(dtype)) and torch.equal(decode(data, None, torch.float32),
                                                                                x.to(dtype).float())
    q, s = quantize_int8(x)
    assert q.dtype is torch.int8 and s.shape == x.shape[:2] and int(q.abs().max()) == 127
    err = (decode(q, s, torch.float32) - x).abs()
    assert (err <= s[..., None] / 2 * (1 + 1e-5)).all()
    x[3, 1, 5], x[7, 2, 0] = float("inf"), float("nan")
    q, s = quantize_int8(x)
    assert s[3, 1].isnan() and s[7, 2].isnan() and (q[3, 1] == 0).all() and (q[7, 2] == 0).all()
    assert decode(q, s, torch.float32)[3, 1].isnan().all()
    assert torch.isfinite(s[0]).all()       # other rows unaffected


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_cache_holds_each_dtype_and_moves_carry_the_scales(kv_dtype):
    c = KVCache(2, 16, 3, 8, torch.float32, "cpu", kv_dtype=kv_dtype)
    assert c.k.dtype is kv_dtype and (c.k_scale is not None) == (kv_dtype is torch.int8)
    per_slot = 2 * 2 * 3 * (8 * c.k.element_size() + (4 if kv_dtype is torch.int8 else 0))
    assert c.nbytes == 16 * per_slot
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        c.layer(i).write(torch.arange(16), torch.randn(16, 3, 8, generator=g), torch.randn(16, 3, 8, generator=g))
    before = [tuple(t.clone() for t in c.layer(i).values(torch.float32)) for i in range(2)]
    assert c.commit(2, torch.tensor([9, 4, 12])) == 5
    c.move(torch.tensor([0]), torch.tensor([15]))
    for i in range(2):
        k, v = c.layer(i).values(torch.float32)
        for dst, src in ((2, 9), (3, 4), (4, 12), (15, 0)):
            assert torch.equal(k[dst], before[i][0][src]) and torch.equal(v[dst], before[i][1][src])


def test_default_kv_dtype_is_half_where_the_kernels_read_it():
    native = cpu_native.library() is not None
    assert resolve_kv_dtype(None, torch.float32, "cpu") is (torch.float16 if native else torch.float32)
    assert resolve_kv_dtype("auto", torch.bfloat16, "cpu") is torch.bfloat16
    assert resolve_kv_dtype(None, torch.float16, "cuda") is torch.float16
    assert resolve_kv_dtype(None, torch.float32, "cuda") is torch.float32
    assert resolve_kv_dtype("int8", torch.float16, "cuda") is torch.int8
    assert resolve_kv_dtype(torch.bfloat16, torch.float32, "cpu") is torch.bfloat16


@pytest.mark.parametrize("bad", ["fp8", "half", "", torch.float64, torch.int32, 16])
def test_bad_kv_dtype_is_refused_by_name_before_anything_loads(bad):
    with pytest.raises(ValueError, match="kv_dtype=.*choose one of auto, float32, float16, bfloat16, int8"):
        load_model("/nonexistent/model", device="cpu", kv_dtype=bad)      # not a missing-file error
    with pytest.raises(ValueError, match="kv_dtype"):
        build_tiny_model(kv_dtype=bad)


def test_drafts_and_engine_pools_inherit_the_targets_kv_dtype():
    from specexec_rt.speculative.drafts import int4_draft, layer_dropped_draft

    target = build_tiny_model(kv_dtype="int8", intermediate_size=64)
    for draft in (int4_draft(target, group_size=32), layer_dropped_draft(target, [0])):
        assert draft.kv_dtype is torch.int8
    engine = Engine(target, int4_draft(target, group_size=32), method="specexec", budget=4, max_batch=3)
    assert engine.runner.target_cache.k.dtype is torch.int8 and engine.runner.draft_cache.k_scale is not None
    assert not target.cache_allocated      # a pooled engine never allocates the model's own cache


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_decoding_is_the_targets_own_with_every_kv_dtype(kv_dtype):
    """The output is the target's greedy text with its own cache, whatever both caches hold; the
    draft's cache dtype only shapes the trees."""
    from specexec_rt.speculative.drafts import int4_draft

    target = build_tiny_model(kv_dtype=kv_dtype, intermediate_size=64)
    prompt = [5, 9, 2, 7, 1]
    want = greedy_decode(target, prompt, 24)
    for method, params in (("specexec", dict(budget=8)), ("chain", dict(budget=4, k=3))):
        got = Engine(target, int4_draft(target, group_size=32), method=method, **params).generate(
            prompt, max_new_tokens=24)
        assert got.token_ids == want, method


@pytest.mark.parametrize("method", ["autoregressive", "specexec"])
def test_prompts_exactly_at_the_limit_fit_and_one_more_token_is_named(method):
    """prompt + max_new_tokens + the verification tree must fit max_len: exactly that fits (the
    whole cache used), one token more is a ContextLengthError naming max_len and max_new_tokens."""
    from specexec_rt.speculative.drafts import int4_draft

    max_len = 48
    target = build_tiny_model(max_len=max_len, intermediate_size=64)
    draft = int4_draft(target, group_size=32) if method == "specexec" else None
    engine = Engine(target, draft, method=method, **({"budget": 4} if draft is not None else {}))
    verify = 1 if draft is None else 5
    n_new = 6
    fits = list(range(1, max_len - n_new - verify + 1))
    assert len(fits) + n_new + verify == max_len
    out = engine.generate(fits, max_new_tokens=n_new)
    assert out.token_ids == greedy_decode(target, fits, n_new)
    with pytest.raises(ContextLengthError, match=rf"max_new_tokens \({n_new}\).*max_len={max_len}"):
        engine.generate(fits + [3], max_new_tokens=n_new)
    with pytest.raises(ContextLengthError, match=f"max_len={max_len}"):
        engine.generate(list(range(max_len)), max_new_tokens=1)
    assert engine.generate(fits, max_new_tokens=n_new).token_ids == out.token_ids   # still usable


def test_max_len_beyond_the_context_is_named(tmp_path):
    from hf_models import make_hf_model

    make_hf_model("llama", tmp_path)          # max_position_embeddings 256
    with pytest.raises(ValueError, match="max_len=257 exceeds .* context is 256"):
        load_model(tmp_path, device="cpu", max_len=257)
    assert load_model(tmp_path, device="cpu", max_len=256).max_len == 256


def test_kv_caches_that_do_not_fit_are_refused_naming_the_settings(monkeypatch):
    from specexec_rt.speculative import memory

    target = build_tiny_model(max_len=256, kv_dtype="float16", intermediate_size=64)
    draft = build_tiny_model(max_len=256, kv_dtype="float16", intermediate_size=64, seed=1)
    need = memory.engine_kv_bytes(target, draft, 8)
    assert need == 2 * 8 * 256 * (2 * 2 * 2 * 8 * 2)      # 2 models x 8 regions x 256 slots x (K,V x layers x heads x dim x 2 B)
    monkeypatch.setenv("SPECEXEC_AVAILABLE_MEMORY_GB", repr(need * 0.9 / GiB))
    with pytest.raises(MemoryBudgetError, match=r"max_batch=8 .*max_len=256 kv_dtype=float16.*lower max_batch"):
        Engine(target, draft, method="specexec", budget=4, max_batch=8)
    monkeypatch.setenv("SPECEXEC_AVAILABLE_MEMORY_GB", repr((need + (64 << 20)) / GiB))   # + the passes
    Engine(target, draft, method="specexec", budget=4, max_batch=8)
