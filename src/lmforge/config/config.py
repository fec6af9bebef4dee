"""`load_config`: render a config's template chain, parse the YAML graph, and construct targets."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import yaml

from lmforge.config.diagnostics import SourceDisplay, guess_source, render_error, yaml_error
from lmforge.config.environment import SUB_SEPARATOR, make_environment
from lmforge.config.graph import ConstructError
from lmforge.config.graph import construct as construct_graph
from lmforge.config.namespace import (
    PinnedNamespace,
    check_override_keys,
    namespace_used_keys,
    namespace_values,
    parse_overrides,
)
from lmforge.config.project import Project, find_project, load_project, workspace_template_dirs
from lmforge.config.yaml_tags import TagError, parse_graph
from lmforge.errors import LmforgeError


class Config:
    """A loaded config: its preprocessed YAML, final `ns` values and lazy object graph.

    The graph contains nodes, not objects, and every `construct` call builds a new set of objects.
    """

    def __init__(
        self,
        *,
        name: str,
        path: Path,
        project: Project | None,
        preprocessed: str,
        template_chain: list[str],
        template_edges: list[tuple[str, str, str]],
        namespace: dict[str, Any],
        graph: dict[str, Any],
        display: SourceDisplay,
    ):
        self.name = name
        self.path = path
        self.project = project
        self.preprocessed = preprocessed
        self.template_chain = template_chain
        """Templates in load order, first the config itself, as paths relative to the project directory."""
        self.template_edges = template_edges
        """(parent, child, kind) of each extends/include/import, with displayed names, in load order."""
        self.namespace = namespace
        self._graph = graph
        self._display = display

    @property
    def targets(self) -> list[str]:
        """Top-level keys that do not start with `.` (those are definitions only)."""
        return [key for key in self._graph if not str(key).startswith(".")]

    @property
    def graph(self) -> dict[str, Any]:
        """The parsed YAML: plain data and graph nodes, keyed by top-level name."""
        return self._graph

    def construct(self, target: str, **variables: Any) -> Any:
        """Build TARGET's sub-graph into fresh objects; `!var` values come from VARIABLES."""
        if target not in self._graph:
            close = difflib.get_close_matches(target, self.targets, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"targets: {', '.join(self.targets) or '(none)'}"
            raise LmforgeError(f"config {self.name} has no target {target!r}", hint=hint)
        base_dir = self.project.dir if self.project else self.path.parent
        try:
            return construct_graph(self._graph[target], target, variables, base_dir, self._locate)
        except ConstructError as exc:
            raise ConstructError(f"config {self.name}: {exc.message}", hint=exc.hint) from exc

    def _locate(self, line: int) -> str:
        lines = self.preprocessed.splitlines()
        text = lines[line - 1] if 1 <= line <= len(lines) else ""
        source = guess_source(text, self._display)
        if source:
            return source
        return f"line {line} of `lmforge -t {self.name} pp`"

    def __repr__(self) -> str:
        return f"Config(name={self.name!r}, targets={self.targets!r})"


def _project_hint() -> str:
    """Return a hint naming the projects under ./configs, or the repository's Open-Orca project."""
    nearby = sorted(path.parent for path in Path("configs").glob("*/meta.yaml"))
    if nearby:
        return "pass the project directory with -p, e.g. " + ", ".join(f"-p {path}" for path in nearby[:3])
    return "pass the project directory with -p, e.g. -p configs/open_orca from the lmforge repository root"


def resolve_config_path(config: str | Path | None, project_dir: str | Path | None) -> tuple[Path, Project | None]:
    """Find the config file and its project (None when the file is in no project)."""
    project: Project | None = None
    if project_dir is not None:
        project = load_project(project_dir)
    else:
        try:
            project = load_project(find_project(Path.cwd()))
        except LmforgeError:
            project = None

    if config is None:
        if project is None or not project.default_config:
            raise LmforgeError("no config given", hint="pass -t CONFIG (or set default_config in meta.yaml)")
        config = project.default_config

    candidates = []
    if project is not None:
        candidates.append(project.config_dir / config)
    candidates.append(Path(config))
    for candidate in candidates:
        if candidate.is_file():
            path = candidate.resolve()
            break
    else:
        known = [str(p.relative_to(project.config_dir)) for p in project.config_files()] if project else []
        close = difflib.get_close_matches(str(config), known, n=3, cutoff=0.5)
        where = f" in {project.config_dir}" if project else ""
        hint = f"did you mean {', '.join(close)}?" if close else "list the configs with `lmforge ls`"
        if project is None and project_dir is None:
            raise LmforgeError(
                f"config {str(config)!r} not found: no project (a directory with meta.yaml) at or above {Path.cwd()}",
                hint=_project_hint(),
            )
        raise LmforgeError(f"config {str(config)!r} not found{where}", hint=hint)

    if project is None or not _is_relative_to(path, project.dir):
        try:
            project = load_project(find_project(path.parent))
        except LmforgeError:
            project = None
    return path, project


def _is_relative_to(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def load_config(
    config: str | Path | None,
    project_dir: str | Path | None = None,
    sets: Sequence[str] | Mapping[str, Any] = (),
) -> Config:
    """Render CONFIG (relative to the project's config directory, or a file path) into a Config.

    SETS are overrides (`["ns.lr=3e-4"]` or `{"ns.lr": 3e-4}`) that beat every template value.
    """
    path, project = resolve_config_path(config, project_dir)
    if project is not None:
        search_path = project.search_path()
        name = str(path.relative_to(project.config_dir)) if _is_relative_to(path, project.config_dir) else str(path)
        variables = {
            "project_dir": str(project.dir),
            "config_dir": str(project.config_dir),
            "workspace_dir": str(project.workspace_file.parent) if project.workspace_file else str(project.dir),
        }
    else:
        workspace, workspace_dirs = workspace_template_dirs(path.parent)
        search_path = [path.parent, *workspace_dirs]
        name = str(config)
        variables = {
            "project_dir": str(path.parent),
            "config_dir": str(path.parent),
            "workspace_dir": str(workspace.parent if workspace else path.parent),
        }

    overrides = parse_overrides(sets)
    namespace = PinnedNamespace(overrides)
    variables.update(ns=namespace, config_name=name, config_path=str(path))
    env = make_environment(search_path, variables)
    display = SourceDisplay(env.loader, project.dir if project is not None else path.parent)

    try:
        preprocessed = env.get_template(str(path)).render()
        # Blank lines around the YAML are leftovers of statement lines, e.g. `== super()`.
        preprocessed = re.sub(r"\A(?:[ \t]*\n)+", "", preprocessed)
        preprocessed = preprocessed.rstrip() + "\n" if preprocessed.strip() else ""
    except Exception as exc:  # any failure inside template code is reported at its template line
        raise render_error(exc, display, name) from exc

    check_override_keys(overrides, namespace_used_keys(namespace), name)

    try:
        graph = parse_graph(preprocessed)
    except TagError as exc:
        lines = preprocessed.splitlines()
        source = guess_source(lines[exc.line - 1], display) if 1 <= exc.line <= len(lines) else None
        where = f" (from {source})" if source else ""
        raise LmforgeError(f"config {name}: {exc.message}{where}", hint=exc.hint) from exc
    except yaml.YAMLError as exc:
        raise yaml_error(exc, preprocessed, display, name) from exc
    if graph is None:
        graph = {}
    if not isinstance(graph, dict):
        raise LmforgeError(
            f"config {name}: the preprocessed YAML is a {type(graph).__name__}, not a mapping of targets",
            hint="write top-level `name: value` entries",
        )

    loader = env.loader
    chain = [display.describe(filename) for filename in loader.load_order]
    kinds = _reference_kinds(env)
    edges = []
    for parent, child in env.edges:
        edge = (
            _display_name(parent, display, loader),
            _display_name(child, display, loader),
            kinds.get((parent, child), "include"),
        )
        if edge not in edges:
            edges.append(edge)
    return Config(
        name=name,
        path=path,
        project=project,
        preprocessed=preprocessed,
        template_chain=chain,
        template_edges=edges,
        namespace=namespace_values(namespace),
        graph=graph,
        display=display,
    )


def _reference_kinds(env) -> dict[tuple[str, str], str]:
    """Map (parent name, child name) to extends/include/import by reading each parent's syntax tree."""
    from jinja2 import nodes

    kinds: dict[tuple[str, str], str] = {}
    node_kinds = ((nodes.Extends, "extends"), (nodes.Include, "include"), (nodes.Import, "import"),
                  (nodes.FromImport, "import"))
    for parent in {parent for parent, _ in env.edges}:
        try:
            source, _, _ = env.loader.get_source(env, parent)
            tree = env.parse(source)
        except jinja2.TemplateError:
            continue
        dynamic = []
        for node_type, kind in node_kinds:
            for node in tree.find_all(node_type):
                if isinstance(node.template, nodes.Const) and isinstance(node.template.value, str):
                    kinds[(parent, env.join_path_quiet(node.template.value, parent))] = kind
                else:
                    dynamic.append(kind)
        for edge_parent, child in env.edges:
            if edge_parent == parent and (parent, child) not in kinds and len(set(dynamic)) == 1:
                kinds[(parent, child)] = dynamic[0]
    return kinds


def _display_name(template_name: str, display: SourceDisplay, loader) -> str:
    for filename, loaded in loader.loaded.items():
        if loaded.name == template_name:
            return display.describe(filename)
    return template_name
