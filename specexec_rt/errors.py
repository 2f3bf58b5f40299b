"""Errors users see. Each names the problem and, where there is one, the fix."""
from __future__ import annotations


class SpecExecError(Exception):
    """Base class of every error specexec-rt raises on purpose."""


class ModelLoadError(SpecExecError, ValueError):
    """A checkpoint could not be read: missing, truncated, corrupt or incomplete."""


class UnsupportedModelError(SpecExecError, ValueError):
    """An architecture (or one of its options) the runtime does not implement. ``supported``
    lists what is, for the message."""

    def __init__(self, model_type, detail: str | None = None, supported=()):
        self.model_type = model_type
        msg = f"unsupported model_type {model_type!r}"
        if detail:
            msg += f": {detail}"
        elif supported:
            msg += f" (supported: {', '.join(sorted(supported))})"
        super().__init__(msg)


class ContextLengthError(SpecExecError, ValueError):
    """A prompt (plus what must be generated or drafted) does not fit in the KV cache."""


class VocabularyMismatchError(SpecExecError, ValueError):
    """The draft and target models do not share a vocabulary."""


class SamplingParameterError(SpecExecError, ValueError):
    """temperature, top_p, top_k, max_new_tokens ... out of range."""


class NonFiniteLogitsError(SpecExecError, FloatingPointError):
    """A model produced NaN or inf logits (broken weights, or an overflow in a low-precision dtype)."""


class MemoryBudgetError(SpecExecError, MemoryError):
    """A budget (draft tree, verification pass) or a prompt needs more working memory than the
    device has free; the message names the setting to lower (see specexec_rt/speculative/memory.py)."""


class InvalidParameterError(SamplingParameterError):
    """A request parameter of the wrong type or out of range (``specexec_rt/speculative/params.py``).

    ``param`` names it as the caller spelled it (``temperature`` in the API, ``--temperature`` on
    the command line, ``messages[0].content`` in a chat request); ``code`` says how it is wrong:
    ``invalid_type``, ``invalid_value``, ``missing_required_parameter`` or ``unsupported_value``
    (the OpenAI error codes, so the server can pass them on)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code

    def __reduce__(self):       # picklable although __init__ takes more than the message
        return type(self), (self.param, str(self), self.code)


class ChatTemplateError(InvalidParameterError):
    """The tokenizer's chat template refused the messages (or there is none); ``param`` names
    the first message at which it fails (``messages[3]``), ``code`` is ``chat_template_error``."""

    def __init__(self, param: str, message: str, code: str = "chat_template_error"):
        super().__init__(param, message, code)
