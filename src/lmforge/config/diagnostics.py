"""Turn Jinja, YAML and loader failures into one LmforgeError naming the source file, line and chain."""

from __future__ import annotations

import difflib
import os
import re
import traceback
from pathlib import Path

import jinja2
import yaml

from lmforge.config.environment import SUB_SEPARATOR, TemplateLibraryLoader
from lmforge.errors import LmforgeError

_UNKNOWN_TAG_RE = re.compile(r"could not determine a constructor for the tag '([^']+)'")
_NS_ATTRIBUTE_RE = re.compile(r"'[\w.]*PinnedNamespace object' has no attribute '(\w+)'")


class SourceDisplay:
    """Show template files by paths relative to the project directory and quote their lines.

    A shared template outside the project shows as `../../templates/x.yaml`, so it is never
    mistaken for a project template with the same relative name.
    """

    def __init__(self, loader: TemplateLibraryLoader, base_dir: Path):
        self.loader = loader
        self.base_dir = base_dir

    def short_path(self, path: Path) -> str:
        relative = os.path.relpath(path, self.base_dir)
        # Beyond three levels up, the absolute path is easier to read.
        return str(path) if relative.startswith((os.pardir + os.sep) * 4) else relative

    def describe(self, filename: str) -> str:
        """Return `short/path.yaml` or `short/path.yaml#SUB` for a filename given to Jinja."""
        path_text, sep, section = filename.partition(SUB_SEPARATOR)
        return self.short_path(Path(path_text)) + (f"{SUB_SEPARATOR}{section}" if sep else "")

    def source_line(self, filename: str, lineno: int | None) -> str | None:
        if not lineno:
            return None
        path = Path(filename.partition(SUB_SEPARATOR)[0])
        entry = self.loader.files.get(path)
        lines = entry.text.splitlines() if entry else []
        if 1 <= lineno <= len(lines):
            return lines[lineno - 1]
        return None

    def clamp_line(self, filename: str, lineno: int | None) -> int | None:
        """Map a line past the end (where the preprocessor closes open blocks) to the file's last line."""
        path = Path(filename.partition(SUB_SEPARATOR)[0])
        entry = self.loader.files.get(path)
        if lineno and entry is not None:
            return min(lineno, max(len(entry.text.splitlines()), 1))
        return lineno

    def location(self, filename: str, lineno: int | None) -> str:
        """Return `file.yaml:LINE` (the `#SUB` part is left out: the line number is the file's)."""
        path_text = filename.partition(SUB_SEPARATOR)[0]
        return f"{self.short_path(Path(path_text))}:{lineno}" if lineno else self.short_path(Path(path_text))


def template_frames(exc: BaseException, loader: TemplateLibraryLoader) -> list[tuple[str, int]]:
    """Return (filename, line) of each template frame in the traceback, outermost first."""
    frames = []
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in loader.loaded and frame.lineno:
            location = (frame.filename, frame.lineno)
            if not frames or frames[-1] != location:
                frames.append(location)
    return frames


def render_error(exc: BaseException, display: SourceDisplay, config_name: str) -> LmforgeError:
    """Build the LmforgeError for an exception raised while loading or rendering templates."""
    frames = template_frames(exc, display.loader)
    hint = None

    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.filename in display.loader.loaded:
        where = (exc.filename, exc.lineno)
        frames = [frame for frame in frames if frame[0] != exc.filename]
        problem = f"template syntax error: {exc.message}"
        hint = "line syntax: `-- stmt`, `== expr`, `## comment`; blocks `[name]`; see docs/templates.md"
    elif frames:
        where = frames[-1]
        frames = frames[:-1]
        problem, hint = _describe_runtime_error(exc, display)
    else:
        where = None
        problem, hint = _describe_runtime_error(exc, display)

    parts = [f"config {config_name}: {problem}"]
    if where is not None:
        filename, lineno = where
        lineno = display.clamp_line(filename, lineno)
        parts[0] += f" at {display.location(filename, lineno)}"
        section = filename.partition(SUB_SEPARATOR)[2]
        if section:
            parts[0] += f" (template {section})"
        quoted = display.source_line(filename, lineno)
        if quoted is not None:
            parts.append(f"  {lineno} | {quoted.rstrip()}")
    if frames:
        chain = " -> ".join(display.location(f, line) for f, line in frames)
        parts.append(f"  chain: {chain}")
    return LmforgeError("\n".join(parts), hint=hint)


def _describe_runtime_error(exc: BaseException, display: SourceDisplay) -> tuple[str, str | None]:
    if isinstance(exc, jinja2.TemplateNotFound):
        return _describe_not_found(exc, display)
    if isinstance(exc, jinja2.UndefinedError):
        match = _NS_ATTRIBUTE_RE.search(exc.message or "")
        if match:
            return (
                f"ns.{match.group(1)} is not defined",
                "set it in a template (-- set ns.KEY = VALUE) or on the command line (--set ns.KEY=VALUE)",
            )
        return f"undefined value: {exc.message}", "define the variable, or test it with `is defined` first"
    if isinstance(exc, LmforgeError):
        return exc.message, exc.hint
    if isinstance(exc, jinja2.TemplateError):
        return f"{type(exc).__name__}: {exc.message}", None
    return f"{type(exc).__name__}: {exc}", "rerun with --debug for the traceback"


def _describe_not_found(exc: jinja2.TemplateNotFound, display: SourceDisplay) -> tuple[str, str | None]:
    name = exc.name
    if exc.message and exc.message != name:
        return f"template {name!r} not found: {exc.message}", None
    searched = ", ".join(display.short_path(d) or "." for d in display.loader.search_path)
    close = difflib.get_close_matches(str(name), display.loader.list_templates(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "check the name, or add its directory to template_dirs"
    return f"template {name!r} not found (searched: {searched})", hint


def yaml_error(exc: yaml.YAMLError, preprocessed: str, display: SourceDisplay, config_name: str) -> LmforgeError:
    """Build the LmforgeError for invalid YAML in the preprocessed text, pointing at its likely source."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return LmforgeError(f"config {config_name}: invalid YAML after preprocessing: {problem}")
    lines = preprocessed.splitlines()
    lineno = mark.line + 1
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem = f"{context} at line {context_mark.line + 1}: {problem}"
    # At the end of the text the problem line is empty; the construct that is open is more useful.
    if not (1 <= lineno <= len(lines) and lines[lineno - 1].strip()) and context_mark is not None:
        lineno = context_mark.line + 1
    quoted = lines[lineno - 1] if 1 <= lineno <= len(lines) else ""
    parts = [f"config {config_name}: invalid YAML at line {lineno} of the preprocessed text: {problem}",
             f"  {lineno} | {quoted.rstrip()}"]
    source = guess_source(quoted, display)
    if source:
        parts.append(f"  from {source}")
    hint = f"inspect the whole text with `lmforge -t {config_name} pp`"
    tag_match = _UNKNOWN_TAG_RE.search(str(exc))
    if tag_match:
        from lmforge.config.yaml_tags import TAG_NAMES

        tag = tag_match.group(1)
        close = difflib.get_close_matches(tag.split(":")[0] + (":SPEC" if ":" in tag else ""), TAG_NAMES, n=2)
        hint = f"unknown tag {tag}; " + (f"did you mean {', '.join(close)}?" if close else f"tags: {', '.join(TAG_NAMES)}")
    return LmforgeError("\n".join(parts), hint=hint)


def guess_source(line: str, display: SourceDisplay) -> str | None:
    """Return `file:line` of the only template line whose text equals LINE, or None."""
    expected_text = line.strip()
    if not expected_text:
        return None
    matches = []
    for entry in display.loader.files.values():
        for number, text in enumerate(entry.text.splitlines(), start=1):
            if text.strip() == expected_text:
                matches.append(f"{display.short_path(entry.path)}:{number}")
    return matches[0] if len(matches) == 1 else None
