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
- connections are counted per client address (``client_limits.ClientTable``): beyond
  ``max_connections`` in all, or ``max_client_connections`` from one address, a new connection
  gets a JSON 503 as it opens (then a graceful close);
- a request's line and headers must arrive within the head deadline of its first byte (of the
  connection, for the first request): else 408 and close. uvicorn bounds only the idle time
  between requests, so a client sending a header byte every few seconds would otherwise hold
  its connection for ever. The deadline is ``head_timeout`` and shortens under pressure (to
  ``min_head_timeout``); beyond ``max_client_pending_heads`` incomplete heads from one
  address, a connection is parked unread until one of them completes or times out;
- malformed requests (bad request line, ``Content-Length: -1``, headers over the limit) get a
  JSON 400 instead of uvicorn's text one.

``RequestGuard`` also serves an absolute-form request target (``POST http://host/v1/...``, which
RFC 9112 requires a server to accept) by its path, and refuses other non-path targets with 400.
"""
from __future__ import annotations

import hmac
import http
import json
import re
from typing import Optional
from urllib.parse import unquote

import anyio
import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .client_limits import ClientTable, ConnectionLimits, client_key
from .error_map import APIError

MAX_BODY_BYTES = 8 * 2**20
MAX_HEADER_BYTES = 16 * 2**10
BODY_TIMEOUT = 30.0
SEND_TIMEOUT = 60.0
PUBLIC_PATHS = ("/health",)
_ABSOLUTE_FORM = re.compile(rb"^[hH][tT][tT][pP][sS]?://[^/]*")


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
        try:
            scope = origin_form(scope)
        except APIError as e:
            return await send_api_error(send, e, close=True)
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


def origin_form(scope: dict) -> dict:
    """``scope`` with an absolute-form target (``http://host:port/v1/models``) turned into its
    path (``/v1/models``; the query is already apart), as RFC 9112 (3.2.2) asks of a server;
    a path and the asterisk form (``OPTIONS *``) pass unchanged; anything else is a 400."""
    raw = scope.get("raw_path") or scope["path"].encode()
    if raw.startswith(b"/") or raw == b"*":
        return scope
    m = _ABSOLUTE_FORM.match(raw)
    if m is None:
        shown = raw[:60].decode("latin-1")
        raise APIError(400, f"request target {shown!r} is neither a path (/v1/...) nor an absolute http(s) URI",
                       code="invalid_request")
    path = raw[m.end():] or b"/"
    return {**scope, "raw_path": path, "path": unquote(path.decode("latin-1"))}


def _too_large(n: int, limit: int, at_least: bool = False) -> APIError:
    return APIError(413, f"request body of {'at least ' if at_least else ''}{n} bytes exceeds the {limit}-byte limit",
                    code="request_too_large")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with per-client connection limits and head deadlines
    (``client_limits``), JSON answers to refused connections and malformed requests.
    Configure by subclassing (``protocol_class``): ``table`` is shared by a server's
    connections."""

    table: ClientTable

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None           # ours: ClientTable.admit, with a JSON 503
        self._key = ""
        self._admitted = False                  # counted in the table's open connections
        self._lingering = False                 # a refusal counted in the table's lingering ones
        self._discarding = False                # answered: what the client sends is dropped
        self._head_timer = self._park_timer = self._close_timer = None
        self._head_deadline = 0.0

    # --------------------------------------------------------------- admission
    def connection_made(self, transport) -> None:
        self._key = client_key(transport.get_extra_info("peername"))
        refusal = self.table.admit(self._key)
        if refusal is not None:
            self.transport = transport
            if not self.table.refuse(self._key):
                self._discarding = True
                transport.abort()               # too many refusals linger: no answer
                return
            self._lingering = True
            self.connections.add(self)          # so that a server shutdown closes it too
            self._answer_then_close(_busy(refusal))
            return
        super().connection_made(transport)
        self._admitted = True
        self.table.opened(self._key)
        self._start_head()

    def connection_lost(self, exc) -> None:
        for timer in (self._head_timer, self._park_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._park_timer = self._close_timer = None
        if self._lingering:
            self._lingering = False
            self.table.linger_done(self._key)
        if not self._admitted:
            self.connections.discard(self)
            return
        self._settle([], self.table.closed(self._key, self))
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return                              # the answer is sent; the rest is dropped
        between_requests = (self._head_timer is None and self._park_timer is None
                            and self.conn.their_state is h11.IDLE)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            if self._head_timer is not None:    # the head is complete
                self._head_timer.cancel()
                self._head_timer = None
                self._settle([], self.table.head_done(self._key, self))
        elif between_requests and not self.transport.is_closing():
            self._start_head()                  # a kept-alive connection's next head, incomplete

    def shutdown(self) -> None:
        if self._admitted and not self._discarding:
            super().shutdown()
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        if self._admitted:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            super().resume_writing()

    # --------------------------------------------------------------- heads: deadlines, parking
    def _start_head(self) -> None:
        deadline, expired, promoted = self.table.head_started(self._key, self)
        if deadline is None:                    # the address holds its cap of pending heads
            self.transport.pause_reading()
            self._park_timer = self.loop.call_later(self.table.limits.head_timeout, self._park_timed_out)
        else:
            self._arm_head(deadline)
        self._settle(expired, promoted)

    def _arm_head(self, deadline: float) -> None:
        self._head_deadline = deadline
        self._head_timer = self.loop.call_later(deadline, self._head_timed_out)

    def _settle(self, expired: list, promoted: list) -> None:
        """Act on what the table decided: time out ``expired`` heads, read ``promoted`` ones."""
        for conn in expired:
            conn._head_expired()
        for conn, deadline in promoted:
            conn._promote(deadline)

    def _promote(self, deadline: float) -> None:
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        self._arm_head(deadline)
        self.transport.resume_reading()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        promoted = self.table.head_done(self._key, self, timed_out=True)
        self._answer_head_timeout(f"the request line and headers did not arrive within {self._head_deadline:g} s")
        self._settle([], promoted)

    def _head_expired(self) -> None:
        """The table dropped this pending head: it is older than the deadline that the pressure
        on its address (or the server) now allows."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._answer_head_timeout("the request line and headers did not arrive in time (the head deadline is "
                                  "shorter while this client address or the server holds many incomplete requests)")

    def _park_timed_out(self) -> None:
        self._park_timer = None
        promoted = self.table.head_done(self._key, self)
        cap = self.table.limits.max_client_pending_heads
        self._answer_then_close(_busy(f"this client address holds {cap} requests whose line and headers are "
                                      f"incomplete; this connection waited {self.table.limits.head_timeout:g} s "
                                      f"unread; retry later"))
        self._settle([], promoted)

    def _answer_head_timeout(self, message: str) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._answer_then_close(APIError(408, message, code="request_timeout"))

    def _answer_then_close(self, err: APIError) -> None:
        """Write ``err`` and close gracefully: half-close, drop what the client still sends, close
        once it does or ``linger`` s pass. Closing at once with its data unread would reset the
        connection, and the client would lose the answer."""
        self._discarding = True
        self.transport.write(_response_bytes(err))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self._close_timer = self.loop.call_later(self.table.limits.linger, self.transport.close)

    # --------------------------------------------------------------- JSON instead of text
    def send_400_response(self, msg: str) -> None:
        self._write_and_close(APIError(
            400, f"malformed HTTP request (request line, headers over {MAX_HEADER_BYTES // 1024} KiB, or a "
                 f"Content-Length that is not a non-negative integer)", code="invalid_request"))

    def _write_and_close(self, err: APIError) -> None:
        self.transport.write(_response_bytes(err))
        self.transport.close()


def _busy(message: str) -> APIError:
    return APIError(503, message, type_="server_error", code="too_many_connections", headers={"Retry-After": "1"})


def _response_bytes(err: APIError) -> bytes:
    """A whole JSON error response that closes the connection, as bytes."""
    body = json_error_bytes(err)
    head = f"HTTP/1.1 {err.status} {http.HTTPStatus(err.status).phrase}\r\ncontent-type: application/json\r\n"
    head += "".join(f"{k.lower()}: {v}\r\n" for k, v in err.headers.items())
    head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


def protocol_class(limits: ConnectionLimits = ConnectionLimits()) -> type:
    """A GuardedH11Protocol subclass for one server (uvicorn builds one protocol per connection;
    they share the class's ClientTable)."""
    return type("SpecExecH11Protocol", (GuardedH11Protocol,), {"table": ClientTable(limits)})
