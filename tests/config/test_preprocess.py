"""Line syntax, TOML-style blocks and multi-template files, checked on the rendered text."""

from __future__ import annotations

import jinja2
import pytest

from lmforge.config.preprocess import preprocess, split_templates
from lmforge.errors import LmforgeError


def render(text: str, **variables) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    return env.from_string(preprocess(text)).render(**variables)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("-- set x = 3\nvalue: {{ x }}\n", "value: 3\n"),
        ("a: 1\n<< set x = 2\nb: {{ x }}\n", "a: 1b: 2\n"),
        ("a: [\n>> set x = 1\n    1]\n", "a: [\n1]\n"),
        ("== 'k: v'\n", "k: v\n"),
        ("    == 'k: v'\n", "k: v\n"),
        ("a: [\n=> '1, 2'\n]\n", "a: [1, 2]\n"),
        ("## only a comment\nk: v\n", "k: v\n"),
        ("k: v   ## trailing comment\n", "k: v\n"),
        ("-- set x = 5 ## comment after a statement\nk: {{ x }}\n", "k: 5\n"),
        ("url: a##b\n", "url: a##b\n"),
        ('title: "a ## b"  ## note\n', 'title: "a ## b"\n'),
        ("title: 'a ## b'\n", "title: 'a ## b'\n"),
        ("note: don't ## comment\n", "note: don't\n"),
        ("key: == x\n", "key: == x\n"),
    ],
    ids=["statement", "trim-left", "trim-right", "print", "print-indented", "print-trimmed",
         "comment-line", "comment-trailing", "comment-after-statement", "hashes-in-text", "hashes-in-double-quotes", "hashes-in-single-quotes",
         "apostrophe-before-comment", "mid-line-prefix"],
)
def test_line_syntax_forms(source, expected):
    assert render(source) == expected


def test_preprocess_keeps_line_count():
    source = (
        "## c\n-- set a = 1\n[outer]\nx: 1\n    [inner!]\n    y: 2\nz: 3\n-- if a\n[b]\nq: 1\n-- endif\n"
        "#---- sub ----\n[c]\nr: 1\n"
    )
    assert preprocess(source).count("\n") == source.count("\n")


def test_nested_block_ends_at_dedent():
    source = "model:\n    [model_args]\n    hidden: 8\nafter: 1\n"
    converted = preprocess(source)
    assert converted.splitlines()[2] == "    hidden: 8{% endblock +%}"
    assert render(source) == "model:\n    hidden: 8\nafter: 1\n"


def test_nested_blocks_close_together():
    source = "outer:\n    [a]\n    x:\n        [b]\n        y: 1\nz: 2\n"
    assert preprocess(source).splitlines()[4] == "        y: 1{% endblock +%}{% endblock +%}"
    assert render(source) == "outer:\n    x:\n        y: 1\nz: 2\n"


def test_toml_block_runs_to_next_header():
    source = "[a]\nx: 1\ny: 2\n\n[b]\nz: 3\n"
    converted = preprocess(source).splitlines()
    assert converted[0] == "{% block a %}"
    assert converted[2] == "y: 2{% endblock +%}"
    assert converted[4] == "{% block b %}"
    assert render(source) == "x: 1\ny: 2\n\nz: 3\n"


def test_child_overrides_nested_block():
    loader = jinja2.DictLoader({
        "parent": preprocess("m:\n    [args]\n    a: 1\n    b: 2\nn: 0\n"),
        "child": preprocess("-- extends 'parent'\n[args]\n    == super()\n    c: 3\n"),
    })
    env = jinja2.Environment(loader=loader, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    assert env.get_template("child").render() == "m:\n    a: 1\n    b: 2\n    c: 3\nn: 0\n"


def test_trimmed_block_inline():
    source = "-- if false\n    [name!]\n\n    run-7\n\n-- endif\nname: {{ self.name() }}!\n"
    assert render(source) == "name: run-7!\n"


def test_block_mixes_with_plain_block():
    source = "-- block outer\n[inner]\nx: 1\n-- endblock\ny: 2\n"
    converted = preprocess(source).splitlines()
    assert converted[2] == "x: 1{% endblock +%}"
    assert converted[3] == "{% endblock %}"
    assert render(source) == "x: 1\ny: 2\n"


def test_block_ends_before_enclosing_endif():
    source = "-- if true\n[a]\nx: 1\n-- else\n[a2]\nx: 2\n-- endif\ny: 3\n"
    assert render(source) == "x: 1\ny: 3\n"


def test_split_templates_keeps_file_lines():
    text = "main: 1\n#---- first.part ----\nfirst: 1\n#------ second ------\nsecond: 2\nsecond_b: 3\n"
    sections = split_templates(text, "f.yaml")
    assert [s.name for s in sections] == [None, "first.part", "second"]
    assert [s.first_line for s in sections] == [1, 3, 5]
    for section in sections:
        rendered_lines = section.text.split("\n")
        # The padding comment spans the lines before the section, so line N of the section is line N of the file.
        assert rendered_lines[section.first_line - 1] == text.split("\n")[section.first_line - 1]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    assert env.from_string(sections[2].text).render() == "second: 2\nsecond_b: 3\n"


def test_split_templates_rejects_duplicate_name():
    with pytest.raises(LmforgeError, match=r"f.yaml:4: template 'x' is defined twice"):
        split_templates("a\n#---- x ----\nb\n#---- x ----\n", "f.yaml")
