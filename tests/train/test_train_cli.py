"""`lmforge train` through the real console script and torchrun, on the tiny Llama."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from lmforge.train.callbacks import read_json_log

STEP_KEYS = {"global_step", "epoch", "tokens", "loss", "grad_norm", "learning_rate", "tokens_per_second", "peak_memory", "time"}
START_KEYS = {"event", "time", "global_step", "world_size", "per_device_train_batch_size", "gradient_accumulation_steps",
              "seq_len", "effective_batch_size", "tokens_per_step", "max_steps", "config"}
END_KEYS = {"event", "global_step", "tokens", "train_runtime", "train_tokens_per_second", "reason"}


@pytest.fixture
def run_dir(tiny_llama_dir, tmp_path) -> Path:
    """A run directory that starts as a copy of the tiny model, as `-M` expects."""
    path = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, path)
    return path


def _train(run_lmforge, repo_root, run_dir, *flags, sets=()):
    args = ["-p", repo_root / "configs" / "open_orca", "-t", "tiny/cpu_test.yaml"]
    for value in sets:
        args += ["--set", value]
    return run_lmforge(*args, "train", "-M", run_dir, *flags, timeout=300)


def test_train_resume_logs_tensorboard(run_lmforge, repo_root, run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    prompts = repo_root / "prompts" / "open_orca_eval.yaml"
    sets = [f"ns.eval_prompts_file={prompts}", "ns.eval_max_new_tokens=4"]
    first = _train(run_lmforge, repo_root, run_dir, "--max-steps", "4", "--step-cadence", "0.4", sets=sets)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "-m lmforge.train.torchrun" in first.stdout

    checkpoints = run_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (checkpoints / "checkpoint-4" / "COMPLETE").is_file()
    model = AutoModelForCausalLM.from_pretrained(checkpoints / "checkpoint-4")
    assert model.config.num_hidden_layers == 2

    (run_name_dir,) = (run_dir / "runs").iterdir()
    resolved = (run_name_dir / "config.yaml").read_text()
    assert "lmforge.train.trainer:Trainer" in resolved
    assert (checkpoints / "checkpoint-4" / "config.yaml").read_text() == resolved
    generations = [json.loads(line) for line in (run_name_dir / "eval_generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 * 12  # evals at steps 2 and 4, 12 prompts each
    assert {record["global_step"] for record in generations} == {2, 4}
    assert all(record["num_tokens"] <= 4 for record in generations)
    assert "Eval response 12/12" in first.stderr

    second = _train(run_lmforge, repo_root, run_dir, "--max-steps", "6", "--step-cadence", "0.4")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stderr
    assert (checkpoints / "checkpoint-6" / "COMPLETE").is_file()

    log = json.loads((run_name_dir / "trainer_logs.json").read_text())  # valid JSON after a clean exit
    starts = [record for record in log if record.get("event") == "start"]
    ends = [record for record in log if record.get("event") == "end"]
    steps = [record for record in log if "loss" in record and "event" not in record]
    evals = [record for record in log if "eval_loss" in record]
    assert [record["global_step"] for record in starts] == [0, 4]
    assert all(START_KEYS <= record.keys() for record in starts)
    assert starts[0]["config"] == "tiny/cpu_test.yaml"
    assert starts[0]["seq_len"] == 128
    assert starts[0]["tokens_per_step"] == 243
    assert starts[0]["effective_batch_size"] == 2
    assert [record["global_step"] for record in steps] == [1, 2, 3, 4, 5, 6]
    assert all(STEP_KEYS <= record.keys() for record in steps)
    assert all(record["peak_memory"] > 0 and record["tokens_per_second"] > 0 for record in steps)
    assert steps[-1]["tokens"] > steps[0]["tokens"] > 0
    assert [record["global_step"] for record in evals] == [2, 4, 6]
    assert [record["reason"] for record in ends] == ["completed", "completed"]
    assert all(END_KEYS <= record.keys() for record in ends)

    events = EventAccumulator(str(run_name_dir))
    events.Reload()
    loss_steps = [event.step for event in events.Scalars("train/loss")]
    assert loss_steps == [1, 2, 3, 4, 5, 6]
    assert [event.step for event in events.Scalars("eval/loss")] == [2, 4, 6]
    assert "config/text_summary" in events.Tags()["tensors"]
    assert "eval_generations/cot_maths/text_summary" in events.Tags()["tensors"]


def _run_cli(argv: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the console script's entry point in this process; return (exit status, stdout, stderr)."""
    from lmforge.cli.main import run

    monkeypatch.setattr(sys, "argv", ["lmforge", *map(str, argv)])
    try:
        run()
        status = 0
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def check_cli(repo_root, monkeypatch, capsys):
    """Run `lmforge -t tiny/cpu_test.yaml train -M RUN_DIR --dry-run FLAGS`; return (status, stderr)."""

    def check(run_dir, *flags, sets=()):
        argv = ["-p", repo_root / "configs" / "open_orca", "-t", "tiny/cpu_test.yaml"]
        for value in sets:
            argv += ["--set", value]
        status, _, err = _run_cli([*argv, "train", "-M", run_dir, "--dry-run", *flags], monkeypatch, capsys)
        return status, err

    return check


def test_dry_run_prints_command_and_plan(run_dir, capsys, repo_root, monkeypatch):
    argv = ["-p", repo_root / "configs" / "open_orca", "-t", "tiny/cpu_test.yaml", "train", "-M", run_dir, "--dry-run",
            "--max-steps", "7", "--nproc", "1", "--no-resume"]
    status, out, err = _run_cli(argv, monkeypatch, capsys)
    assert status == 0, err
    assert "max_steps        7" in out
    assert "--nproc-per-node=1 --standalone" in out
    assert "--set ns.max_steps=7" in out
    assert '--overrides \'{"resume": "no"}\'' in out
    assert not (run_dir / "checkpoints").exists()


def test_multinode_flags_pass_through(run_dir, capsys, repo_root, monkeypatch):
    argv = ["-p", repo_root / "configs" / "open_orca", "-t", "tiny/cpu_test.yaml", "--set", "ns.world_size=2",
            "train", "-M", run_dir, "--dry-run", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:29400"]
    status, out, err = _run_cli(argv, monkeypatch, capsys)
    assert status == 0, err
    assert "--nproc-per-node=1 --nnodes=2 --node-rank=1 --rdzv-endpoint=127.0.0.1:29400" in out


def test_check_model_dir_missing(tmp_path, check_cli):
    status, err = check_cli(tmp_path / "nothing")
    assert status == 2
    assert "model directory not found" in err
    assert "lmforge model fetch-demo DIR" in err
    assert "--model DIR" in err


def test_check_not_a_model(tmp_path, check_cli):
    (tmp_path / "empty").mkdir()
    status, err = check_cli(tmp_path / "empty")
    assert status == 2
    assert "config.json" in err


def test_check_missing_chat_tokens(tmp_path, check_cli):
    from lmforge.models.tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "plain", chat_tokens=False)
    status, err = check_cli(model_dir)
    assert status == 2
    assert "lacks the ChatML tokens <|im_start|>, <|im_end|>" in err
    assert "lmforge convert --add-tokens chatml" in err


def test_check_dataset_path_missing(run_dir, tmp_path, check_cli):
    status, err = check_cli(run_dir, sets=[f"ns.dataset_path={tmp_path}/missing.jsonl"])
    assert status == 2
    assert f"dataset path {tmp_path}/missing.jsonl not found" in err


def test_check_seq_len_above_model(run_dir, check_cli):
    status, err = check_cli(run_dir, "--seq-len", "4096")
    assert status == 2
    assert "seq_len 4096 is above the model's max_position_embeddings 1024" in err


def test_check_gpu_config_without_gpu(run_dir, repo_root, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # Without --dry-run: a dry run only warns, so a GPU run can be planned on this machine.
    argv = ["-p", repo_root / "configs" / "open_orca", "-t", "tiny/cpu_test.yaml", "--set", "ns.device_type=cuda", "train", "-M", run_dir]
    status, _, err = _run_cli(argv, monkeypatch, capsys)
    assert status == 2
    assert "no CUDA GPU" in err


def test_check_fewer_processes_than_config(run_dir, check_cli):
    status, err = check_cli(run_dir, "--nproc", "1", sets=["ns.world_size=2"])
    assert status == 2
    assert "--nproc is 1 on 1 node(s), but the config's world_size is 2" in err


def test_check_devices_on_cpu_config(run_dir, check_cli):
    status, err = check_cli(run_dir, "-d", "0,1")
    assert status == 2
    assert "-d selects CUDA devices" in err


def test_check_run_dir_not_writable(run_dir, tmp_path, check_cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    status, err = check_cli(blocker / "run", "--model", run_dir)
    assert status == 2
    assert "is not writable" in err


def _wait_for_first_step(run_dir: Path, process, timeout: float = 240) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "training exited before its first step"
        logs = list((run_dir / "runs").glob("*/trainer_logs.json")) if (run_dir / "runs").exists() else []
        if logs and any("loss" in record for record in read_json_log(logs[0])):
            return
        time.sleep(0.5)
    raise AssertionError(f"no step logged in {run_dir} within {timeout} s")


def test_sigint_saves_then_second_aborts(repo_root, tiny_llama_dir, tmp_path):
    import os
    import signal
    import subprocess
    import time

    processes = {}
    for name in ("once", "twice"):
        run_dir = tmp_path / name
        shutil.copytree(tiny_llama_dir, run_dir)
        command = [sys.executable, "-m", "lmforge.cli.main", "-p", str(repo_root / "configs" / "open_orca"),
                   "-t", "tiny/cpu_test.yaml", "train", "-M", str(run_dir), "--max-steps", "100000",
                   "--decay-start-step", "-1", "--save-steps", "100000"]
        if name == "twice":
            # Long steps (4 x 1024 tokens), so no step boundary falls between the two signals.
            command += ["--seq-len", "1024", "--batch-size", "4"]
        processes[name] = (run_dir, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    for run_dir, process in processes.values():
        _wait_for_first_step(run_dir, process)

    processes["once"][1].send_signal(signal.SIGINT)
    processes["twice"][1].send_signal(signal.SIGINT)
    # Far shorter than a step, and long enough that the two signals are not merged into one.
    time.sleep(0.02)
    processes["twice"][1].send_signal(signal.SIGINT)
    outputs = {name: process.communicate(timeout=240)[0] for name, (_, process) in processes.items()}

    once_dir, once = processes["once"]
    assert once.returncode == 0, outputs["once"][-3000:]
    (log_path,) = (once_dir / "runs").glob("*/trainer_logs.json")
    end = json.loads(log_path.read_text())[-1]
    assert end["reason"] == "save-stop"
    assert (once_dir / "checkpoints" / f"checkpoint-{end['global_step']}" / "COMPLETE").is_file()

    twice_dir, _ = processes["twice"]
    (log_path,) = (twice_dir / "runs").glob("*/trainer_logs.json")
    records = read_json_log(log_path)
    assert records[-1]["event"] == "end", outputs["twice"][-3000:]
    assert records[-1]["reason"] == "abort"
    assert not list((twice_dir / "checkpoints").glob("checkpoint-*"))


def test_worker_error_prints_one_line(run_lmforge, repo_root, run_dir, tmp_path):
    # Columns are only read inside the worker, so this error comes back through torchrun.
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "hi", "answer": "hello"}\n')
    result = _train(run_lmforge, repo_root, run_dir, "--max-steps", "1", sets=[f"ns.dataset_path={data}"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: [rank 0]" in result.stderr
    assert "column" in result.stderr
    assert "error: training process rank 0 exited with status 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert "ChildFailedError" not in result.stderr


def test_exit_status_of_a_killed_worker():
    from lmforge.train.torchrun import exit_status

    assert exit_status(2) == 2
    assert exit_status(-9) == 137  # SIGKILL, as a shell reports it
    assert exit_status(0) == 1  # torchrun only raises for a failure


def test_missing_eval_prompts_file_fails_before_launch(check_cli, run_dir):
    status, err = check_cli(run_dir, sets=["ns.eval_prompts_file=missing.yaml"])
    assert status == 2
    assert "eval prompts file missing.yaml not found" in err
    assert "--set ns.eval_prompts_file=null" in err
