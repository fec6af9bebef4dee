"""ChatML rendering, BOS/EOS placement, label masking and the chat-token check."""

from __future__ import annotations

import pytest

from lmforge.data.chat import ChatTokenizer
from lmforge.data.packing import IGNORE_INDEX, PackedCollator, build_row, shifted_labels
from lmforge.errors import LmforgeError

ROW = {"id": "x", "system_prompt": "Be brief.", "question": "Capital of France?", "response": "Paris."}


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_document_text_has_bos_turns_and_eos(tiny_tokenizer):
    chat = ChatTokenizer(tiny_tokenizer)
    (document,) = chat.encode_rows([ROW])
    assert decode(tiny_tokenizer, document.input_ids) == (
        "<|endoftext|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_end|>"
    )
    assert document.first_target == 1


def test_empty_system_prompt_omits_system_turn(tiny_tokenizer):
    chat = ChatTokenizer(tiny_tokenizer, add_bos=False, add_eos=False)
    (document,) = chat.encode_rows([dict(ROW, system_prompt="")])
    assert decode(tiny_tokenizer, document.input_ids) == (
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
    )


def test_packed_boundary_shows_eos_then_bos(tiny_tokenizer):
    chat = ChatTokenizer(tiny_tokenizer)
    row = build_row(chat.encode_rows([ROW, dict(ROW, question="Capital of Peru?", response="Lima.")]))
    assert "Paris.<|im_end|>\n<|im_end|><|endoftext|><|im_start|>system" in decode(tiny_tokenizer, row["input_ids"])


def test_assistant_only_labels_train_response_and_stop(tiny_tokenizer):
    chat = ChatTokenizer(tiny_tokenizer, train_on="assistant")
    (document,) = chat.encode_rows([ROW])
    labels = shifted_labels(document)
    targets = [label for label in labels if label != IGNORE_INDEX]
    assert decode(tiny_tokenizer, targets) == "Paris.<|im_end|>\n<|im_end|>"
    # The prompt, up to and including "<|im_start|>assistant\n", is never a target.
    prompt = decode(tiny_tokenizer, document.input_ids[: document.first_target])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert labels[-1] == IGNORE_INDEX


def test_all_tokens_trained_by_default(tiny_tokenizer):
    chat = ChatTokenizer(tiny_tokenizer)
    (document,) = chat.encode_rows([ROW])
    labels = shifted_labels(document)
    assert labels[:-1] == document.input_ids[1:]
    assert labels[-1] == IGNORE_INDEX


def test_pad_equal_to_eos_is_never_trained(tiny_tokenizer):
    chat = ChatTokenizer(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    row = build_row(chat.encode_rows([ROW]))
    batch = PackedCollator(pad_token_id=eos, max_length=len(row["input_ids"]) + 5)([row])
    labels = batch["labels"][0].tolist()
    length = len(row["input_ids"])
    assert labels[length:] == [IGNORE_INDEX] * 5
    # The document's own EOS is still the target of the token before it.
    assert labels[length - 2] == eos
    assert batch["input_ids"][0, length:].tolist() == [eos] * 5


def test_missing_chat_tokens_fail_at_start():
    from lmforge.models.tiny import build_tiny_tokenizer

    plain = build_tiny_tokenizer(chat_tokens=False)
    with pytest.raises(LmforgeError) as excinfo:
        ChatTokenizer(plain, chat_template="chatml")
    assert "<|im_start|>" in str(excinfo.value)
    assert "lmforge convert --add-tokens" in str(excinfo.value)


def test_invalid_train_on_names_value(tiny_tokenizer):
    with pytest.raises(LmforgeError, match="invalid train_on 'prompt'"):
        ChatTokenizer(tiny_tokenizer, train_on="prompt")


def test_smollm2_tokenizer_renders_chatml(smollm2_gguf):
    from lmforge.data.chat import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    chat = ChatTokenizer(tokenizer, chat_template="chatml", add_bos=False, train_on="assistant")
    documents = chat.encode_rows([ROW, dict(ROW, system_prompt="")])
    text = decode(tokenizer, build_row(documents)["input_ids"])
    assert text.count("<|im_start|>") == 5
    assert "Paris.<|im_end|>\n<|im_end|><|im_start|>user" in text
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert documents[0].input_ids[-1] == im_end
    assert decode(tokenizer, documents[0].input_ids[documents[0].first_target:]) == "Paris.<|im_end|>\n<|im_end|>"
