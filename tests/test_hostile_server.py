"""Hostile clients against the HTTP server: every error a JSON answer with the right status and
the parameter named, nothing a client sends can hold a connection or the engine unboundedly, one
client address cannot starve the others, and a normal request right after still gets the
target's own greedy text.

Covered: deeply nested JSON; the API key checked before the body is read; seeds out of range and
silent coercions; slow or short bodies and heads, ``Content-Length: -1``, methods,
disconnects, absolute-form targets; the connection limits, per client address too, and a
slowloris attack; huge text prompts refused before tokenizing, and tokenizing never blocking
other requests; chat messages and template errors.

No test waits on a sleep or a wall-clock window: each waits on an event (an answer, a gate
the test opens, the server's connection counts, the worker's counters). The only paced sends
are the slow clients themselves.
"""
from __future__ import annotations

import asyncio
import copy
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
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
MAX_BODY = 2**20
SLOWLORIS = os.path.join(os.path.dirname(__file__), "slowloris.py")
ATTACK_SECONDS = 20.0
OTHER_ADDRESS = "127.0.0.2"      # Linux routes all of 127/8 to loopback: a second local client address


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


def raw(server, method, path, body=None, headers=None, raw_body: bytes | None = None, source: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT,
                                      source_address=(source, 0) if source else None)
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


def assert_serves_correctly(server, reference, prompt="w9 w8 w7", n=6, source=None):
    status, body = raw(server, "POST", "/v1/completions",
                       {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0}, source=source)
    assert status == 200, body
    assert body["choices"][0]["text"] == reference(prompt, n).text


def completion(prompt="w1 w2", **kw) -> bytes:
    return json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4, **kw}).encode()


def post_head(length, extra: bytes = b"") -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %s\r\n%s\r\n" % (str(length).encode(), extra))


# ------------------------------------------------------------------- nesting and the key
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
    # The body deadline is far beyond the read timeout: an answer that waited for the body
    # would never come.
    with running(engine, api_key="s3cret", body_timeout=10 * TIMEOUT) as srv:
        # A declared 900 KiB body that never comes: the 401 comes without it, and the server closes.
        sock = send_raw(srv, post_head(900 * 1024))
        status, headers, body = read_answer(sock)
        assert_error(status, body, 401, code="invalid_api_key")
        assert headers.get("connection") == "close"
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
        # An absolute-form target is judged by its path: /health is public, /v1/... is not.
        assert raw(srv, "GET", "http://example.com/health") == (200, {"status": "ok"})
        status, resp = raw(srv, "POST", "http://example.com/v1/completions", {"model": "tiny", "prompt": "w1"})
        assert_error(status, resp, 401, code="invalid_api_key")
        status, resp = raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": "w5 w6", "max_tokens": 4,
                                                           "temperature": 0}, {"Authorization": "Bearer s3cret"})
        assert status == 200 and resp["choices"][0]["text"] == reference("w5 w6", 4).text


# ----------------------------------------------------------------------------- parameters
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
    ('"stop": "w1 \\ud800"', "stop", params.check_stop, "w1 \ud800"),     # lone surrogates, as in prompts
    ('"stop": ["w1", "\\udfff"]', "stop", params.check_stop, ["w1", "\udfff"]),
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


# ---------------------------------------------------------------- slow and malformed clients
class Trickle:
    """Sends ``data`` one byte per ``pace`` seconds on ``sock`` from a thread (a slow client),
    counting the bytes sent, until all are sent, a send fails or ``stop()``."""

    def __init__(self, sock: socket.socket, data: bytes, pace: float):
        self.sock, self.data, self.pace = sock, data, pace
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        for byte in self.data:
            if self._stop.wait(self.pace):
                return
            try:
                self.sock.send(bytes([byte]))
            except OSError:
                return
            self.sent += 1

    def stop(self):
        self._stop.set()
        self._thread.join(TIMEOUT)


def test_slow_head_is_cut_off_while_others_are_served(server, reference):
    """One header byte every 0.25 s: a 408 for the head while it is still incomplete (the
    deadline counts from its first byte, not per byte), while a normal request on another
    connection completes; a connection that sends nothing is closed the same way."""
    head = post_head(20)
    sock = send_raw(server)
    silent = send_raw(server)
    trickle = Trickle(sock, head, pace=0.25)
    assert_serves_correctly(server, reference)
    try:
        status, headers, body = read_answer(sock)
    finally:
        trickle.stop()
    assert_error(status, body, 408, code="request_timeout")
    assert "headers did not arrive" in body["error"]["message"]
    assert trickle.sent < len(head)          # answered before the head was complete
    status, headers, body = read_answer(silent)
    assert_error(status, body, 408, code="request_timeout")
    sock.close()
    silent.close()


@pytest.mark.parametrize("how", ["trickle", "short"])
def test_slow_or_short_body_is_cut_off(server, reference, how):
    """The body has BODY_TIMEOUT in total, however it trickles in (the 408 comes before the
    trickle ends: a deadline per read would never fire); a Content-Length larger than what is
    sent is the same case."""
    data = completion()
    sock = send_raw(server, post_head(len(data) + (10 if how == "short" else 0)))
    trickle = None
    if how == "short":
        sock.sendall(data)
    else:
        trickle = Trickle(sock, data, pace=0.2)
    try:
        status, headers, body = read_answer(sock)
    finally:
        if trickle is not None:
            trickle.stop()
    assert_error(status, body, 408, code="request_timeout")
    assert "body did not arrive" in body["error"]["message"] and headers.get("connection") == "close"
    if trickle is not None:
        assert trickle.sent < len(data)
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


def kept_alive(server, source: str | None = None) -> http.client.HTTPConnection:
    """A connection that has been served (so the server holds it for sure), left open."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT,
                                      source_address=(source, 0) if source else None)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b'{"status":"ok"}')
    return conn


def test_connection_limit(engine, reference):
    """Beyond max_connections a new connection gets a JSON 503 as it opens (its request, sent
    at once, does not turn the answer into a reset); once the others close, it is served."""
    with running(engine, max_connections=2, keep_alive_timeout=TIMEOUT) as srv:
        idle = [kept_alive(srv), kept_alive(srv)]
        status, resp = raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": "w1"})
        assert_error(status, resp, 503, code="too_many_connections")
        assert "limit of 2 connections" in resp["error"]["message"]
        for conn in idle:
            conn.close()
        assert srv.wait_for_connections(lambda c: not c["open"], TIMEOUT)
        assert_serves_correctly(srv, reference)


class GatedSteps:
    """Wraps ``engine.step``: after each pass that served a request, sets ``passed`` and waits
    for ``release`` (so a test acts while a generation is certainly mid-way)."""

    def __init__(self, engine):
        self.step, self.passed, self.release = engine.step, threading.Event(), threading.Event()
        engine.step = self

    def __call__(self, timeout=None):
        n = self.step(timeout)
        if n:
            self.passed.set()
            self.release.wait(TIMEOUT)
        return n


def test_disconnects_log_no_tracebacks(tok, reference, capfd):
    engine = make_engine(tok)
    gate = GatedSteps(engine)
    with running(engine, max_queue=2) as srv:
        for k, body in enumerate((completion(max_tokens=60, stream=True), completion(max_tokens=60)), start=1):
            gate.passed.clear()
            gate.release.clear()
            sock = send_raw(srv, post_head(len(body)) + body)
            assert gate.passed.wait(TIMEOUT)                # its first pass has run; the engine waits
            sock.close()                                    # mid-generation
            assert srv.worker.wait_for(lambda c: c["cancelled"] == k, TIMEOUT)
            gate.release.set()
            assert srv.worker.idle(TIMEOUT)
        assert srv.counters["completed"] == 0
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

    sent, cancelled = [], []

    async def stuck_send(message):
        sent.append(message["type"])
        if len(sent) == 2:
            try:
                await asyncio.Event().wait()     # the client never reads
            except asyncio.CancelledError:
                cancelled.append(message["type"])
                raise

    async def main():
        # Without the guard's own deadline this would end only at the outer TIMEOUT, as a failure.
        await asyncio.wait_for(guard({"type": "http", "path": "/v1/completions", "headers": []}, receive,
                                     stuck_send), TIMEOUT)

    guard = RequestGuard(app, send_timeout=0.2)
    asyncio.run(main())
    assert sent == ["http.response.start", "http.response.body"] and cancelled == ["http.response.body"]


# ----------------------------------------------------------------------- huge text prompts
def test_huge_text_prompt_is_refused_before_tokenizing(server, reference):
    calls = []
    encode = server.tokens.encode

    async def counting(text):
        calls.append(len(text))
        return await encode(text)

    server.tokens.encode = counting
    try:
        huge = "w5 " * (MAX_BODY // 3 - 100)
        status, resp = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": huge})
        assert_error(status, resp, 400, param="prompt", code="context_length_exceeded")
        assert "bytes" in resp["error"]["message"]
        status, resp = raw(server, "POST", "/v1/chat/completions",
                           {"model": "tiny", "messages": [{"role": "user", "content": huge}]})
        assert_error(status, resp, 400, param="messages", code="context_length_exceeded")
        assert calls == []
        assert_serves_correctly(server, reference)
        assert calls == [len("w9 w8 w7")]
    finally:
        server.tokens.encode = encode


class GatedTokenizer:
    """The tiny tokenizer, holding any text containing SLOW until ``release`` is set (after
    setting ``entered``); deep-copyable like a real one, the copies sharing the two events."""

    def __init__(self, tok, entered: threading.Event, release: threading.Event):
        self.tok, self.entered, self.release = tok, entered, release

    def __call__(self, text, **kw):
        if "SLOW" in text:
            self.entered.set()
            self.release.wait(TIMEOUT)
            text = text.replace("SLOW", "")
        return self.tok(text, **kw)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __deepcopy__(self, memo):
        return GatedTokenizer(copy.deepcopy(self.tok, memo), self.entered, self.release)


def test_tokenizing_blocks_no_other_request(tok, reference):
    """A request stuck in its tokenizer holds no lock: another request is tokenized, generated and
    answered while it is still stuck."""
    entered, release = threading.Event(), threading.Event()
    with running(make_engine(tok), tokenizer=GatedTokenizer(tok, entered, release)) as srv:
        answers = {}

        def post(name, prompt):
            answers[name] = raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2})

        slow = threading.Thread(target=post, args=("slow", "SLOW w5"))
        slow.start()
        try:
            assert entered.wait(TIMEOUT)
            post("fast", "w6 w7")
            assert answers["fast"][0] == 200 and "slow" not in answers
        finally:
            release.set()
        slow.join(TIMEOUT)
        assert answers["slow"][0] == 200
        assert_serves_correctly(srv, reference)


# --------------------------------------------------------------------- request targets
def request_line(server, target: bytes) -> tuple:
    sock = send_raw(server, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
    try:
        status, headers, body = read_answer(sock)
    finally:
        sock.close()
    return status, body


def test_absolute_form_targets_are_served_by_their_path(server, reference):
    """RFC 9112 asks a server to accept an absolute-form target (what a client talking to a
    proxy sends): it is served by its path; a target that is neither a path nor an http(s)
    URI is a 400."""
    port = server.server_address[1]
    for target in (b"http://127.0.0.1:%d/health" % port, b"http://example.com/health", b"HTTPS://x/health?probe=1"):
        assert request_line(server, target) == (200, {"status": "ok"}), target
    status, body = request_line(server, b"http://x")                   # no path: "/"
    assert_error(status, body, 404)
    data = completion("w9 w8 w7", temperature=0, max_tokens=6)
    sock = send_raw(server, post_head(len(data)).replace(b"POST /v1/", b"POST http://example.com/v1/") + data)
    status, headers, body = read_answer(sock)
    sock.close()
    assert status == 200 and body["choices"][0]["text"] == reference("w9 w8 w7", 6).text
    for target in (b"ftp://x/health", b"x.example:80", b"health"):
        status, body = request_line(server, target)
        assert_error(status, body, 400, code="invalid_request")
    assert_serves_correctly(server, reference)


# ---------------------------------------------------------------- one address against the others
@pytest.fixture(scope="module")
def other_address():
    """A second local source address; without one (a kernel that routes only 127.0.0.1) the
    per-address tests cannot tell two clients apart, and are skipped saying so."""
    probe = socket.socket()
    try:
        probe.bind((OTHER_ADDRESS, 0))
    except OSError as e:
        pytest.skip(f"cannot bind {OTHER_ADDRESS} here ({e}); per-address limits need two local addresses")
    finally:
        probe.close()
    return OTHER_ADDRESS


def by_address(counts: dict, address: str = "127.0.0.1") -> tuple:
    """(open, pending heads, parked) of ``address`` in ``server.connections``."""
    return (counts["open"].get(address, 0), counts["pending_heads"].get(address, 0), counts["parked"].get(address, 0))


def test_per_address_limits(engine, reference, other_address):
    """An address with max_client_pending_heads incomplete heads has its next connections parked
    unread, and each is promoted (its request, sent meanwhile, then served) when a place frees;
    one holding max_client_connections gets a 503 as it opens. Another address is served
    throughout."""
    data = completion("w9 w8 w7", temperature=0, max_tokens=6)
    want = reference("w9 w8 w7", 6).text
    with running(engine, max_client_connections=4, max_client_pending_heads=2, head_timeout=TIMEOUT,
                 min_head_timeout=TIMEOUT, keep_alive_timeout=TIMEOUT) as srv:
        held = [send_raw(srv) for _ in range(3)]
        assert srv.wait_for_connections(lambda c: by_address(c) == (3, 2, 1), TIMEOUT), srv.connections
        assert_serves_correctly(srv, reference, source=other_address)
        parked = send_raw(srv, post_head(len(data)) + data)    # its request waits in the kernel, unread
        assert srv.wait_for_connections(lambda c: by_address(c) == (4, 2, 2), TIMEOUT), srv.connections
        for sock in held[:2]:               # each completed head frees a place: the oldest parked one takes it
            sock.sendall(post_head(len(data)) + data)
            status, headers, body = read_answer(sock)
            assert status == 200 and body["choices"][0]["text"] == want
        status, headers, body = read_answer(parked)
        assert status == 200 and body["choices"][0]["text"] == want
        assert srv.wait_for_connections(lambda c: by_address(c) == (4, 1, 0), TIMEOUT), srv.connections
        refused = send_raw(srv, post_head(len(data)) + data)   # a fifth connection of this address
        status, headers, body = read_answer(refused)
        assert_error(status, body, 503, code="too_many_connections")
        assert "client address" in body["error"]["message"] and headers.get("retry-after") == "1"
        assert_serves_correctly(srv, reference, source=other_address)
        for sock in held + [parked, refused]:
            sock.close()
        assert srv.wait_for_connections(lambda c: not c["open"] and not c["lingering"], TIMEOUT), srv.connections
        counters = srv.connections["counters"]
        assert counters["parked"] == 2 and counters["refused"] == 1 and counters["head_timeouts"] == 0


@pytest.mark.slow
def test_slowloris_does_not_starve_other_addresses(tok, reference, other_address):
    """One local address holds 80 partial request heads and reopens each one the server closes,
    for ATTACK_SECONDS, against the server's default limits; legitimate requests from another
    address meanwhile get at least 90% 200s (the attacker runs in its own process, as one
    would)."""
    with serve(make_engine(tok)) as srv:
        port = srv.server_address[1]
        attacker = subprocess.Popen([sys.executable, SLOWLORIS, "127.0.0.1", str(port), "--n", "80", "--seconds",
                                     str(ATTACK_SECONDS)], stdout=subprocess.PIPE, text=True)
        try:
            assert srv.wait_for_connections(lambda c: sum(by_address(c)[1:]) >= 64, TIMEOUT), srv.connections
            statuses = []
            while attacker.poll() is None:
                try:
                    statuses.append(raw(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": "w9 w8 w7",
                                                                         "max_tokens": 6, "temperature": 0},
                                        source=other_address)[0])
                except OSError as e:
                    statuses.append(type(e).__name__)
            attack = json.loads(attacker.communicate(timeout=TIMEOUT)[0])
        finally:
            if attacker.poll() is None:
                attacker.kill()
        counters = srv.connections["counters"]
        assert attack["max_open"] == 80 and attack["closed_by_server"] > 0 and counters["head_timeouts"] > 0
        assert len(statuses) >= 5 and statuses.count(200) >= 0.9 * len(statuses), statuses
        assert_serves_correctly(srv, reference)


# ------------------------------------------------------------------------- chat messages
def chat_text(server, messages) -> tuple:
    status, body = raw(server, "POST", "/v1/chat/completions",
                       {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0})
    return status, (body["choices"][0]["message"]["content"] if status == 200 else body)


def test_chat_text_parts_and_template_errors(engine, tok, server, reference):
    """Content as text parts is the joined text; a template that refuses the messages is a 400
    naming the message it fails on (the engine API's check and error, word for word)."""
    as_string = chat_text(server, [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3"}])
    as_parts = chat_text(server, [{"role": "developer", "content": [{"type": "text", "text": "w1 "},
                                                                     {"type": "text", "text": "w2"}]},
                                  {"role": "user", "content": [{"type": "text", "text": "w3"}]}])
    assert as_string[0] == 200 and as_parts == as_string
    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                            "{{ raise_exception('this model takes no assistant turns') }}{% endif %}w1 {% endfor %}")
    with running(engine, tokenizer=strict) as srv:
        messages = [{"role": "user", "content": "w5"}, {"role": "user", "content": "w6"},
                    {"role": "assistant", "content": "w7"}, {"role": "user", "content": "w8"}]
        status, body = chat_text(srv, messages)
        assert_error(status, body, 400, param="messages[2]", code="chat_template_error")
        assert "no assistant turns" in body["error"]["message"]
        assert_serves_correctly(srv, reference)
