"""`stop_token_ids`: EOS ids from both sources plus the turn-closing token."""

from __future__ import annotations

from transformers import GenerationConfig

from lmforge.models.stop_tokens import stop_token_ids
from lmforge.models.tiny import build_tiny_tokenizer


def test_chatml_tokenizer_includes_im_end():
    tokenizer = build_tiny_tokenizer(chat_tokens=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    ids = stop_token_ids(tokenizer, GenerationConfig(eos_token_id=[endoftext]))

    assert ids == [endoftext, im_end]


def test_generation_config_list_and_duplicates():
    tokenizer = build_tiny_tokenizer(chat_tokens=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    ids = stop_token_ids(tokenizer, GenerationConfig(eos_token_id=[im_end, endoftext]))

    assert ids == [im_end, endoftext]


def test_tokenizer_without_chat_tokens():
    tokenizer = build_tiny_tokenizer(chat_tokens=False)

    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert stop_token_ids(tokenizer, GenerationConfig()) == [tokenizer.eos_token_id]
