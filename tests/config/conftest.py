"""Fixtures for the config tests: a throwaway project written from a dict of files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def make_project(tmp_path):
    """Write FILES ({relative path: text}) into a new project directory and return it."""

    def make(files: dict[str, str], meta: str = "name: test\n", name: str = "project") -> Path:
        project = tmp_path / name
        counter = 1
        while project.exists():
            counter += 1
            project = tmp_path / f"{name}{counter}"
        project.mkdir(parents=True)
        (project / "meta.yaml").write_text(meta)
        for relative, text in files.items():
            path = project / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return project

    return make


@pytest.fixture
def sample_project(repo_root) -> Path:
    return repo_root / "tests" / "fixtures" / "sample_project"
