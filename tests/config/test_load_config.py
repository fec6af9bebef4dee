"""load_config: inheritance, overrides, projects, search path and error messages."""

from __future__ import annotations

import pytest

from lmforge.config import find_project, load_config
from lmforge.errors import LmforgeError

PARENT = """\
[config_metadata]
-- set ns.total_tokens = 1000
-- set ns.tokens_per_step = 10
-- set ns.lr = 0.1
[globals]
-- set ns.total_steps = (ns.total_tokens // ns.tokens_per_step) | int
steps: {{ ns.total_steps }}
lr: {{ ns.lr }}
"""

CHILD = """\
-- extends "parent.yaml"
[config_metadata]
== super()
-- set ns.total_tokens = 5000
"""


@pytest.fixture
def budget_project(make_project):
    return make_project({"templates/parent.yaml": PARENT, "configs/child.yaml": CHILD, "configs/parent_only.yaml": PARENT})


def test_precedence_parent_child_command_line(budget_project):
    parent = load_config("parent_only.yaml", project_dir=budget_project)
    child = load_config("child.yaml", project_dir=budget_project)
    overridden = load_config("child.yaml", project_dir=budget_project, sets=["ns.total_tokens=2e4", "ns.lr=0.5"])
    assert parent.namespace["total_steps"] == 100
    assert child.namespace["total_steps"] == 500
    assert overridden.namespace["total_steps"] == 2000
    assert overridden.namespace["total_tokens"] == 20000
    assert isinstance(overridden.namespace["total_tokens"], int)
    assert "steps: 2000\nlr: 0.5\n" == overridden.preprocessed


def test_sets_as_mapping(budget_project):
    config = load_config("child.yaml", project_dir=budget_project, sets={"ns.total_tokens": 300})
    assert config.namespace["total_steps"] == 30


def test_misspelled_override_key(budget_project):
    with pytest.raises(LmforgeError) as raised:
        load_config("child.yaml", project_dir=budget_project, sets=["ns.total_token=1"])
    assert "override key ns.total_token is not used by config child.yaml" in str(raised.value)
    assert "did you mean ns.total_tokens" in str(raised.value)


@pytest.mark.parametrize("entry", ["total_tokens=1", "ns.total_tokens"])
def test_invalid_override_syntax(budget_project, entry):
    with pytest.raises(LmforgeError, match="invalid override"):
        load_config("child.yaml", project_dir=budget_project, sets=[entry])


def test_override_key_read_with_is_defined(make_project):
    project = make_project({"configs/c.yaml": "x: {{ ns.extra if ns.extra is defined else 0 }}\n"})
    assert load_config("c.yaml", project_dir=project).preprocessed == "x: 0\n"
    assert load_config("c.yaml", project_dir=project, sets=["ns.extra=7"]).preprocessed == "x: 7\n"


def test_config_attributes(budget_project):
    config = load_config("child.yaml", project_dir=budget_project)
    assert config.name == "child.yaml"
    assert config.path == budget_project / "configs" / "child.yaml"
    assert config.project.dir == budget_project
    assert config.template_chain == ["configs/child.yaml", "templates/parent.yaml"]
    assert config.targets == ["steps", "lr"]


def test_dynamic_parent_include_and_macros(make_project):
    project = make_project({
        "templates/a.yaml": "[body]\nfrom: a\n",
        "templates/b.yaml": "[body]\nfrom: b\n",
        "templates/macros.yaml": "-- macro double(x)\n{{- x * 2 -}}\n-- endmacro\n",
        "templates/part.yaml": "part: {{ value }}\n",
        "configs/c.yaml": (
            "-- set parent = 'b.yaml'\n-- extends parent\n-- import 'macros.yaml' as m\n"
            "[body]\n== super()\ndouble: {{ m.double(21) }}\n-- set value = 'included'\n-- include 'part.yaml'\n"
        ),
    })
    config = load_config("c.yaml", project_dir=project)
    assert config.preprocessed == "from: b\ndouble: 42\npart: included\n"
    edges = set(config.template_edges)
    assert ("configs/c.yaml", "templates/b.yaml", "extends") in edges
    assert ("configs/c.yaml", "templates/macros.yaml", "import") in edges
    assert ("configs/c.yaml", "templates/part.yaml", "include") in edges


def test_sub_template_names(make_project):
    project = make_project({
        "templates/lib.yaml": "lib: main\n#---- lib.part ----\npart: from lib\n",
        "configs/c.yaml": (
            "-- include 'local'\n-- include 'lib.yaml#lib.part'\n-- include 'lib.yaml'\n-- include 'lib.part'\n"
            "#---- local ----\nlocal: 1\n"
        ),
    })
    config = load_config("c.yaml", project_dir=project)
    assert config.preprocessed == "local: 1\npart: from lib\nlib: main\npart: from lib\n"


def test_search_path_first_match_wins(make_project, tmp_path):
    workspace = tmp_path / "ws"
    (workspace / "shared").mkdir(parents=True)
    (workspace / "lmforge_workspace.yaml").write_text("template_dirs: [shared]\n")
    (workspace / "shared" / "base.yaml").write_text("source: workspace\n")
    (workspace / "shared" / "only_shared.yaml").write_text("shared: yes\n")
    project = workspace / "proj"
    (project / "templates").mkdir(parents=True)
    (project / "configs").mkdir()
    (project / "meta.yaml").write_text("name: p\n")
    (project / "templates" / "base.yaml").write_text("source: project\n")
    (project / "configs" / "c.yaml").write_text("-- include 'base.yaml'\n-- include 'only_shared.yaml'\n")
    config = load_config("c.yaml", project_dir=project)
    assert config.preprocessed == "source: project\nshared: yes\n"
    assert config.project.workspace_file == workspace / "lmforge_workspace.yaml"


def test_find_project_walks_up(budget_project):
    assert find_project(budget_project / "configs") == budget_project
    with pytest.raises(LmforgeError, match="no project found"):
        find_project(budget_project.parent)


def test_config_by_file_path_and_cwd(budget_project, monkeypatch):
    monkeypatch.chdir(budget_project / "configs")
    assert load_config("child.yaml").namespace["total_steps"] == 500
    monkeypatch.chdir(budget_project.parent)
    by_path = load_config(str(budget_project / "configs" / "child.yaml"))
    assert by_path.project.dir == budget_project


def test_unknown_config_suggests(budget_project):
    with pytest.raises(LmforgeError) as raised:
        load_config("chld.yaml", project_dir=budget_project)
    assert "config 'chld.yaml' not found" in str(raised.value)
    assert "child.yaml" in str(raised.value)


def test_undefined_ns_error_names_file_line_chain(make_project):
    project = make_project({
        "templates/parent.yaml": "## parent\n[body]\nx: 1\n",
        "templates/part.yaml": "a: 1\nb: {{ ns.missing_key }}\n",
        "configs/c.yaml": "-- extends 'parent.yaml'\n[body]\n-- include 'part.yaml'\n",
    })
    with pytest.raises(LmforgeError) as raised:
        load_config("c.yaml", project_dir=project)
    message = str(raised.value)
    assert "ns.missing_key is not defined at templates/part.yaml:2" in message
    assert "  2 | b: {{ ns.missing_key }}" in message
    assert "chain: configs/c.yaml:1 -> templates/parent.yaml:2 -> configs/c.yaml:3" in message


def test_syntax_error_in_sub_template_line(make_project):
    project = make_project({"configs/c.yaml": "-- include 'sub'\n#---- sub ----\nok: 1\n-- if true\nx: 1\n"})
    with pytest.raises(LmforgeError) as raised:
        load_config("c.yaml", project_dir=project)
    message = str(raised.value)
    assert "template syntax error" in message
    assert "configs/c.yaml:5 (template sub)" in message
    assert "chain: configs/c.yaml:1" in message


def test_template_not_found_suggests(make_project):
    project = make_project({"templates/parent.yaml": "x: 1\n", "configs/c.yaml": "a: 1\n-- extends 'parnt.yaml'\n"})
    with pytest.raises(LmforgeError) as raised:
        load_config("c.yaml", project_dir=project)
    message = str(raised.value)
    assert "template 'parnt.yaml' not found" in message
    assert "at configs/c.yaml:2" in message
    assert "did you mean parent.yaml" in message


def test_yaml_error_points_at_source(make_project):
    project = make_project({"templates/t.yaml": "good: 1\nbad: [1, 2\n", "configs/c.yaml": "-- include 't.yaml'\n"})
    with pytest.raises(LmforgeError) as raised:
        load_config("c.yaml", project_dir=project)
    message = str(raised.value)
    assert "invalid YAML" in message
    assert "from templates/t.yaml:2" in message


def test_raise_global_reports_location(make_project):
    project = make_project({"configs/c.yaml": "-- set lr = 5\n-- if lr > 1\n== raise('lr must be at most 1, got ' ~ lr)\n-- endif\n"})
    with pytest.raises(LmforgeError) as raised:
        load_config("c.yaml", project_dir=project)
    assert "lr must be at most 1, got 5 at configs/c.yaml:3" in str(raised.value)


def test_globals_and_filters(make_project, monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_VALUE", "from-env")
    project = make_project({
        "configs/c.yaml": (
            "env: {{ getenv('LMFORGE_TEST_VALUE') }}\n"
            "default: {{ getenv('LMFORGE_TEST_UNSET_XYZ', 'fallback') }}\n"
            "project: {{ project_dir | basename }}\n"
            "config: {{ config_name }}\n"
            "abs: {{ 'x' | abspath == joinpath(getcwd(), 'x') }}\n"
            "home: {{ user_home_dir() | length > 0 }}\n"
            "time: {{ isotime(0) | length }}\n"
            "mtime: {{ filetime(config_path) | length }}\n"
            "year: {{ now().year > 2000 }}\n"
            "none: {{ toyaml(None) }}\n"
        )
    })
    config = load_config("c.yaml", project_dir=project)
    values = config.construct("env"), config.graph
    assert values[0] == "from-env"
    assert config.graph["default"] == "fallback"
    assert config.graph["project"] == project.name
    assert config.graph["config"] == "c.yaml"
    assert config.graph["abs"] is True
    assert config.graph["home"] is True
    assert config.graph["time"] == 19
    assert config.graph["mtime"] == 19
    assert config.graph["year"] is True
    assert config.graph["none"] is None


def test_meta_yaml_unknown_key(make_project):
    project = make_project({"configs/c.yaml": "a: 1\n"}, meta="name: x\ndefault_confg: c.yaml\n")
    with pytest.raises(LmforgeError) as raised:
        load_config("c.yaml", project_dir=project)
    assert "unknown keys ['default_confg']" in str(raised.value)
    assert "default_config" in str(raised.value)


def test_default_config_from_meta(make_project):
    project = make_project({"configs/c.yaml": "a: 1\n"}, meta="default_config: c.yaml\n")
    assert load_config(None, project_dir=project).name == "c.yaml"


def test_unknown_tag_suggests(make_project):
    project = make_project({"configs/c.yaml": "a: 1\nmain: !cal:dict {x: 1}\n"})
    with pytest.raises(LmforgeError) as raised:
        load_config("c.yaml", project_dir=project)
    message = str(raised.value)
    assert "from configs/c.yaml:2" in message
    assert "unknown tag !cal:dict" in message
    assert "did you mean !call:SPEC" in message


def test_invalid_tag_use_points_at_source(make_project):
    project = make_project({"templates/t.yaml": "a: 1\nb: !var\n", "configs/c.yaml": "-- include 't.yaml'\n"})
    with pytest.raises(LmforgeError) as raised:
        load_config("c.yaml", project_dir=project)
    message = str(raised.value)
    assert "!var has no variable name" in message
    assert "(from templates/t.yaml:2)" in message


def test_config_without_project_suggests_p(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmforgeError) as raised:
        load_config("smollm2_135m/cpu_default.yaml")
    assert f"no project (a directory with meta.yaml) at or above {tmp_path}" in raised.value.message
    assert "-p configs/open_orca" in raised.value.hint
    # From a checkout's root the hint names the projects under ./configs.
    (tmp_path / "configs" / "demo").mkdir(parents=True)
    (tmp_path / "configs" / "demo" / "meta.yaml").write_text("name: demo\n")
    with pytest.raises(LmforgeError) as raised:
        load_config("missing.yaml")
    assert raised.value.hint == "pass the project directory with -p, e.g. -p configs/demo"
