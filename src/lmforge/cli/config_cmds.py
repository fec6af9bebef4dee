"""Config inspection commands: `ls`, `pp`, `targets`, `trefs`, `construct`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmforge.cli.context import global_options


def _load(ctx: typer.Context):
    from lmforge.config import load_config

    opts = global_options(ctx)
    return load_config(opts.template, project_dir=opts.project, sets=opts.sets)


def ls(ctx: typer.Context) -> None:
    """List the projects under the current directory (or -p DIR) and their configs with descriptions."""
    from lmforge.config.listing import list_projects

    opts = global_options(ctx)
    root = Path(opts.project) if opts.project else Path.cwd()
    if not root.is_dir():
        from lmforge.errors import LmforgeError

        problem = "is not a directory" if root.exists() else "not found"
        raise LmforgeError(f"-p {root}: directory {problem}", hint="pass -p with an existing directory, e.g. -p configs/open_orca")
    listing = list_projects(root)
    if not listing:
        typer.echo(f"no projects (directories with meta.yaml) under {root.resolve()}")
        return
    for project, directory, configs in listing:
        shown_dir = _relative(directory, root)
        if project is None:
            typer.echo(f"{shown_dir}: error: {configs}")
            continue
        title = f"{project.name} ({shown_dir})"
        typer.echo(f"{title}: {project.description}" if project.description else title)
        if not configs:
            typer.echo(f"  (no configs in {_relative(project.config_dir, root)})")
        width = max((len(entry.name) for entry in configs), default=0)
        for entry in configs:
            marker = "*" if entry.name == project.default_config else " "
            text = f"error: {entry.error}" if entry.error else entry.description
            typer.echo(f" {marker}{entry.name.ljust(width)}  {text}".rstrip())


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def pp(ctx: typer.Context) -> None:
    """Print the fully preprocessed YAML of -t CONFIG, headed by its template chain, `ns` values and overrides."""
    config = _load(ctx)
    typer.echo(f"# config: {config.name}")
    typer.echo("# template chain: " + " -> ".join(config.template_chain))
    if config.namespace:
        typer.echo("# ns: " + ", ".join(f"{key}={value!r}" for key, value in config.namespace.items()))
    sets = global_options(ctx).sets
    if sets:
        typer.echo("# overrides: " + " ".join(f"--set {entry}" for entry in sets))
    typer.echo(config.preprocessed.rstrip("\n"))


def targets(ctx: typer.Context) -> None:
    """List the targets (top-level keys not starting with `.`) of -t CONFIG."""
    for name in _load(ctx).targets:
        typer.echo(name)


def trefs(ctx: typer.Context) -> None:
    """Print the tree of templates that -t CONFIG extends, includes and imports."""
    from lmforge.config.listing import template_tree

    typer.echo(template_tree(_load(ctx)))


def construct(
    ctx: typer.Context,
    target: str = typer.Option("main", "--target", help="Top-level key to build."),
    variables: list[str] = typer.Option(
        [], "--var", help="Value for a `!var` in the config, as NAME=VALUE (YAML scalar). Repeatable."
    ),
) -> None:
    """Build one target of -t CONFIG and print the resulting object."""
    import pprint

    from lmforge.config.namespace import parse_scalar
    from lmforge.errors import LmforgeError

    values = {}
    for entry in variables:
        name, sep, text = entry.partition("=")
        if not sep or not name:
            raise LmforgeError(f"invalid --var {entry!r}: expected NAME=VALUE", hint="e.g. --var run_dir=/tmp/run")
        values[name.strip()] = parse_scalar(text)
    obj = _load(ctx).construct(target, **values)
    typer.echo(pprint.pformat(obj, sort_dicts=False))


def register(app: typer.Typer) -> None:
    """Add the config commands to the root app."""
    app.command("ls")(ls)
    app.command("pp")(pp)
    app.command("targets")(targets)
    app.command("trefs")(trefs)
    app.command("construct")(construct)
