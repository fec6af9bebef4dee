"""The work behind `lmforge dataset`: load the config, build the target, format what it yields."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

DEFAULT_SHOW_ROWS = 3


def _config_sets(template, project, sets: list[str], max_length: int | None, source: str | None) -> list[str]:
    """Return `sets` plus the overrides that --source and --max-length imply for this config."""
    from lmforge.config import load_config

    sets = list(sets)
    if source is not None:
        sets.append(f"ns.dataset_path={source}")
    if max_length is not None:
        namespace = load_config(template, project_dir=project, sets=sets).namespace
        if "max_length" in namespace:
            sets.append(f"ns.max_length={max_length}")
        elif "seq_len" in namespace:
            sets.append(f"ns.seq_len={max_length}")
    return sets


def build_target(template, project, sets: list[str], target: str, tokenizer: str | None,
                 max_length: int | None, source: str | None) -> Any:
    """Construct `target` of the config, giving it the tokenizer and max_length variables."""
    from lmforge.config import load_config

    config = load_config(template, project_dir=project, sets=_config_sets(template, project, sets, max_length, source))
    if target not in config.targets:
        raise LmforgeError(
            f"target {target!r} not found in config {config.name}",
            hint=f"use one of: {', '.join(config.targets)}",
        )
    variables: dict[str, Any] = {}
    if tokenizer is not None:
        variables["tokenizer"] = tokenizer
        variables["model_dir"] = tokenizer
    if max_length is not None:
        variables["max_length"] = max_length
    logger.debug("constructing %s of %s with variables %s", target, config.name, variables)
    try:
        return config.construct(target, **variables)
    except LmforgeError as exc:
        needs_tokenizer = "'tokenizer' is not set" in exc.message or "'model_dir' is not set" in exc.message
        if tokenizer is None and needs_tokenizer:
            raise LmforgeError(
                f"target {target!r} tokenizes rows, so it needs a tokenizer",
                hint="pass -T MODEL_DIR (a model directory or a .gguf file)",
            ) from exc
        raise


def run_dataset_command(*, template, project, sets: list[str], target: str, tokenizer: str | None,
                        max_length: int | None, tokenized: bool, count: int | None, labels: bool, stats: bool,
                        plot: Path | None, source: str | None) -> str:
    """Build the target and return the text that `lmforge dataset` prints."""
    from lmforge.data.dataset import ChatDataset
    from lmforge.data.inspect import (
        collect_stats,
        format_labels,
        format_packed_row,
        format_raw_row,
        format_stats,
        plot_lengths,
        take,
    )
    from lmforge.data.rows import SplitRows

    if plot is not None and not stats:
        raise LmforgeError("--plot needs --stats", hint="add --stats")
    if count is not None and count < 0:
        raise LmforgeError(f"invalid -n {count}", hint="pass a row count >= 0")
    built = build_target(template, project, sets, target, tokenizer, max_length, source)
    if not isinstance(built, (SplitRows, ChatDataset)):
        raise LmforgeError(
            f"target {target!r} builds a {type(built).__name__}, not a dataset",
            hint="pick a dataset target such as train_dataset_split or train_dataset",
        )
    if isinstance(built, SplitRows) and (tokenized or labels):
        raise LmforgeError(
            f"target {target!r} yields raw rows, so there are no tokens to decode",
            hint="drop -s/--labels, or pick a tokenized target such as train_dataset",
        )

    if stats:
        collected = collect_stats(built, limit=count)
        report = format_stats(collected)
        if plot is not None:
            report += f"\nlength histogram written to {plot_lengths(collected, plot)}"
        return report

    rows = take(built, DEFAULT_SHOW_ROWS if count is None else count)
    if isinstance(built, SplitRows):
        return "\n".join(format_raw_row(i, row) for i, row in enumerate(rows))
    tokenizer_object = built.tokenizer
    parts = []
    for i, row in enumerate(rows):
        parts.append(format_packed_row(i, row, tokenizer_object, built.max_length if built.packing else None))
        if labels:
            parts.append(format_labels(i, row, tokenizer_object))
    return "\n".join(parts)
