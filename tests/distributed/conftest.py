"""Fixtures for the distributed-backend tests: a 4-layer tiny Llama and a torchrun launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .launch import torchrun_command

DRIVER = Path(__file__).with_name("driver.py")


@pytest.fixture(scope="session")
def tiny_llama4_dir(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama with tied embeddings: enough layers for 4 pipeline stages."""
    from lmforge.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama4") / "model", num_hidden_layers=4)


@pytest.fixture(scope="session")
def run_driver():
    """Run tests/distributed/driver.py, under torchrun when nproc > 1; return the CompletedProcess."""

    def run(*args: str, nproc: int = 2, timeout: float = 100, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if nproc > 1:
            command = torchrun_command(nproc, DRIVER, *args)
        else:
            command = [sys.executable, str(DRIVER), *map(str, args)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    return run
