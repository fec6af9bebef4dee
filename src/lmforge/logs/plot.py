"""Plot loss, learning-rate and grad-norm curves of one or more runs to an image file.

The figure is built with `matplotlib.figure.Figure` and written with the Agg
canvas, without pyplot, so no window opens and no display is needed.

Outlier rule (the default view): a panel's y-range covers only the values inside
Tukey's far-out fences, [Q1 - 3 * IQR, Q3 + 3 * IQR] of all raw values in that
panel, plus a 5% margin. Points outside are still drawn but fall off the axis.
`ignore_outliers=False` sets the y-range from every value, which is what shows a
warmup grad-norm spike in full.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.logs.reader import TrainerLog

logger = logging.getLogger(__name__)

PANELS = ("loss", "grad_norm", "lr")
"""Panel names in drawing order: loss curves (with LR on a second axis), grad norm, LR alone."""
OUTLIER_IQR_FACTOR = 3.0
SUPPORTED_SUFFIXES = (".png", ".svg", ".pdf")


def outlier_limits(values: list[float], factor: float = OUTLIER_IQR_FACTOR) -> tuple[float, float] | None:
    """Return (low, high) y-limits covering the values inside [Q1 - factor*IQR, Q3 + factor*IQR], with a 5% margin."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    q1, q3 = _quantile(finite, 0.25), _quantile(finite, 0.75)
    spread = q3 - q1
    inside = [v for v in finite if q1 - factor * spread <= v <= q3 + factor * spread]
    return _with_margin(min(inside), max(inside))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method) of sorted values."""
    position = (len(sorted_values) - 1) * q
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def _with_margin(low: float, high: float) -> tuple[float, float]:
    margin = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    return low - margin, high + margin


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start); window 1 returns the values."""
    if window <= 1:
        return list(values)
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        result.append(total / min(index + 1, window))
    return result


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [
        (record["global_step"], float(record[key]))
        for record in records
        if isinstance(record.get(key), (int, float)) and "global_step" in record and math.isfinite(record[key])
    ]
    return [step for step, _ in points], [value for _, value in points]


def _unique_labels(logs: list[TrainerLog]) -> list[str]:
    """Use each run's name, prefixed with its model directory where two runs share a name."""
    labels = [log.label for log in logs]
    if len(set(labels)) == len(labels):
        return labels
    result = []
    for log in logs:
        # trainer_logs.json sits in MODEL_DIR/runs/RUN_NAME/.
        model_dir = log.path.parent.parent.parent.name
        result.append(f"{model_dir}/{log.label}" if model_dir else str(log.path))
    return result


def default_output_path(logs: list[TrainerLog], panels: list[str]) -> Path:
    """`<directory of the first log>/<panel names joined by '+'>.png`."""
    names = {"loss": "loss_curves", "grad_norm": "grad_norm", "lr": "learning_rate"}
    return logs[0].path.parent / ("+".join(names[panel] for panel in panels) + ".png")


def build_figure(
    logs: list[TrainerLog],
    *,
    panels: list[str] | tuple[str, ...] = ("loss",),
    ignore_outliers: bool = True,
    smooth: int = 1,
    size: tuple[int, int] = (1200, 800),
    dpi: int = 100,
):
    """Draw the selected panels for every log, overlaid with one color per run; return the matplotlib Figure.

    The figure is `size` pixels (width, height) whatever the number of panels.
    Raise `LmforgeError` for an unknown panel, a bad `smooth` or a log without
    training records.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    unknown = [panel for panel in panels if panel not in PANELS]
    if unknown or not panels:
        raise LmforgeError(f"unknown plot panel(s) {unknown}; expected some of {', '.join(PANELS)}")
    if smooth < 1:
        raise LmforgeError(f"invalid smoothing window {smooth}; it must be at least 1 (1 means no smoothing)")
    for log in logs:
        if not log.train_records:
            raise LmforgeError(
                f"{log.path} contains no training records ({len(log.records)} records in all); nothing to plot",
                hint="the run may have stopped before its first logging step",
            )

    ordered = [panel for panel in PANELS if panel in panels]
    width, height = size
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(ordered), 1, sharex=True, squeeze=False)[:, 0]
    labels = _unique_labels(logs)
    colors = [f"C{index % 10}" for index in range(len(logs))]

    for axis, panel in zip(axes, ordered):
        if panel == "loss":
            _draw_loss_panel(axis, logs, labels, colors, ignore_outliers, smooth)
        elif panel == "grad_norm":
            _draw_metric_panel(axis, logs, labels, colors, "grad_norm", "grad norm", ignore_outliers, smooth)
        else:
            _draw_metric_panel(axis, logs, labels, colors, "learning_rate", "learning rate", False, 1)
        axis.grid(True, alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    title = "outliers clipped from the y-range" if ignore_outliers else "all points shown"
    if smooth > 1:
        title += f", moving average over {smooth} records"
    figure.suptitle(title, fontsize="small")
    figure.tight_layout()
    return figure


def plot_logs(logs: list[TrainerLog], output: str | Path, *, dpi: int = 100, **options) -> Path:
    """Build the figure (`build_figure` takes `options`) and write it to `output` through a temporary file.

    Raise `LmforgeError` for a file type other than PNG, SVG or PDF.
    """
    output = Path(output)
    if output.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise LmforgeError(
            f"unsupported plot file type {output.suffix or '(none)'!r} for {output}",
            hint=f"use one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    figure = build_figure(logs, dpi=dpi, **options)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}")
    try:
        figure.savefig(tmp_path, dpi=dpi)
        os.replace(tmp_path, output)
    finally:
        tmp_path.unlink(missing_ok=True)
    width, height = figure.canvas.get_width_height()
    logger.debug("Wrote %s (%dx%d px)", output, width, height)
    return output


def _draw_curve(axis, steps, values, color, label, smooth, **style) -> None:
    if smooth > 1:
        axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        axis.plot(steps, moving_average(values, smooth), color=color, label=label, **style)
    else:
        axis.plot(steps, values, color=color, label=label, **style)


def _apply_limits(axis, values: list[float], ignore_outliers: bool) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    limits = outlier_limits(finite) if ignore_outliers else _with_margin(min(finite), max(finite))
    if limits is not None:
        axis.set_ylim(*limits)


def _draw_loss_panel(axis, logs, labels, colors, ignore_outliers: bool, smooth: int) -> None:
    lr_axis = axis.twinx()
    all_losses: list[float] = []
    for log, label, color in zip(logs, labels, colors):
        steps, losses = _series(log.train_records, "loss")
        _draw_curve(axis, steps, losses, color, f"{label} train loss", smooth, linewidth=1.2)
        all_losses += losses

        eval_steps, eval_losses = _series(log.eval_records, "eval_loss")
        if eval_steps:
            axis.plot(eval_steps, eval_losses, color=color, linestyle="--", marker="o", markersize=3, label=f"{label} eval loss")
            all_losses += eval_losses

        lr_steps, lrs = _series(log.train_records, "learning_rate")
        if lr_steps:
            lr_axis.plot(lr_steps, lrs, color=color, linestyle=":", alpha=0.7, label=f"{label} LR")
    _apply_limits(axis, all_losses, ignore_outliers)
    axis.set_ylabel("loss")
    lr_axis.set_ylabel("learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    handles, names = axis.get_legend_handles_labels()
    lr_handles, lr_names = lr_axis.get_legend_handles_labels()
    axis.legend(handles + lr_handles, names + lr_names, fontsize="small", loc="upper right")


def _draw_metric_panel(axis, logs, labels, colors, key: str, name: str, ignore_outliers: bool, smooth: int) -> None:
    all_values: list[float] = []
    for log, label, color in zip(logs, labels, colors):
        steps, values = _series(log.train_records, key)
        if steps:
            _draw_curve(axis, steps, values, color, label, smooth, linewidth=1.0)
            all_values += values
    _apply_limits(axis, all_values, ignore_outliers)
    axis.set_ylabel(name)
    if key == "learning_rate":
        axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if all_values:
        axis.legend(fontsize="small", loc="upper right")
