"""One validation layer for request parameters, shared by every surface.

``Engine.generate`` / ``Engine.stream``, the CLI (before any model loads) and the server (the
pydantic validators of its request bodies) all check a request's parameters with these
functions, so one bad value gets one message wherever it comes from. Each check takes the
parameter's ``name`` as that surface spells it (``max_new_tokens``, ``--max-new-tokens``,
``max_tokens``) and raises ``InvalidParameterError`` (a ``SamplingParameterError``) whose
message names it, shows the value and, where there is one, the allowed range.

Nothing is coerced silently: a float is not an int (``2.0`` tokens, a seed of ``1.5``), a bool
is not a number, ``bytes`` are not token ids, ``"0.7"`` is not a temperature, and ``inf`` /
``nan`` are not finite.
"""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..errors import ContextLengthError, InvalidParameterError, MemoryBudgetError

# torch.Generator.manual_seed takes [-2**63, 2**64 - 1] and folds negative seeds onto positive
# ones; negatives are refused so that two different seeds never give the same draws (and a
# client's -1 "random seed" convention is not taken as a fixed seed).
SEED_MAX = 2**64 - 1
# Below this a positive temperature divides float32 logits into inf/NaN (measured: 1e-38 fails,
# 1e-30 works); anything this small is greedy in effect, so it is refused rather than clamped.
MIN_TEMPERATURE = 1e-5
# A text of B bytes has at least B / L tokens when the longest token spells L bytes (tokenizers
# that keep every byte); the server checks this before tokenizing (text_byte_limit).
MIN_BYTES_PER_TOKEN_BOUND = 16

Prompt = Union[str, list]


@dataclass(frozen=True)
class RequestParams:
    """The checked generation parameters of one request."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: tuple = ()        # non-empty strings


def show(value, limit: int = 60) -> str:
    """repr of a bad value, cut short: a message must stay one readable line."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _type_error(name: str, what: str, value) -> InvalidParameterError:
    return InvalidParameterError(name, f"{name} must be {what}, got {show(value)} ({type(value).__name__})",
                                 "invalid_type")


def as_int(value, name: str, what: str = "an integer") -> int:
    """An integer (Python or numpy int, 0-d integer tensor); never a bool, a float or a str."""
    if isinstance(value, (bool, float, str, bytes)) or _is_bool_tensor(value):
        raise _type_error(name, what, value)
    try:
        return operator.index(value)
    except TypeError:
        raise _type_error(name, what, value) from None


def _is_bool_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def as_real(value, name: str) -> float:
    """A finite real number (int or float, numpy included); never a bool or a str."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _type_error(name, "a number", value)
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise InvalidParameterError(name, f"{name} must be a finite number, got {show(value)}")
    return x


def check_max_new_tokens(value, name: str = "max_new_tokens") -> int:
    n = as_int(value, name, "a positive integer")
    if n < 1:
        raise InvalidParameterError(name, f"{name} must be a positive integer, got {n}")
    return n


def check_temperature(value, name: str = "temperature") -> float:
    t = as_real(value, name)
    if t < 0 or 0 < t < MIN_TEMPERATURE:
        raise InvalidParameterError(name, f"{name} must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, inf), got {t!r}")
    return t


def check_top_p(value, name: str = "top_p") -> float:
    p = as_real(value, name)
    if not 0.0 < p <= 1.0:
        raise InvalidParameterError(name, f"{name} must be in (0, 1], got {p!r}")
    return p


def check_top_k(value, name: str = "top_k") -> int:
    k = as_int(value, name, "an integer >= 0 (0 = off)")
    if k < 0:
        raise InvalidParameterError(name, f"{name} must be an integer >= 0 (0 = off), got {k}")
    return k


def check_seed(value, name: str = "seed") -> Optional[int]:
    """None (a fresh random seed) or an int in [0, 2**64 - 1], the generator's range."""
    if value is None:
        return None
    s = as_int(value, name, "an integer in [0, 2**64 - 1]")
    if not 0 <= s <= SEED_MAX:
        raise InvalidParameterError(name, f"{name} must be in [0, 2**64 - 1] (omit it for a random seed), "
                                          f"got {show(s)}")
    return s


def check_stop(value, name: str = "stop", max_count: Optional[int] = None) -> tuple:
    """None, a string, or a list/tuple of strings, every one non-empty and valid Unicode (as
    prompts are) -> a tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        stops = [value]
    elif isinstance(value, (list, tuple)):
        stops = list(value)
    else:
        raise _type_error(name, "a string or a list of strings", value)
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise InvalidParameterError(name, f"{name}[{i}] must be a string, got {show(s)} ({type(s).__name__})",
                                        "invalid_type")
        if not s:
            raise InvalidParameterError(name, f"{name} strings must be non-empty ({name}[{i}] is '')")
        check_text(s, name if isinstance(value, str) else f"{name}[{i}]", param=name)
    if max_count is not None and len(stops) > max_count:
        raise InvalidParameterError(name, f"{name} takes at most {max_count} strings, got {len(stops)}")
    return tuple(stops)


def check_text(text: str, name: str = "prompt", param: Optional[str] = None) -> str:
    """``text`` unchanged if it is valid Unicode (JSON can carry lone surrogates such as
    "\\ud800", which tokenizers refuse with a TypeError, and a command line undecodable bytes
    as surrogates). The message names ``name``; the error's ``param`` is ``param`` or ``name``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameterError(param or name, f"{name} is not valid Unicode text: {e.reason} "
                                          f"({text[e.start:e.end]!r} at index {e.start})") from None
    return text


def check_prompt(prompt, vocab_size: Optional[int] = None, name: str = "prompt") -> Prompt:
    """A non-empty ``str``, or a non-empty sequence of int token ids (list, tuple, numpy array,
    1-D or ``[1, n]`` integer tensor) -> the str, or the ids as a list of Python ints, each
    checked against ``vocab_size`` when given."""
    if prompt is None:
        raise InvalidParameterError(name, f"{name} is required: a string or a list of token ids",
                                    "missing_required_parameter")
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidParameterError(name, f"{name} is empty")
        return check_text(prompt, name)
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InvalidParameterError(name, f"{name} must be a string or a list of token ids, not "
                                          f"{type(prompt).__name__} (decode it to a str first)", "invalid_type")
    if isinstance(prompt, torch.Tensor):
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise InvalidParameterError(name, f"{name} token ids must be integers, got a {prompt.dtype} tensor",
                                        "invalid_type")
        if prompt.dim() > 2 or (prompt.dim() == 2 and prompt.shape[0] != 1):
            raise InvalidParameterError(name, f"{name} must be one sequence of token ids ([n] or [1, n]), got a "
                                              f"tensor of shape {list(prompt.shape)}")
        items = prompt.reshape(-1).tolist()
    elif isinstance(prompt, Sequence):
        items = list(prompt)
    elif type(prompt).__module__ == "numpy" and hasattr(prompt, "ndim"):     # an ndarray: its dtype decides
        return check_prompt(_numpy_to_tensor(prompt, name), vocab_size, name)
    else:
        raise _type_error(name, "a string or a list of token ids", prompt)
    if not items:
        raise InvalidParameterError(name, f"{name} is empty")
    return check_token_ids(items, vocab_size, name)


def check_prompts(prompts, vocab_size: Optional[int] = None, name: str = "prompts") -> list:
    """A batch: a list, tuple or other iterable of prompts (not a ``str``, whose characters would
    each become a prompt, nor ``bytes`` or one list of token ids), each checked by
    ``check_prompt`` as ``prompts[i]`` -> the checked prompts."""
    if prompts is None:
        raise InvalidParameterError(name, f"{name} is required: a list of prompts", "missing_required_parameter")
    if isinstance(prompts, (str, bytes, bytearray, memoryview)):
        raise InvalidParameterError(name, f"{name} must be a list of prompts, not one {type(prompts).__name__} "
                                          f"(each character would be a prompt): wrap it in a list, or call "
                                          f"generate", "invalid_type")
    if isinstance(prompts, (Mapping, Set)) or not isinstance(prompts, Iterable):     # a set has no order
        raise _type_error(name, "a list of prompts", prompts)
    items = list(prompts)
    if items and all(_is_token_id(p) for p in items):
        raise InvalidParameterError(name, f"{name} is one list of token ids, not a list of prompts: wrap it in a "
                                          f"list ([ids]), or call generate", "invalid_type")
    return [check_prompt(p, vocab_size, f"{name}[{i}]") for i, p in enumerate(items)]


def _is_token_id(value) -> bool:
    """An int-like scalar (a one-element tensor row of a batch is a prompt, not an id)."""
    if isinstance(value, (bool, float, str, bytes)) or _is_bool_tensor(value):
        return False
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def batch_seeds(seed, n: int, name: str = "seed") -> list:
    """The seeds of a batch's ``n`` requests: ``seed + i`` for request ``i`` (all None without
    a seed), every one in the generator's range."""
    s = check_seed(seed, name)
    if s is None:
        return [None] * n
    if n and s + n - 1 > SEED_MAX:
        raise InvalidParameterError(name, f"{name} + i seeds prompt i, so with {n} prompts {name} must be at most "
                                          f"2**64 - {n}, got {show(s)}")
    return [s + i for i in range(n)]


@contextmanager
def batch_item(name: str, i: int):
    """Errors about one prompt of a batch (tokenized empty, too long for the context or the
    device's memory) say which: ``prompt`` becomes ``prompts[i]``."""
    item = f"{name}[{i}]"
    try:
        yield
    except InvalidParameterError as e:
        if not e.param.startswith("prompt") or e.param.startswith(name):
            raise
        message = str(e)
        message = message.replace("prompt", item, 1) if message.startswith("prompt") else f"{item}: {message}"
        raise InvalidParameterError(item + e.param[len("prompt"):], message, e.code) from None
    except (ContextLengthError, MemoryBudgetError) as e:
        raise type(e)(f"{item}: {e}") from None


def _numpy_to_tensor(array, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(array)
    except (TypeError, RuntimeError, ValueError):
        raise _type_error(name, "a string or a list of token ids", array) from None


def check_token_ids(items, vocab_size: Optional[int], name: str = "prompt") -> list:
    """Every item an int (not bool/float/str) and, with ``vocab_size``, in ``[0, vocab_size)``."""
    ids = []
    for i, t in enumerate(items):
        if isinstance(t, (bool, float, str, bytes)) or _is_bool_tensor(t):
            raise _id_type_error(name, i, t)
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise _id_type_error(name, i, t) from None
    if vocab_size is not None:
        for i, t in enumerate(ids):
            if not 0 <= t < vocab_size:
                raise InvalidParameterError(name, f"{name}[{i}] = {show(t)} is not a token id: token ids must be "
                                                  f"in [0, {vocab_size})")
    return ids


def _id_type_error(name: str, i: int, t) -> InvalidParameterError:
    return InvalidParameterError(
        name, f"{name}[{i}] must be an int token id, got {show(t)} ({type(t).__name__}); a prompt is a string "
              f"or one list of token ids", "invalid_type")


def text_byte_limit(max_len: int, longest_token_bytes: int = 0) -> int:
    """The most bytes of prompt text worth tokenizing for a ``max_len``-token context: beyond
    ``max_len`` x (the longest token's bytes, at least MIN_BYTES_PER_TOKEN_BOUND) the text cannot
    fit, so it is refused before the tokenizer spends seconds on it."""
    return max_len * max(longest_token_bytes, MIN_BYTES_PER_TOKEN_BOUND)


def check_text_bytes(text: str, max_bytes: int, name: str = "prompt") -> None:
    """ContextLengthError when ``text`` is longer than ``max_bytes`` UTF-8 bytes (text_byte_limit)."""
    # len(str) <= UTF-8 bytes <= 4 * len(str): most texts are decided without encoding them.
    if len(text) <= max_bytes // 4:
        return
    over = len(text) > max_bytes
    n = len(text) if over else len(text.encode("utf-8", "surrogatepass"))
    if n > max_bytes:
        raise ContextLengthError(f"{name} is {'at least ' if over else ''}{n} bytes of text; at most {max_bytes} "
                                 f"bytes can fit this model's context (max_len tokens x the longest token's bytes), "
                                 f"so it is refused before tokenizing")


def check_request(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None,
                  max_stop: Optional[int] = None, names: Optional[dict] = None) -> RequestParams:
    """Every generation parameter checked -> RequestParams. ``names`` maps a parameter to the
    name this surface gives it (e.g. ``{"max_new_tokens": "max_tokens"}``)."""
    n = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
         "seed": "seed", "stop": "stop", **(names or {})}
    return RequestParams(
        max_new_tokens=check_max_new_tokens(max_new_tokens, n["max_new_tokens"]),
        temperature=check_temperature(temperature, n["temperature"]),
        top_p=check_top_p(top_p, n["top_p"]),
        top_k=check_top_k(top_k, n["top_k"]),
        seed=check_seed(seed, n["seed"]),
        stop=check_stop(stop, n["stop"], max_stop))
