"""Render Open-Orca rows as chat conversations and tokenize them into training documents.

A row becomes the messages `system` (omitted when `system_prompt` is empty), `user`
(the question) and `assistant` (the response), rendered with the tokenizer's chat
template or a given one. With ChatML and `add_bos`/`add_eos` on, one document is

    <BOS><|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n
    <|im_start|>assistant\\n...<|im_end|>\\n<EOS>

so a packed row shows `...<|im_end|>\\n<|im_end|><|begin_of_text|><|im_start|>system`
at a document boundary on a Llama 3 tokenizer whose EOS is `<|im_end|>`.

A document is `Document(input_ids, first_target)`: tokens from index `first_target`
on are training targets. `train_on="all"` sets it to 1, because nothing inside the
document predicts its first token. `train_on="assistant"` sets it to the first
token of the response, so the response, its `<|im_end|>` and the EOS are trained
and the prompt is not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

TRAIN_ON = ("all", "assistant")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


class Document(NamedTuple):
    """One tokenized example: token ids and the index of its first training target."""

    input_ids: list[int]
    first_target: int


def row_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """Return the chat messages of an Open-Orca row; an empty system prompt adds no system turn."""
    messages = []
    if row["system_prompt"].strip():
        messages.append({"role": "system", "content": row["system_prompt"]})
    messages.append({"role": "user", "content": row["question"]})
    messages.append({"role": "assistant", "content": row["response"]})
    return messages


def shipped_chatml_template() -> str:
    """Return the text of lmforge's `chat_templates/chatml.jinja`."""
    from lmforge.models.tiny import CHATML_TEMPLATE, CHATML_TEMPLATE_PATH

    return CHATML_TEMPLATE_PATH.read_text() if CHATML_TEMPLATE_PATH.exists() else CHATML_TEMPLATE


def resolve_chat_template(tokenizer, chat_template: str | None) -> str:
    """Return the template text for `chat_template`.

    None uses the tokenizer's own template, or the shipped ChatML template when
    the tokenizer has none. "chatml" is the shipped template. Any other value is
    a path to a `.jinja` file or, when it contains "{", the template text itself.
    """
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own:
            return own
        logger.info("tokenizer has no chat template; using the shipped ChatML template")
        return shipped_chatml_template()
    if chat_template == "chatml":
        return shipped_chatml_template()
    if "{" not in chat_template:
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise LmforgeError(
                f"chat template file not found: {path}",
                hint="pass a .jinja file, 'chatml' for the shipped template, or leave it unset for the tokenizer's own",
            )
        return path.read_text()
    return chat_template


def _single_token_id(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


class ChatTokenizer:
    """Turns rows into `Document`s with a chat template, BOS/EOS rules and label masking.

    Stateless apart from the tokenizer and settings given to the constructor.
    """

    def __init__(self, tokenizer, *, chat_template: str | None = None, add_bos: bool = True,
                 add_eos: bool = True, train_on: str = "all"):
        if train_on not in TRAIN_ON:
            raise LmforgeError(f"invalid train_on {train_on!r}", hint=f"use one of: {', '.join(TRAIN_ON)}")
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(tokenizer, chat_template)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.train_on = train_on
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        if add_bos and self.bos_token_id is None:
            raise LmforgeError("add_bos is on but the tokenizer has no BOS token", hint="set add_bos: false")
        if add_eos and self.eos_token_id is None:
            raise LmforgeError("add_eos is on but the tokenizer has no EOS token", hint="set add_eos: false")
        self._check_template()

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _check_template(self) -> None:
        """Raise when the template uses ChatML tokens that the tokenizer splits into pieces."""
        probe = row_messages({"system_prompt": "s", "question": "q", "response": "r"})
        text = self._render(probe)
        for token in CHATML_TOKENS:
            if token in text and _single_token_id(self.tokenizer, token) is None:
                raise LmforgeError(
                    f"the chat template uses {token}, but the tokenizer splits it into several tokens",
                    hint="the model needs its chat tokens added first: lmforge convert --add-tokens chatml SRC DST",
                )
        prompt = self._render(probe[:-1], add_generation_prompt=True)
        if self.train_on == "assistant" and not text.startswith(prompt):
            raise LmforgeError(
                "train_on=assistant needs a chat template whose rendered prompt (with the generation prompt) "
                "is a prefix of the full conversation; this template's is not",
                hint="use train_on: all or chat_template: chatml",
            )

    def encode_rows(self, rows: Sequence[dict[str, Any]]) -> list[Document]:
        """Render and tokenize `rows` in one tokenizer call per part."""
        if not rows:
            return []
        conversations = [row_messages(row) for row in rows]
        full_texts = [self._render(messages) for messages in conversations]
        if self.train_on == "assistant":
            prompts = [self._render(messages[:-1], add_generation_prompt=True) for messages in conversations]
            completions = [full[len(prompt):] for full, prompt in zip(full_texts, prompts)]
        else:
            prompts = full_texts
            completions = [""] * len(rows)

        bos_text = self.tokenizer.bos_token if self.add_bos else None
        prompt_ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        completion_ids = (
            self.tokenizer(completions, add_special_tokens=False)["input_ids"]
            if self.train_on == "assistant"
            else [[] for _ in rows]
        )
        documents = []
        for prompt_text, prompt_tokens, completion_tokens in zip(prompts, prompt_ids, completion_ids):
            ids: list[int] = []
            if bos_text is not None and not prompt_text.startswith(bos_text):
                ids.append(self.bos_token_id)
            ids.extend(prompt_tokens)
            first_target = len(ids) if self.train_on == "assistant" else 1
            ids.extend(completion_tokens)
            if self.add_eos:
                ids.append(self.eos_token_id)
            documents.append(Document(ids, first_target))
        return documents


def load_tokenizer(spec: Any):
    """Return a tokenizer from a tokenizer object, a model directory, a GGUF file, or a directory with one GGUF file."""
    if not isinstance(spec, (str, Path)):
        return spec
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir():
        from lmforge.models.model_dir import has_tokenizer

        if has_tokenizer(path):
            return AutoTokenizer.from_pretrained(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return AutoTokenizer.from_pretrained(path, gguf_file=ggufs[0].name)
        raise LmforgeError(
            f"no tokenizer in {path}: expected tokenizer.json (or tokenizer.model / vocab.json) or one .gguf file",
            hint="pass the model directory that was saved with its tokenizer",
        )
    raise LmforgeError(f"tokenizer path not found: {path}", hint="pass a model directory or a .gguf file")
