"""OpenAI-compatible HTTP server over one Engine: FastAPI + uvicorn + pydantic.

Endpoints: ``GET /v1/models[/{id}]``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(both streaming with server-sent events), ``GET /health``. See docs/SERVER.md.

How a request flows:
1. ``http_guard``: per-client connection limits and head deadlines (uvicorn protocol), then the API
   key from the headers, the body's size limit and its total deadline (ASGI middleware).
2. The handler parses the body (depth-limited JSON), validates it (``openai_schema``: pydantic
   models whose validators are the engine API's own checks), refuses text that cannot fit the
   context by its byte length, and tokenizes on a pool thread with a private tokenizer copy
   (``tokenize_pool``). A bad request never waits and never touches the engine.
3. The job goes to the engine's worker thread (``worker``), which runs the engine's passes:
   up to the engine's ``max_batch`` requests share each pass, ``max_queue`` more may wait for a
   slot, 429 beyond. Text pieces come back per pass through an asyncio queue.
4. A client that disconnects (while queued, while generating, mid-stream) cancels its job: the
   engine stops at its next pass. Every error is ``{"error": {...}}`` JSON (``error_map``).
"""
from __future__ import annotations

import asyncio
import signal
import socket
import sys
import threading
import time
from typing import Optional

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthError, InvalidParameterError, SpecExecError
from ..speculative import params
from . import openai_format as fmt
from .error_map import APIError, classify
from .client_limits import (DEFAULT_MAX_CLIENT_CONNECTIONS, DEFAULT_MAX_CLIENT_PENDING_HEADS, DEFAULT_MAX_CONNECTIONS,
                            HEAD_TIMEOUT, MIN_HEAD_TIMEOUT, ConnectionLimits, fd_capacity)
from .http_guard import BODY_TIMEOUT, MAX_BODY_BYTES, MAX_HEADER_BYTES, SEND_TIMEOUT, RequestGuard, protocol_class
from .openai_schema import ChatCompletionRequest, CompletionRequest, parse_json_object, validate_body
from .tokenize_pool import TokenizerPool
from .worker import DEFAULT_MAX_QUEUE, EngineWorker, QueueFull

SERVED_ALIAS = "specexec-rt"           # accepted as a model name besides the model's own id
OFF_LOOP_BYTES = 64 * 2**10            # bodies larger than this are parsed on a thread


class ClientGone(Exception):
    pass


class ServerState:
    """What the handlers share: the engine's worker, the tokenizer pool, the model's limits."""

    def __init__(self, engine, worker: EngineWorker, tokens: TokenizerPool, model_id: str):
        self.engine, self.worker, self.tokens, self.model_id = engine, worker, tokens, model_id
        self.created = int(time.time())
        target = getattr(engine, "target", None)
        self.max_len = getattr(target, "max_len", None)
        self.vocab_size = getattr(target, "vocab_size", None)
        self.text_limit = (params.text_byte_limit(self.max_len, tokens.longest_token_bytes)
                           if self.max_len else None)
        self.closing = False
        # Fields added to every answer's ``specexec`` object (a Ray Serve replica adds its name).
        self.stats_extra: dict = {}

    def model_names(self) -> tuple:
        return (self.model_id, SERVED_ALIAS)


# ---------------------------------------------------------------------------------- the app
def build_app(state: ServerState, api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES,
              body_timeout: float = BODY_TIMEOUT, send_timeout: float = SEND_TIMEOUT) -> RequestGuard:
    """The FastAPI app behind its RequestGuard (an ASGI app)."""
    app = FastAPI(title="specexec-rt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.specexec = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:
            err = APIError(405, f"{request.url.path} does not take {request.method}", code="method_not_allowed",
                           headers=exc.headers)
        elif exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        else:
            err = APIError(exc.status_code, str(exc.detail), code="http_error", headers=exc.headers)
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error_response(APIError(400, str(exc), code="invalid_value"))

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        print(f"[specexec-rt serve] {request.method} {request.url.path} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return _error_response(exc)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state, state.model_id)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in state.model_names():
            return _error_response(APIError(404, f"model {name!r} does not exist", param="model",
                                            code="model_not_found"))
        return _model_card(state, name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(state, request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(state, request, "chat")

    return RequestGuard(app, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout,
                        send_timeout=send_timeout)


def _model_card(state: ServerState, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "specexec-rt"}


def _error_response(exc: BaseException, prompt_param: Optional[str] = None) -> JSONResponse:
    answer = classify(exc, prompt_param)
    headers = dict(answer.headers)
    if answer.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(answer.body(), status_code=answer.status, headers=headers)


# ------------------------------------------------------------------------------- generation
async def _generate(state: ServerState, request: Request, kind: str) -> Response:
    prompt_param = "prompt" if kind == "completions" else "messages"
    try:
        if state.closing:
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        req = await _parse(state, await request.body(), kind)
        ids = await _prompt_ids(state, req, kind, prompt_param)
        return await _run(state, request, req, kind, ids)
    except ClientGone:
        return Response(status_code=499)     # nobody reads it: the client has left
    except Exception as e:  # noqa: BLE001 - every failure becomes a JSON answer
        _log_unexpected(e, kind)
        return _error_response(e, prompt_param)


def _log_unexpected(e: Exception, kind: str) -> None:
    """One line on stderr for a failure that is not the client's (an engine or server bug)."""
    if not isinstance(e, (SpecExecError, APIError)):
        print(f"[specexec-rt serve] {kind} request failed: {type(e).__name__}: {e}", file=sys.stderr)


async def _parse(state: ServerState, raw: bytes, kind: str):
    model_cls = CompletionRequest if kind == "completions" else ChatCompletionRequest

    def parse():
        return validate_body(model_cls, parse_json_object(raw), state.vocab_size)

    req = await anyio.to_thread.run_sync(parse) if len(raw) > OFF_LOOP_BYTES else parse()
    model = req.model if req.model is not None else state.model_id
    if model not in state.model_names():
        raise APIError(404, f"model {model!r} does not exist; this server serves {state.model_id!r} "
                            f"(alias {SERVED_ALIAS!r})", param="model", code="model_not_found")
    req.model = model
    return req


async def _prompt_ids(state: ServerState, req, kind: str, param: str) -> list:
    if kind == "completions" and not isinstance(req.prompt, str):
        ids = req.prompt                                     # checked against the vocabulary already
    else:
        text = req.prompt if kind == "completions" else "".join(m["content"] for m in req.messages)
        if state.text_limit is not None:
            params.check_text_bytes(text, state.text_limit, param)
        if kind == "completions":
            ids = await state.tokens.encode(req.prompt)
        else:       # ChatTemplateError (a 400 naming the message) if the template refuses them
            ids = await state.tokens.chat_ids(req.messages)
        if not ids:
            raise InvalidParameterError(param, f"{param} gives no tokens once tokenized")
        ids = params.check_token_ids(ids, state.vocab_size, param)
    if state.max_len is not None and len(ids) >= state.max_len:
        raise ContextLengthError(f"the prompt is {len(ids)} tokens; this server's context is {state.max_len} tokens "
                                 f"(max_len; prompt + max_tokens must fit)")
    return ids


async def _run(state: ServerState, request: Request, req, kind: str, ids: list) -> Response:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    max_tokens = req.max_new_tokens(kind)
    try:
        job = state.worker.submit(ids, req.engine_kwargs(kind),
                                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                                  pieces=bool(req.stream))
    except QueueFull:
        raise APIError(429, f"all {state.worker.max_batch} engine slots are busy and {state.worker.max_queue} "
                            f"requests are already waiting; "
                            f"retry later", type_="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    watcher = asyncio.ensure_future(_disconnected(request))
    streaming = False
    try:
        first = await _next_event(events, watcher)
        if first[0] == "error":
            raise first[1]
        if first[0] == "cancelled":
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        env = fmt.envelope(kind, req.model, stream=bool(req.stream))
        if req.stream:
            watcher.cancel()            # StreamingResponse listens for the disconnect from here on
            streaming = True            # and _JobStream cancels the job when the response ends
            return _JobStream(_sse(first, events, kind, env, len(ids), max_tokens, req.include_usage,
                                   state.stats_extra),
                              on_close=lambda: state.worker.cancel(job))
        event = first
        while event[0] == "piece":
            event = await _next_event(events, watcher)
        if event[0] == "error":
            raise event[1]
        if event[0] == "cancelled":
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        return JSONResponse(fmt.completion(kind, env, event[1], len(ids), max_tokens, state.stats_extra))
    finally:
        watcher.cancel()
        if not streaming:
            state.worker.cancel(job)        # a no-op once the job has finished


class _JobStream(StreamingResponse):
    """The SSE response of one job: however the response ends (done, client gone, error),
    ``on_close`` cancels the job, which is a no-op once it has finished."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read: only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(events: asyncio.Queue, watcher: asyncio.Future) -> tuple:
    get = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    raise ClientGone


async def _sse(first: tuple, events: asyncio.Queue, kind: str, env: dict, prompt_tokens: int, max_tokens: int,
               include_usage: bool, stats_extra: dict):
    """The event stream: a role chunk (chat), a chunk per non-empty piece, the final chunk(s) and
    ``[DONE]``. An engine error after the headers ends the stream with an in-band error and no
    ``[DONE]``; so does a shutdown (the job's "cancelled")."""
    if kind == "chat":
        yield fmt.sse(fmt.chunk(kind, env, "", first=True))
    event = first
    while event[0] == "piece":
        if event[1]:
            yield fmt.sse(fmt.chunk(kind, env, event[1]))
        event = await events.get()
    what, value = event
    if what == "done":
        for c in fmt.final_chunks(kind, env, value, prompt_tokens, max_tokens, include_usage, stats_extra):
            yield fmt.sse(c)
        yield fmt.sse("[DONE]")
    elif what == "error":
        _log_unexpected(value, kind)
        yield fmt.sse(classify(value).body())


# ------------------------------------------------------------------------------- the server
class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling us when it has started (listening, its signal handlers in
    place) and when its shutdown begins (Ctrl-C, SIGTERM, close())."""

    def __init__(self, config: uvicorn.Config, on_shutdown):
        super().__init__(config)
        self._on_shutdown = on_shutdown
        self.on_started = None
        self.received_signals: list = []

    def handle_exit(self, sig: int, frame) -> None:
        # uvicorn's own, minus its re-raise of the signal once it has stopped: raised from inside
        # asyncio.run, a SIGINT meets asyncio's handler, which may or may not turn it into
        # KeyboardInterrupt depending on timing. The caller reads received_signals instead.
        self.received_signals.append(sig)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets=None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets)


class SpecExecServer:
    """One engine behind an OpenAI-compatible API on a bound socket.

    ``serve_forever()`` runs it (in this thread); ``close(timeout)`` from another thread (or a
    signal in the main thread) stops accepting, stops the request in flight at its next pass,
    and waits for the engine. ``server_address``: (host, port) actually bound.
    """

    def __init__(self, sock: socket.socket, engine, api_key: Optional[str] = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, model_name: Optional[str] = None, tokenizer=None,
                 verbose: bool = False, max_connections: Optional[int] = None,
                 max_client_connections: Optional[int] = DEFAULT_MAX_CLIENT_CONNECTIONS,
                 max_client_pending_heads: Optional[int] = DEFAULT_MAX_CLIENT_PENDING_HEADS,
                 head_timeout: float = HEAD_TIMEOUT, min_head_timeout: float = MIN_HEAD_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT,
                 send_timeout: float = SEND_TIMEOUT, max_body_bytes: int = MAX_BODY_BYTES,
                 keep_alive_timeout: float = 5.0, shutdown_timeout: float = 10.0, tokenizer_threads: int = 2):
        # Checked first: nothing (the tokenizer pool, the engine's thread) starts for bad limits.
        self.limits = ConnectionLimits(_fit_descriptors(max_connections), max_client_connections,
                                       max_client_pending_heads, head_timeout, min_head_timeout)
        tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        self.socket = sock
        self._address = sock.getsockname()[:2]
        self.engine = engine
        self.api_key = api_key or None
        self.tokens = TokenizerPool(tokenizer, tokenizer_threads)
        self.worker = EngineWorker(engine, max_queue)
        self.state = ServerState(engine, self.worker, self.tokens, model_name or _default_model_id(engine))
        self.app = build_app(self.state, self.api_key, max_body_bytes, body_timeout, send_timeout)
        http_protocol = protocol_class(self.limits)
        self._clients = http_protocol.table
        config = uvicorn.Config(
            self.app, http=http_protocol, loop="asyncio", lifespan="off",
            log_config=None, log_level="info" if verbose else "warning", access_log=verbose,
            proxy_headers=False, server_header=False, timeout_keep_alive=keep_alive_timeout,
            timeout_graceful_shutdown=shutdown_timeout, h11_max_incomplete_event_size=MAX_HEADER_BYTES)
        self._uvicorn = _Uvicorn(config, self._begin_shutdown)
        self._serving = False
        self._stopped = threading.Event()

    @property
    def server_address(self) -> tuple:
        return self._address

    @property
    def model_id(self) -> str:
        return self.state.model_id

    @property
    def counters(self) -> dict:
        return self.worker.counters

    @property
    def connections(self) -> dict:
        """Connection counts now (``client_limits.ClientTable.snapshot``): ``open``,
        ``pending_heads`` and ``lingering`` per client address, and the counters ``opened``,
        ``refused``, ``reset``, ``evicted``, ``head_timeouts``."""
        return self._clients.snapshot()

    def wait_for_connections(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(self.connections)`` holds (True) or ``timeout`` s pass (False):
        what tests and monitors wait on instead of sleeping."""
        return self._clients.wait_for(predicate, timeout)

    @property
    def received_signals(self) -> list:
        """The signals (SIGINT, SIGTERM) that stopped ``serve_forever``, in arrival order."""
        return list(self._uvicorn.received_signals)

    def serve_forever(self, poll_interval: Optional[float] = None, on_started=None) -> None:
        """Serve until ``close()`` or a signal (then it returns; see ``received_signals``).
        ``poll_interval`` is accepted for the ``socketserver``-style API and ignored (uvicorn
        checks for shutdown every 0.1 s). ``on_started()`` runs once the server listens and
        handles Ctrl-C / SIGTERM itself: a "serving" line printed before that would invite a
        signal into uvicorn's start-up."""
        self._serving = True
        self._uvicorn.on_started = on_started
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def _begin_shutdown(self) -> None:
        self.state.closing = True
        self.worker.cancel_all()        # the request in flight stops at its next pass

    def close(self, timeout: float = 10.0) -> bool:
        """Stop accepting, cancel what runs and waits, wait up to ``timeout`` s for the engine to
        be free, release the socket. Returns whether the engine went idle."""
        self._begin_shutdown()
        if self._serving:
            self._uvicorn.should_exit = True
            self._stopped.wait(timeout)
        idle = self.worker.shutdown(timeout)
        self.tokens.close()
        self.socket.close()
        return idle


def _fit_descriptors(max_connections: Optional[int]) -> int:
    """``max_connections`` (None: DEFAULT_MAX_CONNECTIONS) lowered to what the open-file limit
    (``ulimit -n``) can hold; a value asked for explicitly is lowered with a warning."""
    room = fd_capacity()
    if max_connections is None:
        return DEFAULT_MAX_CONNECTIONS if room is None else min(DEFAULT_MAX_CONNECTIONS, room)
    if room is not None and isinstance(max_connections, int) and not isinstance(max_connections, bool) \
            and max_connections > room:
        print(f"[specexec-rt serve] max_connections={max_connections} lowered to {room}: the open-file limit "
              f"(ulimit -n) holds no more; raise it to serve more", file=sys.stderr)
        return room
    return max_connections


def _default_model_id(engine) -> str:
    src = getattr(getattr(engine, "target", None), "source", None)
    path = getattr(src, "path", None)
    if path is not None:
        return getattr(path, "stem", None) or str(path)
    return SERVED_ALIAS


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. OSError when the address
    is in use or not this machine's."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
                max_queue: int = DEFAULT_MAX_QUEUE, model_name: Optional[str] = None, tokenizer=None,
                verbose: bool = False, sock: Optional[socket.socket] = None, **limits) -> SpecExecServer:
    """Bind (port 0 picks a free port: ``server.server_address``) unless ``sock`` is given
    already bound; then ``serve_forever()``. ``limits``: ``max_connections``,
    ``max_client_connections``, ``max_client_pending_heads``, ``head_timeout``, ``min_head_timeout``,
    ``body_timeout``, ``send_timeout``, ``max_body_bytes``, ``keep_alive_timeout``,
    ``shutdown_timeout``, ``tokenizer_threads`` (see SpecExecServer)."""
    sock = sock if sock is not None else bind(host, port)
    try:
        return SpecExecServer(sock, engine, api_key=api_key, max_queue=max_queue, model_name=model_name,
                              tokenizer=tokenizer, verbose=verbose, **limits)
    except BaseException:
        sock.close()
        raise
