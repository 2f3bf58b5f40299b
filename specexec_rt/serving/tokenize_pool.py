"""Tokenizing requests off the event loop, with no lock that other requests wait on.

A Rust-backed HF tokenizer must not be used from two threads at once (a concurrent mutable
borrow raises "Already borrowed"), and the engine's thread decodes with the engine's tokenizer
while requests are being tokenized. So each of a few pool threads gets its own deep copy of the
tokenizer (made up front: ~0.3 s for SmolLM2's) and tokenizes with it alone; a long prompt then
occupies one pool thread, never a lock every request needs. Text is also bounded before it is
tokenized (``params.text_byte_limit``), so no prompt costs more than what can fit the context.
"""
from __future__ import annotations

import asyncio
import copy
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ..speculative import chat

DEFAULT_THREADS = 2


class TokenizerPool:
    """``await pool.encode(text)``, ``await pool.chat_ids(messages)`` on pool threads, each with
    its own tokenizer copy. Ids are exactly what ``Engine`` feeds for a text prompt
    (``tokenizer(text).input_ids``)."""

    def __init__(self, tokenizer, threads: int = DEFAULT_THREADS):
        if tokenizer is None:
            raise ValueError("the server needs a tokenizer: pass tokenizer= or use an engine that has one")
        self.tokenizer = tokenizer
        copies: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            copies.put(_private_copy(tokenizer))
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="specexec-tokenize",
                                        initializer=lambda: setattr(self._local, "tok", copies.get()))
        self.longest_token_bytes = longest_token_bytes(tokenizer)

    async def run(self, fn, *args):
        """``fn(tokenizer, *args)`` on a pool thread with that thread's tokenizer."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._local.tok, *args))

    async def encode(self, text: str) -> list:
        return await self.run(_encode, text)

    async def chat_ids(self, messages: list) -> list:
        return await self.run(_chat_ids, messages)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _encode(tok, text: str) -> list:
    return list(tok(text).input_ids)


def _chat_ids(tok, messages: list) -> list:
    """``messages`` already checked (``chat.check_messages``); ChatTemplateError if the template
    refuses them."""
    return _encode(tok, chat.render_messages(tok, messages))


def _private_copy(tokenizer):
    """A deep copy, or the tokenizer itself when it cannot be copied (a pure-Python tokenizer
    holds no Rust borrow, so sharing it is safe)."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:   # noqa: BLE001 - any copy failure: share the original
        return tokenizer


def longest_token_bytes(tokenizer, limit: Optional[int] = 1 << 20) -> int:
    """The longest token's text in UTF-8 bytes (0 when the vocabulary cannot be read)."""
    try:
        n = min(len(tokenizer), limit)
        texts = tokenizer.batch_decode([[i] for i in range(n)])
    except Exception:   # noqa: BLE001 - an unusual tokenizer: fall back to the floor in text_byte_limit
        return 0
    return max((len(t.encode("utf-8", "surrogatepass")) for t in texts), default=0)
