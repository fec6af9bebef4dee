"""`lmforge logs`: summary tables and plots of `trainer_logs.json` files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from lmforge.errors import LmforgeError

PATHS_HELP = "trainer_logs.json files, run directories (runs/NAME/), or model directories with runs/*/."


def _read_logs(paths: list[Path]):
    from lmforge.logs.reader import find_trainer_logs, read_trainer_log

    logs = [read_trainer_log(path) for path in find_trainer_logs(paths)]
    for log in logs:
        for problem in log.problems:
            typer.echo(f"warning: {log.path}: {problem}", err=True)
    return logs


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match or int(match.group(1)) < 100 or int(match.group(2)) < 100:
        raise LmforgeError(f"invalid --size {text!r}", hint="give WIDTHxHEIGHT in pixels, each at least 100, e.g. 1200x800")
    return int(match.group(1)), int(match.group(2))


def register(app: typer.Typer) -> None:
    logs_app = typer.Typer(help="Summarise and plot training logs (trainer_logs.json).", no_args_is_help=True)
    app.add_typer(logs_app, name="logs")

    @logs_app.command("summary")
    def summary(
        paths: list[Path] = typer.Argument(..., help=PATHS_HELP),
        output_format: str = typer.Option("text", "--format", help="Output format: text, md (Markdown table) or json."),
    ) -> None:
        """Print the results table of each run: steps, tokens, wall-clock, tokens/s, memory, LR, losses, grad norms.

        Logs of runs that crashed (no closing bracket, a half-written last record)
        are read up to the last complete record, with a warning on stderr.
        """
        from lmforge.logs.summary import format_summaries, summarize

        if output_format not in ("text", "md", "json"):
            raise LmforgeError(f"invalid --format {output_format!r}; expected text, md or json")
        logs = _read_logs(paths)
        for log in logs:
            if not log.records:
                raise LmforgeError(f"{log.path} contains no records; the run stopped before it logged anything")
        typer.echo(format_summaries([summarize(log) for log in logs], output_format))

    @logs_app.command("plot")
    def plot(
        paths: list[Path] = typer.Argument(..., help=PATHS_HELP),
        loss_curves: bool = typer.Option(
            False, "--loss-curves", help="Train and eval loss against step, LR on a second axis (the default panel)."
        ),
        grad_norm: bool = typer.Option(False, "--grad-norm", help="A panel of the gradient norm against step (add --loss-curves to keep the loss panel)."),
        lr: bool = typer.Option(False, "--lr", help="A panel of the learning rate against step (add --loss-curves to keep the loss panel)."),
        ignore_outliers: bool = typer.Option(
            True,
            "--ignore-outliers/--no-ignore-outliers",
            help="Fit each panel's y-range to the values inside [Q1 - 3*IQR, Q3 + 3*IQR] (Tukey's far-out "
            "fences); outside points are drawn but off-axis. --no-ignore-outliers fits every point, e.g. "
            "to see a warmup grad-norm spike.",
        ),
        smooth: int = typer.Option(
            1, "--smooth", help="Also draw a trailing moving average over N logging records (1: raw curves only)."
        ),
        output: Optional[Path] = typer.Option(
            None, "-o", "--output", help="Image file (.png, .svg or .pdf); default: <first log's dir>/<panels>.png."
        ),
        size: str = typer.Option("1200x800", "--size", help="Image size in pixels, WIDTHxHEIGHT."),
        dpi: int = typer.Option(100, "--dpi", help="Dots per inch; text scales with it, the pixel size does not."),
    ) -> None:
        """Plot runs overlaid, one color per run, to an image file (no window opens)."""
        from lmforge.logs.plot import default_output_path, plot_logs

        panels = [name for name, selected in (("loss", loss_curves), ("grad_norm", grad_norm), ("lr", lr)) if selected]
        panels = panels or ["loss"]
        width, height = _parse_size(size)
        if dpi < 10:
            raise LmforgeError(f"invalid --dpi {dpi}; it must be at least 10")
        logs = _read_logs(paths)
        target = output or default_output_path(logs, panels)
        written = plot_logs(
            logs, target, panels=panels, ignore_outliers=ignore_outliers, smooth=smooth, size=(width, height), dpi=dpi
        )
        typer.echo(f"wrote {written} ({width}x{height} px, {len(logs)} run(s))")
