"""`lmforge dataset`: show raw rows, packed rows, labels and statistics of a dataset target."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmforge.cli.context import global_options


def dataset(
    ctx: typer.Context,
    target: str = typer.Option("train_dataset_split", "--target", help="Config target to show, e.g. train_dataset."),
    tokenizer: Optional[str] = typer.Option(
        None, "-T", "--tokenizer", help="Tokenizer: a model directory or a .gguf file (sets the tokenizer and model_dir variables)."
    ),
    max_length: Optional[int] = typer.Option(
        None, "--max-length", help="Tokens per row (sets the max_length variable, or ns.seq_len in a training config)."
    ),
    tokenized: bool = typer.Option(False, "-s", "--tokenized", help="The target yields token rows: decode input_ids."),
    count: Optional[int] = typer.Option(
        None, "-n", help="Rows to show (default 3), or with --stats the rows to scan (default: all)."
    ),
    labels: bool = typer.Option(False, "--labels", help="Show which tokens are trained and which are masked."),
    stats: bool = typer.Option(False, "--stats", help="Scan the target: rows read and skipped, lengths, fill."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --stats: write a length histogram PNG here."),
    source: Optional[str] = typer.Option(
        None, "--source", help="Data source (sets ns.dataset_path): a file, a directory of shards, or a Hub id."
    ),
) -> None:
    """Show a dataset target of a dataset project or a training config."""
    from lmforge.data.cli_support import run_dataset_command

    opts = global_options(ctx)
    output = run_dataset_command(
        template=opts.template,
        project=opts.project,
        sets=list(opts.sets),
        target=target,
        tokenizer=tokenizer,
        max_length=max_length,
        tokenized=tokenized or labels,
        count=count,
        labels=labels,
        stats=stats,
        plot=plot,
        source=source,
    )
    typer.echo(output)


def register(app: typer.Typer) -> None:
    app.command(name="dataset")(dataset)
