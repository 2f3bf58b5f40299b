"""``offload_kv``: the KV cache in host memory, streamed per layer (specexec_rt/offload/kv_stream.py).

CPU (CI): the same schedule with plain copies. A model whose cache is streamed equals the
resident model bit for bit (forwards, trees, several requests, whole generations, with the
weights streamed too), the schedule obeys its ordering (a layer is copied before it is computed,
written back after, at most ``n_slots`` layers in flight), only the spans a pass reads are
copied, and the loader decides ``offload_kv`` from the budget. CUDA (marked): the same equality
with pinned memory and a copy stream.
"""
from __future__ import annotations

import pytest
import torch

from conftest import greedy_decode, random_weights, tiny_config
from specexec_rt.model import Segment, Transformer
from specexec_rt.offload import LayerStreamer, StreamedKVCache, streamed_cache_factory
from specexec_rt.speculative import memory

cuda = pytest.mark.cuda


def _pair(kv_dtype, device="cpu", dtype=torch.float32, stream_weights=False, max_len=96):
    cfg = tiny_config("llama", n_layers=5, head_dim=16, intermediate_size=64)
    w = random_weights(cfg, seed=4)
    if dtype != torch.float32 or device != "cpu":
        from specexec_rt.model.weights import replace_leaves

        w.layers = [replace_leaves(layer, lambda p, t: t.to(device, dtype)) for layer in w.layers]
        w.embed, w.final_norm, w.lm_head = (t.to(device, dtype) for t in (w.embed, w.final_norm, w.lm_head))
    resident = Transformer(cfg, w, max_len, torch.device(device), dtype, kv_dtype=kv_dtype)
    source = LayerStreamer(w.layers, device, n_resident=1, n_slots=2) if stream_weights else None
    streamed = Transformer(cfg, w, max_len, torch.device(device), dtype, layer_source=source, kv_dtype=kv_dtype,
                           cache_factory=streamed_cache_factory())
    return cfg, resident, streamed


def _passes(model, device="cpu"):
    """A prefill, a decode step, a 4-node tree, and a ragged batch of two requests."""
    dev = torch.device(device)
    ids = torch.arange(3, 23, device=dev) % model.vocab_size
    out = [model.forward(ids[:12], torch.arange(12, device=dev), model.cache, 0)]
    out.append(model.forward(ids[12:13], torch.tensor([12], device=dev), model.cache, 12))
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool, device=dev)
    out.append(model.forward(ids[:4], torch.tensor([13, 14, 14, 15], device=dev), model.cache, 13, tree_mask=mask))
    model.cache.commit(13, torch.tensor([13, 14, 16], device=dev))
    segs = [Segment(n_new=2, base=0, prefix_len=16), Segment(n_new=3, base=48, prefix_len=0)]
    out.append(model.forward_batch(ids[:5], torch.tensor([16, 17, 0, 1, 2], device=dev), model.cache, segs))
    c = model.cache
    return out + [t.clone() for t in (c.k, c.v, c.k_scale, c.v_scale) if t is not None]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8], ids=str)
@pytest.mark.parametrize("stream_weights", [False, True])
def test_streamed_kv_equals_resident(kv_dtype, stream_weights):
    cfg, resident, streamed = _pair(kv_dtype, stream_weights=stream_weights)
    assert isinstance(streamed.cache, StreamedKVCache) and streamed.kv_offload and not resident.kv_offload
    streamed.cache.trace = []
    want, got = _passes(resident), _passes(streamed)
    assert len(want) == len(got)
    for i, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a, b), i
    check_trace(streamed.cache.trace, cfg.n_layers, streamed.cache.n_slots, passes=4)


def check_trace(trace: list, n_layers: int, n_slots: int, passes: int) -> None:
    """Per pass: every layer copied into slot i % n_slots before it is computed, written back
    after, and layer i + n_slots copied into the slot only after layer i is written back."""
    assert len(trace) == 3 * n_layers * passes
    for p in range(passes):
        events = trace[3 * n_layers * p:3 * n_layers * (p + 1)]
        at = {e: j for j, e in enumerate(events)}
        for i in range(n_layers):
            s = i % n_slots
            assert at[("copy", i, s)] < at[("compute", i, s)] < at[("write", i, s)]
            if i + n_slots < n_layers:
                assert at[("write", i, s)] < at[("copy", i + n_slots, s)]
            in_flight = sum(1 for e in events[:at[("compute", i, s)]] if e[0] == "copy") - i
            assert 1 <= in_flight <= n_slots


def test_only_the_spans_a_pass_reads_are_copied():
    cfg, _, streamed = _pair(torch.float16)
    cache = streamed.cache
    per_slot = 2 * cfg.n_kv_heads * cfg.head_dim * 2                      # K and V, float16, one layer
    streamed.forward(torch.arange(10), torch.arange(10), cache, 0)
    assert cache.bytes_copied == cfg.n_layers * 10 * per_slot             # slots [0, 10)
    assert cache.bytes_written == cfg.n_layers * 10 * per_slot
    cache.bytes_copied = cache.bytes_written = 0
    segs = [Segment(n_new=1, base=0, prefix_len=10), Segment(n_new=2, base=60, prefix_len=5)]
    streamed.forward_batch(torch.tensor([1, 2, 3]), torch.tensor([10, 5, 6]), cache, segs)
    assert cache.bytes_copied == cfg.n_layers * (11 + 7) * per_slot      # [0, 11) and [60, 67)
    assert cache.bytes_written == cfg.n_layers * (1 + 2) * per_slot      # the tree regions


def test_engine_with_a_streamed_target_kv_is_lossless():
    from specexec_rt.speculative.drafts import int4_draft
    from specexec_rt.speculative.engine import Engine

    _, resident, streamed = _pair(torch.float16, stream_weights=True, max_len=128)
    prompts = [[5, 9, 2, 7], [1, 3, 3, 8, 2, 6]]
    want = [greedy_decode(resident, p, 20) for p in prompts]
    for max_batch in (1, 2):
        engine = Engine(streamed, int4_draft(streamed, group_size=32), method="specexec", budget=8,
                        max_batch=max_batch)
        got = [r.token_ids for r in engine.generate_batch(prompts, max_new_tokens=20)]
        assert got == want, max_batch
        pool = engine.runner.target_cache
        assert isinstance(pool, StreamedKVCache) and pool.max_len == max_batch * 128
        assert engine.runner.draft_cache.resident   # the draft keeps its own cache on the device


def test_memory_planner_counts_the_streaming_slots_only():
    cfg, resident, streamed = _pair(torch.float16)
    full = memory.kv_bytes(resident, 1000)
    assert full == 1000 * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2
    assert memory.kv_bytes(streamed, 1000) == full * 2 // cfg.n_layers
    assert streamed.cache.device_bytes == memory.kv_bytes(streamed, streamed.max_len)


def test_loader_keeps_the_kv_on_the_host_when_it_does_not_fit(tmp_path):
    from hf_models import make_hf_model
    from specexec_rt import load_model

    make_hf_model("llama", tmp_path)
    big = load_model(tmp_path, device="cpu", max_len=128, offload=True, gpu_memory_gb=1.0, offload_reserve_gb=0)
    assert not big.kv_offload
    # A budget that holds the streaming slots but not the KV at max_len: the KV goes to the host.
    tight = load_model(tmp_path, device="cpu", max_len=128, offload=True, gpu_memory_gb=2e-4, offload_reserve_gb=0)
    assert tight.kv_offload and isinstance(tight.cache, StreamedKVCache)
    forced = load_model(tmp_path, device="cpu", max_len=128, offload_kv=True)
    assert forced.kv_offload
    ids = torch.arange(3, 20)
    torch.testing.assert_close(forced.prefill(ids), big.prefill(ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="offload_kv must be"):
        load_model(tmp_path, device="cpu", max_len=128, offload_kv="yes")


@cuda
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8], ids=str)
def test_cuda_streamed_kv_equals_resident(kv_dtype):
    from specexec_rt.offload import native

    cfg, resident, streamed = _pair(kv_dtype, device="cuda", dtype=torch.float16, stream_weights=True)
    cache = streamed.cache
    assert cache.pinned and native.is_pinned(cache.k)
    for s in cache.slots:
        s.k.fill_(float("nan")) if kv_dtype is not torch.int8 else s.k.fill_(127)
    torch.cuda.synchronize()
    cache.trace = []
    want, got = _passes(resident, "cuda"), _passes(streamed, "cuda")
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a.cpu(), b.cpu()), i
    check_trace(cache.trace, cfg.n_layers, cache.n_slots, passes=4)
    cache.close()
    assert not native.is_pinned(cache.k)
