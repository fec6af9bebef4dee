"""Named command-line flags that a project declares in its meta.yaml.

A project maps flag names to namespace keys, for example

    flags:
      warmup-tokens: ns.warmup_tokens
      optimizer: ns.optimizer

so that `lmforge -t CFG train --warmup-tokens 2e7` means the same as
`--set ns.warmup_tokens=2e7`: the value is pinned like any `--set` override and
beats what the templates set.
"""

from __future__ import annotations

import difflib
from typing import Sequence

from lmforge.config.project import Project
from lmforge.errors import LmforgeError


def declared_flag_sets(project: Project | None, args: Sequence[str]) -> list[str]:
    """Turn `--NAME VALUE` and `--NAME=VALUE` pairs of declared flags into `ns.KEY=VALUE` overrides."""
    flags = project.flags if project is not None else {}
    sets: list[str] = []
    index = 0
    while index < len(args):
        argument = args[index]
        if not argument.startswith("--") or argument == "--":
            raise LmforgeError(f"unexpected argument {argument!r}", hint="see --help for the command's arguments")
        name, has_value, value = argument[2:].partition("=")
        if name not in flags:
            raise LmforgeError(f"no such option: --{name}", hint=_flag_hint(name, flags))
        if not has_value:
            if index + 1 >= len(args):
                raise LmforgeError(f"option --{name} needs a value", hint=f"pass --{name} VALUE (it sets {flags[name]})")
            index += 1
            value = args[index]
        sets.append(f"{flags[name]}={value}")
        index += 1
    return sets


# Root options of `lmforge` that a user may put after the command name by mistake.
_ROOT_OPTIONS = ("set", "template", "project", "debug")


def _flag_hint(name: str, flags: dict[str, str]) -> str:
    if name in _ROOT_OPTIONS:
        return f"--{name} is an option of lmforge itself: put it before the command, e.g. lmforge --{name} ... train"
    if not flags:
        return "this project declares no flags of its own; use --set ns.KEY=VALUE before the command"
    close = difflib.get_close_matches(name, list(flags), n=2)
    if close:
        return "did you mean " + " or ".join(f"--{match}" for match in close) + "?"
    return "the project's own flags are " + ", ".join(f"--{flag}" for flag in sorted(flags))
