"""Options given before the command name, shared by every command."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer


@dataclass
class GlobalOptions:
    """Root options: `lmforge [-p PROJECT] [-t CONFIG] [--set KEY=VALUE]... [--debug] COMMAND`."""

    project: Path | None = None
    """Project directory; None means the current directory, walking up to the nearest meta.yaml."""
    template: str | None = None
    """Config path relative to the project's config directory, e.g. `llama3_1b/4gpu_ddp.yaml`."""
    sets: list[str] = field(default_factory=list)
    """`ns.key=value` overrides, applied over the values that templates set."""
    debug: bool = False
    """Show Python tracebacks on errors."""


def global_options(ctx: typer.Context) -> GlobalOptions:
    """Return the root options from any command's context."""
    root = ctx.find_root()
    if isinstance(root.obj, GlobalOptions):
        return root.obj
    return GlobalOptions()
