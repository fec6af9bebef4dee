"""`lmforge model check DIR`: checks that a model directory is ready for fine-tuning and serving.

Each check produces one line. Problems make the command fail; notes only inform.

- DIR loads with AutoModelForCausalLM and AutoTokenizer, without remote code;
- the embedding has a row for every tokenizer token and config.json's vocab_size
  matches it;
- embeddings that config.json declares tied share one tensor after loading;
- generation_config.json's eos_token_id contains the turn-closing token (`<|im_end|>`)
  when the chat template uses it, so generation stops at the end of a reply;
- the chat template renders a conversation;
- pad is not an EOS token (a note, because a user may choose it);
- the loss on a short text is finite;
- with a source (`--source`, or the one recorded by `lmforge convert` when it still
  exists): logits and loss match the source, as in `lmforge.models.checks`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.models.checks import LOSS_TOLERANCE, compare_with_reference, take_reference, text_loss
from lmforge.models.model_dir import load_model_dir
from lmforge.models.stop_tokens import TURN_CLOSING_TOKENS, stop_token_ids

logger = logging.getLogger(__name__)


@dataclass
class ModelCheckReport:
    """Lines of `model check`: passed checks, notes and problems."""

    path: str
    passed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _eos_ids(generation_config) -> list[int]:
    value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(item) for item in value]


def recorded_source(path: Path) -> Path | None:
    """Return the source that `lmforge convert` recorded in DIR, if that file or directory still exists."""
    from lmforge.models.convert import PROVENANCE_FILE

    provenance_path = path / PROVENANCE_FILE
    if not provenance_path.is_file():
        return None
    try:
        provenance = json.loads(provenance_path.read_text())
        source = provenance.get("source_path") or provenance.get("source")
    except (json.JSONDecodeError, AttributeError):
        return None
    if source and Path(source).exists():
        return Path(source)
    return None


def check_structure(model, tokenizer, report: ModelCheckReport) -> None:
    """Check vocabulary size, tied weights, stop tokens, chat template and pad token."""
    rows = model.get_input_embeddings().weight.shape[0]
    report.facts.update(
        architecture=type(model).__name__,
        layers=getattr(model.config, "num_hidden_layers", None),
        tokenizer_size=len(tokenizer),
        embedding_rows=rows,
        dtype=str(model.dtype).replace("torch.", ""),
        max_position_embeddings=getattr(model.config, "max_position_embeddings", None),
    )
    if len(tokenizer) > rows:
        report.problems.append(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows")
    else:
        report.passed.append(f"embedding rows {rows} >= tokenizer size {len(tokenizer)}")
    if getattr(model.config, "vocab_size", rows) != rows:
        report.problems.append(f"config.json vocab_size {model.config.vocab_size} != embedding rows {rows}")

    if getattr(model.config, "tie_word_embeddings", False):
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            report.problems.append("config.json says tie_word_embeddings but lm_head has its own weight after loading")
        else:
            report.passed.append("input and output embeddings are tied")

    eos_ids = _eos_ids(model.generation_config)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    report.facts.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generation_eos_token_ids=eos_ids,
        stop_token_ids=stop_ids,
    )
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    for token in TURN_CLOSING_TOKENS:
        if token in template and token in vocab:
            if vocab[token] in eos_ids:
                report.passed.append(f"generation_config eos_token_id contains {token} (id {vocab[token]})")
            else:
                report.problems.append(
                    f"generation_config.json eos_token_id {eos_ids} lacks the turn-closing token {token} "
                    f"(id {vocab[token]}), so generation runs past the end of a reply; convert the model again"
                )

    if not template:
        report.notes.append("no chat template: chat requests and chat-formatted datasets need one (--chat-template)")
    else:
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # any Jinja or template error is a bad template
            report.problems.append(f"the chat template failed to render a conversation: {exc}")
        else:
            report.passed.append("the chat template renders a conversation")

    if tokenizer.pad_token_id is None:
        report.notes.append("no pad token: batched generation and padding collators need one")
    elif tokenizer.pad_token_id in set(eos_ids) | {tokenizer.eos_token_id}:
        report.notes.append(
            f"pad token {tokenizer.pad_token!r} is an EOS token; labels masked at pad positions also mask EOS"
        )


def check_model(path: str | Path, source: str | Path | None = None, loss_tolerance: float = LOSS_TOLERANCE) -> ModelCheckReport:
    """Run every check on the model directory `path`; compare with `source` when given or recorded."""
    from lmforge.models.convert import load_source, round_to_dtype

    path = Path(path)
    report = ModelCheckReport(path=str(path))
    model, tokenizer = load_model_dir(path, dtype="float32")
    report.passed.append("loads with AutoModelForCausalLM and AutoTokenizer without remote code")
    check_structure(model, tokenizer, report)

    loss = text_loss(model, tokenizer)
    report.facts["check_text_loss"] = loss
    if math.isfinite(loss):
        report.passed.append(f"loss on the check text is finite ({loss:.6f})")
    else:
        report.problems.append(f"loss on the check text is {loss}")

    source_path = Path(source) if source is not None else recorded_source(path)
    if source_path is None:
        report.notes.append("no source to compare logits with (pass --source SRC)")
        return report

    logger.info("comparing with source %s", source_path)
    source_model, source_tokenizer, _, _ = load_source(source_path)
    round_to_dtype(source_model, _stored_dtype(path))
    reference = take_reference(source_model, source_tokenizer)
    del source_model
    result = compare_with_reference(model, tokenizer, reference, loss_tolerance)
    report.facts.update(
        source=str(source_path),
        max_abs_logit_diff=result.max_abs_diff,
        loss_before=result.loss_before,
        loss_after=result.loss_after,
    )
    if result.ok:
        report.passed.append(
            f"matches {source_path}: max abs logit diff {result.max_abs_diff:.3g}, "
            f"loss {result.loss_before:.6f} -> {result.loss_after:.6f}"
        )
    report.problems.extend(result.problems)
    return report


def _stored_dtype(path: Path):
    """Return the torch dtype that config.json records for the weights (float32 when absent)."""
    from lmforge.models.model_dir import read_model_config, resolve_dtype

    config = read_model_config(path)
    return resolve_dtype(config.get("dtype") or config.get("torch_dtype") or "float32")
