"""The OpenAI request bodies as pydantic models, and the JSON body parser in front of them.

Every generation parameter's validator calls the shared checks of
``specexec_rt/speculative/params.py``, so the server's messages are the engine API's, word for
word, with the server's parameter names (``max_tokens`` where the API says ``max_new_tokens``).
A ``ValidationError`` becomes the first failing parameter's ``InvalidParameterError``
(``as_parameter_error``): the answer is a 400 naming it, never a 422.

Options the engine cannot honour are refused rather than ignored (``n`` other than 1,
``best_of``, ``echo``, ``logprobs``, penalties, ``logit_bias``, ``suffix``, tools, a
non-text ``response_format``): each would change what the target's distribution gives.
Other unknown fields are ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from ..errors import InvalidParameterError, SpecExecError
from ..speculative import chat, params
from .error_map import APIError

DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256}   # OpenAI's completions default is 16
MAX_STOP_SEQUENCES = 4
MAX_JSON_DEPTH = 32         # OpenAI bodies nest 4-5 levels (messages[i].content[j].text)

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


# ------------------------------------------------------------------------------ JSON body
def json_depth(raw: bytes) -> int:
    """Nesting depth of the arrays/objects in JSON text ``raw`` (strings skipped), computed
    without parsing it: a deeply nested body must be refused before the parser recurses."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    a = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((a == ord("[")) | (a == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def parse_json_object(raw: bytes) -> dict:
    """A request body -> dict, or a 400 ``invalid_json`` APIError saying what is wrong."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted",
                       code="invalid_json")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8: {e}", code="invalid_json") from None
    except (ValueError, RecursionError) as e:     # JSONDecodeError, over-long integers
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}",
                       code="invalid_json")
    return body


# ------------------------------------------------------------------------------ validators
def _optional(check):
    """A before-validator: None (or JSON null) stays None, anything else goes through ``check``."""
    def validate(cls, value, info: ValidationInfo):
        return None if value is None else check(value, info.field_name)
    return validate


def _refuse_unless(ok, why: str):
    def validate(cls, value, info: ValidationInfo):
        if value is not None and not ok(value):
            name = info.field_name
            raise InvalidParameterError(name, f"{name}={_short(value)} is not supported ({why})", "unsupported_value")
        return value
    return validate


def _short(value) -> str:
    r = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool)) else repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameterError(name, f"{name} must be true or false, got {_short(value)}", "invalid_type")
    return value


def _check_model(value, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidParameterError(name, f"{name} must be a string, got {_short(value)}", "invalid_type")
    return value


class _GenerationBody(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions; None = the default."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Optional[tuple] = None
    stream: Optional[bool] = None
    stream_options: Optional[dict] = None
    n: Any = None
    best_of: Any = None
    echo: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    _model = field_validator("model", mode="before")(_optional(_check_model))
    _max_tokens = field_validator("max_tokens", mode="before")(_optional(params.check_max_new_tokens))
    _temperature = field_validator("temperature", mode="before")(_optional(params.check_temperature))
    _top_p = field_validator("top_p", mode="before")(_optional(params.check_top_p))
    _top_k = field_validator("top_k", mode="before")(_optional(params.check_top_k))
    _seed = field_validator("seed", mode="before")(_optional(params.check_seed))
    _stop = field_validator("stop", mode="before")(
        _optional(lambda v, name: params.check_stop(v, name, MAX_STOP_SEQUENCES)))
    _stream = field_validator("stream", mode="before")(_optional(_check_bool))

    _n = field_validator("n", mode="before")(_refuse_unless(lambda v: _is_int(v) and v == 1, "only n=1"))
    _best_of = field_validator("best_of", mode="before")(
        _refuse_unless(lambda v: _is_int(v) and v == 1, "only one candidate is generated"))
    _echo = field_validator("echo", mode="before")(_refuse_unless(lambda v: v is False, "the prompt is not echoed"))
    _logprobs = field_validator("logprobs", "top_logprobs", mode="before")(
        _refuse_unless(lambda v: v is False or (_is_int(v) and v == 0), "logprobs are not returned"))
    _penalties = field_validator("presence_penalty", "frequency_penalty", mode="before")(
        _refuse_unless(lambda v: not isinstance(v, bool) and v in (0, 0.0),
                       "it would change the target's distribution"))
    _logit_bias = field_validator("logit_bias", mode="before")(
        _refuse_unless(lambda v: v == {}, "it would change the target's distribution"))

    @field_validator("stream_options", mode="before")
    @classmethod
    def _stream_options(cls, value, info: ValidationInfo):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidParameterError("stream_options", f"stream_options must be an object, got {_short(value)}",
                                        "invalid_type")
        usage = value.get("include_usage")
        if usage is not None:
            _check_bool(usage, "stream_options.include_usage")
        return value

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def engine_kwargs(self, kind: str) -> dict:
        """The checked parameters with the server's defaults filled in, as ``Engine.stream`` takes them."""
        return dict(max_new_tokens=self.max_new_tokens(kind),
                    temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p,
                    top_k=self.top_k or 0, seed=self.seed, stop=list(self.stop) if self.stop else None)

    def max_new_tokens(self, kind: str) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS[kind]


class CompletionRequest(_GenerationBody):
    """``POST /v1/completions``: ``prompt`` is a string or one list of token ids (the openai
    client may wrap either in a one-element list). Validate with
    ``context={"vocab_size": V}`` to check the ids' range."""

    prompt: Union[str, list]
    suffix: Any = None

    _suffix = field_validator("suffix", mode="before")(_refuse_unless(lambda v: v == "", "no insertion mode"))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value, info: ValidationInfo):
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            raise InvalidParameterError("prompt", f"prompt is a batch of {len(value)} strings; this server takes one "
                                                  f"prompt per request")
        if not isinstance(value, (str, list)) and value is not None:
            raise InvalidParameterError("prompt", f"prompt must be a string or a list of token ids, got "
                                                  f"{_short(value)}", "invalid_type")
        return params.check_prompt(value, (info.context or {}).get("vocab_size"))


class ChatCompletionRequest(_GenerationBody):
    """``POST /v1/chat/completions``: ``messages`` checked by the engine API's own check
    (``specexec_rt/speculative/chat.py``: ``developer`` is taken as ``system``; content is a
    string or a list of text parts), then through the tokenizer's chat template."""

    messages: list
    max_completion_tokens: Optional[int] = None
    tools: Any = None
    response_format: Any = None

    _max_completion_tokens = field_validator("max_completion_tokens", mode="before")(
        _optional(params.check_max_new_tokens))
    _tools = field_validator("tools", mode="before")(_refuse_unless(lambda v: v == [], "no tool calling"))
    _response_format = field_validator("response_format", mode="before")(
        _refuse_unless(lambda v: isinstance(v, dict) and v.get("type") == "text", "no constrained output"))

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value, info: ValidationInfo):
        return chat.check_messages(value)

    def max_new_tokens(self, kind: str = "chat") -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_new_tokens(kind)


# ------------------------------------------------------------------------------ errors
def validate_body(model: type, body: dict, vocab_size: Optional[int] = None):
    """``model.model_validate(body)``; a failure raises the first failing parameter's error."""
    try:
        return model.model_validate(body, context={"vocab_size": vocab_size})
    except ValidationError as e:
        raise as_parameter_error(e) from None


def as_parameter_error(e: ValidationError) -> Exception:
    """The error a validator raised (it names its parameter), or one built from pydantic's own
    (a missing field, a wrong type the validators never saw)."""
    err = e.errors()[0]
    original = (err.get("ctx") or {}).get("error")
    if isinstance(original, SpecExecError):
        return original
    param = _param_name(err.get("loc", ()))
    if err.get("type") == "missing":
        return InvalidParameterError(param, f"{param} is required", "missing_required_parameter")
    return InvalidParameterError(param, f"{param}: {err.get('msg')}", "invalid_type")


def _param_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"
