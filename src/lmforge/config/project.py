"""Projects (a directory with `meta.yaml`) and the workspace file that lends them shared templates.

meta.yaml keys (all optional):

    name: open_orca                # default: the directory name
    description: Fine-tune on Open-Orca
    config_dir: configs            # where `-t CONFIG` is looked up, relative to the project
    default_config: smoke.yaml     # used when no `-t` is given
    template_dirs: [templates]     # project template directories, searched first
    flags:                         # `train --NAME VALUE` flags, each setting a namespace key
      warmup-tokens: ns.warmup_tokens

The workspace file `lmforge_workspace.yaml`, found by walking up from the project
directory, lists more template directories, relative to the workspace file:

    template_dirs: [templates]

A template name is looked up in the project's template directories, then the config
directory, then the workspace's directories; the first match wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError

META_FILE = "meta.yaml"
WORKSPACE_FILE = "lmforge_workspace.yaml"


@dataclass
class Project:
    """A project's directory and its meta.yaml settings."""

    dir: Path
    name: str
    description: str = ""
    config_dir: Path = field(default_factory=Path)
    default_config: str | None = None
    template_dirs: list[Path] = field(default_factory=list)
    """The project's own template directories (meta.yaml `template_dirs`)."""
    workspace_file: Path | None = None
    workspace_dirs: list[Path] = field(default_factory=list)
    """Template directories that the workspace file lists."""
    flags: dict[str, str] = field(default_factory=dict)
    """Command-line flags the project declares (meta.yaml `flags`): flag name without `--` -> `ns.KEY`."""

    def search_path(self) -> list[Path]:
        """Return the template search path: project templates, the config directory, workspace templates."""
        return _unique([*self.template_dirs, self.config_dir, *self.workspace_dirs])

    def config_files(self) -> list[Path]:
        """Return the *.yaml files under the config directory, sorted.

        meta.yaml and files inside a template directory are left out, since a project may use
        its own directory (`config_dir: .`) as its config directory.
        """
        if not self.config_dir.is_dir():
            return []
        files = []
        for path in sorted(self.config_dir.rglob("*.yaml")):
            if not path.is_file() or path == self.dir / META_FILE:
                continue
            if any(template_dir in path.parents for template_dir in self.template_dirs):
                continue
            if any(part.startswith(".") for part in path.relative_to(self.config_dir).parts):
                continue
            files.append(path)
        return files


def _unique(paths: list[Path]) -> list[Path]:
    seen: set[Path] = set()
    result = []
    for path in paths:
        if path not in seen:
            seen.add(path)
            result.append(path)
    return result


def find_project(start: str | Path) -> Path:
    """Return the nearest directory at or above START that contains meta.yaml."""
    start = Path(start).resolve()
    for directory in [start, *start.parents]:
        if (directory / META_FILE).is_file():
            return directory
    raise LmforgeError(
        f"no project found: neither {start} nor any directory above it contains {META_FILE}",
        hint="run from inside a project, or pass -p PROJECT_DIR",
    )


def find_workspace(start: Path) -> Path | None:
    """Return the nearest lmforge_workspace.yaml at or above START, or None."""
    start = start.resolve()
    for directory in [start, *start.parents]:
        candidate = directory / WORKSPACE_FILE
        if candidate.is_file():
            return candidate
    return None


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise LmforgeError(f"{path}:{line}: invalid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise LmforgeError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _string_list(value: Any, path: Path, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise LmforgeError(f"{path}: {key} must be a list of directory names, got {value!r}")


_META_KEYS = {"name", "description", "config_dir", "default_config", "template_dirs", "flags"}


def workspace_template_dirs(start: Path) -> tuple[Path | None, list[Path]]:
    """Return the workspace file above START and its template directories (absolute)."""
    workspace = find_workspace(start)
    if workspace is None:
        return None, []
    data = _read_yaml_mapping(workspace)
    unknown = set(data) - {"template_dirs"}
    if unknown:
        raise LmforgeError(f"{workspace}: unknown keys {sorted(unknown)}", hint="the workspace file takes template_dirs")
    dirs = [(workspace.parent / d).resolve() for d in _string_list(data.get("template_dirs"), workspace, "template_dirs")]
    return workspace, dirs


def load_project(project_dir: str | Path) -> Project:
    """Read PROJECT_DIR/meta.yaml into a Project."""
    directory = Path(project_dir).resolve()
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise LmforgeError(f"{directory} is not a project: {META_FILE} not found", hint="pass -p with a directory that has meta.yaml")
    meta = _read_yaml_mapping(meta_path)
    unknown = set(meta) - _META_KEYS
    if unknown:
        import difflib

        names = [difflib.get_close_matches(key, sorted(_META_KEYS), n=1) for key in sorted(unknown)]
        suggestions = [f"{key} -> {match[0]}" for key, match in zip(sorted(unknown), names) if match]
        raise LmforgeError(
            f"{meta_path}: unknown keys {sorted(unknown)}",
            hint=("did you mean " + ", ".join(suggestions) + "? ") if suggestions else f"valid keys: {sorted(_META_KEYS)}",
        )
    template_names = _string_list(meta.get("template_dirs", ["templates"]), meta_path, "template_dirs")
    template_dirs = [(directory / name).resolve() for name in template_names]
    workspace, workspace_dirs = workspace_template_dirs(directory)
    return Project(
        dir=directory,
        name=str(meta.get("name") or directory.name),
        description=str(meta.get("description") or ""),
        config_dir=(directory / str(meta.get("config_dir", "configs"))).resolve(),
        default_config=meta.get("default_config"),
        template_dirs=[d for d in template_dirs if d.is_dir() or "template_dirs" in meta],
        workspace_file=workspace,
        workspace_dirs=workspace_dirs,
        flags=_declared_flags(meta.get("flags"), meta_path),
    )


def _declared_flags(value: Any, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LmforgeError(f"{path}: flags must be a mapping of flag name to ns.KEY, got {value!r}")
    flags = {}
    for name, key in value.items():
        name = str(name).removeprefix("--")
        if not isinstance(key, str) or not key.startswith("ns.") or len(key) <= 3:
            raise LmforgeError(f"{path}: flag {name!r} maps to {key!r}, expected a namespace key such as ns.warmup_tokens")
        flags[name] = key
    return flags
