"""Turning a request's growing list of token ids into text: end-of-sequence, stop strings,
``max_new_tokens``, and the pieces a stream may show.

A piece is held back while it could still be the start of a stop string or ends in an
incomplete character (a multi-byte character split across tokens decodes as U+FFFD), so a
streamed text never shows something the final text does not contain. Without a tokenizer
the text is None and only token-level rules apply (EOS ids, ``max_new_tokens``).
"""
from __future__ import annotations

from typing import Optional


class TextTracker:
    """Per-request output bookkeeping. ``add(new_ids)`` after every pass returns the text piece
    that became safe to show; ``finish_reason`` is set once generation must stop."""

    def __init__(self, tokenizer, eos_ids: set, max_new_tokens: int, stops: list):
        if stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.stops = stops
        self.token_ids: list = []
        self.emitted = ""                       # text shown so far
        self.finish_reason: Optional[str] = None

    @property
    def text(self) -> Optional[str]:
        return self.emitted if self.tokenizer is not None else None

    def decode(self, ids: list) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new: list) -> str:
        """Take one pass's new tokens; returns the newly safe text ("" without a tokenizer)."""
        if self.finish_reason:
            return ""
        finish = None
        for i, t in enumerate(new):
            if t in self.eos_ids:
                new, finish = new[:i + 1], "eos"
                break
        out = self.token_ids
        out.extend(new)
        if len(out) >= self.max_new_tokens:
            del out[self.max_new_tokens:]
            finish = finish or "length"
        piece = ""
        if self.tokenizer is not None:
            text = self.decode(out)
            cut = find_stop(text, self.stops)
            if cut is not None:
                text, finish = text[:cut[0]], "stop"
                self.token_ids = out = self._trim_to_stop(out, cut[1])
                safe = len(text)
            else:
                safe = len(text) if finish else safe_prefix_len(text, self.stops)
            if safe > len(self.emitted):
                piece = text[len(self.emitted):safe]
                self.emitted = text[:safe]
        self.finish_reason = finish
        return piece

    def _trim_to_stop(self, out: list, end: int) -> list:
        """The shortest prefix of ``out`` whose text contains the stop string ending at ``end``."""
        for i in range(1, len(out) + 1):
            if len(self.decode(out[:i])) >= end:
                return out[:i]
        return out


def find_stop(text: str, stops: list) -> Optional[tuple[int, int]]:
    """(start, end) of the earliest stop string in ``text``, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(s))
    return best


def safe_prefix_len(text: str, stops: list) -> int:
    """How much of ``text`` can be shown: hold back an incomplete character and any suffix that
    may be the start of a stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                n -= k
                break
    return max(n, 0)
