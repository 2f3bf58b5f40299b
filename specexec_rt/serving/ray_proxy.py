"""Ray Serve's HTTP proxy, answering like the single-process server: JSON errors, a connection limit.

Under Ray Serve, Ray's proxy actor accepts the connections and hands each request to a replica
(``ray_serve``). What a replica answers is the server's own, but a few answers are the proxy's:

- a replica that dies before answering: Ray's proxy lets uvicorn send a text ``500 Internal
  Server Error``; here it is a JSON 503 ``replica_unavailable`` with ``Retry-After: 1`` (Serve
  starts a replacement; the retry goes to a live replica);
- a replica that dies mid-stream: the stream would just stop (the client sees a broken chunked
  body); here it ends the way the server ends a stream on an engine error: one
  ``data: {"error": {...}}`` event and no ``[DONE]``;
- Ray's own text errors (no route yet, a timeout, back-pressure): the same status and
  ``Retry-After``, with the OpenAI error body;
- ``--max-connections``: more requests in flight than that in this proxy get the server's
  JSON 503 ``too_many_connections``.

Ray loads the middleware in its proxy process from the import path in
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``; ``proxy_env`` gives the environment variables to
set for the Serve controller (the proxies inherit its environment). The proxy process must be able
to import ``specexec_rt`` (on a cluster: installed on every node, as the replicas need it anyway).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from .error_map import APIError
from .http_guard import json_error_bytes, send_api_error

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "specexec_rt.serving.ray_proxy:middlewares"
MAX_CONNECTIONS_ENV = "SPECEXEC_RAY_MAX_CONNECTIONS"

REPLICA_GONE = ("the Ray Serve replica serving this request stopped before it finished (Serve starts a "
                "replacement); retry the request")
_TEXT_ERROR_CODES = {404: "not_found", 408: "request_timeout", 429: "queue_full", 500: "internal_error",
                     503: "service_unavailable"}


def proxy_env(max_connections: Optional[int] = None) -> dict:
    """Environment variables that put ``ProxyErrors`` into Ray's proxies (for the controller's
    ``runtime_env``: ``serve.start(controller_options={"runtime_env": {"env_vars": ...}})``)."""
    env = {CALLBACK_ENV: CALLBACK}
    if max_connections is not None:
        env[MAX_CONNECTIONS_ENV] = str(max_connections)
    return env


def middlewares() -> list:
    """Ray's proxy callback: the middleware list it wraps its ASGI app with."""
    from starlette.middleware import Middleware

    limit = os.environ.get(MAX_CONNECTIONS_ENV)
    return [Middleware(ProxyErrors, max_connections=int(limit) if limit else None)]


def replica_gone_error() -> APIError:
    return APIError(503, REPLICA_GONE, type_="server_error", code="replica_unavailable",
                    headers={"Retry-After": "1"})


class ProxyErrors:
    """ASGI middleware around Ray's proxy app (module docstring)."""

    def __init__(self, app, max_connections: Optional[int] = None):
        self.app, self.max_connections = app, max_connections
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.max_connections is not None and self.in_flight >= self.max_connections:
            err = APIError(503, f"the server holds its limit of {self.max_connections} connections; retry later",
                           type_="server_error", code="too_many_connections", headers={"Retry-After": "1"})
            return await send_api_error(send, err, close=True)
        self.in_flight += 1
        response = _Response(send)
        try:
            await self.app(scope, receive, response.send)
        except Exception as e:  # noqa: BLE001 - the proxy failed: the client still gets JSON
            print(f"[specexec-rt proxy] {scope.get('path')}: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            self.in_flight -= 1
        await response.finish()


class _Response:
    """Watches what the proxy sends for one request and completes what it left unfinished."""

    def __init__(self, send):
        self._send = send
        self.started = self.finished = False
        self.event_stream = False
        self._held: Optional[dict] = None      # a text error's start message, until its body is read
        self._held_body: list = []

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            headers = {k.lower(): v for k, v in message.get("headers", [])}
            content_type = headers.get(b"content-type", b"")
            self.event_stream = content_type.startswith(b"text/event-stream")
            if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                self._held = message
                return
        elif kind == "http.response.body":
            if self._held is not None:
                self._held_body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.finished = True
                    await self._send_as_json()
                return
            if not message.get("more_body", False):
                self.finished = True
        await self._send(message)

    async def finish(self) -> None:
        """After the proxy's app returned: answer a request it left without an answer, end a
        stream it left open."""
        if self.finished:
            return
        try:
            if not self.started:
                await send_api_error(self._send, replica_gone_error())
            elif self._held is not None:
                await self._send_as_json()
            elif self.event_stream:
                error = json_error_bytes(replica_gone_error())
                await self._send({"type": "http.response.body", "body": b"data: " + error + b"\n\n",
                                  "more_body": False})
            # Any other body cut short stays cut: the client must see an incomplete answer as one.
        except Exception:  # noqa: BLE001 - the client has gone too: nobody to tell
            pass
        self.finished = True

    async def _send_as_json(self) -> None:
        """Ray's text error (status kept, ``Retry-After`` kept) as the OpenAI error body."""
        status = self._held["status"]
        text = b"".join(self._held_body).decode("utf-8", "replace").strip() or f"HTTP {status}"
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self._held.get("headers", [])
                   if k.lower() == b"retry-after"}
        type_ = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        err = APIError(status, text, type_=type_, code=_TEXT_ERROR_CODES.get(status, "http_error"), headers=headers)
        self._held = None
        await send_api_error(self._send, err)

