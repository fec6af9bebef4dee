"""The `lmforge` console script.

Each command group lives in its own module with a `register(app)` function, so this
file only wires them together. Command modules import torch, transformers and the
like inside the command functions, which keeps `lmforge --help` fast.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from lmforge.cli.context import GlobalOptions
from lmforge.errors import LmforgeError

app = typer.Typer(
    name="lmforge",
    help="Fine-tune causal language models from Jinja-preprocessed YAML configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that define `register(app)`; each adds its commands or sub-apps.
COMMAND_MODULES = [
    "lmforge.cli.config_cmds",
    "lmforge.cli.dataset_cmd",
    "lmforge.cli.model_cmds",
    "lmforge.cli.train_cmd",
    "lmforge.cli.plan_cmd",
    "lmforge.cli.control_cmds",
    "lmforge.cli.logs_cmds",
    "lmforge.cli.inf_cmds",
    "lmforge.cli.checkpoint_cmds",
    "lmforge.cli.quickstart_cmd",
]


@app.callback()
def root(
    ctx: typer.Context,
    template: Optional[str] = typer.Option(
        None, "-t", "--template", help="Config file, relative to the project's config directory."
    ),
    project: Optional[Path] = typer.Option(
        None, "-p", "--project", help="Project directory (default: nearest meta.yaml at or above the current directory)."
    ),
    sets: list[str] = typer.Option(
        [], "--set", help="Override a template value, e.g. --set ns.total_tokens=1e6. Repeatable."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
) -> None:
    ctx.obj = GlobalOptions(project=project, template=template, sets=list(sets), debug=debug)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@app.command()
def version() -> None:
    """Print the lmforge version."""
    from lmforge import __version__

    typer.echo(__version__)


for _module_name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_module_name)
    except ModuleNotFoundError as exc:
        if exc.name != _module_name:
            raise
        continue
    _module.register(app)


def run() -> None:
    """Run the CLI, reporting `LmforgeError` as one line with exit status 2."""
    debug = "--debug" in sys.argv
    try:
        # Without standalone mode, typer returns the code of `raise typer.Exit(code)` instead of exiting.
        exit_code = app(standalone_mode=False)
    except LmforgeError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None)
        if code is None:
            code = getattr(exc, "code", 0)
        sys.exit(code or 0)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # usage errors (typer's ClickException) and unexpected failures
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if debug:
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(exit_code if isinstance(exit_code, int) else 0)


if __name__ == "__main__":
    run()
