"""The OpenAI answer shapes: completions, chat completions, their streamed chunks (server-sent
events), ``usage``, and the extra ``specexec`` object with the engine's statistics."""
from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from typing import Optional


def envelope(kind: str, model: str, stream: bool = False) -> dict:
    """id / object / created / model of one answer (every chunk of a stream shares it)."""
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    obj = ("chat.completion.chunk" if stream else "chat.completion") if kind == "chat" else "text_completion"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, result) -> dict:
    n = len(result.token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


def finish_reason(result, max_tokens: int) -> str:
    """OpenAI's ``stop`` (EOS or a stop string) or ``length``, from the engine's own reason."""
    reason = getattr(result, "finish_reason", None) or getattr(getattr(result, "stats", None), "finish_reason", None)
    if reason in ("stop", "eos"):       # the engine says "eos" for an end-of-sequence token
        return "stop"
    if reason == "length":
        return reason
    return "length" if len(result.token_ids) >= max_tokens else "stop"


def completion(kind: str, env: dict, result, prompt_tokens: int, max_tokens: int,
               stats_extra: Optional[dict] = None) -> dict:
    """The whole (non-streamed) answer. ``stats_extra``: fields added to its ``specexec`` object."""
    reason = finish_reason(result, max_tokens)
    choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
               "finish_reason": reason} if kind == "chat" else
              {"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason})
    return dict(env, choices=[choice], usage=usage(prompt_tokens, result),
                specexec={**stats_json(result.stats), **(stats_extra or {})})


def chunk(kind: str, env: dict, text: Optional[str], reason: Optional[str] = None, first: bool = False) -> dict:
    """One streamed chunk: a text piece, the chat opening (``first``: the role delta), or the last
    one (``reason`` set)."""
    if kind == "chat":
        delta = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    return dict(env, choices=[choice])


def final_chunks(kind: str, env: dict, result, prompt_tokens: int, max_tokens: int, include_usage: bool,
                 stats_extra: Optional[dict] = None) -> list:
    """The chunk with ``finish_reason``, ``usage`` and ``specexec`` (plus ``stats_extra``), then
    (``include_usage``) the usage-only chunk with empty ``choices``."""
    last = chunk(kind, env, None if kind == "chat" else "", finish_reason(result, max_tokens))
    last["usage"] = usage(prompt_tokens, result)
    last["specexec"] = {**stats_json(result.stats), **(stats_extra or {})}
    out = [last]
    if include_usage:
        out.append(dict(env, choices=[], usage=last["usage"]))
    return out


def sse(obj) -> bytes:
    """One server-sent event: ``data: {json}\\n\\n`` (or ``data: [DONE]\\n\\n``)."""
    payload = obj if isinstance(obj, str) else json.dumps(obj)
    return b"data: " + payload.encode() + b"\n\n"


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
                except Exception:    # noqa: BLE001 - a property that cannot be computed is skipped
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
