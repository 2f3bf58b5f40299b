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
