"""`lmforge control` commands against a job process that runs a real ControlServer."""

from __future__ import annotations

import json
import os
import stat


def test_list_status_and_save(start_job, run_lmforge, control_dir):
    proc, run_dir = start_job("cli", max_steps=100000)

    listing = run_lmforge("control", "list", "--format", "json", check=True)
    (entry,) = json.loads(listing.stdout)
    assert entry["job_id"] == "cli"
    assert entry["pid"] == proc.pid
    assert entry["alive"] is True
    assert entry["config"] == "loop.yaml"
    assert entry["run_dir"] == str(run_dir)
    assert stat.S_IMODE(os.stat(entry["socket"]).st_mode) == 0o600

    text = run_lmforge("control", "list", check=True).stdout
    assert "cli" in text
    assert "running" in text
    assert str(proc.pid) in text

    status = run_lmforge("control", "status", "cli", check=True).stdout
    for label in ("step", "tokens", "loss", "learning rate", "tokens/s", "ETA"):
        assert f"\n{label} " in status

    saved = run_lmforge("control", "save", "cli", check=True).stdout
    step = int(saved.split("at step ")[1].split(":")[0])
    assert (run_dir / f"checkpoint-{step}").is_dir()
    assert proc.poll() is None


def test_save_stop_exits_cleanly(start_job, run_lmforge):
    proc, run_dir = start_job("ss")
    out = run_lmforge("control", "save-stop", "ss", check=True).stdout
    step = int(out.split("at step ")[1].split(":")[0])
    assert proc.wait(timeout=30) == 0
    assert (run_dir / f"checkpoint-{step}").is_dir()

    listing = run_lmforge("control", "list", "--format", "json", check=True)
    assert json.loads(listing.stdout) == []


def test_stop_and_start_annealing(start_job, run_lmforge):
    proc, run_dir = start_job("sa")
    out = run_lmforge("control", "start-annealing", "sa", check=True).stdout
    step = int(out.split("at step ")[1].split(":")[0])
    assert (run_dir / "annealing_step").read_text() == str(step)

    again = run_lmforge("control", "start-annealing", "sa")
    assert again.returncode == 2
    assert "did not apply 'start-annealing': the decay has already started" in again.stderr

    run_lmforge("control", "stop", "sa", check=True)
    assert proc.wait(timeout=30) == 0
    assert not list(run_dir.glob("checkpoint-*"))


def test_abort_asks_for_confirmation(start_job, run_lmforge):
    proc, _ = start_job("ab")
    declined = run_lmforge("control", "abort", "ab", input="n\n")
    assert declined.returncode == 1
    assert "Abort job ab" in declined.stdout
    assert proc.poll() is None

    run_lmforge("control", "abort", "ab", "--force", check=True)
    assert proc.wait(timeout=30) == 3


def test_dead_job_listed_and_cleaned(start_job, run_lmforge):
    proc, _ = start_job("killed")
    proc.kill()
    proc.wait(timeout=10)

    text = run_lmforge("control", "list", check=True).stdout
    assert "dead" in text
    assert "lmforge control cleanup" in text

    refused = run_lmforge("control", "save", "killed")
    assert refused.returncode == 2
    assert f"error: job killed (pid {proc.pid}) is not running" in refused.stderr

    cleaned = run_lmforge("control", "cleanup", check=True).stdout
    assert "removed killed" in cleaned
    assert "No training jobs registered" in run_lmforge("control", "list", check=True).stdout


def test_unknown_job_is_an_error(control_dir, run_lmforge):
    result = run_lmforge("control", "status", "nosuchjob")
    assert result.returncode == 2
    assert "error: no training job 'nosuchjob'" in result.stderr
    assert "Traceback" not in result.stderr


def test_abort_kills_job_stuck_in_step(start_job, run_lmforge, control_dir):
    proc, _ = start_job("stuck", step_seconds=600)
    result = run_lmforge("control", "abort", "--force", "--grace", "1", "stuck", check=True)
    assert "killed pid" in result.stdout
    assert proc.wait(timeout=30) == -9
    assert list(control_dir.iterdir()) == []
