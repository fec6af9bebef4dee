"""`lmforge -t CFG plan`: print a training config's token budget, steps and LR schedule."""

from __future__ import annotations

import json

import typer

from lmforge.cli.context import global_options


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)


def plan(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the config's namespace values as JSON instead of the plan."),
) -> None:
    """Print the run plan of a training config: tokens per step, steps, warmup, decay window and LRs.

    Root options apply: `lmforge -t llama3_1b/4gpu_ddp.yaml --set ns.total_tokens=2e8 plan`.
    """
    from lmforge.config import load_config
    from lmforge.optim.plan import format_plan

    opts = global_options(ctx)
    config = load_config(_config_name(opts), project_dir=opts.project, sets=opts.sets)
    if as_json:
        typer.echo(json.dumps(config.namespace, indent=2, sort_keys=True, default=str))
        return
    typer.echo(format_plan(config.namespace, title=config.name))


def _config_name(opts) -> str:
    """Return `-t CONFIG`, or the project's default config when `-t` is not given."""
    if opts.template:
        return opts.template
    from pathlib import Path

    from lmforge.config import find_project
    from lmforge.config.project import load_project
    from lmforge.errors import LmforgeError

    project = load_project(opts.project or find_project(Path.cwd()))
    if not project.default_config:
        raise LmforgeError(
            f"no config given and project {project.name} has no default_config",
            hint="pass -t CONFIG, e.g. lmforge -t llama3_1b/4gpu_ddp.yaml plan",
        )
    return project.default_config
