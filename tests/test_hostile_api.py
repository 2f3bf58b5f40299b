"""Hostile input at the Python API: every bad request parameter gets an InvalidParameterError
that names it (no silent coercion, no bare ValueError/TypeError/IndexError), and the engine then
still gives exactly what a fresh engine gives.

Covered: seeds outside the generator's range or of the wrong type; silent coercions and unnamed
parameters: float/bool/bytes/None token ids, ``temperature=inf``, ``prompt=None``, ``stop=123``,
``temperature="abc"``, ``max_len="64"``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from specexec_rt import InvalidParameterError, SamplingParameterError, load_model
from specexec_rt.speculative import params
from specexec_rt.speculative.engine import Engine
from tiny_tokenizer import tiny_tokenizer

MAX_LEN = 128
PROMPT = "w5 w6 w7"
N_NEW = 6
SPEC = dict(method="specexec", budget=6, beams_per_step=3, branch_width=2, max_depth=3)


def make_engine(tok):
    return Engine(build_tiny_model(seed=0, max_len=MAX_LEN), build_tiny_model(seed=1, max_len=MAX_LEN),
                  tokenizer=tok, **SPEC)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    return make_engine(tok)


@pytest.fixture(scope="module")
def fresh(tok):
    """What a fresh engine (never given bad input) answers: greedy and seeded sampling."""
    e = make_engine(tok)
    return {"greedy": e.generate(PROMPT, max_new_tokens=N_NEW),
            "sampled": e.generate(PROMPT, max_new_tokens=N_NEW, temperature=0.8, top_p=0.9, seed=7)}


def assert_same_as_fresh(engine, fresh, sampled=False):
    got = engine.generate(PROMPT, max_new_tokens=N_NEW)
    assert got.token_ids == fresh["greedy"].token_ids and got.text == fresh["greedy"].text
    if sampled:
        got = engine.generate(PROMPT, max_new_tokens=N_NEW, temperature=0.8, top_p=0.9, seed=7)
        assert got.token_ids == fresh["sampled"].token_ids


def call(engine, entry, prompt, kwargs):
    kwargs = dict(kwargs)
    kwargs.setdefault("max_new_tokens", N_NEW)
    if entry == "generate":
        return engine.generate(prompt, **kwargs)
    return "".join(engine.stream(prompt, **kwargs))


# ------------------------------------------------------------------ sampling parameters
BAD_PARAMS = [
    # (kwargs, parameter named, error code)
    (dict(seed=-1), "seed", "invalid_value"),
    (dict(seed=2**64), "seed", "invalid_value"),
    (dict(seed=-2**70), "seed", "invalid_value"),
    (dict(seed=1.5), "seed", "invalid_type"),
    (dict(seed=3.0), "seed", "invalid_type"),
    (dict(seed=True), "seed", "invalid_type"),
    (dict(seed="3"), "seed", "invalid_type"),
    (dict(temperature=float("inf")), "temperature", "invalid_value"),
    (dict(temperature=float("-inf")), "temperature", "invalid_value"),
    (dict(temperature=float("nan")), "temperature", "invalid_value"),
    (dict(temperature="abc"), "temperature", "invalid_type"),
    (dict(temperature="0.7"), "temperature", "invalid_type"),
    (dict(temperature=True), "temperature", "invalid_type"),
    (dict(temperature=None), "temperature", "invalid_type"),
    (dict(temperature=1e-30), "temperature", "invalid_value"),      # logits / 1e-38 are inf: refused
    (dict(temperature=10**400), "temperature", "invalid_value"),
    (dict(top_p="0.9"), "top_p", "invalid_type"),
    (dict(top_p=True), "top_p", "invalid_type"),
    (dict(top_p=float("inf")), "top_p", "invalid_value"),
    (dict(top_k=2.5), "top_k", "invalid_type"),
    (dict(top_k=3.0), "top_k", "invalid_type"),
    (dict(top_k="3"), "top_k", "invalid_type"),
    (dict(top_k=True), "top_k", "invalid_type"),
    (dict(max_new_tokens="5"), "max_new_tokens", "invalid_type"),
    (dict(max_new_tokens=5.0), "max_new_tokens", "invalid_type"),
    (dict(max_new_tokens=None), "max_new_tokens", "invalid_type"),
    (dict(max_new_tokens=True), "max_new_tokens", "invalid_type"),
    (dict(stop=123), "stop", "invalid_type"),
    (dict(stop=b"w9"), "stop", "invalid_type"),
    (dict(stop=[1]), "stop", "invalid_type"),
    (dict(stop=("w9", None)), "stop", "invalid_type"),
    (dict(stop={"w9"}), "stop", "invalid_type"),
    (dict(stop=["w9", ""]), "stop", "invalid_value"),
]


@pytest.mark.parametrize("kwargs,param,code", BAD_PARAMS, ids=[repr(k)[:40] for k, _, _ in BAD_PARAMS])
def test_bad_parameter_is_named(engine, fresh, kwargs, param, code):
    with pytest.raises(InvalidParameterError) as e:
        call(engine, "generate", PROMPT, kwargs)
    assert e.value.param == param and e.value.code == code
    assert str(e.value).startswith(param), str(e.value)
    assert isinstance(e.value, SamplingParameterError) and isinstance(e.value, ValueError)
    assert_same_as_fresh(engine, fresh)


def test_stream_refuses_the_same(engine, fresh):
    """``stream`` runs the same checks at its first ``next``, with the same errors; an
    abandoned stream between them leaves nothing behind."""
    for kwargs, param, code in BAD_PARAMS:
        with pytest.raises(InvalidParameterError) as e:
            call(engine, "stream", PROMPT, kwargs)
        assert (e.value.param, e.value.code) == (param, code)
    for prompt, code, match in BAD_PROMPTS:
        with pytest.raises(InvalidParameterError, match=match):
            call(engine, "stream", prompt, {})
    half = engine.stream("w40 w41", max_new_tokens=30, temperature=1.0, seed=3)
    next(half)
    half.close()
    assert_same_as_fresh(engine, fresh, sampled=True)


# ---------------------------------------------------------------------------- prompts
BAD_PROMPTS = [
    (None, "missing_required_parameter", "required"),
    ([5.0, 6], "invalid_type", r"prompt\[0\].*float"),
    ([5, 6.7], "invalid_type", r"prompt\[1\].*float"),
    ([True, 5], "invalid_type", r"prompt\[0\].*bool"),
    ([5, None], "invalid_type", r"prompt\[1\].*None"),
    (["w5", "w6"], "invalid_type", r"prompt\[0\].*str"),
    ([[5, 6]], "invalid_type", r"prompt\[0\].*list"),
    (b"\x05\x06", "invalid_type", "bytes"),
    (bytearray(b"\x05\x06"), "invalid_type", "bytearray"),
    (torch.tensor([5.0, 6.0]), "invalid_type", "float32 tensor"),
    (torch.tensor([True, False]), "invalid_type", "torch.bool tensor"),
    (torch.tensor([[5, 6], [7, 8]]), "invalid_value", r"shape \[2, 2\]"),
    (np.array([5.0, 6.0]), "invalid_type", "float64 tensor"),
    (5, "invalid_type", "int"),
    ({5, 6}, "invalid_type", "set"),
    ([5, 64], "invalid_value", r"prompt\[1\] = 64.*\[0, 64\)"),
    ([-1, 5], "invalid_value", r"prompt\[0\] = -1"),
    ([5, 2**70], "invalid_value", r"prompt\[1\]"),
    ("w5 \ud800 w6", "invalid_value", "not valid Unicode"),
    ("", "invalid_value", "empty"),
    ([], "invalid_value", "empty"),
]


@pytest.mark.parametrize("prompt,code,match", BAD_PROMPTS, ids=[repr(p)[:30] for p, _, _ in BAD_PROMPTS])
def test_bad_prompt_is_named(engine, fresh, prompt, code, match):
    with pytest.raises(InvalidParameterError, match=match) as e:
        call(engine, "generate", prompt, {})
    assert e.value.param == "prompt" and e.value.code == code
    assert "prompt" in str(e.value)
    assert_same_as_fresh(engine, fresh)


def test_equivalent_prompts_and_seeds_are_accepted(engine, fresh):
    """What is an integer without coercion is taken: numpy ints, tuples, [1, n] tensors, the
    generator's full seed range."""
    ids = [5, 6, 7]
    want = engine.generate(ids, max_new_tokens=N_NEW).token_ids
    assert want == fresh["greedy"].token_ids        # the tiny tokenizer: "w5 w6 w7" is [5, 6, 7]
    for same in (tuple(ids), np.array(ids), np.array(ids, dtype=np.int32), torch.tensor([ids]),
                 [np.int64(i) for i in ids], torch.tensor(ids, dtype=torch.int16)):
        assert engine.generate(same, max_new_tokens=N_NEW).token_ids == want
    for seed in (0, 2**64 - 1, np.uint64(2**64 - 1), np.int32(7)):
        a = engine.generate(ids, max_new_tokens=N_NEW, temperature=1.0, seed=seed).token_ids
        b = engine.generate(ids, max_new_tokens=N_NEW, temperature=1.0, seed=int(seed)).token_ids
        assert a == b
    assert engine.generate(ids, max_new_tokens=N_NEW, temperature=np.float32(0.8), top_p=0.9,
                           seed=7).token_ids == fresh["sampled"].token_ids
    # The smallest positive temperature allowed samples without NaN.
    got = engine.generate(ids, max_new_tokens=N_NEW, temperature=params.MIN_TEMPERATURE, seed=1).token_ids
    assert got == want      # at 1e-5 the sampled distribution is the argmax
    assert_same_as_fresh(engine, fresh, sampled=True)


def test_same_message_on_every_surface():
    """The API, the CLI and the server call one function per parameter: only the name differs."""
    for check, value in ((params.check_temperature, float("inf")), (params.check_seed, 2**64),
                         (params.check_top_p, 1.5), (params.check_max_new_tokens, 2.0)):
        msgs = []
        for name in ("x", "--x", "x_y"):
            with pytest.raises(InvalidParameterError) as e:
                check(value, name)
            msgs.append(str(e.value).replace(name, "NAME", 1))
        assert len(set(msgs)) == 1, msgs


def test_text_byte_limit():
    limit = params.text_byte_limit(100, longest_token_bytes=81)
    assert limit == 8100
    params.check_text_bytes("x" * limit, limit)
    for text in ("x" * (limit + 1), "\u00e9" * (limit // 2 + 1), "\U0001f600" * limit):
        with pytest.raises(Exception, match="bytes of text") as e:
            params.check_text_bytes(text, limit)
        assert type(e.value).__name__ == "ContextLengthError"
    assert params.text_byte_limit(100, 3) == 100 * params.MIN_BYTES_PER_TOKEN_BOUND


def test_load_model_max_len_must_be_an_int(tmp_path):
    from hf_models import make_hf_model

    make_hf_model("llama", tmp_path)
    for bad in ("64", 64.0, True, 0, -1):
        with pytest.raises(ValueError, match="max_len"):
            load_model(tmp_path, device="cpu", max_len=bad)
    assert load_model(tmp_path, device="cpu", max_len=64).max_len == 64
    assert load_model(tmp_path, device="cpu", max_len_cap=100).max_len == 100    # context is 256
