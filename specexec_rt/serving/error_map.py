"""The one place that decides what an exception means to a user: the CLI's exit code and the
server's HTTP status with its OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.

| exception | HTTP | code | exit |
| --- | --- | --- | --- |
| ``APIError`` (raised by the server itself) | its own | its own | 2 |
| ``InvalidParameterError`` | 400 | its ``code`` (``invalid_value``, ``invalid_type``, ...), ``param`` named | 2 |
| other ``SamplingParameterError`` | 400 | ``invalid_value`` | 2 |
| ``ContextLengthError`` | 400 | ``context_length_exceeded`` (param: the prompt) | 2 |
| ``MemoryBudgetError`` | 503 | ``insufficient_memory`` | 2 |
| ``UsageError`` (a CLI flag that cannot work) | 400 | ``invalid_value`` | 2 |
| any other ``SpecExecError`` (load, vocabulary, NaN logits ...) | 500 | ``engine_error`` | 2 |
| ``KeyboardInterrupt`` | - | - | 130 |
| anything else (a bug) | 500 | ``internal_error`` | 1 |

Bad input is always a 4xx: a 500 means the engine or the server failed.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import Optional

from ..errors import (ContextLengthError, InvalidParameterError, MemoryBudgetError, SamplingParameterError,
                      SpecExecError)

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEBUG_ENV = "SPECEXEC_DEBUG"       # =1: the CLI prints the traceback of any error


class UsageError(SpecExecError, ValueError):
    """A command-line flag or server setting that cannot work (a device that does not exist, a
    port in use, a method without its draft); the message names the flag."""


class APIError(Exception):
    """An HTTP error answer decided by the server itself (401, 404, 405, 408, 413, 429, 503 ...)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class ErrorAnswer:
    """What one exception becomes: an HTTP status + body, and a CLI exit code."""

    status: int
    message: str
    type: str
    code: Optional[str]
    param: Optional[str]
    exit_code: int
    headers: tuple = ()

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def classify(exc: BaseException, prompt_param: Optional[str] = None) -> ErrorAnswer:
    """``prompt_param``: what the request calls its prompt (``prompt`` or ``messages``), named by
    context-length errors."""
    if isinstance(exc, APIError):
        return ErrorAnswer(exc.status, exc.message, exc.type, exc.code, exc.param, EXIT_USAGE,
                           tuple(exc.headers.items()))
    if isinstance(exc, InvalidParameterError):
        return ErrorAnswer(400, str(exc), "invalid_request_error", exc.code, exc.param, EXIT_USAGE)
    if isinstance(exc, (SamplingParameterError, UsageError)):
        return ErrorAnswer(400, str(exc), "invalid_request_error", "invalid_value", None, EXIT_USAGE)
    if isinstance(exc, ContextLengthError):
        return ErrorAnswer(400, str(exc), "invalid_request_error", "context_length_exceeded", prompt_param,
                           EXIT_USAGE)
    if isinstance(exc, MemoryBudgetError):
        return ErrorAnswer(503, str(exc), "server_error", "insufficient_memory", None, EXIT_USAGE)
    if isinstance(exc, SpecExecError):
        return ErrorAnswer(500, f"{type(exc).__name__}: {exc}", "server_error", "engine_error", None, EXIT_USAGE)
    if isinstance(exc, KeyboardInterrupt):
        return ErrorAnswer(503, "interrupted", "server_error", "shutting_down", None, EXIT_INTERRUPTED)
    return ErrorAnswer(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error", None,
                       EXIT_INTERNAL)


def report_cli_error(exc: BaseException, prog: str = "specexec-rt", stream=None) -> int:
    """Print one line about ``exc`` (plus the traceback with SPECEXEC_DEBUG=1) -> the exit code."""
    stream = stream or sys.stderr
    answer = classify(exc)
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
    if answer.exit_code == EXIT_INTERRUPTED:
        print(f"{prog}: interrupted", file=stream)
    elif answer.exit_code == EXIT_USAGE:
        print(f"{prog}: error: {exc}", file=stream)
    else:
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)",
              file=stream)
    return answer.exit_code
