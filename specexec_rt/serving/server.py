"""OpenAI-compatible HTTP server over one Engine (stdlib only).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
streaming with server-sent events), ``GET /health``. See docs/SERVER.md.

One engine serves one request at a time (it owns a single KV cache): requests wait for the
engine in FIFO order, at most ``max_queue`` of them besides the one running; beyond that the
server answers 429 at once. Requests are validated and tokenized *before* they queue, so a bad
request never waits and never touches the engine.

A streamed request pulls text from ``engine.stream`` one accepted pass at a time; before each
write the server checks whether the client is still there, and when it is gone it closes the
stream generator, which ends the engine's work at that pass and frees it for the next request.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import math
import select
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from ..errors import ContextLengthError, SamplingParameterError, SpecExecError

DEFAULT_MAX_QUEUE = 8
SERVED_ALIAS = "specexec-rt"           # accepted as a model name besides the model's own id
MAX_BODY_BYTES = 8 * 2**20
DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256}   # OpenAI's completions default is 16
MAX_STOP_SEQUENCES = 4


class APIError(Exception):
    """An OpenAI-style error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_param(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------- requests
@dataclasses.dataclass
class GenerationRequest:
    """A validated request, tokenized, ready for the engine."""

    kind: str                   # "completions" or "chat"
    model: str
    prompt_ids: list
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    stop: Optional[list]
    stream: bool
    include_usage: bool

    def engine_kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, seed=self.seed, stop=self.stop)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default: float, lo: float, lo_open: bool, hi: Optional[float]) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not _is_number(x) or not math.isfinite(x):
        raise bad_param(name, f"{name} must be a finite number, got {x!r}", "invalid_type")
    if x < lo or (lo_open and x == lo) or (hi is not None and x > hi):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        hi_s = f"{hi}]" if hi is not None else "inf)"
        raise bad_param(name, f"{name} must be in {lo_s}, {hi_s}, got {x!r}")
    return float(x)


def _integer(body: dict, name: str, default: Optional[int], lo: Optional[int]) -> Optional[int]:
    x = body.get(name)
    if x is None:
        return default
    if not _is_int(x):
        raise bad_param(name, f"{name} must be an integer, got {x!r}", "invalid_type")
    if lo is not None and x < lo:
        raise bad_param(name, f"{name} must be >= {lo}, got {x}")
    return x


def _stop(body: dict) -> Optional[list]:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
            or len(stop) > MAX_STOP_SEQUENCES):
        raise bad_param("stop", f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings")
    if any(s == "" for s in stop):
        raise bad_param("stop", "stop sequences must not be empty strings")
    return stop or None


def _reject_unsupported(body: dict) -> None:
    """Options we cannot honour fail loudly rather than being silently ignored."""
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise bad_param("n", f"only n=1 is supported, got {n!r}", "unsupported_value")
    best_of = body.get("best_of")
    if best_of not in (None, 1) or isinstance(best_of, bool):
        raise bad_param("best_of", "best_of is not supported", "unsupported_value")
    if body.get("echo"):
        raise bad_param("echo", "echo is not supported", "unsupported_value")
    lp = body.get("logprobs")
    if lp not in (None, False) or body.get("top_logprobs") is not None:
        raise bad_param("logprobs", "logprobs are not supported", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad_param(name, f"{name} is not supported (it would change the target's distribution)",
                            "unsupported_value")


def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_param(f"messages[{i}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_param(f"messages[{i}].content", "message content must be a string or a list of text parts")


def _messages(body: dict) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_param("messages", "messages must be a non-empty list of {role, content} objects",
                        "missing_required_parameter" if msgs is None else "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_param(f"messages[{i}]", "each message needs a role: system, developer, user, assistant or tool")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _message_text(m.get("content"), i)})
    if not any(m["content"] for m in out):
        raise bad_param("messages", "messages are all empty")
    return out


# ----------------------------------------------------------------------------- engine facade
class EngineAdapter:
    """What the server needs from an Engine: tokenize, chat template, generate, stream, stats.

    The engine is driven with token ids (the server counts ``usage`` from the same ids it sends).
    """

    def __init__(self, engine, tokenizer=None):
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("the server needs a tokenizer: pass tokenizer= or use an engine that has one")
        target = getattr(engine, "target", None)
        self.max_len = getattr(target, "max_len", None)
        # Rust tokenizers are not safe to call from several threads at once.
        self._tok_lock = threading.Lock()

    def encode(self, text: str) -> list:
        with self._tok_lock:
            encode = getattr(self.engine, "encode", None)
            if encode is not None:
                return list(encode(text))
            # Exactly as Engine._encode does for a text prompt, so ids (and usage) match the CLI.
            return list(self.tokenizer(text).input_ids)

    def chat_prompt(self, messages: list) -> str:
        with self._tok_lock:
            try:
                apply = getattr(self.engine, "apply_chat_template", None)
                if apply is not None:
                    return apply(messages)
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except (ValueError, TypeError) as e:   # transformers: "no chat template"
                raise APIError(400, f"cannot apply the model's chat template: {e}", param="messages",
                               code="chat_template_error") from e


def stats_json(stats) -> dict:
    """Engine stats -> JSON: every public numeric/str/list/dict field and property."""
    if stats is None:
        return {}
    if isinstance(stats, dict):
        items = dict(stats)
    else:
        items = {}
        if dataclasses.is_dataclass(stats):
            items.update({f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)})
        else:
            items.update(vars(stats))
        for name in dir(type(stats)):       # computed properties such as tokens_per_pass
            if not name.startswith("_") and isinstance(getattr(type(stats), name, None), property):
                try:
                    items[name] = getattr(stats, name)
                except Exception:    # a property that cannot be computed (e.g. zero passes) is skipped
                    pass
    return {k: v for k, v in ((k, _jsonable(v)) for k, v in items.items() if not k.startswith("_"))
            if v is not None}


def _jsonable(v):
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):        # tensors, numpy arrays
        return _jsonable(v.tolist())
    return None


def finish_reason(result, max_tokens: int) -> str:
    reason = getattr(result, "finish_reason", None) or getattr(getattr(result, "stats", None), "finish_reason", None)
    if reason in ("stop", "eos"):       # the engine says "eos" for an end-of-sequence token
        return "stop"
    if reason == "length":
        return reason
    return "length" if len(result.token_ids) >= max_tokens else "stop"


# ------------------------------------------------------------------------------------ queue
class QueueFull(Exception):
    pass


class EngineGate:
    """One runner at a time; at most ``max_queue`` waiters (FIFO: Condition wakes in wait order)."""

    def __init__(self, max_queue: int):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._busy = False
        self.waiting = 0

    @contextmanager
    def hold(self):
        with self._cond:
            if self._busy and self.waiting >= self.max_queue:
                raise QueueFull
            self.waiting += 1
            try:
                while self._busy:
                    self._cond.wait()
            finally:
                self.waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify()

    def idle(self, timeout: float) -> bool:
        """Wait until nothing runs and nothing waits; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self.waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True


# ----------------------------------------------------------------------------------- server
class SpecExecServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, engine, api_key: Optional[str] = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 model_name: Optional[str] = None, tokenizer=None, verbose: bool = False):
        self.adapter = EngineAdapter(engine, tokenizer)
        self.engine = engine
        self.api_key = api_key or None
        self.gate = EngineGate(max_queue)
        self.model_id = model_name or _default_model_id(engine)
        self.created = int(time.time())
        self.verbose = verbose
        self.closing = threading.Event()
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "rejected_queue_full": 0, "errors": 0}
        self._counter_lock = threading.Lock()
        self._serving = False
        super().__init__(address, Handler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        super().serve_forever(poll_interval)

    def count(self, name: str) -> None:
        with self._counter_lock:
            self.counters[name] += 1

    def model_names(self) -> tuple:
        return (self.model_id, SERVED_ALIAS)

    def close(self, timeout: float = 10.0) -> bool:
        """Stop accepting, cancel running streams at their next pass, wait for the engine to be
        free (up to ``timeout`` s), close the socket. Returns whether the engine went idle.
        Call from a thread other than the one running ``serve_forever`` (or after it returned)."""
        self.closing.set()
        if self._serving:
            self.shutdown()     # returns at once when serve_forever has already ended
        idle = self.gate.idle(timeout)
        self.server_close()
        return idle


def _default_model_id(engine) -> str:
    src = getattr(getattr(engine, "target", None), "source", None)
    path = getattr(src, "path", None)
    if path is not None:
        return getattr(path, "stem", None) or str(path)
    return SERVED_ALIAS


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
                max_queue: int = DEFAULT_MAX_QUEUE, model_name: Optional[str] = None, tokenizer=None,
                verbose: bool = False) -> SpecExecServer:
    """Bind (port 0 picks a free port: read ``server.server_address``); run ``serve_forever()``."""
    return SpecExecServer((host, port), engine, api_key=api_key, max_queue=max_queue, model_name=model_name,
                          tokenizer=tokenizer, verbose=verbose)


class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "specexec-rt"
    timeout = 120               # idle keep-alive connections do not hold a thread forever
    server: SpecExecServer

    # -------------------------------------------------------------------------- plumbing
    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, obj: dict, extra_headers: Optional[dict] = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: APIError) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        if err.status == 429:
            headers = {"Retry-After": "1"}
        self._send_json(err.status, err.body(), headers)

    def _read_body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not supported; send Content-Length",
                           code="length_required")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise APIError(400, "bad Content-Length header", code="invalid_request")
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True    # the unread body would be taken for the next request
            raise APIError(413, f"request body of {n} bytes exceeds the {MAX_BODY_BYTES}-byte limit",
                           code="request_too_large")
        raw = self.rfile.read(n)
        if len(raw) != n:
            self.close_connection = True
            raise APIError(400, "request body shorter than Content-Length", code="invalid_request")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from e
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        return body

    def _check_auth(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _client_gone(self) -> bool:
        """True when the peer has closed its end (readable with nothing to read) or reset it."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if method == "POST":
                # Read the body first, even when the answer will be an error, so a keep-alive
                # connection stays in sync.
                body = self._read_body()
            if path == "/health" and method == "GET":
                return self._send_json(200, {"status": "ok"})
            self._check_auth()
            if path == "/v1/models" and method == "GET":
                return self._send_json(200, self._models())
            if path.startswith("/v1/models/") and method == "GET":
                name = path[len("/v1/models/"):]
                if name not in self.server.model_names():
                    raise APIError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
                return self._send_json(200, self._model_card(name))
            routes = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
            if path in routes:
                if method != "POST":
                    raise APIError(405, f"{path} takes POST", code="method_not_allowed")
                return self._generate(routes[path], body)
            raise APIError(404, f"no route {method} {path}", code="not_found")
        except APIError as e:
            self._send_error(e)
        except ClientGone:
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")

    # ------------------------------------------------------------------------- endpoints
    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.server.created, "owned_by": "specexec-rt"}

    def _models(self) -> dict:
        return {"object": "list", "data": [self._model_card(self.server.model_id)]}

    def _parse(self, kind: str, body: dict) -> GenerationRequest:
        model = body.get("model")
        if model is None:
            model = self.server.model_id
        if not isinstance(model, str):
            raise bad_param("model", "model must be a string", "invalid_type")
        if model not in self.server.model_names():
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.server.model_id!r} (alias {SERVED_ALIAS!r})",
                           param="model", code="model_not_found")
        _reject_unsupported(body)
        max_tokens = _integer(body, "max_tokens", None, 1)
        if kind == "chat":
            max_tokens = _integer(body, "max_completion_tokens", max_tokens, 1)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS[kind]
        temperature = _number(body, "temperature", 1.0, 0.0, False, None)
        top_p = _number(body, "top_p", 1.0, 0.0, True, 1.0)
        top_k = _integer(body, "top_k", 0, 0)
        seed = _integer(body, "seed", None, None)
        stop = _stop(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_param("stream", "stream must be a boolean", "invalid_type")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise bad_param("stream_options", "stream_options must be an object", "invalid_type")
        include_usage = bool(opts.get("include_usage", False))

        if kind == "chat":
            prompt_ids = self.server.adapter.encode(self.server.adapter.chat_prompt(_messages(body)))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]      # the openai client may wrap a single prompt in a list
            if isinstance(prompt, str):
                if not prompt:
                    raise bad_param("prompt", "prompt must not be empty")
                prompt_ids = self.server.adapter.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
                prompt_ids = list(prompt)
            elif prompt is None:
                raise bad_param("prompt", "prompt is required", "missing_required_parameter")
            else:
                raise bad_param("prompt", "prompt must be a non-empty string, or a non-empty list of token ids "
                                          "(batches of several prompts are not supported)")
        if not prompt_ids:
            raise bad_param("prompt" if kind == "completions" else "messages", "the prompt encodes to no tokens")
        self._check_token_ids(prompt_ids)
        max_len = self.server.adapter.max_len
        if max_len is not None and len(prompt_ids) >= max_len:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this server's context is {max_len} "
                                f"tokens (prompt + max_tokens must fit)",
                           param="prompt" if kind == "completions" else "messages", code="context_length_exceeded")
        return GenerationRequest(kind, model, prompt_ids, max_tokens, temperature, top_p, top_k, seed, stop,
                                 stream, include_usage)

    def _check_token_ids(self, ids: list) -> None:
        vocab = getattr(getattr(self.server.engine, "target", None), "vocab_size", None)
        if vocab is not None and any(t < 0 or t >= vocab for t in ids):
            raise bad_param("prompt", f"token ids must be in [0, {vocab})")

    def _generate(self, kind: str, body: dict) -> None:
        if self.server.closing.is_set():
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        req = self._parse(kind, body)
        self.server.count("requests")
        try:
            with self.server.gate.hold():
                if self._client_gone():         # gave up while queued: do not run it
                    self.server.count("cancelled")
                    raise ClientGone
                if req.stream:
                    self._run_stream(req)
                else:
                    self._run_once(req)
        except QueueFull:
            self.server.count("rejected_queue_full")
            raise APIError(429, f"the engine is busy and {self.server.gate.max_queue} requests are already "
                                f"waiting; retry later", type_="rate_limit_error", code="queue_full")

    def _engine_error(self, e: Exception, req: GenerationRequest) -> APIError:
        param = "prompt" if req.kind == "completions" else "messages"
        if isinstance(e, ContextLengthError):
            return APIError(400, str(e), param=param, code="context_length_exceeded")
        if isinstance(e, SamplingParameterError):
            return APIError(400, str(e), code="invalid_value")
        if isinstance(e, SpecExecError):
            return APIError(500, f"{type(e).__name__}: {e}", type_="server_error", code="engine_error")
        self.server.count("errors")
        print(f"[specexec-rt serve] engine failed: {type(e).__name__}: {e}", file=sys.stderr)
        return APIError(500, f"internal engine error: {type(e).__name__}: {e}", type_="server_error",
                        code="internal_error")

    def _envelope(self, req: GenerationRequest) -> dict:
        prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": req.model}

    def _usage(self, req: GenerationRequest, result) -> dict:
        n = len(result.token_ids)
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                "total_tokens": len(req.prompt_ids) + n}

    def _run_once(self, req: GenerationRequest) -> None:
        # Driven through ``stream`` rather than ``generate`` so that a client that gives up (a
        # timeout, Ctrl-C) frees the engine at the next pass here too.
        engine = self.server.engine
        gen = engine.stream(req.prompt_ids, **req.engine_kwargs())
        try:
            for _ in gen:
                if self._client_gone() or self.server.closing.is_set():
                    self.server.count("cancelled")
                    self.close_connection = True
                    raise ClientGone
        except ClientGone:
            raise
        except Exception as e:      # noqa: BLE001 - every engine failure becomes an HTTP answer
            raise self._engine_error(e, req) from e
        finally:
            gen.close()
        result = engine.last_result
        reason = finish_reason(result, req.max_tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                   "finish_reason": reason} if req.kind == "chat" else
                  {"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason})
        out = self._envelope(req)
        out.update(choices=[choice], usage=self._usage(req, result), specexec=stats_json(result.stats))
        self.server.count("completed")
        try:
            self._send_json(200, out)
        except OSError as e:
            raise ClientGone from e

    # ------------------------------------------------------------------------- streaming
    def _write_chunk(self, data: bytes) -> None:
        """One HTTP/1.1 chunk; raises ClientGone when the peer has left."""
        if self._client_gone():
            raise ClientGone
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as e:        # BrokenPipeError, ConnectionResetError, timeouts
            raise ClientGone from e

    def _sse(self, obj) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        self._write_chunk(b"data: " + payload.encode() + b"\n\n")

    def _chunk(self, req: GenerationRequest, env: dict, text: Optional[str], reason: Optional[str],
               first: bool = False) -> dict:
        if req.kind == "chat":
            delta = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return dict(env, choices=[choice])

    def _run_stream(self, req: GenerationRequest) -> None:
        engine = self.server.engine
        gen = engine.stream(req.prompt_ids, **req.engine_kwargs())
        try:
            # Pull the first piece before answering 200, so errors raised at prefill (context
            # length, sampling parameters) still become a proper 4xx.
            try:
                first = next(gen)
                done = False
            except StopIteration:
                first, done = None, True
            except Exception as e:  # noqa: BLE001
                raise self._engine_error(e, req) from e
            env = self._envelope(req)
            env["object"] = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
            self._start_stream()
            if req.kind == "chat":
                self._sse(self._chunk(req, env, "", None, first=True))
            pending = [] if first is None else [first]
            while True:
                for piece in pending:
                    if piece:
                        self._sse(self._chunk(req, env, piece, None))
                if done or self.server.closing.is_set():
                    break
                try:
                    pending = [next(gen)]
                except StopIteration:
                    pending, done = [], True
                except Exception as e:  # noqa: BLE001 - headers are sent: report in-band and end
                    err = self._engine_error(e, req)
                    self._sse(err.body())
                    self._end_stream()
                    return
            result = getattr(engine, "last_result", None)
            if self.server.closing.is_set() and not done:
                raise ClientGone       # shutting down: end the response without a finish chunk
            final = self._chunk(req, env, None if req.kind == "chat" else "",
                                finish_reason(result, req.max_tokens) if result is not None else "stop")
            if result is not None:
                final["usage"] = self._usage(req, result)
                final["specexec"] = stats_json(result.stats)
            self._sse(final)
            if req.include_usage and result is not None:
                self._sse(dict(env, choices=[], usage=final["usage"]))
            self._sse("[DONE]")
            self._end_stream()
            self.server.count("completed")
        except ClientGone:
            self.server.count("cancelled")
            self.close_connection = True
            raise
        finally:
            gen.close()     # GeneratorExit at the engine's current yield: the pass in flight is its last

    def _start_stream(self) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
        except OSError as e:
            raise ClientGone from e

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as e:
            raise ClientGone from e
