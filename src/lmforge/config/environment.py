"""The Jinja environment that renders config templates: search path, sub-templates, globals, filters."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from lmforge.config.preprocess import TemplateSection, preprocess, split_templates
from lmforge.errors import LmforgeError

SUB_SEPARATOR = "#"


@dataclass
class LoadedTemplate:
    """The source of one loaded template."""

    name: str
    """The name Jinja loaded it under: a search-path-relative or absolute path, plus `#SUB` for a sub-template."""
    path: Path
    section: str | None
    """The sub-template name, or None for the file's main template."""


@dataclass
class _FileEntry:
    path: Path
    text: str
    sections: dict[str | None, TemplateSection]


class TemplateLibraryLoader(jinja2.BaseLoader):
    """Loads templates from an ordered search path (first match wins), split into sub-templates.

    A name is `dir/file.yaml` (searched on the path), an absolute path, or `file.yaml#SUB` for
    the sub-template SUB of that file. A bare `SUB` is first a sub-template of the including
    file (see `LibraryEnvironment.join_path`), else the only sub-template of that name among
    the files loaded so far. The loader keeps no state between `load_config` calls, because
    each call makes a new environment.
    """

    def __init__(self, search_path: list[Path]):
        self.search_path = [Path(p) for p in search_path]
        self.files: dict[Path, _FileEntry] = {}
        self.loaded: dict[str, LoadedTemplate] = {}
        """Filename given to Jinja -> template, in load order."""
        self.load_order: list[str] = []

    def find_file(self, relative: str) -> Path | None:
        path = Path(relative)
        if path.is_absolute():
            return path if path.is_file() else None
        for directory in self.search_path:
            candidate = directory / relative
            if candidate.is_file():
                return candidate.resolve()
        return None

    def read_file(self, path: Path) -> _FileEntry:
        entry = self.files.get(path)
        if entry is None:
            text = path.read_text()
            sections = {section.name: section for section in split_templates(text, str(path))}
            entry = _FileEntry(path=path, text=text, sections=sections)
            self.files[path] = entry
        return entry

    def _find_bare_section(self, name: str) -> tuple[Path, str] | None:
        owners = [entry.path for entry in self.files.values() if name in entry.sections]
        if len(owners) > 1:
            raise LmforgeError(
                f"template name {name!r} is ambiguous: files {', '.join(map(str, owners))} all define it",
                hint=f"name the file too, e.g. FILE.yaml{SUB_SEPARATOR}{name}",
            )
        return (owners[0], name) if owners else None

    def get_source(self, environment: jinja2.Environment, template: str):
        file_part, sep, section = template.partition(SUB_SEPARATOR)
        path = self.find_file(file_part)
        section_name: str | None = section if sep else None
        if path is None and not sep:
            found = self._find_bare_section(template)
            if found is not None:
                path, section_name = found
        if path is None:
            raise jinja2.TemplateNotFound(template)
        entry = self.read_file(path)
        if section_name not in entry.sections:
            known = ", ".join(name for name in entry.sections if name) or "none"
            raise jinja2.TemplateNotFound(template, f"{path} has no sub-template {section_name!r} (it defines: {known})")
        filename = str(path) + (f"{SUB_SEPARATOR}{section_name}" if section_name else "")
        if filename not in self.loaded:
            self.loaded[filename] = LoadedTemplate(name=template, path=path, section=section_name)
            self.load_order.append(filename)
        source = preprocess(entry.sections[section_name].text)
        return source, filename, lambda: True

    def list_templates(self) -> list[str]:
        names = set()
        for directory in self.search_path:
            if directory.is_dir():
                names.update(str(p.relative_to(directory)) for p in directory.rglob("*.yaml"))
        return sorted(names)


class LibraryEnvironment(jinja2.Environment):
    """A Jinja environment that resolves bare sub-template names against the including file."""

    def __init__(self, loader: TemplateLibraryLoader, **options: Any):
        super().__init__(loader=loader, **options)
        self.edges: list[tuple[str, str]] = []
        """(including template name, included template name) in the order Jinja requested them."""

    def join_path(self, template: str, parent: str) -> str:
        resolved = self.join_path_quiet(template, parent)
        self.edges.append((parent, resolved))
        return resolved

    def join_path_quiet(self, template: str, parent: str) -> str:
        """Resolve a bare sub-template name against PARENT's file, without recording an edge."""
        resolved = template
        loader: TemplateLibraryLoader = self.loader  # type: ignore[assignment]
        if SUB_SEPARATOR not in template and not Path(template).is_absolute():
            parent_file = parent.partition(SUB_SEPARATOR)[0]
            path = loader.find_file(parent_file)
            if path is not None and template in loader.read_file(path).sections:
                resolved = f"{parent_file}{SUB_SEPARATOR}{template}"
        return resolved


def _to_yaml(value: Any) -> str:
    """Render VALUE as inline YAML: None -> null, strings quoted when needed, containers in flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=float("inf"), allow_unicode=True)
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[:-3].strip()
    return text


def _raise(message: str) -> None:
    raise LmforgeError(str(message))


def _getenv(name: str, default: Any = None) -> Any:
    return os.environ.get(name, default)


def _now() -> _dt.datetime:
    return _dt.datetime.now()


def _isotime(value: _dt.datetime | float | None = None) -> str:
    """Return VALUE (a datetime or a Unix time; default now) as local ISO 8601 time to the second."""
    if value is None:
        value = _dt.datetime.now()
    elif isinstance(value, (int, float)):
        value = _dt.datetime.fromtimestamp(value)
    return value.isoformat(timespec="seconds")


def _filetime(path: str) -> str:
    """Return a file's modification time as local ISO 8601 time to the second."""
    try:
        mtime = os.path.getmtime(path)
    except OSError as exc:
        raise LmforgeError(f"filetime({path!r}): {exc.strerror}") from exc
    return _isotime(mtime)


def _joinpath(*parts: Any) -> str:
    return os.path.join(*(str(part) for part in parts))


PATH_HELPERS = {
    "joinpath": _joinpath,
    "abspath": lambda path: os.path.abspath(os.path.expanduser(str(path))),
    "normpath": lambda path: os.path.normpath(str(path)),
    "dirname": lambda path: os.path.dirname(str(path)),
    "basename": lambda path: os.path.basename(str(path)),
}


def make_environment(search_path: list[Path], variables: dict[str, Any]) -> LibraryEnvironment:
    """Create the environment with the config globals (`ns` and path variables among VARIABLES)."""
    env = LibraryEnvironment(
        TemplateLibraryLoader(search_path),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        extensions=["jinja2.ext.do", "jinja2.ext.loopcontrols"],
    )
    env.globals.update(PATH_HELPERS)
    env.globals.update(
        getcwd=os.getcwd,
        user_home_dir=lambda: str(Path.home()),
        getenv=_getenv,
        now=_now,
        isotime=_isotime,
        filetime=_filetime,
        toyaml=_to_yaml,
    )
    env.globals["raise"] = _raise
    env.globals.update(variables)
    env.filters.update(PATH_HELPERS)
    env.filters["toyaml"] = _to_yaml
    return env
