"""Checkpoint, resume and uneven data shares under the DDP and pipeline backends.

One torchrun launch per backend runs tests/distributed/resume_driver.py, which
trains the tiny Open-Orca config through the real Trainer: 6 steps with
checkpoints at 3 and 6, then a second run resumed from a copy of checkpoint-3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lmforge.train.callbacks import read_json_log

from .launch import torchrun_command

RESUME_DRIVER = Path(__file__).with_name("resume_driver.py")
SHORT_ROWS = 9


def _launch(work: Path, backend: str, *extra: str) -> Path:
    import os
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    command = torchrun_command(2, RESUME_DRIVER, "--backend", backend, "--work", work, *extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=200, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"resume driver ({backend}) exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return work


@pytest.fixture(scope="module")
def ddp_work(tmp_path_factory, tiny_llama4_dir) -> Path:
    work = tmp_path_factory.mktemp("ddp_resume")
    return _launch(work, "ddp", "--model", str(tiny_llama4_dir), "--short-rows", str(SHORT_ROWS))


@pytest.fixture(scope="module")
def pipeline_work(tmp_path_factory, tiny_llama4_dir) -> Path:
    work = tmp_path_factory.mktemp("pipeline_resume")
    return _launch(work, "pipeline", "--model", str(tiny_llama4_dir), "--schedule", "ZBVZeroBubble")


def _step_records(run_dir: Path) -> dict[int, dict]:
    (log_path,) = run_dir.glob("runs/*/trainer_logs.json")
    records: dict[int, dict] = {}
    for record in read_json_log(log_path):
        if "global_step" in record and "event" not in record:
            records.setdefault(record["global_step"], {}).update(record)
    return records


def _assert_resume_matches(work: Path) -> None:
    full = _step_records(work / "full")
    resumed = _step_records(work / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == full[step]["loss"], f"loss at step {step}"
        assert resumed[step]["grad_norm"] == full[step]["grad_norm"], f"grad_norm at step {step}"
        assert resumed[step]["learning_rate"] == full[step]["learning_rate"], f"learning_rate at step {step}"
    assert resumed[6]["eval_loss"] == full[6]["eval_loss"]

    expected = load_file(str(work / "full" / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    actual = load_file(str(work / "resumed" / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"weight {name} differs after resume"


@pytest.mark.timeout(240)
def test_ddp_resume_matches_uninterrupted(ddp_work):
    _assert_resume_matches(ddp_work)


@pytest.mark.timeout(240)
def test_pipeline_resume_matches_uninterrupted(pipeline_work):
    _assert_resume_matches(pipeline_work)


def test_ddp_checkpoint_has_rank_states(ddp_work):
    checkpoint = ddp_work / "full" / "checkpoints" / "checkpoint-3"
    names = {path.name for path in checkpoint.iterdir()}

    assert {"model.safetensors", "optimizer.pt", "dataset_rank0.pt", "dataset_rank1.pt", "rng_rank0.pt", "rng_rank1.pt"} <= names
    assert not any(name.startswith("optimizer_rank") for name in names)
    rank0 = torch.load(checkpoint / "dataset_rank0.pt", weights_only=False)
    rank1 = torch.load(checkpoint / "dataset_rank1.pt", weights_only=False)
    assert rank0 != rank1


def test_ddp_short_share_ends_together(ddp_work):
    rank0 = json.loads((ddp_work / "short.rank0.json").read_text())
    rank1 = json.loads((ddp_work / "short.rank1.json").read_text())

    assert rank0["documents"] != rank1["documents"]
    assert rank0["reason"] == "completed"
    assert rank1["reason"] == "completed"
    assert rank0["global_step"] > 0
    assert rank0["global_step"] == rank1["global_step"]


def test_pipeline_checkpoint_stage_files(pipeline_work, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from lmforge.cli.main import app

    checkpoint = pipeline_work / "full" / "checkpoints" / "checkpoint-6"
    names = {path.name for path in checkpoint.iterdir()}
    assert {"model_rank0.safetensors", "model_rank1.safetensors", "optimizer_rank0.pt", "optimizer_rank1.pt"} <= names

    stages = {}
    for rank in (0, 1):
        with safe_open(str(checkpoint / f"model_rank{rank}.safetensors"), framework="pt") as handle:
            stages[rank] = handle.metadata()["stages"]
    # ZBV on 2 ranks: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2.
    assert stages == {0: "0,3", 1: "1,2"}

    merged = load_file(str(checkpoint / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    for name, tensor in merged.items():
        assert torch.equal(model.state_dict()[name], tensor), name

    exported = tmp_path / "exported"
    result = CliRunner().invoke(app, ["checkpoint", "export", str(checkpoint), str(exported)])
    assert result.exit_code == 0, result.output
    assert not (exported / "optimizer_rank0.pt").exists()
    assert not (exported / "model_rank0.safetensors").exists()
    exported_model = AutoModelForCausalLM.from_pretrained(exported)
    for name, tensor in merged.items():
        assert torch.equal(exported_model.state_dict()[name], tensor), name


def test_rank_files_load_without_merged_model(pipeline_work, tmp_path, tiny_llama4_dir):
    from transformers import AutoModelForCausalLM

    from lmforge.train.checkpoints import load_model_weights

    checkpoint = tmp_path / "checkpoint-6"
    shutil.copytree(pipeline_work / "full" / "checkpoints" / "checkpoint-6", checkpoint)
    expected = load_file(str(checkpoint / "model.safetensors"))
    (checkpoint / "model.safetensors").unlink()

    model = AutoModelForCausalLM.from_pretrained(tiny_llama4_dir)
    load_model_weights(model, checkpoint)
    for name, tensor in expected.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_resume_other_world_size_rejected(ddp_work, tmp_path, tiny_llama4_dir):
    from lmforge.config import load_config
    from lmforge.errors import LmforgeError

    run_dir = tmp_path / "single"
    shutil.copytree(ddp_work / "full" / "checkpoints" / "checkpoint-3", run_dir / "checkpoints" / "checkpoint-3")
    config = load_config(
        "tiny/cpu_test.yaml",
        project_dir=Path(__file__).resolve().parents[2] / "configs" / "open_orca",
        sets=["ns.max_steps=6"],
    )
    trainer = config.construct("trainer", run_dir=str(run_dir), model_dir=str(tiny_llama4_dir), rank=0, local_rank=0, world_size=1)

    with pytest.raises(LmforgeError, match="written by 2 processes, this run has 1"):
        trainer.train()
