"""Token ids that end a generated reply.

A chat model's reply ends at its end-of-sequence token or at the token that closes a
chat turn (`<|im_end|>` in ChatML). Fine-tuned models often list only one of them as
`eos_token_id`, so generation that stops only at EOS can run past the end of the turn
and print the next template header. `stop_token_ids` collects both.
"""

from __future__ import annotations

from typing import Any, Iterable

# Turn-closing tokens of common chat templates: ChatML, Llama 3, Phi-3, Gemma.
TURN_CLOSING_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable):
        return [int(item) for item in value if item is not None]
    return []


def _special_token_id(tokenizer, token: str) -> int | None:
    """Return the id of `token` if the tokenizer has it as a single token, else None."""
    vocab = tokenizer.get_vocab()
    token_id = vocab.get(token)
    if token_id is None:
        return None
    return int(token_id)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Return the EOS ids plus the turn-closing token id, without duplicates.

    Sources, in this order: `generation_config.eos_token_id` (an int or a list),
    `tokenizer.eos_token_id`, then the first of `TURN_CLOSING_TOKENS` that exists
    in the tokenizer's vocabulary, e.g. `<|im_end|>`.
    """
    ids: list[int] = []
    if generation_config is not None:
        ids.extend(_as_id_list(getattr(generation_config, "eos_token_id", None)))
    ids.extend(_as_id_list(getattr(tokenizer, "eos_token_id", None)))

    for token in TURN_CLOSING_TOKENS:
        token_id = _special_token_id(tokenizer, token)
        if token_id is not None:
            ids.append(token_id)
            break

    unique: list[int] = []
    for token_id in ids:
        if token_id not in unique:
            unique.append(token_id)
    return unique
