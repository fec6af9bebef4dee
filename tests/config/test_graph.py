"""The YAML object graph: identity, partials, dlist edits, import specs, variables, dot-names."""

from __future__ import annotations

import functools
import sys

import pytest

from lmforge.config import load_config
from lmforge.errors import LmforgeError


def load(make_project, config_text: str, files: dict[str, str] | None = None):
    project = make_project({"configs/c.yaml": config_text, **(files or {})})
    return load_config("c.yaml", project_dir=project)


def test_singleton_shared_factory_fresh(make_project):
    config = load(make_project, """
.one: &one !call:types:SimpleNamespace {n: 1}
.single: &single !singleton:types:SimpleNamespace {n: 2}
.many: &many !factory:types:SimpleNamespace {n: 3}
main:
    a: *one
    b: *one
    c: *single
    d: *single
    e: *many
    f: *many
""")
    built = config.construct("main")
    assert built["a"] is built["b"]
    assert built["c"] is built["d"]
    assert built["e"] is not built["f"]
    assert built["e"].n == built["f"].n == 3


def test_construct_twice_gives_fresh_objects(make_project):
    config = load(make_project, "main: !call:types:SimpleNamespace {items: !list [1, 2]}\n")
    first = config.construct("main")
    second = config.construct("main")
    assert first is not second
    assert first.items is not second.items
    first.items.append(3)
    assert second.items == [1, 2]


def test_shared_node_across_targets_is_fresh_per_call(make_project):
    config = load(make_project, """
.shared: &shared !call:types:SimpleNamespace {}
left: {x: *shared}
right: {x: *shared}
""")
    assert config.construct("left")["x"] is not config.construct("right")["x"]


def test_partial_appends_and_merges(make_project):
    config = load(make_project, """
main: !partial:builtins:dict
    args: [[[a, 1]]]
    b: 2
    c: 3
fmt: !partial:str.format ["{}-{}-{}", x]
""".replace("str.format", "builtins:str.format"))
    partial = config.construct("main")
    assert isinstance(partial, functools.partial)
    assert partial(c=30, d=4) == {"a": 1, "b": 2, "c": 30, "d": 4}
    assert config.construct("fmt")("y", "z") == "x-y-z"


def test_dlist_override_and_delete(make_project):
    config = load(make_project, """
callbacks: !dlist
    first: 1
    second: 2
    third: 3
    first: one
    second: ~
    fourth: 4
""")
    assert config.construct("callbacks") == ["one", 3, 4]


def test_dlist_child_edits_parent(make_project):
    project = make_project({
        "templates/parent.yaml": "callbacks: !dlist\n    [callbacks]\n    log: !call:str [log]\n    save: !call:str [save]\n",
        "configs/c.yaml": "-- extends 'parent.yaml'\n[callbacks]\n    == super()\n    log: ~\n    eval: !call:str [eval]\n",
    })
    assert load_config("c.yaml", project_dir=project).construct("callbacks") == ["save", "eval"]


def test_argument_forms(make_project):
    config = load(make_project, """
seq: !call:builtins:range [1, 7, 2]
numbered: !call:builtins:range {arg2: 2, arg0: 1, arg1: 7}
args_key: !call:builtins:range {args: [1, 7], arg0: 2}
kwargs_key: !call:builtins:dict {kwargs: {a: 1}, b: 2}
scalar: !call:builtins:int "42"
none: !call:builtins:list
named: !call:builtins:dict@options {x: 1}
tuple: !tuple [1, [2]]
dict: !dict {a: !list [1]}
""")
    assert list(config.construct("seq")) == [1, 3, 5]
    assert list(config.construct("numbered")) == [1, 3, 5]
    # The args: list comes first, then the argN keys.
    assert config.construct("args_key") == range(1, 7, 2)
    assert config.construct("kwargs_key") == {"a": 1, "b": 2}
    assert config.construct("scalar") == 42
    assert config.construct("none") == []
    assert config.construct("named") == {"x": 1}
    assert config.construct("tuple") == (1, [2])
    assert config.construct("dict") == {"a": [1]}


def test_import_spec_forms(make_project):
    config = load(make_project, """
module_attr: !call:collections:OrderedDict.fromkeys [[a, b]]
builtin: !call:len [[1, 2, 3]]
by_path: !call:lib/one/util.py:make [x]
by_path_twin: !call:lib/two/util.py:make [x]
""", files={
        "lib/one/util.py": "def make(value):\n    return 'one:' + value\n",
        "lib/two/util.py": "def make(value):\n    return 'two:' + value\n",
    })
    assert list(config.construct("module_attr")) == ["a", "b"]
    assert config.construct("builtin") == 3
    # Two files named util.py must not replace each other.
    assert config.construct("by_path") == "one:x"
    assert config.construct("by_path_twin") == "two:x"
    assert "util" not in sys.modules


def test_import_errors_name_spec_and_line(make_project):
    config = load(make_project, "a: 1\nmain:\n    inner: !call:collections:OrderdDict []\nmissing: !call:no_such_module_xyz:thing\n")
    with pytest.raises(LmforgeError) as raised:
        config.construct("main")
    message = str(raised.value)
    assert "cannot import 'collections:OrderdDict'" in message
    assert "main.inner" in message
    assert "configs/c.yaml:3" in message
    assert "did you mean OrderedDict" in message
    with pytest.raises(LmforgeError, match="module 'no_such_module_xyz' not found"):
        config.construct("missing")


def test_constructor_failure_is_reported(make_project):
    config = load(make_project, "main: !call:builtins:int [not-a-number]\n")
    with pytest.raises(LmforgeError) as raised:
        config.construct("main")
    assert "constructing !call:builtins:int at main" in str(raised.value)
    assert "ValueError" in str(raised.value)
    assert "configs/c.yaml:1" in str(raised.value)


def test_var_values_defaults_and_errors(make_project):
    config = load(make_project, """
main:
    given: !var run_dir
    default: !var {name: rank, default: 0}
    default_node: !var {name: items, default: !list [1]}
""")
    assert config.construct("main", run_dir="/tmp/x") == {"given": "/tmp/x", "default": 0, "default_node": [1]}
    assert config.construct("main", run_dir="/r", rank=3)["default"] == 3
    with pytest.raises(LmforgeError) as raised:
        config.construct("main", rank=1)
    assert "variable 'run_dir' is not set" in str(raised.value)
    assert "main.given" in str(raised.value)
    assert "variables given: rank" in str(raised.value)


def test_dot_names_elided(make_project):
    config = load(make_project, """
.hidden: &hidden 5
visible:
    value: *hidden
    .note: skipped
    nested: !dict {keep: 1, .drop: 2}
    call: !call:builtins:dict {a: 1, .b: 2}
""")
    assert config.targets == ["visible"]
    assert config.construct("visible") == {"value": 5, "nested": {"keep": 1}, "call": {"a": 1}}
    assert config.construct(".hidden") == 5


def test_unknown_target_suggests(make_project):
    config = load(make_project, "trainer: 1\ntokenizer: 2\n")
    with pytest.raises(LmforgeError) as raised:
        config.construct("trainr")
    assert "has no target 'trainr'" in str(raised.value)
    assert "trainer" in str(raised.value)


def test_invalid_tags_rejected(make_project):
    with pytest.raises(LmforgeError, match=r"!var has no variable name"):
        load(make_project, "a: !var\n")
    with pytest.raises(LmforgeError, match=r"!tuple takes a sequence"):
        load(make_project, "a: !tuple {x: 1}\n")
