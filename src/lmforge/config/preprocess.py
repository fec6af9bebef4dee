"""Line syntax and TOML-style blocks, rewritten into plain Jinja before Jinja parses a template.

The rewrite never adds or removes a line, so the line numbers that Jinja reports in an
error are the line numbers of the source file. Rules, applied to each line:

    -- stmt      {% stmt %}       a statement; with trim_blocks/lstrip_blocks the line leaves no output
    << stmt      {%- stmt %}      a statement that also removes the whitespace before it
    >> stmt      {% stmt -%}      a statement that also removes the whitespace after it
    == expr      {{ expr }}       print (indentation before `==` is kept)
    => expr      {{- expr -}}     print, removing the whitespace (newlines included) around it
    ## text      {# text #}       a whole-line comment, which leaves no output
    x ## text    x                a trailing comment (whitespace, `##`, whitespace or end of line)
    [name]       {% block name %} a block that ends before the next `[...]` line indented at most
                                  as far, before the first non-blank line indented less, before an
                                  `endblock` that closes an enclosing plain block, or at the end
    [name!]      the same block, trimming the whitespace at its start and end

A file may hold several templates: a line `#---- NAME ----` (four or more dashes on each
side) starts the template NAME, which runs to the next such line. `split_templates`
returns each template's text padded with a multi-line Jinja comment, so its line numbers
are still those of the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.errors import LmforgeError

_PREFIX_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<prefix>--|<<|>>|==|=>|##)(?=\s|$)(?P<body>.*)$")
_TRAILING_COMMENT_RE = re.compile(r"\s##(?:\s.*)?$")
_BLOCK_RE = re.compile(r"^(?P<indent>[ \t]*)\[(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<trim>!?)\][ \t]*$")
_JINJA_BLOCK_RE = re.compile(r"^\s*\{%-?\s*block\s")
_JINJA_ENDBLOCK_RE = re.compile(r"^\s*\{%-?\s*endblock\b")
_SEPARATOR_RE = re.compile(r"^#-{4,}\s*(?P<name>[^\s#]+)\s*-{4,}\s*$")


@dataclass
class TemplateSection:
    """One template of a file: its name (None for the file's main template) and its text."""

    name: str | None
    first_line: int
    """1-based line of the file where the template's text starts."""
    text: str
    """The template's text, preceded by a Jinja comment spanning the lines before it."""


def split_templates(text: str, filename: str) -> list[TemplateSection]:
    """Split a file at `#---- NAME ----` lines into its main template and named sub-templates."""
    lines = text.splitlines(keepends=True)
    sections: list[TemplateSection] = []
    name: str | None = None
    start = 0
    seen: set[str] = set()
    for index, line in enumerate(lines):
        match = _SEPARATOR_RE.match(line.rstrip("\r\n"))
        if not match:
            continue
        sections.append(_make_section(name, lines, start, index))
        name = match.group("name")
        if name in seen:
            raise LmforgeError(
                f"{filename}:{index + 1}: template {name!r} is defined twice in this file",
                hint="give each `#---- NAME ----` section a unique name",
            )
        seen.add(name)
        start = index + 1
    sections.append(_make_section(name, lines, start, len(lines)))
    return sections


def _make_section(name: str | None, lines: list[str], start: int, end: int) -> TemplateSection:
    padding = "{#" + "\n" * start + "#}" if start else ""
    return TemplateSection(name=name, first_line=start + 1, text=padding + "".join(lines[start:end]))


def _indent_width(indent: str) -> int:
    return len(indent.expandtabs(8))


@dataclass
class _OpenBlock:
    kind: str  # "toml" for `[name]` blocks, "jinja" for plain `-- block` statements
    indent: int
    trim: bool
    line: int


def preprocess(text: str, filename: str = "<string>") -> str:
    """Rewrite line syntax and `[name]` blocks into Jinja, keeping every line where it was."""
    lines = text.split("\n")
    out: list[str] = []
    stack: list[_OpenBlock] = []

    for index, raw in enumerate(lines):
        line = raw.rstrip("\r")
        carriage = raw[len(line):]
        stripped = line.strip()
        closing = ""

        block = _BLOCK_RE.match(line)
        if stripped and not (stripped.startswith("##") and not block):
            indent = _indent_width(line[: len(line) - len(line.lstrip())])
            # A block header closes the open TOML blocks indented as far or further; any other
            # line closes the open TOML blocks indented further than it.
            while stack and stack[-1].kind == "toml" and (
                indent <= stack[-1].indent if block else indent < stack[-1].indent
            ):
                closing += _endblock(stack.pop())

        if block:
            trim = bool(block.group("trim"))
            stack.append(_OpenBlock("toml", _indent_width(block.group("indent")), trim, index + 1))
            out.append(closing + "{% block " + block.group("name") + (" -%}" if trim else " %}") + carriage)
            continue

        converted = _convert_line(line)
        if _JINJA_BLOCK_RE.match(converted):
            stack.append(_OpenBlock("jinja", 0, False, index + 1))
        elif _JINJA_ENDBLOCK_RE.match(converted):
            # A plain endblock first closes the TOML blocks opened inside its plain block.
            while stack and stack[-1].kind == "toml":
                closing += _endblock(stack.pop())
            if stack:
                stack.pop()
        out.append(closing + converted + carriage)

    tail = "".join(_endblock(open_block) for open_block in reversed(stack) if open_block.kind == "toml")
    if tail:
        # Close on the last line of text, so an error Jinja reports at the close points into the file.
        last = len(out) - 2 if len(out) > 1 and out[-1] == "" else len(out) - 1
        out[last] = out[last] + tail
    return "\n".join(out)


def _endblock(block: _OpenBlock) -> str:
    return "{%- endblock %}" if block.trim else "{% endblock %}"


def _convert_line(line: str) -> str:
    match = _PREFIX_RE.match(line)
    if match is None:
        return _strip_trailing_comment(line)
    indent, prefix, body = match.group("indent"), match.group("prefix"), match.group("body")
    if prefix == "##":
        return indent + "{# " + body.strip().replace("#}", "# }") + " #}"
    body = _strip_trailing_comment(body).strip()
    if prefix == "--":
        return indent + "{% " + body + " %}"
    if prefix == "<<":
        return indent + "{%- " + body + " %}"
    if prefix == ">>":
        return indent + "{% " + body + " -%}"
    if prefix == "==":
        return indent + "{{ " + body + " }}"
    return indent + "{{- " + body + " -}}"


def _strip_trailing_comment(line: str) -> str:
    return _TRAILING_COMMENT_RE.sub("", line)
