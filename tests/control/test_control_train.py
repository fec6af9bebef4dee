"""End to end: `lmforge train` on the tiny config, steered by real control requests and signals.

Each run uses a private runtime directory and a copy of the 2-layer tiny Llama as
its run directory. `--decay-start-step -1` keeps the LR at its peak until a
start-annealing request. Periodic checkpoints are off, so every checkpoint here
comes from a request or a signal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.train.control import JobRegistry, send_request

from .conftest import _wait_for

TRAIN_FLAGS = ("--max-steps", "100000", "--decay-start-step", "-1", "--save-steps", "100000")


class TrainRun:
    """One `lmforge train` process, its output file and its registry entry."""

    def __init__(self, repo_root: Path, run_dir: Path, wait_for, sets: tuple[str, ...] = ()):
        self.run_dir = run_dir
        self.output_path = run_dir.parent / f"{run_dir.name}.out"
        self.wait_for = wait_for
        command = [
            sys.executable, "-m", "lmforge.cli.main",
            "-p", str(repo_root / "configs" / "open_orca"), "-t", "tiny/cpu_test.yaml",
            *(argument for value in sets for argument in ("--set", value)),
            "train", "-M", str(run_dir), *TRAIN_FLAGS,
        ]
        self.output = open(self.output_path, "w")
        self.process = subprocess.Popen(command, stdout=self.output, stderr=subprocess.STDOUT, env=dict(os.environ))

    def job(self):
        """Wait until the job registers and has taken a step; return its registry record."""

        def registered():
            if self.process.poll() is not None:
                raise AssertionError(f"lmforge train exited {self.process.returncode}:\n{self.tail()}")
            for record in JobRegistry().jobs():
                if record.run_dir == str(self.run_dir) and record.alive and record.global_step:
                    return record
            return None

        return self.wait_for(registered, timeout=120, interval=0.2)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lmforge train still running after {timeout} s:\n{self.tail()}") from None

    def tail(self) -> str:
        self.output.flush()
        return "\n".join(self.output_path.read_text(errors="replace").splitlines()[-40:])

    def log_records(self) -> list[dict]:
        (log_path,) = self.run_dir.glob("runs/*/trainer_logs.json")
        return json.loads(log_path.read_text())

    def checkpoint_steps(self) -> list[int]:
        return sorted(int(path.name.split("-")[1]) for path in self.run_dir.glob("checkpoints/checkpoint-*"))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.output.close()


@pytest.fixture(scope="module")
def module_control_dir():
    """A runtime directory shared by this module's jobs (the control_dir fixture is per test)."""
    path = Path(tempfile.mkdtemp(prefix="lmf-", dir="/tmp"))
    previous = os.environ.get("LMFORGE_RUNTIME_DIR")
    os.environ["LMFORGE_RUNTIME_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["LMFORGE_RUNTIME_DIR"]
    else:
        os.environ["LMFORGE_RUNTIME_DIR"] = previous
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def start_train(repo_root, tiny_llama_dir, tmp_path_factory, module_control_dir):
    base = tmp_path_factory.mktemp("train")
    runs = []

    def start(name: str, *sets: str) -> TrainRun:
        run_dir = base / name
        if not run_dir.exists():
            shutil.copytree(tiny_llama_dir, run_dir)
        run = TrainRun(repo_root, run_dir, _wait_for, sets)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


@pytest.fixture(scope="module")
def train_jobs(start_train) -> dict[str, TrainRun]:
    """Every job of this module, started at once so that their start-up costs overlap."""
    return {
        "pipeline": start_train("pipeline", "ns.backend=pipeline", "ns.world_size=2", "ns.pipeline_schedule=1F1B"),
        "steered": start_train("steered"),
        "aborted": start_train("aborted"),
        "terminated": start_train("terminated"),
    }


def _lr_by_step(records: list[dict]) -> dict[int, float]:
    return {r["global_step"]: r["learning_rate"] for r in records if "learning_rate" in r and "event" not in r}


def test_requests_apply_on_every_rank(train_jobs):
    """Two pipeline ranks (1F1B, one decoder layer each) apply both requests at the acknowledged step.

    DDP goes through the same broadcast in the trainer; the pipeline is the case
    where each rank saves its own scheduler state, so rank 1's can be checked.
    """
    import torch

    run = train_jobs["pipeline"]
    job = run.job()
    anneal_step = send_request(job, "start-annealing", timeout=60)["step"]
    stop_step = send_request(job, "save-stop", timeout=60)["step"]
    assert run.wait() == 0

    end = run.log_records()[-1]
    assert end["reason"] == "save-stop"
    assert end["global_step"] == stop_step
    assert run.checkpoint_steps() == [stop_step]
    checkpoint = run.run_dir / "checkpoints" / f"checkpoint-{stop_step}"
    for rank in (0, 1):
        state = torch.load(checkpoint / f"scheduler_rank{rank}.pt", weights_only=False)
        assert state["triggered_decay_start_step"] == anneal_step, rank
        assert state["last_epoch"] == stop_step, rank


def test_train_steered_by_requests_and_signals(train_jobs, start_train, run_lmforge, module_control_dir):
    steered, aborted, terminated = train_jobs["steered"], train_jobs["aborted"], train_jobs["terminated"]
    job = steered.job()
    abort_job = aborted.job()
    terminated.job()

    # `control list` before: the three jobs run, each with a 0600 socket in the 0700 directory.
    listed = {entry["run_dir"]: entry for entry in json.loads(run_lmforge("control", "list", "--format", "json", check=True).stdout)}
    for run in (steered, aborted, terminated):
        assert listed[str(run.run_dir)]["alive"] is True, run.run_dir
    entry = listed[str(steered.run_dir)]
    assert entry["job_id"] == job.job_id
    assert entry["alive"] is True
    assert entry["config"] == "tiny/cpu_test.yaml"
    for entry in listed.values():
        assert stat.S_IMODE(os.stat(entry["socket"]).st_mode) == 0o600
    assert stat.S_IMODE(module_control_dir.stat().st_mode) == 0o700

    # status, start-annealing, save, then save-stop.
    status = send_request(job, "status", timeout=10)
    assert status["status"]["global_step"] >= 1
    assert status["status"]["max_steps"] == 100000

    annealed = send_request(job, "start-annealing", timeout=60)
    anneal_step = annealed["step"]
    assert annealed["message"] == f"annealing started at step {anneal_step}"
    with pytest.raises(LmforgeError, match=rf"did not apply 'start-annealing': the decay already started after step {anneal_step}"):
        send_request(job, "start-annealing", timeout=60)

    saved = run_lmforge("control", "save", job.job_id, check=True).stdout
    save_step = int(saved.split("at step ")[1].split(":")[0])
    assert (steered.run_dir / "checkpoints" / f"checkpoint-{save_step}" / "COMPLETE").is_file()
    assert steered.process.poll() is None

    stop_step = send_request(job, "save-stop", timeout=60)["step"]
    assert steered.wait() == 0
    assert steered.checkpoint_steps() == [save_step, stop_step]
    resumed = start_train("steered")

    # abort: declined at the prompt, then forced; no checkpoint.
    declined = run_lmforge("control", "abort", abort_job.job_id, input="n\n")
    assert declined.returncode == 1
    assert aborted.process.poll() is None
    forced = run_lmforge("control", "abort", "--force", abort_job.job_id, check=True)
    assert "'abort' applied at step" in forced.stdout
    aborted.wait()
    assert aborted.checkpoint_steps() == []
    assert aborted.log_records()[-1]["reason"] == "abort"

    # SIGTERM to the launcher acts as save-stop: one checkpoint, then a clean exit.
    terminated.process.send_signal(signal.SIGTERM)
    assert terminated.wait() == 0
    end = terminated.log_records()[-1]
    assert end["reason"] == "save-stop"
    assert terminated.checkpoint_steps() == [end["global_step"]]

    # The save-stopped run resumes from its checkpoint; stop ends it without saving.
    resumed_job = resumed.job()
    assert resumed_job.global_step >= stop_step
    ack = run_lmforge("control", "stop", resumed_job.job_id, check=True).stdout
    assert "'stop' applied at step" in ack
    assert resumed.wait() == 0
    assert resumed.checkpoint_steps() == [save_step, stop_step]

    # `control list` after: no jobs left.
    after = json.loads(run_lmforge("control", "list", "--format", "json", check=True).stdout)
    ours = {str(run.run_dir) for run in (steered, aborted, terminated)}
    assert [entry["job_id"] for entry in after if entry["run_dir"] in ours] == []

    records = resumed.log_records()
    starts = [r for r in records if r.get("event") == "start"]
    assert [r["global_step"] for r in starts] == [0, stop_step]
    ends = [r for r in records if r.get("event") == "end"]
    assert [(r["reason"], r["global_step"]) for r in ends][0] == ("save-stop", stop_step)
    assert ends[-1]["reason"] == "stop"

    # The log tools read the real log of the resumed run.
    summary = json.loads(run_lmforge("logs", "summary", "--format", "json", resumed.run_dir, check=True).stdout)[0]
    assert summary["total_steps"] == ends[-1]["global_step"]
    assert summary["resumed_from_steps"] == [stop_step]
    assert summary["end_reason"] == "stop"
    plot = run_lmforge("logs", "plot", "--lr", resumed.run_dir, check=True).stdout
    assert "(1200x800 px, 1 run(s))" in plot

    lrs = _lr_by_step(records)
    peak = lrs[anneal_step]
    for step in range(3, anneal_step + 1):  # steps 1 and 2 are warmup
        assert lrs[step] == peak, step
    assert lrs[anneal_step + 1] < peak
    # min_lr_ratio is 0.1, reached 2 annealing steps after the request, and kept after the resume.
    assert lrs[stop_step] == pytest.approx(0.1 * peak)
    assert lrs[stop_step + 1] == pytest.approx(0.1 * peak)
