"""Special tokens for chat fine-tuning, and embedding rows for the tokens added.

`lmforge convert --add-tokens chatml|FILE.yaml` turns a base model into one that a
chat template can drive. It registers the template's tokens as special tokens (never
split, skipped when decoding), adds the ones the vocabulary lacks, and assigns the
bos/eos/pad roles. A token already in the vocabulary keeps its id and its embedding,
so converting a converted model again changes nothing.

Pad and EOS are different tokens in lmforge's convention. A collator that masks the
labels at pad positions would otherwise also mask every EOS, and the fine-tuned model
would never learn to stop. `chatml` therefore adds `<|pad|>` when the tokenizer has no
pad token or its pad token is an EOS token. A YAML file may set `pad_token` equal to
`eos_token` on purpose, which is kept with a warning.

New embedding rows start at the mean of the existing rows. A new token's logit is
then the mean of the old logits, which adds little probability mass next to the
largest logits, so the first loss stays where it was. Random rows can give a new
token a large logit, which makes the first loss jump.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_PAD = "<|pad|>"
ROLE_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
NEW_TOKEN_INIT_METHODS = ("mean", "mean_noise", "random")

# Standard deviation of the noise that `mean_noise` adds, as a fraction of each
# embedding dimension's standard deviation over the existing rows.
MEAN_NOISE_SCALE = 0.01


@dataclass
class TokenPlan:
    """Special tokens to register and the roles to assign, from `chatml` or a YAML file."""

    special_tokens: list[str] = field(default_factory=list)
    """Tokens to register as special; each one missing from the vocabulary is added."""
    roles: dict[str, str] = field(default_factory=dict)
    """Role assignments such as {"eos_token": "<|im_end|>"}; keys are from ROLE_KEYS."""
    pad_if_missing: str | None = None
    """Pad token to add when the tokenizer has no pad token or its pad token is an EOS token."""
    source: str = "chatml"
    """Origin of the plan, for messages: "chatml" or the YAML file path."""


@dataclass
class TokenChange:
    """One token of the plan after applying it: its id and whether it was new to the vocabulary."""

    token: str
    token_id: int
    added: bool


def chatml_plan() -> TokenPlan:
    """Return the plan for ChatML: `<|im_start|>`, `<|im_end|>` as EOS, and a distinct `<|pad|>`."""
    return TokenPlan(
        special_tokens=list(CHATML_TOKENS),
        roles={"eos_token": "<|im_end|>"},
        pad_if_missing=CHATML_PAD,
        source="chatml",
    )


def load_token_plan(value: str) -> TokenPlan:
    """Parse an `--add-tokens` value: `chatml` or the path of a YAML file.

    The YAML file is a mapping with an optional `special_tokens` list and optional
    `bos_token`, `eos_token`, `pad_token` and `unk_token` strings, e.g.::

        special_tokens: ["<|im_start|>", "<|im_end|>"]
        eos_token: "<|im_end|>"
        pad_token: "<|pad|>"
    """
    if value == "chatml":
        return chatml_plan()

    path = Path(value)
    if not path.is_file():
        raise LmforgeError(
            f"invalid --add-tokens value {value!r}: it is neither 'chatml' nor an existing YAML file",
            hint="pass --add-tokens chatml or the path of a YAML file with special_tokens and bos/eos/pad_token",
        )

    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise LmforgeError(f"invalid YAML in {where}: {getattr(exc, 'problem', exc)}") from exc

    if not isinstance(data, dict):
        raise LmforgeError(
            f"invalid token file {path}: expected a mapping with special_tokens and bos/eos/pad_token keys",
            hint="see docs/models.md for the format",
        )
    allowed = {"special_tokens", *ROLE_KEYS}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise LmforgeError(
            f"invalid key {unknown[0]!r} in token file {path}",
            hint=f"allowed keys: {', '.join(sorted(allowed))}",
        )

    special_tokens = data.get("special_tokens") or []
    if not isinstance(special_tokens, list) or not all(isinstance(t, str) and t for t in special_tokens):
        raise LmforgeError(
            f"invalid special_tokens in {path}: expected a list of non-empty strings, got {special_tokens!r}"
        )
    roles: dict[str, str] = {}
    for key in ROLE_KEYS:
        if key not in data or data[key] is None:
            continue
        if not isinstance(data[key], str) or not data[key]:
            raise LmforgeError(f"invalid {key} in {path}: expected a non-empty string, got {data[key]!r}")
        roles[key] = data[key]
    if not special_tokens and not roles:
        raise LmforgeError(f"token file {path} lists no tokens", hint="add special_tokens or a bos/eos/pad_token")

    return TokenPlan(special_tokens=list(dict.fromkeys(special_tokens)), roles=roles, source=str(path))


def apply_token_plan(tokenizer, plan: TokenPlan, eos_ids: list[int] | None = None) -> list[TokenChange]:
    """Register the plan's tokens in `tokenizer` (in place) and return one TokenChange per token.

    `eos_ids` are the model's EOS ids (from its generation config); together with the
    tokenizer's EOS they decide whether the pad token counts as "an EOS token".
    """
    old_vocab = tokenizer.get_vocab()
    old_special = set(tokenizer.all_special_tokens)
    old_eos_ids = {tokenizer.eos_token_id, *(eos_ids or [])} - {None}

    wanted = list(dict.fromkeys([*plan.special_tokens, *plan.roles.values()]))
    extra = [token for token in plan.special_tokens if token not in old_special]
    if extra:
        tokenizer.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
    if plan.roles:
        tokenizer.add_special_tokens(dict(plan.roles))

    if plan.pad_if_missing is not None:
        eos_ids_now = old_eos_ids | {tokenizer.eos_token_id}
        if tokenizer.pad_token is None or tokenizer.pad_token_id in eos_ids_now:
            if tokenizer.pad_token is not None:
                logger.info(
                    "pad token %r (id %s) is an EOS token; setting pad to %s",
                    tokenizer.pad_token,
                    tokenizer.pad_token_id,
                    plan.pad_if_missing,
                )
            tokenizer.add_special_tokens({"pad_token": plan.pad_if_missing})
            wanted.append(plan.pad_if_missing)
        elif tokenizer.pad_token == plan.pad_if_missing:
            wanted.append(plan.pad_if_missing)
    elif "pad_token" in plan.roles and plan.roles["pad_token"] == tokenizer.eos_token:
        logger.warning(
            "%s sets pad_token equal to eos_token %r; labels masked at pad positions will also mask EOS",
            plan.source,
            tokenizer.eos_token,
        )

    new_vocab = tokenizer.get_vocab()
    changes = []
    for token in dict.fromkeys(wanted):
        token_id = new_vocab.get(token)
        if token_id is None:
            raise LmforgeError(f"failed to add token {token!r} to the tokenizer")
        changes.append(TokenChange(token=token, token_id=int(token_id), added=token not in old_vocab))
    return changes


def tied_embeddings(model) -> bool:
    """Return True if the model's input and output embeddings share one weight tensor."""
    output = model.get_output_embeddings()
    if output is None:
        return False
    return output.weight is model.get_input_embeddings().weight


def init_new_rows(weight, new_ids: list[int], reference_rows: int, method: str, generator, init_std: float) -> None:
    """Set the rows `new_ids` of the matrix `weight` in place from rows `[:reference_rows]`."""
    import torch

    with torch.no_grad():
        reference = weight[:reference_rows].float()
        mean = reference.mean(dim=0)
        index = torch.tensor(new_ids, dtype=torch.long)
        shape = (len(new_ids), weight.shape[1])
        if method == "mean":
            rows = mean.expand(shape)
        elif method == "mean_noise":
            noise = torch.randn(shape, generator=generator) * (reference.std(dim=0) * MEAN_NOISE_SCALE)
            rows = mean + noise
        elif method == "random":
            rows = torch.randn(shape, generator=generator) * init_std
        else:
            raise LmforgeError(
                f"invalid --new-token-init {method!r}", hint=f"use one of: {', '.join(NEW_TOKEN_INIT_METHODS)}"
            )
        weight[index] = rows.to(weight.dtype)


def resize_for_new_tokens(model, vocab_size: int, new_ids: list[int], old_vocab_size: int, method: str = "mean", seed: int = 0) -> dict[str, Any]:
    """Grow the embeddings to `vocab_size` rows and initialise the rows of `new_ids`.

    `old_vocab_size` is the tokenizer length before tokens were added: rows below it
    are the trained ones whose statistics the new rows use. An untied `lm_head` gets
    the same treatment from its own rows, and tied embeddings stay tied. Returns a
    summary: old and new row counts, whether the weights are tied, the init method.
    """
    import torch

    if method not in NEW_TOKEN_INIT_METHODS:
        raise LmforgeError(
            f"invalid --new-token-init {method!r}", hint=f"use one of: {', '.join(NEW_TOKEN_INIT_METHODS)}"
        )
    was_tied = tied_embeddings(model)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_vocab_size > old_rows:
        raise LmforgeError(
            f"the tokenizer has {old_vocab_size} tokens but the model's embedding has only {old_rows} rows",
            hint="the source tokenizer does not belong to this model; check the source directory",
        )
    if vocab_size > old_rows:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)

    if new_ids:
        generator = torch.Generator().manual_seed(seed)
        init_std = float(getattr(model.config, "initializer_range", 0.02))
        reference_rows = min(old_vocab_size, old_rows)
        init_new_rows(model.get_input_embeddings().weight, new_ids, reference_rows, method, generator, init_std)
        if not was_tied and model.get_output_embeddings() is not None:
            init_new_rows(model.get_output_embeddings().weight, new_ids, reference_rows, method, generator, init_std)

    if was_tied and not tied_embeddings(model):
        raise LmforgeError("resizing the embeddings untied them from lm_head; this model type is not supported")
    return {
        "old_rows": old_rows,
        "new_rows": model.get_input_embeddings().weight.shape[0],
        "tied": was_tied,
        "init": method,
    }
