"""What a slow, careless or hostile HTTP client meets before the application sees its request.

``RequestGuard`` (an ASGI middleware, outermost):
- the API key is checked from the headers, before a byte of the body is read (FastAPI would
  read and parse the body before any dependency runs);
- headers over ``max_header_bytes`` in total are a 431 (h11 bounds only a head that arrives
  in several reads);
- ``Content-Length`` over the limit is a 413 at once; a chunked body is cut at the limit (413);
- the whole body must arrive within ``body_timeout`` seconds of the headers, however it
  trickles in (a deadline per request, not per read): else 408;
- every answer it gives is JSON and closes the connection (the unread body would otherwise be
  taken for the next request, or keep the connection busy);
- a response the client does not read within ``send_timeout`` seconds per write is abandoned.

``GuardedH11Protocol`` (uvicorn's h11 protocol, extended):
- a request's line and headers must arrive within ``head_timeout`` seconds of its first byte
  (of the connection, for the first request): else 408 and close. uvicorn bounds only the idle
  time between requests, so a client sending a header byte every few seconds would otherwise
  hold its connection for ever;
- more than ``max_connections`` open connections (or running requests): a JSON 503 instead of
  uvicorn's text one;
- malformed requests (bad request line, ``Content-Length: -1``, headers over the limit) get a
  JSON 400 instead of uvicorn's text one.
"""
from __future__ import annotations

import hmac
import http
import json
from typing import Optional

import anyio
import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .error_map import APIError

MAX_BODY_BYTES = 8 * 2**20
MAX_HEADER_BYTES = 16 * 2**10
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
SEND_TIMEOUT = 60.0
PUBLIC_PATHS = ("/health",)


class ClientTooSlow(Exception):
    """A response write waited longer than ``send_timeout`` for the client to read."""


def json_error_bytes(err: APIError) -> bytes:
    return json.dumps({"error": {"message": err.message, "type": err.type, "param": err.param,
                                 "code": err.code}}).encode()


async def send_json(send, status: int, body: bytes, headers: Optional[dict] = None, close: bool = False) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_api_error(send, err: APIError, close: bool = False) -> None:
    headers = dict(err.headers)
    if err.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    await send_json(send, err.status, json_error_bytes(err), headers, close)


class _Replay:
    """``receive`` for the application: the buffered body once, then the real channel (which
    reports the client's disconnect)."""

    def __init__(self, body: bytes, receive):
        self.body, self.receive, self.done = body, receive, False

    async def __call__(self):
        if not self.done:
            self.done = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await self.receive()


class _ClientLeft(Exception):
    pass


class RequestGuard:
    """ASGI middleware: API key, body size and deadline, slow readers (module docstring)."""

    def __init__(self, app, api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES,
                 body_timeout: float = BODY_TIMEOUT, send_timeout: float = SEND_TIMEOUT,
                 public_paths: tuple = PUBLIC_PATHS, max_header_bytes: int = MAX_HEADER_BYTES):
        self.app, self.api_key, self.max_header_bytes = app, api_key or None, max_header_bytes
        self.max_body_bytes, self.body_timeout, self.send_timeout = max_body_bytes, body_timeout, send_timeout
        self.public_paths = public_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, size = {}, 0
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
            size += len(k) + len(v) + 4
        try:
            if size > self.max_header_bytes:     # h11's own bound applies only to a head split across reads
                raise APIError(431, f"request headers of {size} bytes exceed the {self.max_header_bytes}-byte limit",
                               code="request_header_fields_too_large")
            if scope["path"].rstrip("/") not in self.public_paths:
                self._check_key(headers)
            body = await self._read_body(receive, headers)
        except APIError as e:
            return await send_api_error(send, e, close=True)
        except _ClientLeft:
            return

        async def timed_send(message):
            try:
                with anyio.fail_after(self.send_timeout):
                    await send(message)
            except TimeoutError:
                raise ClientTooSlow(f"the client read nothing for {self.send_timeout:g} s") from None

        try:
            await self.app(scope, _Replay(body, receive), timed_send)
        except ClientTooSlow:
            return      # the response is abandoned; uvicorn closes the connection

    def _check_key(self, headers: dict) -> None:
        if self.api_key is None:
            return
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           type_="invalid_request_error", code="invalid_api_key")

    async def _read_body(self, receive, headers: dict) -> bytes:
        length = headers.get("content-length")
        if length is not None:
            # h11 has already refused anything but digits (a malformed request: 400).
            try:
                declared = int(length)
            except ValueError:
                raise APIError(400, f"bad Content-Length {length!r}", code="invalid_request") from None
            if declared > self.max_body_bytes:
                raise _too_large(declared, self.max_body_bytes)
        chunks, n = [], 0
        try:
            with anyio.fail_after(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientLeft
                    chunk = message.get("body", b"")
                    n += len(chunk)
                    if n > self.max_body_bytes:
                        raise _too_large(n, self.max_body_bytes, at_least=True)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            got = f"{n} of {length} bytes" if length is not None else f"{n} bytes"
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s (got {got})",
                           code="request_timeout") from None


def _too_large(n: int, limit: int, at_least: bool = False) -> APIError:
    return APIError(413, f"request body of {'at least ' if at_least else ''}{n} bytes exceeds the {limit}-byte limit",
                    code="request_too_large")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head, a JSON connection limit
    and JSON answers to malformed requests. Configure by subclassing (``protocol_class``)."""

    head_timeout: float = HEAD_TIMEOUT
    max_connections: Optional[int] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_timer = None
        self.limit_concurrency = None           # ours, below: the same bound with a JSON 503
        if self.max_connections is not None:
            self.app = self._limited(self.app)

    def _limited(self, app):
        async def limited(scope, receive, send):
            limit = self.max_connections
            if len(self.connections) > limit or len(self.tasks) > limit:
                err = APIError(503, f"the server holds its limit of {limit} connections; retry later",
                               type_="server_error", code="too_many_connections", headers={"Retry-After": "1"})
                return await send_api_error(send, err, close=True)
            return await app(scope, receive, send)
        return limited

    # --------------------------------------------------------------- the head deadline
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()              # the first byte of a kept-alive connection's next request
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._write_and_close(APIError(408, f"the request line and headers did not arrive within "
                                                f"{self.head_timeout:g} s", code="request_timeout"))

    # --------------------------------------------------------------- JSON instead of text
    def send_400_response(self, msg: str) -> None:
        self._write_and_close(APIError(
            400, f"malformed HTTP request (request line, headers over {MAX_HEADER_BYTES // 1024} KiB, or a "
                 f"Content-Length that is not a non-negative integer)", code="invalid_request"))

    def _write_and_close(self, err: APIError) -> None:
        body = json_error_bytes(err)
        head = (f"HTTP/1.1 {err.status} {http.HTTPStatus(err.status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()


def protocol_class(head_timeout: float = HEAD_TIMEOUT, max_connections: Optional[int] = None) -> type:
    """A GuardedH11Protocol subclass with these limits (uvicorn builds one protocol per connection)."""
    return type("SpecExecH11Protocol", (GuardedH11Protocol,),
                {"head_timeout": head_timeout, "max_connections": max_connections})
