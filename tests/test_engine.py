"""The engine is lossless: greedy output equals the target's own greedy decoding, and sampled
output follows the target's exact distribution, for every method."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import greedy_decode, random_weights, tiny_config
from specexec_rt.speculative import sampling, tree as tree_mod
from specexec_rt.speculative.engine import Engine
from specexec_rt.errors import ContextLengthError, SamplingParameterError, VocabularyMismatchError
from specexec_rt.model import Transformer
from specexec_rt.speculative.sampling import SamplingParams, process_logits
from specexec_rt.model.weights import replace_leaves
from test_sampling import chi2_pvalue

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_pair(vocab: int = 32, noise: float = 0.15, seed: int = 0, max_len: int = 256, draft_seed=None,
              head_scale: float = 1.0):
    """A tiny random target and a draft that disagrees with it sometimes: a perturbed copy, or
    (draft_seed given) an unrelated random model. ``head_scale`` < 1 flattens the target's
    distributions (the sampling tests need several likely tokens)."""
    cfg = tiny_config(vocab_size=vocab, n_layers=2)
    w = random_weights(cfg, seed, scale=0.6)
    w.lm_head = w.lm_head * head_scale
    target = Transformer(cfg, w, max_len, CPU, torch.float32)
    if draft_seed is not None:
        dw = random_weights(cfg, draft_seed, scale=0.6)
    else:
        g = torch.Generator().manual_seed(seed + 100)
        dw = replace_leaves(w, lambda _, x: x + noise * x.std() * torch.randn(x.shape, generator=g))
    return target, Transformer(cfg, dw, max_len, CPU, torch.float32)


GREEDY_CASES = [
    ("chain", 1, dict(k=1)), ("chain", 4, dict(k=4)), ("chain", 8, dict(k=7)),
    ("specinfer", 4, dict(n=2, depth=2)), ("specinfer", 12, dict(n=4, depth=3)),
    ("specexec", 1, dict()), ("specexec", 8, dict()), ("specexec", 32, dict(beams_per_step=4, branch_width=3)),
    ("specexec", 128, dict(beams_per_step=16, branch_width=8, max_depth=10)),
    # Tree policies (tree_policy.py): the default above is "calibrated".
    ("specexec", 32, dict(tree="softmax", beams_per_step=4, branch_width=3)),
    ("specexec", 24, dict(tree="softmax", growth_temperature=0.5)),
    ("specexec", 8, dict(tree="sequoia")), ("specexec", 64, dict(tree="sequoia", branch_width=4, max_depth=12)),
    ("specexec", 16, dict(tree="sequoia", acceptance=[0.6, 0.2, 0.1], max_depth=5)),
]


@pytest.mark.parametrize("method,budget,params", GREEDY_CASES)
@pytest.mark.parametrize("pair", ["perturbed", "close", "unrelated"])
def test_greedy_equals_greedy_decode(method, budget, params, pair):
    target, draft = {"perturbed": lambda: make_pair(noise=0.3), "close": lambda: make_pair(noise=0.05),
                     "unrelated": lambda: make_pair(draft_seed=7)}[pair]()
    prompt = [1, 5, 9, 2]
    expected = greedy_decode(target, prompt, 48)
    engine = Engine(target, draft, method=method, budget=budget, **params)
    res = engine.generate(prompt, max_new_tokens=48)
    assert res.token_ids == expected
    s = res.stats
    assert s.new_tokens == 48 and s.target_passes == sum(s.tokens_per_pass_histogram.values())
    assert sum(k * v for k, v in s.tokens_per_pass_histogram.items()) >= 48
    depth = engine.params["max_depth"] if method == "specexec" else 1
    assert s.max_syncs_per_pass <= depth + 2       # one per draft step + alive count + result
    if pair == "close" and budget >= 8:
        assert s.tokens_per_pass > 1.5              # the draft is actually used


def test_autoregressive_needs_no_draft_and_matches():
    target, _ = make_pair()
    res = Engine(target, method="autoregressive").generate([3, 4], max_new_tokens=20)
    assert res.token_ids == greedy_decode(target, [3, 4], 20)
    assert res.stats.target_passes == 20 and res.stats.tokens_per_pass == 1.0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["chain", "specinfer", "specexec"]), budget=st.integers(1, 24),
       seed=st.integers(0, 1000), n_new=st.integers(1, 30), temperature=st.sampled_from([0.0, 1.0]))
def test_committed_caches_equal_fresh_prefill(method, budget, seed, n_new, temperature):
    target, draft = make_pair(vocab=24, noise=0.1, max_len=128)
    params = {"chain": dict(k=min(budget, 6)), "specinfer": dict(n=2, depth=max(1, budget // 2)),
              "specexec": dict(beams_per_step=3, branch_width=3, max_depth=6)}[method]
    engine = Engine(target, draft, method=method, budget=budget, **params)
    engine.generate([2, 7, 1], max_new_tokens=n_new, temperature=temperature, seed=seed)
    state = engine.last_cache_state()      # the finished request's committed text and cache prefixes
    seq, tp, dp = state.committed, state.target_len, state.draft_len
    assert tp == len(seq) - 1 and dp <= tp
    for model, n in ((target, tp), (draft, dp)):
        fresh = model.new_cache()
        model.forward(torch.tensor(seq[:n]), torch.arange(n), fresh, 0)
        # A tree pass and a prefill compute K/V with float32 rounding apart; a half-precision
        # cache may then store them one rounding step (2^-10 relative for float16) apart.
        tol = dict(atol=1e-4, rtol=1e-4) if fresh.kv_dtype is torch.float32 else dict(atol=1e-4, rtol=2e-3)
        torch.testing.assert_close(model.cache.k[:, :n].float(), fresh.k[:, :n].float(), **tol)
        torch.testing.assert_close(model.cache.v[:, :n].float(), fresh.v[:, :n].float(), **tol)


# ---------------------------------------------------------------------- sampling losslessness
SAMPLING_VOCAB = 16
N_RUNS = 1000
PROMPT = [1, 2, 3]


def exact_first_two(target: Transformer, params: SamplingParams) -> torch.Tensor:
    """The target's exact joint distribution of the first two tokens, ``[V * V]``: p(t1) from the
    prompt, p(t2 | t1) for every t1 at once as a one-level tree."""
    v, n = SAMPLING_VOCAB, len(PROMPT)
    logits = target.forward(torch.tensor(PROMPT), torch.arange(n), target.cache, 0)
    p1 = process_logits(logits[-1], params)
    l2 = target.forward(torch.arange(v), torch.full((v,), n), target.cache, n,
                        tree_mask=torch.eye(v, dtype=torch.bool))
    p2 = process_logits(l2, params)
    return (p1[:, None] * p2).reshape(-1).double()


def first_two_counts(engine: Engine, params: SamplingParams, runs: int = N_RUNS) -> torch.Tensor:
    counts = torch.zeros(SAMPLING_VOCAB ** 2, dtype=torch.long)
    for seed in range(runs):
        ids = engine.generate(PROMPT, max_new_tokens=2, temperature=params.temperature,
                              top_p=params.top_p, top_k=params.top_k, seed=seed).token_ids
        assert len(ids) == 2
        counts[ids[0] * SAMPLING_VOCAB + ids[1]] += 1
    return counts


# Sampled chains and SpecExec trees are coupled to the target's draws by default (the draft ranks
# by q / E with the request's position noise; verified by the walk); "-rejection" engines draw
# their drafts independently and verify by rejection sampling, "-uncoupled" SpecExec ranks by q.
SAMPLING_ENGINES = {
    "chain": dict(budget=2, k=2),
    "chain-rejection": dict(budget=2, k=2, coupled=False),
    "specinfer": dict(budget=6, n=3, depth=2),
    "specinfer-rejection": dict(budget=6, n=3, depth=2, coupled=False),
    "specexec": dict(budget=8, beams_per_step=4, branch_width=4, max_depth=3),     # tree="calibrated"
    "specexec-uncoupled": dict(budget=8, beams_per_step=4, branch_width=4, max_depth=3, coupled=False),
    "specexec-softmax": dict(budget=8, beams_per_step=4, branch_width=4, max_depth=3, tree="softmax"),
    "specexec-sequoia": dict(budget=8, branch_width=4, max_depth=3, tree="sequoia"),
}
REJECTION = ("chain-rejection", "specinfer-rejection")


def make_engine(target, draft, name: str) -> Engine:
    return Engine(target, draft, method=name.split("-")[0], **SAMPLING_ENGINES[name])


@pytest.fixture(scope="module")
def sampling_pair():
    # first token under (0.7, 0.8): ~8 candidates, max prob ~0.5; draft/target TV ~0.3
    return make_pair(vocab=SAMPLING_VOCAB, noise=0.8, max_len=64, head_scale=0.15)


SAMPLING_SETTINGS = [(0.7, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.8, 0), (1.0, 0.8, 0), (1.0, 1.0, 5)]
# The coupled chain and SpecExec, and the rejection-sampling chains, under every setting; the
# other tree policies (the same walk over other trees) and SpecInfer's variants under the hardest
# ones (temperature with top-p, and top-k), to keep the suite short.
SAMPLING_CASES = [(m, *st) for m in ("chain", "chain-rejection", "specexec") for st in SAMPLING_SETTINGS] \
    + [(m, *st) for m in SAMPLING_ENGINES if m not in ("chain", "chain-rejection", "specexec")
       for st in ((0.7, 0.8, 0), (1.0, 1.0, 5))]


@pytest.mark.parametrize("method,temperature,top_p,top_k", SAMPLING_CASES)
def test_sampling_matches_target_distribution(sampling_pair, method, temperature, top_p, top_k):
    target, draft = sampling_pair
    params = SamplingParams(temperature, top_p, top_k)
    exact = exact_first_two(target, params)
    counts = first_two_counts(make_engine(target, draft, method), params)
    assert chi2_pvalue(counts, exact) > 1e-3


def _accept_everything(p_x, q_x, u):
    return torch.ones_like(u, dtype=torch.bool)


def _walk_follows_draft(tree, draws):
    """Broken SpecExec: walk down the first (most likely under the draft) child, ignoring p."""
    first_child = torch.full_like(draws, -1)
    rows = torch.arange(1, tree.n).flip(0)          # later rows first, so the first child wins
    first_child[tree.parents[rows]] = tree.tokens[rows]
    return tree_mod.__dict__["_real_walk"](tree, torch.where(first_child >= 0, first_child, draws))


@pytest.mark.parametrize("method", list(SAMPLING_ENGINES))
def test_broken_acceptance_fails_the_same_check(sampling_pair, method, monkeypatch):
    """Accepting draft tokens without the ratio test (rejection sampling) or following the draft
    instead of the target's draws (the walk, which verifies coupled and SpecExec trees) must fail
    the distribution check above."""
    target, draft = sampling_pair
    params = SamplingParams(1.0, 1.0)
    if method in REJECTION:
        monkeypatch.setattr(sampling, "ratio_accept", _accept_everything)
    else:
        monkeypatch.setitem(tree_mod.__dict__, "_real_walk", tree_mod.walk_accept)
        monkeypatch.setattr(tree_mod, "walk_accept", _walk_follows_draft)
    exact = exact_first_two(target, params)
    counts = first_two_counts(make_engine(target, draft, method), params)
    assert chi2_pvalue(counts, exact) < 1e-6


def test_seed_reproducible_and_seeds_differ():
    target, draft = make_pair()
    e = Engine(target, draft, method="specexec", budget=16)
    a = e.generate([1, 2], 24, temperature=1.0, seed=3).token_ids
    b = e.generate([1, 2], 24, temperature=1.0, seed=3).token_ids    # the tree policy learned meanwhile
    c = e.generate([1, 2], 24, temperature=1.0, seed=4).token_ids
    assert a == b and a != c


@pytest.mark.parametrize("tree", ["calibrated", "softmax", "sequoia"])
def test_sampled_text_does_not_depend_on_the_tree(tree):
    """The walk draws position t's token with noise keyed by (seed, t) (sampling.PositionNoise),
    so sampled SpecExec gives, token for token, the target's own sampled text for that seed,
    whatever tree was verified; a learning policy's history changes only the speed."""
    target, draft = make_pair(noise=0.3)
    ar = Engine(target, None, method="autoregressive")
    engine = Engine(target, draft, method="specexec", budget=16, tree=tree)
    passes = 0
    for seed in range(4):
        want = ar.generate([1, 2, 3], 30, temperature=1.0, top_p=0.9, seed=seed).token_ids
        got = engine.generate([1, 2, 3], 30, temperature=1.0, top_p=0.9, seed=seed)
        assert got.token_ids == want
        passes += got.stats.target_passes
    assert passes < 4 * 30          # and the draft was used


# ---------------------------------------------------------------------- stopping and text
class CharTokenizer:
    """Token i is the letter chr(97 + i); enough of the HF interface for the engine."""

    eos_token_id = None

    def __call__(self, text):
        class Enc:
            input_ids = [ord(c) - 97 for c in text]
        return Enc()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids)


def test_eos_and_max_new_tokens_exact():
    target, draft = make_pair()
    full = greedy_decode(target, [1, 5, 9, 2], 30)
    for n in (1, 2, 7, 30):
        res = Engine(target, draft, method="specexec", budget=32).generate([1, 5, 9, 2], max_new_tokens=n)
        assert res.token_ids == full[:n] and res.stats.finish_reason == "length"
    eos = full[10]
    target.config.eos_token_ids = [eos]
    try:
        res = Engine(target, draft, method="chain", k=5).generate([1, 5, 9, 2], max_new_tokens=30)
    finally:
        target.config.eos_token_ids = []
    first = full.index(eos)
    assert res.token_ids == full[:first + 1] and res.stats.finish_reason == "eos"


def test_stop_strings_and_stream_pieces():
    target, draft = make_pair(vocab=26)
    tok = CharTokenizer()
    engine = Engine(target, draft, method="specexec", budget=16, tokenizer=tok)
    full = engine.generate("bfjc", max_new_tokens=30).text
    assert full == tok.decode(greedy_decode(target, [1, 5, 9, 2], 30))
    stop = full[12:14]
    pieces = list(engine.stream("bfjc", max_new_tokens=30, stop=[stop, "zzzzz"]))
    res = engine.last_result
    cut = full.index(stop)
    assert res.text == full[:cut] == "".join(pieces)
    assert res.stats.finish_reason == "stop"
    assert tok.decode(res.token_ids).startswith(full[:cut] + stop)
    assert len(tok.decode(res.token_ids)) == cut + len(stop)


# ---------------------------------------------------------------------- errors
def test_parameter_validation():
    target, draft = make_pair(max_len=64)
    e = Engine(target, draft, method="specexec", budget=8)
    for kw in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.1), dict(top_k=-2), dict(max_new_tokens=0)]:
        with pytest.raises(SamplingParameterError):
            e.generate([1, 2], **{"max_new_tokens": 4, **kw})
    with pytest.raises(SamplingParameterError, match="empty"):
        e.generate([], max_new_tokens=4)
    with pytest.raises(SamplingParameterError, match="tokenizer"):
        e.generate("hello", max_new_tokens=4)
    with pytest.raises(ContextLengthError, match="max_len=64"):
        e.generate([1] * 40, max_new_tokens=20)
    with pytest.raises(ValueError, match="method"):
        Engine(target, draft, method="beam")
    with pytest.raises(TypeError, match="k"):
        Engine(target, draft, method="specexec", k=3)
    with pytest.raises(ValueError, match="draft"):
        Engine(target, None, method="chain")


def test_vocabulary_mismatch():
    target, _ = make_pair(vocab=32)
    other, _ = make_pair(vocab=40)
    with pytest.raises(VocabularyMismatchError, match="40"):
        Engine(target, other)


# ---------------------------------------------------------------------- the real pair
@pytest.fixture(scope="module")
def smollm2_pair():
    from specexec_rt import load_model, load_tokenizer
    from specexec_rt.speculative.drafts import default_draft

    target = load_model("smollm2-135m", device="cpu", max_len=320)
    return target, default_draft(target), load_tokenizer(target)


@pytest.mark.slow
def test_smollm2_greedy_lossless_every_method(smollm2_pair):
    from specexec_rt.model.weights import weights_nbytes

    target, draft, tok = smollm2_pair
    def layer_bytes(m):
        return sum(weights_nbytes(lw) for lw in m.weights.layers)

    assert 0 < layer_bytes(draft) < layer_bytes(target) / 4
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = list(tok(prompt).input_ids)
    expected = greedy_decode(target, ids, 20)
    for method, params in [("chain", dict(k=4)), ("specinfer", dict(n=4, depth=3)),
                           ("specexec", dict(budget=32, max_depth=8))]:
        res = Engine(target, draft, method=method, tokenizer=tok, **params).generate(prompt, max_new_tokens=20)
        assert res.token_ids == expected, method
        assert res.text == tok.decode(expected, skip_special_tokens=True)
        assert res.stats.tokens_per_pass > 1.5, method     # the int4 self-draft is accepted often


def test_default_draft_reproduces_the_4bit_file(smollm2_pair):
    """SmolLM2's GGUF is Q4_1 (32-wide min/scale blocks) and its head Q8_0: the default draft
    re-quantizes at the file's own group, so its layers dequantize to exactly the target's
    weights, and it shares the target's 8-bit head rather than re-quantizing it."""
    target, draft, _ = smollm2_pair
    assert target.source_int4_group == 32
    for lt, ld in zip(target.weights.layers, draft.weights.layers):
        for field in ("wqkv", "wo", "w_gate_up", "w_down"):
            wd = getattr(ld, field)
            assert wd.group_size == 32, field
            assert torch.equal(wd.dequantize(torch.float32), getattr(lt, field)), field
    assert draft.weights.lm_head is target.weights.lm_head


def test_default_draft_group_follows_the_checkpoint():
    from conftest import build_tiny_model

    from specexec_rt.speculative.drafts import default_draft

    target = build_tiny_model(hidden_size=64, intermediate_size=128, n_heads=4, n_kv_heads=2, head_dim=16,
                              vocab_size=96)
    assert target.source_int4_group is None                 # built from float weights
    assert default_draft(target).weights.layers[0].wqkv.group_size == 64
    target.source_int4_group = 32                           # as a Q4_0/Q4_1/Q4_K GGUF sets it
    assert default_draft(target).weights.layers[0].w_down.group_size == 32
    target.source_int4_group = 128                          # a GPTQ group wider than a 64-wide row
    assert default_draft(target).weights.layers[0].wo.group_size == 64


def test_builtin_drafts_by_name():
    """``default`` and ``int4:G`` name drafts derived from the target (the CLI's --draft): the
    name's group size is checked before anything is built, and one that does not divide the
    model's widths is refused with the widths named."""
    from conftest import build_tiny_model

    from specexec_rt.errors import UnsupportedModelError
    from specexec_rt.speculative.drafts import builtin_draft, builtin_draft_group, int4_draft

    assert builtin_draft_group("default") == 0 and builtin_draft_group("int4:32") == 32
    assert builtin_draft_group("some/checkpoint") is None
    for bad in ("int4:48", "int4:", "int4:-32", "int4:1e2"):
        with pytest.raises(ValueError, match="32, 64, 128 or 256"):
            builtin_draft_group(bad)
    target = build_tiny_model(hidden_size=64, intermediate_size=96, n_heads=4, n_kv_heads=2, head_dim=16,
                              vocab_size=96)
    ids, pos = torch.tensor([3, 17, 5, 60]), torch.arange(4)
    named, direct = builtin_draft(target, "int4:32"), int4_draft(target, group_size=32)
    assert named.weights.layers[0].wqkv.group_size == 32
    assert torch.equal(named.forward(ids, pos, named.new_cache(), 0), direct.forward(ids, pos, direct.new_cache(), 0))
    with pytest.raises(UnsupportedModelError, match=r"int4:64.*\[64, 96\]"):
        builtin_draft(target, "int4:64")          # the 96-wide MLP
    with pytest.raises(ValueError, match="no built-in draft"):
        builtin_draft(target, "some/checkpoint")
