"""Chat messages: checked before a template sees them, rendered with the template's errors named.

``Engine.apply_chat_template``, the CLI's ``generate`` (without ``--raw``) and the server's
``/v1/chat/completions`` share these two steps:

- ``check_messages``: a non-empty list of ``{"role", "content"}`` objects, ``role`` one of
  ``ROLES`` (``developer`` is OpenAI's newer name for ``system`` and is passed on as
  ``system``), ``content`` a string or a list of text parts (``{"type": "text", "text": ...}``,
  as OpenAI allows; joined into one string), valid Unicode, not all of them empty. Anything
  else is an ``InvalidParameterError`` naming the message and field (``messages[2].role``).
  Templates index ``message['content']`` and concatenate it with strings, so without this
  check a missing field or a list of parts surfaces as the template engine's ``UndefinedError``
  or a ``TypeError``.
- ``render_messages``: the tokenizer's chat template over checked messages, with the generation
  prompt. A template that refuses them (its own ``raise_exception``, roles that must
  alternate, ...) raises ``ChatTemplateError`` naming the first message at which it fails.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..errors import ChatTemplateError, InvalidParameterError
from .params import check_text, show

ROLES = ("system", "developer", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}


def check_messages(messages, name: str = "messages") -> list:
    """``messages`` checked -> a new list of ``{"role": str, "content": str}`` (other fields
    dropped: the templates take only these)."""
    if messages is None:
        raise InvalidParameterError(name, f"{name} is required: a non-empty list of {{role, content}} objects",
                                    "missing_required_parameter")
    if isinstance(messages, (str, bytes, bytearray, Mapping)) or not isinstance(messages, (list, tuple)):
        raise InvalidParameterError(name, f"{name} must be a non-empty list of {{role, content}} objects, got "
                                          f"{show(messages)} ({type(messages).__name__})", "invalid_type")
    if not messages:
        raise InvalidParameterError(name, f"{name} must be a non-empty list of {{role, content}} objects, got []")
    out = [_check_message(m, f"{name}[{i}]") for i, m in enumerate(messages)]
    if not any(m["content"] for m in out):
        raise InvalidParameterError(name, f"{name} are all empty: at least one needs some content")
    return out


def _check_message(message, name: str) -> dict:
    if not isinstance(message, Mapping):
        raise InvalidParameterError(name, f"{name} must be a {{role, content}} object, got {show(message)} "
                                          f"({type(message).__name__})", "invalid_type")
    if "role" not in message or message["role"] is None:
        raise InvalidParameterError(f"{name}.role", f"{name}.role is required: one of {', '.join(ROLES)}",
                                    "missing_required_parameter")
    role = message["role"]
    if not isinstance(role, str):
        raise InvalidParameterError(f"{name}.role", f"{name}.role must be a string, one of {', '.join(ROLES)}; got "
                                                    f"{show(role)} ({type(role).__name__})", "invalid_type")
    if role not in ROLES:
        raise InvalidParameterError(f"{name}.role", f"{name}.role must be one of {', '.join(ROLES)}, got {show(role)}")
    if "content" not in message or message["content"] is None:
        raise InvalidParameterError(f"{name}.content", f"{name}.content is required: a string or a list of text "
                                                       f"parts", "missing_required_parameter")
    return {"role": ROLE_ALIASES.get(role, role), "content": _content_text(message["content"], f"{name}.content")}


def _content_text(content, name: str) -> str:
    if isinstance(content, str):
        return check_text(content, name)
    if not isinstance(content, (list, tuple)):
        raise InvalidParameterError(name, f"{name} must be a string or a list of text parts, got {show(content)} "
                                          f"({type(content).__name__})", "invalid_type")
    parts = []
    for j, part in enumerate(content):       # [{"type": "text", "text": ...}, ...]
        if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise InvalidParameterError(name, f"{name}[{j}]: only text parts are supported ({{'type': 'text', "
                                              f"'text': ...}}), got {show(part)}", "unsupported_value")
        parts.append(check_text(part["text"], f"{name}[{j}].text", param=name))
    return "".join(parts)


def render_messages(tokenizer, messages: list, name: str = "messages") -> str:
    """The chat template over ``messages`` (checked by ``check_messages``), with the generation
    prompt. ChatTemplateError when the tokenizer has no template or the template refuses them:
    it names ``messages[i]``, the message whose addition makes the template fail."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(name, "the tokenizer has no chat template: give the prompt as text (the CLI's --raw, "
                                      "the server's /v1/completions)")
    try:
        return _render(tokenizer, messages)
    except Exception as e:  # noqa: BLE001 - whatever a template raises (jinja2's errors, TypeError ...)
        error = e
    i = _first_failing(tokenizer, messages, error)
    raise ChatTemplateError(f"{name}[{i}]", f"the model's chat template fails on {name}[{i}] (role "
                                            f"{messages[i]['role']!r}): {type(error).__name__}: {error}") from error


def _render(tokenizer, messages: list) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _first_failing(tokenizer, messages: list, error: Exception) -> int:
    """The index ``i`` such that the template renders ``messages[:i]`` but fails on
    ``messages[:i + 1]`` with the same error as on all of them (a binary search: log2(n)
    renders, not n, however long the conversation)."""
    def fails(k: int) -> bool:
        try:
            _render(tokenizer, messages[:k])
        except Exception as e:  # noqa: BLE001
            return type(e) is type(error) and str(e) == str(error)
        return False

    lo, hi = 0, len(messages)          # messages[:lo] does not fail so (empty: never rendered), [:hi] does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid
    return hi - 1
