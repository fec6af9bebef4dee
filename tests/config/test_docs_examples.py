"""Every example in docs/templates.md renders, constructs and fails as the document shows."""

from __future__ import annotations

import pprint

import pytest

from lmforge.config import load_config
from lmforge.errors import LmforgeError

from .doc_examples import read_examples, write_example


@pytest.fixture(scope="module")
def examples(repo_root):
    return read_examples((repo_root / "docs" / "templates.md").read_text())


def test_docs_have_examples(examples):
    assert {"lines", "blocks", "inherit", "multi", "override", "globals", "graph", "dlist"} <= set(examples)
    for example in examples.values():
        assert example.files, example.name
        assert example.output is not None or example.constructs or example.error, example.name


def test_docs_examples_render(examples, tmp_path):
    for example in examples.values():
        project = write_example(example, tmp_path)
        config = load_config(example.config, project_dir=project, sets=example.output_sets)
        if example.output is not None:
            assert config.preprocessed == example.output, example.name
        for target, expected in example.constructs.items():
            built = config.construct(target)
            assert pprint.pformat(built, sort_dicts=False) + "\n" == expected, (example.name, target)
        if example.error is not None:
            with pytest.raises(LmforgeError) as raised:
                load_config(example.config, project_dir=project, sets=example.error_sets)
            assert example.error in str(raised.value), example.name
