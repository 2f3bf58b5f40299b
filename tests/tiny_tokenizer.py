"""A word-level tokenizer over the tiny models' vocabulary: token i is the word ``w{i}``.

Text and ids map one to one ("w5 w6" <-> [5, 6]), so tests can write prompts as text, and the
chat template is a fixed function of the messages (a real ``apply_chat_template`` path).
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{% for m in messages %}w1 w{{ m['content']|length % 50 + 2 }} {% endfor %}"
                 "{% if add_generation_prompt %}w63{% endif %}")


def tiny_tokenizer(vocab_size: int = 64) -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No special tokens: decode(skip_special_tokens=True) must not drop any id.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)
