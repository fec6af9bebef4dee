"""`lmforge quickstart` end to end through the real console script, `lmforge train` and torchrun.

The tiny random Llama replaces the demo model (`--model`), so the run takes
seconds; the command is otherwise the one a new user runs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.quickstart import SAMPLE_DATA, find_repository, prepare_model, run_quickstart
from lmforge.train.callbacks import read_json_log


def _summary_value(stdout: str, metric: str) -> str:
    match = re.search(rf"^{re.escape(metric)}\s+(.+)$", stdout, re.MULTILINE)
    assert match, f"{metric!r} row missing from the summary:\n{stdout}"
    return match.group(1).strip()


def test_quickstart_trains_saves_and_summarises(run_lmforge, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "qs"
    # Run from an unrelated directory: the sample rows must resolve from the repository.
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = run_lmforge("quickstart", out_dir, "--model", tiny_llama_dir, "--steps", "4", cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout

    run_dir = out_dir / "run"
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "COMPLETE").is_file()
    trained = AutoModelForCausalLM.from_pretrained(checkpoint)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    changed = [name for name, weight in base.state_dict().items() if not torch.equal(weight, trained.state_dict()[name])]
    assert changed, "4 optimizer steps left every weight unchanged"

    (log_dir,) = (run_dir / "runs").iterdir()
    records = read_json_log(log_dir / "trainer_logs.json")
    start, end = records[0], records[-1]
    assert start["event"] == "start"
    assert start["config"] == "smollm2_135m/cpu_quickstart.yaml"
    assert end["event"] == "end"
    assert end["reason"] == "completed"
    assert end["global_step"] == 4
    eval_losses = [record["eval_loss"] for record in records if "eval_loss" in record]
    assert len(eval_losses) == 1

    # The printed table contains this run's numbers.
    assert _summary_value(stdout, "Run status") == "ended: completed"
    assert _summary_value(stdout, "Total steps") == "4 of 4"
    assert _summary_value(stdout, "Tokens trained").startswith(f"{end['tokens']:,} ")
    assert _summary_value(stdout, "Best eval loss") == f"{eval_losses[0]:.4f} (step 4)"
    assert "lmforge.train.torchrun" in stdout  # the real `lmforge train` launcher ran

    # The closing lines name where each output went.
    assert f"checkpoint     {checkpoint}" in stdout
    assert f"logs           {log_dir / 'trainer_logs.json'}" in stdout
    assert f"tensorboard --logdir {run_dir / 'runs'}" in stdout
    assert f"lmforge inf server -m {run_dir} -c" in stdout
    assert f"lmforge logs plot {log_dir}" in stdout
    assert str(find_repository() / SAMPLE_DATA) in stdout


def test_existing_model_dir_is_reused(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    before = {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()}
    assert prepare_model(model_dir) is False
    assert {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()} == before


def test_half_fetched_model_dir_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(LmforgeError, match="is not a model directory") as info:
        prepare_model(model_dir)
    assert f"delete {model_dir}" in info.value.hint


def test_bad_arguments_fail_before_training(tiny_llama_dir, tmp_path):
    with pytest.raises(LmforgeError, match="--steps 0 is invalid"):
        run_quickstart(tmp_path / "qs", steps=0, model=tiny_llama_dir)
    with pytest.raises(LmforgeError, match="--model .* is not a model directory"):
        run_quickstart(tmp_path / "qs", steps=4, model=tmp_path)
    assert not (tmp_path / "qs" / "run").exists()


def test_missing_checkout_names_the_fix(monkeypatch, tmp_path):
    """A non-editable install has no configs/ beside the package: the error tells the user to use a clone."""
    import lmforge

    site_packages = tmp_path / "venv" / "lib" / "site-packages" / "lmforge"
    site_packages.mkdir(parents=True)
    monkeypatch.setattr(lmforge, "__file__", str(site_packages / "__init__.py"))
    with pytest.raises(LmforgeError, match="needs the lmforge repository checkout") as info:
        find_repository(start=tmp_path)
    assert "pip install -e ." in info.value.hint
    # From inside a clone it is found again, whatever the package location.
    assert find_repository(start=Path(__file__).parent) == Path(__file__).resolve().parents[2]


def test_quickstart_rerun_needs_fresh(run_lmforge, tiny_llama_dir, tmp_path):
    """A second quickstart into the same DIR must not mix its checkpoints with the first run's."""
    old_checkpoint = tmp_path / "qs" / "run" / "checkpoints" / "checkpoint-30"
    old_checkpoint.mkdir(parents=True)
    proc = run_lmforge("quickstart", tmp_path / "qs", "--model", tiny_llama_dir, "--steps", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"error: {tmp_path / 'qs' / 'run'} already contains an earlier quickstart run (checkpoints)" in proc.stderr
    assert "--fresh" in proc.stderr
    assert "another DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "[2/3] Training" not in proc.stdout
    assert old_checkpoint.is_dir()


def test_fresh_keeps_model(tiny_llama_dir, tmp_path):
    from lmforge.quickstart import prepare_run_dir

    shutil.copytree(tiny_llama_dir, tmp_path / "model")
    run_dir = tmp_path / "run"
    (run_dir / "runs" / "old").mkdir(parents=True)
    with pytest.raises(LmforgeError, match=r"already contains an earlier quickstart run \(runs\)"):
        prepare_run_dir(run_dir)
    prepare_run_dir(run_dir, fresh=True)
    assert not run_dir.exists()
    assert (tmp_path / "model" / "config.json").is_file()
    prepare_run_dir(run_dir)  # An absent run directory passes.
    (run_dir / "checkpoints").mkdir(parents=True)
    prepare_run_dir(run_dir)  # Empty folders from an aborted start are no earlier run.
