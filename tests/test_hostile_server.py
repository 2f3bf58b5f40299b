"""Hostile clients against the HTTP server: every error a JSON answer with the right status and
the parameter named, nothing a client sends can hold a connection or the engine unboundedly, and
a normal request right after still gets the target's own greedy text.

Covered: deeply nested JSON; the API key checked before the body is read; seeds out of range;
silent coercions; slow or short bodies and heads, ``Content-Length: -1``, methods, disconnects,
the connection limit; huge text prompts refused before tokenizing, and tokenizing never blocking
other requests.
"""
from __future__ import annotations

import asyncio
import copy
import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from conftest import build_tiny_model
from specexec_rt import InvalidParameterError
from specexec_rt.serving.http_guard import RequestGuard
from specexec_rt.speculative import params
from specexec_rt.speculative.engine import Engine
from server_harness import MAX_LEN, TIMEOUT, make_engine
from server_harness import running as serve
from tiny_tokenizer import tiny_tokenizer

HEAD_TIMEOUT = BODY_TIMEOUT = 1.0
SLACK = 4.0             # scheduling slack on a loaded 2-core machine
MAX_BODY = 2**20


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reference(tok):
    engine = Engine(build_tiny_model(seed=0, max_len=MAX_LEN), None, method="autoregressive", tokenizer=tok)
    return lambda prompt, n: engine.generate(prompt, max_new_tokens=n)


@contextmanager
def running(engine, **kw):
    """The shared harness with this module's short head/body timeouts and body limit."""
    kw = {"head_timeout": HEAD_TIMEOUT, "body_timeout": BODY_TIMEOUT, "max_body_bytes": MAX_BODY, **kw}
    with serve(engine, **kw) as server:
        yield server


@pytest.fixture(scope="module")
def engine(tok):
    return make_engine(tok)


@pytest.fixture(scope="module")
def server(engine):
    with running(engine, max_queue=4) as s:
        yield s


def raw(server, method, path, body=None, headers=None, raw_body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    try:
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        return resp.status, (json.loads(text) if text else None)
    finally:
        conn.close()


def send_raw(server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(server.server_address, timeout=TIMEOUT)
    if data:
        sock.sendall(data)
    return sock


def read_answer(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of the answer on a raw socket; the server must then close."""
    sock.settimeout(timeout)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(body)


def assert_error(status, body, want_status, param=None, code=None):
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
        assert param.split("[")[0] in err["message"], err
    if code is not None:
        assert err["code"] == code, err


def assert_serves_correctly(server, reference, prompt="w9 w8 w7", n=6):
    status, body = raw(server, "POST", "/v1/completions",
                       {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["text"] == reference(prompt, n).text


def completion(prompt="w1 w2", **kw) -> bytes:
    return json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4, **kw}).encode()


def post_head(length, extra: bytes = b"") -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %s\r\n%s\r\n" % (str(length).encode(), extra))


# ---------------------------------------------------------------- 3: nesting and the key
@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deeply_nested_json_is_a_400(server, reference, depth):
    for body in (b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}",
                 b'{"prompt": "w1", "x": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}",
                 b"[" * depth):                                     # unclosed, too
        status, resp = raw(server, "POST", "/v1/completions", raw_body=body)
        assert_error(status, resp, 400, code="invalid_json")
        levels = int(resp["error"]["message"].split("nests ")[1].split()[0])
        assert depth <= levels <= depth + 1
    # Brackets inside strings are text, not nesting.
    status, resp = raw(server, "POST", "/v1/completions", raw_body=completion("w5 " + "[{" * 500))
    assert status == 200, resp
    assert_serves_correctly(server, reference)


def test_api_key_is_checked_before_the_body(engine, reference):
    with running(engine, api_key="s3cret") as srv:
        # A declared 900 KiB body that never comes: the 401 comes at once, and the server closes.
        t0 = time.monotonic()
        sock = send_raw(srv, post_head(900 * 1024))
        status, headers, body = read_answer(sock)
        assert_error(status, body, 401, code="invalid_api_key")
        assert time.monotonic() - t0 < BODY_TIMEOUT + SLACK and headers.get("connection") == "close"
        assert sock.recv(1) == b""
        sock.close()
        # No key: no parser messages, however bad the body.
        for bad in (b"{not json", b"[" * 50_000, b"\xff\xfe"):
            status, resp = raw(srv, "POST", "/v1/completions", raw_body=bad)
            assert_error(status, resp, 401, code="invalid_api_key")
        status, resp = raw(srv, "POST", "/v1/completions", raw_body=b"{not json",
                           headers={"Authorization": "Bearer s3cret"})
        assert_error(status, resp, 400, code="invalid_json")
        assert raw(srv, "GET", "/health") == (200, {"status": "ok"})
        status, resp = raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": "w5 w6", "max_tokens": 4,
                                                           "temperature": 0}, {"Authorization": "Bearer s3cret"})
        assert status == 200 and resp["choices"][0]["text"] == reference("w5 w6", 4).text


# ------------------------------------------------------------------- 4 and 7: parameters
def api_message(check, value, name):
    with pytest.raises(InvalidParameterError) as e:
        check(value, name)
    return str(e.value)


BAD_VALUES = [
    # (JSON fragment, parameter, the API's check for it (None: the server's own))
    ('"seed": 18446744073709551616', "seed", params.check_seed, 2**64),
    ('"seed": -1', "seed", params.check_seed, -1),
    ('"seed": 1.5', "seed", params.check_seed, 1.5),
    ('"seed": 1e30', "seed", params.check_seed, 1e30),
    ('"seed": "7"', "seed", params.check_seed, "7"),
    ('"seed": true', "seed", params.check_seed, True),
    ('"temperature": Infinity', "temperature", params.check_temperature, float("inf")),
    ('"temperature": -Infinity', "temperature", params.check_temperature, float("-inf")),
    ('"temperature": "abc"', "temperature", params.check_temperature, "abc"),
    ('"temperature": 1e-9', "temperature", params.check_temperature, 1e-9),
    ('"top_p": NaN', "top_p", None, None),
    ('"top_k": 2.0', "top_k", params.check_top_k, 2.0),
    ('"max_tokens": "5"', "max_tokens", params.check_max_new_tokens, "5"),
    ('"max_tokens": 1e3', "max_tokens", params.check_max_new_tokens, 1e3),
    ('"stop": 123', "stop", params.check_stop, 123),
    ('"stop": [null]', "stop", params.check_stop, [None]),
]


@pytest.mark.parametrize("fragment,param,check,value", BAD_VALUES, ids=[f for f, *_ in BAD_VALUES])
def test_bad_parameter_values(server, fragment, param, check, value):
    body = b'{"model": "tiny", "prompt": "w1 w2", "max_tokens": 4, ' + fragment.encode() + b"}"
    if fragment.startswith('"max_tokens"'):
        body = b'{"model": "tiny", "prompt": "w1 w2", ' + fragment.encode() + b"}"
    status, resp = raw(server, "POST", "/v1/completions", raw_body=body)
    assert_error(status, resp, 400, param=param)
    if check is not None:       # the same words as the Python API
        assert resp["error"]["message"] == api_message(check, value, param)


BAD_PROMPTS = [([5.0, 6], "invalid_type"), ([True, 5], "invalid_type"), ([5, None], "invalid_type"),
               ([5, 2**70], "invalid_value"), ({"ids": [5]}, "invalid_type"), ("w1 \ud800", "invalid_value"),
               ([[5, 6], [7]], "invalid_type")]


@pytest.mark.parametrize("prompt,code", BAD_PROMPTS, ids=[repr(p) for p, _ in BAD_PROMPTS])
def test_bad_prompts(server, prompt, code):
    status, resp = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2})
    assert_error(status, resp, 400, param="prompt", code=code)


def test_valid_edges_and_state_after(server, reference):
    kw = {"model": "tiny", "prompt": "w2 w4", "max_tokens": 8, "temperature": 1.0, "seed": 2**64 - 1}
    a, b = raw(server, "POST", "/v1/completions", kw), raw(server, "POST", "/v1/completions", kw)
    assert a[0] == b[0] == 200 and a[1]["choices"][0]["text"] == b[1]["choices"][0]["text"]
    status, resp = raw(server, "POST", "/v1/chat/completions",
                       {"model": "tiny", "messages": [{"role": "user", "content": "w1 \ud800"}]})
    assert_error(status, resp, 400, param="messages[0].content")
    for options in ({"logit_bias": {"5": 100}}, {"suffix": "w1"}):
        status, resp = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "w1", **options})
        assert_error(status, resp, 400, param=next(iter(options)), code="unsupported_value")
    assert_serves_correctly(server, reference)


# ------------------------------------------------------------ 8: slow and malformed clients
def test_slow_head_is_cut_off_while_others_are_served(server, reference):
    """One header byte every 0.25 s: a 408 within the head deadline, while a normal request on
    another connection completes; a connection that sends nothing is closed the same way."""
    head = post_head(20)
    sock = send_raw(server)
    silent = send_raw(server)
    t0 = time.monotonic()
    done = threading.Event()

    def trickle():
        for byte in head:
            if done.is_set():
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.25)

    threading.Thread(target=trickle, daemon=True).start()
    assert_serves_correctly(server, reference)
    try:
        status, headers, body = read_answer(sock)
    finally:
        done.set()
    assert_error(status, body, 408, code="request_timeout")
    assert time.monotonic() - t0 < HEAD_TIMEOUT + SLACK
    status, headers, body = read_answer(silent)
    assert_error(status, body, 408, code="request_timeout")
    sock.close()
    silent.close()


@pytest.mark.parametrize("how", ["trickle", "short"])
def test_slow_or_short_body_is_cut_off(server, reference, how):
    """The body has BODY_TIMEOUT in total, however it trickles in; a Content-Length larger than
    what is sent is the same case."""
    data = completion()
    sock = send_raw(server, post_head(len(data) + (10 if how == "short" else 0)))
    t0 = time.monotonic()
    if how == "short":
        sock.sendall(data)
    else:
        def trickle():
            for byte in data:
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)
        threading.Thread(target=trickle, daemon=True).start()
    status, headers, body = read_answer(sock)
    assert_error(status, body, 408, code="request_timeout")
    assert time.monotonic() - t0 < BODY_TIMEOUT + SLACK and headers.get("connection") == "close"
    sock.close()
    assert_serves_correctly(server, reference)


MALFORMED = [(b"Content-Length: -1\r\n", 400), (b"Content-Length: abc\r\n", 400),
             (b"Content-Length: 5\r\nContent-Length: 7\r\n", 400), (b"Bad Header\r\n", 400),
             (b"X-Big: " + b"a" * 20_000 + b"\r\n", 431), (b"X-Huge: " + b"a" * 2**20 + b"\r\n", 400)]


@pytest.mark.parametrize("header,want", MALFORMED, ids=[h[:20].decode() for h, _ in MALFORMED])
def test_malformed_requests_get_json_errors(server, reference, header, want):
    sock = send_raw(server)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n{}")
    except OSError:             # the server may answer and close before the huge head is sent
        pass
    status, headers, body = read_answer(sock)
    assert_error(status, body, want)
    assert body["error"]["code"] in ("invalid_request", "request_header_fields_too_large")
    sock.close()
    assert_serves_correctly(server, reference)


def test_methods_and_routes_answer_json(server):
    for method, path, want in (("OPTIONS", "/v1/completions", 405), ("PATCH", "/v1/completions", 405),
                               ("DELETE", "/v1/chat/completions", 405), ("PUT", "/v1/models", 405),
                               ("GET", "/v1/completions", 405), ("OPTIONS", "/nothing", 404),
                               ("GET", "/v1/models/nope", 404), ("POST", "/v1/embeddings", 404)):
        status, resp = raw(server, method, path)
        assert_error(status, resp, want)


def test_body_limits(server, reference):
    sock = send_raw(server, post_head(MAX_BODY + 1))           # declared: refused before reading
    status, headers, body = read_answer(sock)
    assert_error(status, body, 413, code="request_too_large")
    sock.close()
    chunk = b"x" * 65536
    sock = send_raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(MAX_BODY // len(chunk) + 2):             # chunked: cut at the limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass
    status, headers, body = read_answer(sock)
    assert_error(status, body, 413, code="request_too_large")
    sock.close()
    assert_serves_correctly(server, reference)


def test_connection_limit(engine, reference):
    with running(engine, max_connections=2, head_timeout=30.0) as srv:
        idle = [send_raw(srv), send_raw(srv)]
        time.sleep(0.2)
        status, resp = raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": "w1"})
        assert_error(status, resp, 503, code="too_many_connections")
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert_serves_correctly(srv, reference)


def test_disconnects_log_no_tracebacks(tok, reference, capfd):
    with running(make_engine(tok), max_queue=2) as srv:
        for body in (completion(max_tokens=60, stream=True), completion(max_tokens=60)):
            sock = send_raw(srv, post_head(len(body)) + body)
            time.sleep(0.3)
            sock.close()                                    # mid-generation
        sock = send_raw(srv, post_head(100) + b'{"prompt"')
        sock.close()                                        # mid-body
        assert srv.worker.idle(TIMEOUT)
        assert_serves_correctly(srv, reference)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "BrokenPipe" not in out + err


def test_slow_reader_is_abandoned():
    """A response write that waits longer than send_timeout ends the request (RequestGuard,
    driven directly: a loopback socket buffer is too large to fill from a test)."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    sent = []

    async def stuck_send(message):
        sent.append(message["type"])
        if len(sent) == 2:
            await asyncio.sleep(3600)        # the client never reads

    guard = RequestGuard(app, send_timeout=0.2)
    t0 = time.monotonic()
    asyncio.run(guard({"type": "http", "path": "/v1/completions", "headers": []}, receive, stuck_send))
    assert time.monotonic() - t0 < 0.2 + SLACK and sent == ["http.response.start", "http.response.body"]


# ----------------------------------------------------------------- 9: huge text prompts
def test_huge_text_prompt_is_refused_before_tokenizing(server, reference):
    calls = []
    encode = server.tokens.encode

    async def counting(text):
        calls.append(len(text))
        return await encode(text)

    server.tokens.encode = counting
    try:
        huge = "w5 " * (MAX_BODY // 3 - 100)
        t0 = time.monotonic()
        status, resp = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": huge})
        assert_error(status, resp, 400, param="prompt", code="context_length_exceeded")
        assert "bytes" in resp["error"]["message"] and time.monotonic() - t0 < SLACK + 2
        status, resp = raw(server, "POST", "/v1/chat/completions",
                           {"model": "tiny", "messages": [{"role": "user", "content": huge}]})
        assert_error(status, resp, 400, param="messages", code="context_length_exceeded")
        assert calls == []
        assert_serves_correctly(server, reference)
        assert calls == [len("w9 w8 w7")]
    finally:
        server.tokens.encode = encode


class SlowTokenizer:
    """The tiny tokenizer, taking 3 s for any text containing SLOW (deep-copyable like a real one)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, **kw):
        if "SLOW" in text:
            time.sleep(3.0)
            text = text.replace("SLOW", "")
        return self.tok(text, **kw)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __deepcopy__(self, memo):
        return SlowTokenizer(copy.deepcopy(self.tok, memo))


def test_tokenizing_blocks_no_other_request(tok, reference):
    """A request stuck in its tokenizer holds no lock: another request is tokenized, generated and
    answered meanwhile."""
    with running(make_engine(tok), tokenizer=SlowTokenizer(tok)) as srv:
        finished = {}

        def post(name, prompt):
            raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2})
            finished[name] = time.monotonic()

        slow = threading.Thread(target=post, args=("slow", "SLOW w5"))
        slow.start()
        time.sleep(0.3)
        post("fast", "w6 w7")
        slow.join(TIMEOUT)
        assert finished["fast"] < finished["slow"]
        assert_serves_correctly(srv, reference)
