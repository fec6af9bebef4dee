"""Line syntax and TOML-style blocks, rewritten into plain Jinja before Jinja parses a template.

The rewrite never adds or removes a line, so the line numbers that Jinja reports in an
error are the line numbers of the source file. Rules, applied to each line:

    -- stmt      {% stmt %}       a statement; with trim_blocks/lstrip_blocks the line leaves no output
    << stmt      {%- stmt %}      a statement that also removes the whitespace before it
    >> stmt      {% stmt -%}      a statement that also removes the whitespace after it
    == expr      {{ expr }}       print (the indentation before `==` is dropped)
    => expr      {{- expr -}}     print, removing the whitespace (newlines included) around it
    ## text      {# text #}       a whole-line comment, which leaves no output
    x ## text    x                a trailing comment (whitespace, `##`, whitespace or end of line),
                                  except inside a quoted string
    [name]       {% block name %} a block that ends before the next `[...]` line indented at most
                                  as far, before the first non-blank line indented less, before a
                                  statement that closes or continues a Jinja structure opened
                                  before the block (`-- endif`, `-- else`, `-- endblock`...), or
                                  at the end of the template
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
_TRAILING_COMMENT_RE = re.compile(r"\s+##(?=\s|$)")
_BLOCK_RE = re.compile(r"^(?P<indent>[ \t]*)\[(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<trim>!?)\][ \t]*$")
_TAG_RE = re.compile(r"\{%-?\s*(?P<tag>\w+)(?P<body>.*?)-?%\}")
# Jinja statements that open a structure closed by `end<tag>`; `set` only without `=` (a block set).
_OPENING_TAGS = {"if", "for", "macro", "call", "filter", "with", "block", "raw", "set", "trans", "autoescape"}
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
    # A comment over lines 1..start (it leaves no output) keeps the section's line numbers.
    padding = "{#" + "\n" * (start - 1) + "#}\n" if start else ""
    return TemplateSection(name=name, first_line=start + 1, text=padding + "".join(lines[start:end]))


def _indent_width(indent: str) -> int:
    return len(indent.expandtabs(8))


@dataclass
class _OpenBlock:
    kind: str  # "toml" for `[name]` blocks, else the Jinja tag that opened the structure (if, for, block...)
    indent: int
    trim: bool
    line: int
    """0-based index of the line that opened it."""


def preprocess(text: str) -> str:
    """Rewrite line syntax and `[name]` blocks into Jinja, keeping every line where it was."""
    lines = text.split("\n")
    out: list[str] = []
    stack: list[_OpenBlock] = []

    for index, raw in enumerate(lines):
        line = raw.rstrip("\r")
        carriage = raw[len(line):]
        stripped = line.strip()

        block = _BLOCK_RE.match(line)
        if stripped and not (stripped.startswith("##") and not block):
            indent = _indent_width(line[: len(line) - len(line.lstrip())])
            # A block header closes the open TOML blocks indented as far or further; any other
            # line closes the open TOML blocks indented further than it.
            while stack and stack[-1].kind == "toml" and (
                indent <= stack[-1].indent if block else indent < stack[-1].indent
            ):
                _close_block(stack.pop(), out, lines)

        if block:
            trim = bool(block.group("trim"))
            stack.append(_OpenBlock("toml", _indent_width(block.group("indent")), trim, index))
            out.append("{% block " + block.group("name") + (" -%}" if trim else " %}") + carriage)
            continue

        converted = _convert_line(line)
        _track_statements(converted, stack, index, out, lines)
        out.append(converted + carriage)

    while stack:
        open_block = stack.pop()
        if open_block.kind == "toml":
            _close_block(open_block, out, lines)
    return "\n".join(out)


def _close_block(block: _OpenBlock, out: list[str], lines: list[str]) -> None:
    """Append the endblock to the block's last non-blank line, leaving that line's newline outside the block.

    Because the newline stays outside, `== super()` on a line of its own prints the parent's
    lines followed by exactly one newline.
    """
    last = block.line
    for index in range(len(out) - 1, block.line, -1):
        if lines[index].strip():
            last = index
            break
    text = out[last].rstrip("\r")
    carriage = out[last][len(text):]
    # After a statement or comment the line leaves no output, so the endblock may trim the
    # newline. After text, `+%}` keeps the newline because it turns trim_blocks off for this tag.
    # A line that an inner block's `+%}` already closed keeps its newline too.
    ends_with_tag = text.rstrip().endswith(("%}", "#}")) and not text.endswith("+%}") or last == block.line
    opening = "{%- endblock" if block.trim else "{% endblock"
    out[last] = text + opening + (" %}" if ends_with_tag else " +%}") + carriage


def _track_statements(converted: str, stack: list[_OpenBlock], line: int, out: list[str], lines: list[str]) -> None:
    """Follow the Jinja structures a line opens and closes.

    A statement that closes or continues a structure opened before an open TOML block (an
    `endif`, `else` or `endblock` of an enclosing `if` or `-- block`) ends that TOML block first.
    """
    for match in _TAG_RE.finditer(converted):
        tag, body = match.group("tag"), match.group("body")
        if tag in _OPENING_TAGS and not (tag == "set" and "=" in body):
            stack.append(_OpenBlock(tag, 0, False, line))
        elif tag.startswith("end") or tag in {"else", "elif"}:
            if not any(entry.kind != "toml" for entry in stack):
                continue
            while stack[-1].kind == "toml":
                _close_block(stack.pop(), out, lines)
            if tag.startswith("end"):
                stack.pop()


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
    # A print drops the indentation before its prefix, so `    == super()` inside an indented
    # block prints the parent's lines with their own indentation.
    if prefix == "==":
        return "{{ " + body + " }}"
    return "{{- " + body + " -}}"


def _strip_trailing_comment(line: str) -> str:
    """Remove a trailing ` ## note`, unless the `##` is inside a quoted string."""
    for match in _TRAILING_COMMENT_RE.finditer(line):
        if not _inside_quotes(line, match.start()):
            return line[: match.start()]
    return line


_QUOTE_OPENERS = " \t:[{(,="


def _inside_quotes(line: str, position: int) -> bool:
    """Tell whether POSITION is inside a '...' or "..." string (an apostrophe within a word opens none)."""
    quote = None
    for index, char in enumerate(line[:position]):
        if quote is not None:
            if char == quote:
                quote = None
        elif char == '"' or (char == "'" and (index == 0 or line[index - 1] in _QUOTE_OPENERS)):
            quote = char
    return quote is not None
