"""Project discovery and config descriptions for `lmforge ls`, and the `trefs` tree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmforge.config.config import Config, load_config
from lmforge.config.project import META_FILE, Project, load_project
from lmforge.errors import LmforgeError

_SKIPPED_DIRS = {"__pycache__", "node_modules", "venv", "site-packages"}


@dataclass
class ConfigEntry:
    """One config of a project: its name, its description, or the first line of its load error."""

    name: str
    description: str = ""
    error: str | None = None


def find_projects(root: Path) -> list[Path]:
    """Return every directory under ROOT (ROOT included) that contains meta.yaml, sorted."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in _SKIPPED_DIRS)
        if META_FILE in files:
            found.append(Path(directory))
    return found


def comment_description(path: Path) -> str:
    """Return the first paragraph of the `## ...` lines that start a config file.

    The paragraph ends at an empty `##` line or at the first line that is not a `##` comment.
    """
    parts = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped and not parts:
            continue
        if not stripped.startswith("##"):
            break
        text = stripped[2:].strip()
        if not text:
            if parts:
                break
            continue
        parts.append(text)
    return " ".join(parts)


def config_description(path: Path, config: Config | None) -> str:
    """Return a config's description: its leading `## ` comment, else a plain `description` in a `meta` target."""
    description = comment_description(path)
    if description or config is None:
        return description
    for key in ("meta", ".meta"):
        meta = config.graph.get(key)
        if isinstance(meta, dict) and isinstance(meta.get("description"), str):
            return meta["description"]
    return ""


def describe_configs(project: Project) -> list[ConfigEntry]:
    """Load every config of PROJECT; a config that fails is listed with its error's first line."""
    entries = []
    for path in project.config_files():
        name = str(path.relative_to(project.config_dir))
        try:
            config = load_config(name, project_dir=project.dir)
        except LmforgeError as exc:
            entries.append(ConfigEntry(name=name, description=comment_description(path),
                                       error=exc.message.splitlines()[0]))
            continue
        entries.append(ConfigEntry(name=name, description=config_description(path, config)))
    return entries


def list_projects(root: Path) -> list[tuple[Project | None, Path, list[ConfigEntry] | str]]:
    """Return (project, directory, its configs or its meta.yaml error) for each project under ROOT."""
    listing = []
    for directory in find_projects(root):
        try:
            project = load_project(directory)
        except LmforgeError as exc:
            listing.append((None, directory, exc.message.splitlines()[0]))
            continue
        listing.append((project, directory, describe_configs(project)))
    return listing


def template_tree(config: Config) -> str:
    """Draw the extends/include/import tree of a loaded config, from the config file down."""
    children: dict[str, list[tuple[str, str]]] = {}
    for parent, child, kind in config.template_edges:
        children.setdefault(parent, []).append((child, kind))
    root = config.template_chain[0] if config.template_chain else config.name
    lines = [root]

    def walk(name: str, prefix: str, seen: tuple[str, ...]) -> None:
        items = children.get(name, [])
        for index, (child, kind) in enumerate(items):
            last = index == len(items) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{kind} {child}")
            if child not in seen:
                walk(child, prefix + ("    " if last else "│   "), seen + (child,))

    walk(root, "", (root,))
    return "\n".join(lines)
