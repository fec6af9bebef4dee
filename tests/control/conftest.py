"""Fixtures for the control tests: a private runtime directory and a job process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

JOB_SCRIPT = Path(__file__).with_name("step_loop_job.py")


@pytest.fixture
def control_dir(monkeypatch):
    """A fresh runtime directory under /tmp (short, because socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lmf-", dir="/tmp"))
    monkeypatch.setenv("LMFORGE_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s: {predicate}")


@pytest.fixture
def wait_for():
    """The `_wait_for(predicate, timeout)` polling helper."""
    return _wait_for


@pytest.fixture
def start_job(control_dir, tmp_path):
    """Start `step_loop_job.py` (a step loop around a real ControlServer) and wait until it registers."""
    processes = []

    def start(job_id: str = "loop", step_seconds: float = 0.05, max_steps: int = 100000):
        run_dir = tmp_path / job_id
        run_dir.mkdir()
        env = dict(os.environ, LMFORGE_RUNTIME_DIR=str(control_dir))
        proc = subprocess.Popen(
            [sys.executable, str(JOB_SCRIPT), job_id, str(run_dir), str(step_seconds), str(max_steps)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        processes.append(proc)
        _wait_for(lambda: (control_dir / f"{job_id}.json").exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.stdout.read()
        return proc, run_dir

    yield start
    for proc in processes:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
