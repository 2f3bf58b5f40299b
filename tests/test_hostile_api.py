"""Hostile input at the Python API: every bad request parameter gets an InvalidParameterError
that names it (no silent coercion, no bare ValueError/TypeError/IndexError), and the engine then
still gives exactly what a fresh engine gives.

Covered: seeds outside the generator's range or of the wrong type; silent coercions and
unnamed parameters (float/bool/bytes/None token ids, ``temperature=inf``, ``prompt=None``,
``stop=123``, ``temperature="abc"``, ``max_len="64"``); lone surrogates in prompts and stop
strings; batches (a bare string, one bad prompt among good ones: nothing is left queued);
chat messages (missing or mistyped roles and content, text parts, template errors).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from specexec_rt import (ChatTemplateError, ContextLengthError, InvalidParameterError, ModelLoadError,
                         SamplingParameterError, load_model)
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
    (dict(stop="w9 \ud800"), "stop", "invalid_value"),           # lone surrogates, refused as in prompts
    (dict(stop=["w9", "\udcff"]), "stop", "invalid_value"),
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


def test_empty_model_source_is_refused(tmp_path, monkeypatch):
    """``load_model("")`` would read the current directory (Path("") is "."): refused by name."""
    from hf_models import make_hf_model

    make_hf_model("llama", tmp_path)
    monkeypatch.chdir(tmp_path)         # a loadable checkpoint right here: "" must still not mean it
    for empty in ("", "   "):
        with pytest.raises(ModelLoadError, match="empty"):
            load_model(empty, device="cpu")


# ------------------------------------------------------------------------- batches
def assert_nothing_pending(engine):
    assert engine.pending_requests == (0, 0)


BAD_BATCHES = [
    # (prompts, kwargs, param named, error code)
    ("w5 w6", {}, "prompts", "invalid_type"),                    # a str is not split into characters
    (b"w5 w6", {}, "prompts", "invalid_type"),
    ([5, 6, 7], {}, "prompts", "invalid_type"),                  # one list of ids, not a batch
    (torch.tensor([5, 6, 7]), {}, "prompts", "invalid_type"),
    ({"w5", "w6"}, {}, "prompts", "invalid_type"),               # no order
    (None, {}, "prompts", "missing_required_parameter"),
    (["w5 w6", [5, 64], "w7"], {}, "prompts[1]", "invalid_value"),
    (["w5 w6", "w7 \ud800"], {}, "prompts[1]", "invalid_value"),
    (["w5 w6", ""], {}, "prompts[1]", "invalid_value"),
    (["w5 w6", "   "], {}, "prompts[1]", "invalid_value"),        # empty once tokenized
    (["w5 w6", "w7"], dict(temperature=float("inf")), "temperature", "invalid_value"),
    (["w5 w6", "w7"], dict(stop=["w9", "\ud800"]), "stop", "invalid_value"),
    (["w5 w6", "w7"], dict(seed=2**64 - 1, temperature=1.0), "seed", "invalid_value"),   # seed + 1 overflows
]


@pytest.mark.parametrize("prompts,kwargs,param,code", BAD_BATCHES, ids=[repr(b[:2])[:40] for b in BAD_BATCHES])
def test_bad_batch_queues_nothing(engine, fresh, prompts, kwargs, param, code):
    """Every prompt and parameter is checked before any request is queued: a bad one among good
    ones leaves the engine with nothing pending, and it serves the next request as a fresh one."""
    with pytest.raises(InvalidParameterError) as e:
        engine.generate_batch(prompts, max_new_tokens=N_NEW, **kwargs)
    assert (e.value.param, e.value.code) == (param, code), str(e.value)
    assert str(e.value).startswith(param.split("[")[0]), str(e.value)
    assert_nothing_pending(engine)
    assert_same_as_fresh(engine, fresh)


def test_batch_too_long_for_the_context_queues_nothing(engine, fresh):
    with pytest.raises(ContextLengthError, match=r"^prompts\[2\]: prompt \(1\d\d\)"):
        engine.generate_batch(["w5 w6", "w7", "w1 " * 120], max_new_tokens=N_NEW)
    assert_nothing_pending(engine)
    assert_same_as_fresh(engine, fresh)


def test_batch_interrupted_while_waiting_leaves_nothing_pending(engine, fresh, monkeypatch):
    """Ctrl-C while waiting for a batch cancels its requests: none is left to run unwatched."""
    def interrupted(req):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.generate_batch(["w5 w6", "w7 w8", "w9"], max_new_tokens=N_NEW)
    monkeypatch.undo()
    assert_nothing_pending(engine)
    assert_same_as_fresh(engine, fresh)


def test_batch_accepts_any_sequence_of_prompts(engine, fresh):
    want = [fresh["greedy"].token_ids, engine.generate([7, 8], max_new_tokens=N_NEW).token_ids]
    for prompts in ([PROMPT, [7, 8]], (PROMPT, [7, 8]), (p for p in [PROMPT, [7, 8]]), [PROMPT, torch.tensor([7, 8])]):
        assert [r.token_ids for r in engine.generate_batch(prompts, max_new_tokens=N_NEW)] == want
    assert engine.generate_batch([], max_new_tokens=N_NEW) == []
    one_token = engine.generate_batch(torch.tensor([[7], [8]]), max_new_tokens=2)          # [B, 1]: B prompts
    assert [r.token_ids for r in one_token] == [engine.generate([t], max_new_tokens=2).token_ids for t in (7, 8)]
    seeded = engine.generate_batch([PROMPT, PROMPT], max_new_tokens=N_NEW, temperature=0.8, top_p=0.9, seed=6)
    assert seeded[1].token_ids == fresh["sampled"].token_ids        # request i is seeded with seed + i
    assert_nothing_pending(engine)


# ---------------------------------------------------------------------- chat messages
BAD_MESSAGES = [
    # (messages, param named, error code)
    ([{"role": "user"}], "messages[0].content", "missing_required_parameter"),
    ([{"role": "user", "content": None}], "messages[0].content", "missing_required_parameter"),
    ([{"content": "w5"}], "messages[0].role", "missing_required_parameter"),
    ([{"role": 5, "content": "w5"}], "messages[0].role", "invalid_type"),
    ([{"role": "user", "content": "w5"}, {"role": "wizard", "content": "w6"}], "messages[1].role", "invalid_value"),
    ([{"role": "user", "content": 5}], "messages[0].content", "invalid_type"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content",
     "unsupported_value"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content", "unsupported_value"),
    ([{"role": "user", "content": "w5 \ud800"}], "messages[0].content", "invalid_value"),
    ([{"role": "user", "content": [{"type": "text", "text": "\udcff"}]}], "messages[0].content", "invalid_value"),
    ([{"role": "user", "content": ""}], "messages", "invalid_value"),
    (["w5"], "messages[0]", "invalid_type"),
    ("w5", "messages", "invalid_type"),
    ({"role": "user", "content": "w5"}, "messages", "invalid_type"),
    ([], "messages", "invalid_value"),
    (None, "messages", "missing_required_parameter"),
]


@pytest.mark.parametrize("messages,param,code", BAD_MESSAGES, ids=[repr(m)[:40] for m, _, _ in BAD_MESSAGES])
def test_bad_chat_messages_are_named(engine, fresh, messages, param, code):
    """Checked before the template sees them: the package's error naming the message and field,
    never the template engine's UndefinedError or a TypeError."""
    with pytest.raises(InvalidParameterError) as e:
        engine.apply_chat_template(messages)
    assert (e.value.param, e.value.code) == (param, code), str(e.value)
    assert str(e.value).startswith(param), str(e.value)
    assert_same_as_fresh(engine, fresh)


def test_chat_text_parts_render_as_their_text(engine):
    """Content as a list of text parts (OpenAI's form) renders as the joined text; developer is
    system; other fields are dropped."""
    as_string = engine.apply_chat_template([{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3"}])
    as_parts = engine.apply_chat_template(
        [{"role": "developer", "content": [{"type": "text", "text": "w1 "}, {"type": "text", "text": "w2"}]},
         {"role": "user", "content": [{"type": "text", "text": "w3"}], "name": "someone"}])
    assert as_parts == as_string


def test_chat_template_errors_name_the_message(tok, fresh):
    """A template that refuses the messages raises ChatTemplateError naming the first message it
    fails on, found in log2(n) renders however long the conversation; no template at all is
    the same error."""
    import copy

    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and m['content'] == 'w9' %}"
                            "{{ raise_exception('no w9 from the assistant') }}{% endif %}w1 {% endfor %}")
    engine = Engine(build_tiny_model(seed=0, max_len=MAX_LEN), None, method="autoregressive", tokenizer=strict)
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "w5"} for i in range(2000)]
    messages[1235] = {"role": "assistant", "content": "w9"}
    renders = []
    render = strict.apply_chat_template

    def counting(*a, **k):
        renders.append(1)
        return render(*a, **k)

    strict.apply_chat_template = counting
    with pytest.raises(ChatTemplateError, match=r"messages\[1235\].*no w9 from the assistant") as e:
        engine.apply_chat_template(messages)
    assert e.value.param == "messages[1235]" and e.value.code == "chat_template_error"
    assert isinstance(e.value, InvalidParameterError) and len(renders) <= 2 + 11      # log2(2000) < 11
    strict.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template") as e:
        engine.apply_chat_template([{"role": "user", "content": "w5"}])
    assert e.value.param == "messages"
    assert engine.generate(PROMPT, max_new_tokens=N_NEW).token_ids == fresh["greedy"].token_ids
