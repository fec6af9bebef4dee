"""Fixtures for the log tests: a hand-written log of a resumed run laid out as a model directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

RESUMED_RUN = Path(__file__).parent / "data" / "resumed_run.json"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """MODEL_DIR/runs/first/trainer_logs.json holding `data/resumed_run.json`."""
    run_dir = tmp_path / "model" / "runs" / "first"
    run_dir.mkdir(parents=True)
    shutil.copy(RESUMED_RUN, run_dir / "trainer_logs.json")
    return tmp_path / "model"


@pytest.fixture
def resumed_log_text() -> str:
    return RESUMED_RUN.read_text()
