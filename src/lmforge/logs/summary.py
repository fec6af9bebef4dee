"""Summary figures of a training run, computed from its `trainer_logs.json`.

How each figure is computed (records are those of `lmforge.logs.reader`):

- total steps: the largest `global_step` in any record;
- tokens trained: the largest `tokens` value (the count is cumulative across resumes);
- wall-clock: summed over launches, from each `start` record's `time` to the last
  record's `time` before the next launch (or to start + `train_runtime` of the
  launch's `end` record, when that is later);
- steady-state tokens/s: the median of `tokens_per_second` over the training
  records, leaving out the first record after each launch (it includes model
  compilation and data-loader warm-up); all records when that leaves none;
- peak memory: the largest `peak_memory` (bytes, as rank 0 logged it);
- effective batch size, tokens per step: from the last `start` record;
- peak LR: the largest `learning_rate`; min LR: the smallest `learning_rate` at or
  after the peak's step, so warmup values do not count;
- initial loss: the first training record's `loss`; best train/eval loss: the
  smallest finite `loss`/`eval_loss` and its step;
- max and average grad norm: over finite `grad_norm` values.
NaN and infinite values are skipped and counted in `non_finite_losses`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field

from lmforge.logs.reader import TrainerLog


@dataclass
class RunSummary:
    """Summary figures of one log; None where the log has no such values."""

    label: str
    path: str
    complete: bool
    problems: list[str] = field(default_factory=list)
    end_reason: str | None = None
    launches: int = 0
    resumed_from_steps: list[int] = field(default_factory=list)
    total_steps: int | None = None
    max_steps: int | None = None
    tokens: int | None = None
    wall_clock_seconds: float | None = None
    steady_tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    world_size: int | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    effective_batch_size: int | None = None
    tokens_per_step: int | None = None
    peak_lr: float | None = None
    peak_lr_step: int | None = None
    min_lr: float | None = None
    min_lr_step: int | None = None
    initial_loss: float | None = None
    initial_loss_step: int | None = None
    best_train_loss: float | None = None
    best_train_loss_step: int | None = None
    best_eval_loss: float | None = None
    best_eval_loss_step: int | None = None
    max_grad_norm: float | None = None
    max_grad_norm_step: int | None = None
    avg_grad_norm: float | None = None
    non_finite_losses: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _launch_segments(log: TrainerLog) -> list[list[dict]]:
    """Split the records at each `start` record; records before the first start form their own segment."""
    segments: list[list[dict]] = []
    for record in log.records:
        if record.get("event") == "start" or not segments:
            segments.append([])
        segments[-1].append(record)
    return segments


def _wall_clock(segments: list[list[dict]]) -> float | None:
    total = 0.0
    measured = False
    for segment in segments:
        times = [record["time"] for record in segment if _finite(record.get("time"))]
        if not times:
            continue
        end_time = max(times)
        # The `end` record has no `time`; its `train_runtime` counts from this launch's start.
        for record in segment:
            if record.get("event") == "end" and _finite(record.get("train_runtime")):
                end_time = max(end_time, times[0] + record["train_runtime"])
        if end_time > times[0]:
            total += end_time - times[0]
            measured = True
    return total if measured else None


def _steady_tokens_per_second(segments: list[list[dict]]) -> float | None:
    all_rates = []
    steady_rates = []
    for segment in segments:
        rates = [r["tokens_per_second"] for r in segment if "loss" in r and _finite(r.get("tokens_per_second"))]
        all_rates.extend(rates)
        steady_rates.extend(rates[1:])
    rates = steady_rates or all_rates
    return statistics.median(rates) if rates else None


def _arg_best(records: list[dict], key: str, pick) -> tuple[float | None, int | None]:
    """Return (value, global_step) of the record whose finite `key` value `pick` (min or max) selects."""
    candidates = [r for r in records if _finite(r.get(key))]
    if not candidates:
        return None, None
    best = pick(candidates, key=lambda r: r[key])
    return best[key], best.get("global_step")


def summarize(log: TrainerLog) -> RunSummary:
    """Compute the figures listed in the module docstring for one log."""
    summary = RunSummary(label=log.label, path=str(log.path), complete=log.complete, problems=list(log.problems))
    segments = _launch_segments(log)
    starts = log.start_records
    train = log.train_records
    evals = log.eval_records

    summary.launches = len(starts)
    summary.resumed_from_steps = [r.get("global_step", 0) for r in starts[1:]]
    end = log.end_record
    if end is not None and log.records and log.records[-1] is end:
        summary.end_reason = end.get("reason")
    elif not log.complete:
        summary.end_reason = "crashed or killed (no end record)"

    steps = [r["global_step"] for r in log.records if _finite(r.get("global_step"))]
    summary.total_steps = int(max(steps)) if steps else None
    token_counts = [r["tokens"] for r in log.records if _finite(r.get("tokens"))]
    summary.tokens = int(max(token_counts)) if token_counts else None
    summary.wall_clock_seconds = _wall_clock(segments)
    summary.steady_tokens_per_second = _steady_tokens_per_second(segments)
    memory = [r["peak_memory"] for r in log.records if _finite(r.get("peak_memory"))]
    summary.peak_memory_bytes = int(max(memory)) if memory else None

    if starts:
        last_start = starts[-1]
        summary.max_steps = last_start.get("max_steps")
        summary.world_size = last_start.get("world_size")
        summary.per_device_train_batch_size = last_start.get("per_device_train_batch_size")
        summary.gradient_accumulation_steps = last_start.get("gradient_accumulation_steps")
        summary.effective_batch_size = last_start.get("effective_batch_size")
        summary.tokens_per_step = last_start.get("tokens_per_step")

    summary.peak_lr, summary.peak_lr_step = _arg_best(train, "learning_rate", max)
    if summary.peak_lr is not None:
        after_peak = [r for r in train if r.get("global_step", 0) >= (summary.peak_lr_step or 0)]
        summary.min_lr, summary.min_lr_step = _arg_best(after_peak, "learning_rate", min)

    finite_train = [r for r in train if _finite(r.get("loss"))]
    if finite_train:
        summary.initial_loss = finite_train[0]["loss"]
        summary.initial_loss_step = finite_train[0].get("global_step")
    summary.best_train_loss, summary.best_train_loss_step = _arg_best(train, "loss", min)
    summary.best_eval_loss, summary.best_eval_loss_step = _arg_best(evals, "eval_loss", min)
    summary.non_finite_losses = sum(not _finite(r.get("loss")) for r in train) + sum(
        not _finite(r.get("eval_loss")) for r in evals
    )

    summary.max_grad_norm, summary.max_grad_norm_step = _arg_best(train, "grad_norm", max)
    grad_norms = [r["grad_norm"] for r in train if _finite(r.get("grad_norm"))]
    summary.avg_grad_norm = statistics.fmean(grad_norms) if grad_norms else None
    return summary


# -- formatting -----------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
    return f"{clock} ({seconds:,.0f} s)"


def _format_count(value: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value:,} ({value / scale:.3g} {suffix})"
    return f"{value:,}"


def _at_step(value: float | None, step: int | None, pattern: str = "{:.4g}") -> str | None:
    if value is None:
        return None
    text = pattern.format(value)
    return f"{text} (step {step})" if step is not None else text


def summary_rows(summary: RunSummary) -> list[tuple[str, str]]:
    """Return the (metric, value) rows of the results table; missing values are shown as `-`."""
    s = summary
    batch = None
    if s.effective_batch_size is not None:
        parts = [
            f"per-device {s.per_device_train_batch_size}" if s.per_device_train_batch_size is not None else None,
            f"{s.world_size} {'rank' if s.world_size == 1 else 'ranks'}" if s.world_size is not None else None,
            f"accumulation {s.gradient_accumulation_steps}" if s.gradient_accumulation_steps is not None else None,
        ]
        # No multiplication sign: pipeline ranks share one batch, so world size is not a factor there.
        detail = ", ".join(part for part in parts if part)
        batch = f"{s.effective_batch_size} ({detail})" if detail else str(s.effective_batch_size)

    total_steps = None
    if s.total_steps is not None:
        total_steps = f"{s.total_steps:,}"
        if s.max_steps and s.max_steps > 0:
            total_steps += f" of {s.max_steps:,}"
    if s.complete:
        status = f"ended: {s.end_reason}" if s.end_reason else "ended without an end record"
    else:
        status = s.end_reason or "incomplete"
    if s.resumed_from_steps:
        status += f"; resumed at step {', '.join(map(str, s.resumed_from_steps))}"

    rows = [
        ("Run status", status),
        ("Total steps", total_steps),
        ("Tokens trained", _format_count(s.tokens) if s.tokens is not None else None),
        ("Wall-clock", _format_duration(s.wall_clock_seconds) if s.wall_clock_seconds is not None else None),
        ("Steady-state tokens/s", f"{s.steady_tokens_per_second:,.0f}" if s.steady_tokens_per_second is not None else None),
        ("Peak memory", f"{s.peak_memory_bytes / 2**30:.2f} GiB" if s.peak_memory_bytes is not None else None),
        ("Effective batch size", batch),
        ("Tokens per step", f"{s.tokens_per_step:,}" if s.tokens_per_step is not None else None),
        ("Peak LR", _at_step(s.peak_lr, s.peak_lr_step, "{:.3e}")),
        ("Min LR after peak", _at_step(s.min_lr, s.min_lr_step, "{:.3e}")),
        ("Initial loss", _at_step(s.initial_loss, s.initial_loss_step, "{:.4f}")),
        ("Best train loss", _at_step(s.best_train_loss, s.best_train_loss_step, "{:.4f}")),
        ("Best eval loss", _at_step(s.best_eval_loss, s.best_eval_loss_step, "{:.4f}")),
        ("Max grad norm", _at_step(s.max_grad_norm, s.max_grad_norm_step)),
        ("Avg grad norm", f"{s.avg_grad_norm:.4g}" if s.avg_grad_norm is not None else None),
        ("Non-finite losses", str(s.non_finite_losses)),
    ]
    return [(name, value if value is not None else "-") for name, value in rows]


def format_summaries(summaries: list[RunSummary], output_format: str) -> str:
    """Render summaries as `text` (aligned columns), `md` (a Markdown table) or `json`, one column per run."""
    if output_format == "json":
        return json.dumps([summary.to_dict() for summary in summaries], indent=1)

    tables = [summary_rows(summary) for summary in summaries]
    header = ["Metric", *(summary.label for summary in summaries)]
    rows = [[name, *(table[index][1] for table in tables)] for index, (name, _) in enumerate(tables[0])]
    notes = [f"{summary.label}: {problem}" for summary in summaries for problem in summary.problems]

    if output_format == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines += [f"\n> Note: {note}" for note in notes]
        return "\n".join(lines)

    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)
