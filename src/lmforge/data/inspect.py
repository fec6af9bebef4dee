"""Text views of dataset targets for `lmforge dataset`: raw rows, decoded packed rows, labels, stats."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lmforge.data.packing import IGNORE_INDEX

logger = logging.getLogger(__name__)

PROGRESS_EVERY_ROWS = 10_000
HISTOGRAM_BINS = 12
HISTOGRAM_BAR_WIDTH = 40


def format_raw_row(index: int, row: dict[str, Any]) -> str:
    """Return one raw row as labelled fields."""
    lines = [f"=== row {index} (id {row.get('id')}) ==="]
    for key in ("system_prompt", "question", "response"):
        lines.append(f"--- {key} ---")
        lines.append(str(row.get(key)))
    return "\n".join(lines)


def _documents(row: dict[str, list[int]]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for length in row["seq_lens"]:
        bounds.append((start, start + length))
        start += length
    return bounds


def format_packed_row(index: int, row: dict[str, list[int]], tokenizer, max_length: int | None = None) -> str:
    """Decode a packed row with special tokens visible and a marker line before each document."""
    total = len(row["input_ids"])
    header = f"=== packed row {index}: {len(row['seq_lens'])} document(s), {total} tokens"
    if max_length:
        header += f" of {max_length} ({total / max_length:.1%} full)"
    lines = [header + " ==="]
    for number, (start, end) in enumerate(_documents(row), 1):
        lines.append(f"----- document {number}: tokens {start}-{end - 1} ({end - start} tokens), position_ids restart -----")
        lines.append(tokenizer.decode(row["input_ids"][start:end], skip_special_tokens=False))
    if max_length and total < max_length:
        lines.append(f"----- padding: {max_length - total} tokens -----")
    return "\n".join(lines)


def format_labels(index: int, row: dict[str, list[int]], tokenizer) -> str:
    """Show, per document, which tokens are training targets ([trained]) and which are not ([masked]).

    Token t counts as trained when the label at t - 1 is t itself, i.e. the model
    is asked to predict it; a document's first token is always masked.
    """
    ids, labels = row["input_ids"], row["labels"]
    lines = [f"=== labels of row {index} ==="]
    for number, (start, end) in enumerate(_documents(row), 1):
        lines.append(f"----- document {number} -----")
        trained_flags = [False] + [labels[t - 1] != IGNORE_INDEX for t in range(start + 1, end)]
        run_start = start
        for offset in range(1, end - start + 1):
            at_end = offset == end - start
            if at_end or trained_flags[offset] != trained_flags[offset - 1]:
                run_end = start + offset
                tag = "[trained]" if trained_flags[run_start - start] else "[masked] "
                text = tokenizer.decode(ids[run_start:run_end], skip_special_tokens=False)
                lines.append(f"{tag} {text!r}")
                run_start = run_end
    trained = sum(1 for label in labels if label != IGNORE_INDEX)
    lines.append(f"trained targets: {trained} of {len(ids)} tokens")
    return "\n".join(lines)


@dataclass
class DatasetStats:
    """Counts gathered by iterating a dataset target."""

    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    rows_kept: int = 0
    document_lengths: list[int] = field(default_factory=list)
    documents_per_row: Counter = field(default_factory=Counter)
    packed_rows: int = 0
    tokens: int = 0
    max_length: int | None = None
    overflow: dict[str, int] = field(default_factory=dict)
    length_unit: str = "tokens"

    @property
    def fill_efficiency(self) -> float | None:
        if not self.max_length or not self.packed_rows:
            return None
        return self.tokens / (self.packed_rows * self.max_length)


def collect_stats(target: Any, limit: int | None = None) -> DatasetStats:
    """Iterate a `SplitRows` or `ChatDataset` target (up to `limit` rows) and gather its statistics."""
    from lmforge.data.dataset import ChatDataset
    from lmforge.data.rows import SplitRows

    stats = DatasetStats()
    if isinstance(target, ChatDataset):
        target.observed_lengths = stats.document_lengths
        stats.max_length = target.max_length
        for count, row in enumerate(target, 1):
            stats.packed_rows += 1
            stats.tokens += len(row["input_ids"])
            stats.documents_per_row[len(row["seq_lens"])] += 1
            if count % PROGRESS_EVERY_ROWS == 0:
                logger.info("stats: %d rows so far", count)
            if limit is not None and count >= limit:
                break
        stats.overflow = {k: v for k, v in target.stats.items() if k.startswith("overflow_")}
        if target.last_epoch_rows is not None:
            stats.rows_read = target.last_epoch_rows["rows_read"]
            stats.skipped = Counter(target.last_epoch_rows["skipped"])
        else:
            stats.rows_read = target.rows.rows_read
            stats.skipped = Counter(target.rows.skipped)
    elif isinstance(target, SplitRows):
        stats.length_unit = "characters"
        for count, row in enumerate(target, 1):
            stats.document_lengths.append(len(row["system_prompt"]) + len(row["question"]) + len(row["response"]))
            if count % PROGRESS_EVERY_ROWS == 0:
                logger.info("stats: %d rows so far", count)
            if limit is not None and count >= limit:
                break
        stats.rows_read = target.rows_read
        stats.skipped = Counter(target.skipped)
    else:
        raise TypeError(f"cannot gather stats of {type(target).__name__}")
    stats.rows_kept = len(stats.document_lengths)
    return stats


def _histogram_edges(lengths: list[int]) -> list[int]:
    top = max(lengths)
    width = max(1, -(-top // HISTOGRAM_BINS))
    return [i * width for i in range(HISTOGRAM_BINS + 1)]


def format_stats(stats: DatasetStats) -> str:
    """Return the stats report: rows read and skipped, a length histogram, rows per pack, fill."""
    lines = [f"rows read: {stats.rows_read}"]
    skipped_total = sum(stats.skipped.values())
    lines.append(f"rows skipped: {skipped_total}")
    for reason, count in sorted(stats.skipped.items()):
        lines.append(f"  {reason}: {count}")
    lines.append(f"examples: {stats.rows_kept}")
    for name, count in sorted(stats.overflow.items()):
        lines.append(f"  {name.replace('_', ' ')} (longer than max_length {stats.max_length}): {count}")
    lengths = stats.document_lengths
    if lengths:
        ordered = sorted(lengths)
        lines.append(
            f"example length ({stats.length_unit}): min {ordered[0]}, median {ordered[len(ordered) // 2]}, "
            f"mean {sum(ordered) / len(ordered):.1f}, max {ordered[-1]}"
        )
        edges = _histogram_edges(lengths)
        counts = Counter(min((length // edges[1]), HISTOGRAM_BINS - 1) for length in lengths)
        peak = max(counts.values())
        for b in range(HISTOGRAM_BINS):
            bar = "#" * round(HISTOGRAM_BAR_WIDTH * counts[b] / peak)
            lines.append(f"  {edges[b]:>7}-{edges[b + 1] - 1:<7} {counts[b]:>8}  {bar}")
    if stats.packed_rows:
        lines.append(f"rows: {stats.packed_rows}")
        per_row = ", ".join(f"{k}: {v}" for k, v in sorted(stats.documents_per_row.items()))
        documents = sum(k * v for k, v in stats.documents_per_row.items())
        lines.append(f"documents per row: mean {documents / stats.packed_rows:.2f} ({per_row})")
        lines.append(f"tokens: {stats.tokens}")
        lines.append(f"fill efficiency (non-pad tokens / row slots): {stats.fill_efficiency:.4f}")
    return "\n".join(lines)


def plot_lengths(stats: DatasetStats, path: str | Path) -> Path:
    """Write a histogram of example lengths to a PNG file (through a temporary file and a rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.hist(stats.document_lengths, bins=50)
    axes.set_xlabel(f"example length ({stats.length_unit})")
    axes.set_ylabel("examples")
    axes.set_title(f"{stats.rows_kept} examples, {sum(stats.skipped.values())} skipped")
    if stats.max_length and stats.length_unit == "tokens":
        axes.axvline(stats.max_length, color="red", linestyle="--", label=f"max_length {stats.max_length}")
        axes.legend()
    figure.tight_layout()
    handle, temp_name = tempfile.mkstemp(suffix=".png", dir=path.parent or ".")
    os.close(handle)
    try:
        figure.savefig(temp_name)
        os.replace(temp_name, path)
    finally:
        plt.close(figure)
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


def take(iterable: Iterable, count: int) -> list:
    """Return the first `count` items of an iterable."""
    items: list = []
    if count <= 0:
        return items
    for item in iterable:
        items.append(item)
        if len(items) >= count:
            break
    return items
