"""Summary figures of the hand-written resumed-run log, checked against values computed by hand."""

from __future__ import annotations

import json

import pytest

from lmforge.logs.reader import read_trainer_log
from lmforge.logs.summary import summarize

# Computed by hand from data/resumed_run.json:
EXPECTED = {
    "total_steps": 8,
    "max_steps": 8,
    "tokens": 16384,
    # launch 1: 1000 -> max(1009, 1000 + train_runtime 10) = 1010; launch 2: 2000 -> 2000 + 12 = 2012
    "wall_clock_seconds": 10.0 + 12.0,
    # first record of each launch left out: median of [2000, 4000]
    "steady_tokens_per_second": 3000.0,
    "peak_memory_bytes": 1610612736,
    "effective_batch_size": 16,
    "world_size": 2,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "tokens_per_step": 2048,
    "peak_lr": 2e-4,
    "peak_lr_step": 4,
    # at or after step 4: 2e-4, 2e-4, 5e-5
    "min_lr": 5e-5,
    "min_lr_step": 8,
    "initial_loss": 5.0,
    "initial_loss_step": 2,
    "best_train_loss": 3.0,
    "best_train_loss_step": 6,
    "best_eval_loss": 3.9,
    "best_eval_loss_step": 8,
    "max_grad_norm": 40.0,
    "max_grad_norm_step": 2,
    # (40 + 2 + 1 + 3) / 4
    "avg_grad_norm": 11.5,
    "launches": 2,
    "resumed_from_steps": [4],
    "end_reason": "completed",
    "complete": True,
    "non_finite_losses": 0,
}


def test_summary_matches_hand_computed(model_dir):
    summary = summarize(read_trainer_log(model_dir / "runs" / "first" / "trainer_logs.json"))
    for key, expected in EXPECTED.items():
        assert getattr(summary, key) == expected, key


def test_summary_of_crashed_log(tmp_path, resumed_log_text):
    cut = resumed_log_text.index('"tokens": 12288') + 5
    path = tmp_path / "trainer_logs.json"
    path.write_text(resumed_log_text[:cut])
    summary = summarize(read_trainer_log(path))
    assert summary.complete is False
    assert summary.end_reason == "crashed or killed (no end record)"
    assert summary.total_steps == 4
    assert summary.tokens == 8192
    assert summary.wall_clock_seconds == 10.0
    assert summary.steady_tokens_per_second == 2000.0
    assert summary.best_train_loss == 4.0
    assert len(summary.problems) == 2


def test_non_finite_losses_skipped(tmp_path):
    path = tmp_path / "trainer_logs.json"
    path.write_text(
        '[\n{"global_step": 1, "loss": 2.0, "grad_norm": 1.0},\n'
        '{"global_step": 2, "loss": NaN, "grad_norm": Infinity},\n'
        '{"global_step": 3, "loss": 1.5, "grad_norm": 3.0}\n]'
    )
    summary = summarize(read_trainer_log(path))
    assert summary.best_train_loss == 1.5
    assert summary.max_grad_norm == 3.0
    assert summary.avg_grad_norm == 2.0
    assert summary.non_finite_losses == 1


def test_cli_formats(model_dir, run_lmforge):
    text = run_lmforge("logs", "summary", model_dir, check=True).stdout
    assert "Steady-state tokens/s  3,000" in text
    assert "Peak memory            1.50 GiB" in text
    assert "Max grad norm          40 (step 2)" in text
    assert "Best eval loss         3.9000 (step 8)" in text
    assert "Wall-clock             0m22s (22 s)" in text
    assert "Effective batch size   16 (per-device 4, 2 ranks, accumulation 2)" in text

    markdown = run_lmforge("logs", "summary", "--format", "md", model_dir, check=True).stdout
    assert markdown.startswith("| Metric | first |\n|---|---|\n")
    assert "| Avg grad norm | 11.5 |" in markdown

    (entry,) = json.loads(run_lmforge("logs", "summary", "--format", "json", model_dir, check=True).stdout)
    assert entry["steady_tokens_per_second"] == 3000.0
    assert entry["min_lr"] == pytest.approx(5e-5)


def test_cli_crashed_log_warns(tmp_path, resumed_log_text, run_lmforge):
    run_dir = tmp_path / "runs" / "crashed"
    run_dir.mkdir(parents=True)
    (run_dir / "trainer_logs.json").write_text(resumed_log_text[: resumed_log_text.index('"tokens": 12288')])
    result = run_lmforge("logs", "summary", run_dir, check=True)
    assert "warning:" in result.stderr
    assert "the closing bracket is missing" in result.stderr
    assert "dropped a half-written last record" in result.stderr
    assert "crashed or killed (no end record)" in result.stdout
    assert "note: crashed: dropped a half-written last record" in result.stdout


def test_cli_two_runs_side_by_side(model_dir, tmp_path, resumed_log_text, run_lmforge):
    other = model_dir / "runs" / "second"
    other.mkdir()
    (other / "trainer_logs.json").write_text(resumed_log_text.replace('"loss": 3.0', '"loss": 2.5'))
    text = run_lmforge("logs", "summary", model_dir, check=True).stdout
    header = text.splitlines()[0].split()
    assert header == ["Metric", "first", "second"]
    best = next(line for line in text.splitlines() if line.startswith("Best train loss"))
    assert "3.0000 (step 6)" in best
    assert "2.5000 (step 6)" in best


def test_cli_errors(tmp_path, run_lmforge):
    missing = run_lmforge("logs", "summary", tmp_path / "missing.json")
    assert missing.returncode == 2
    assert "error: log path not found" in missing.stderr

    empty = tmp_path / "trainer_logs.json"
    empty.write_text("")
    result = run_lmforge("logs", "summary", empty)
    assert result.returncode == 2
    assert "is empty" in result.stderr
    assert "Traceback" not in result.stderr

    empty.write_text("[\n")
    result = run_lmforge("logs", "summary", empty)
    assert result.returncode == 2
    assert "contains no records" in result.stderr

    bad_format = run_lmforge("logs", "summary", "--format", "csv", empty)
    assert "invalid --format 'csv'" in bad_format.stderr



def test_cli_quickstart_dir_one_rank(model_dir, run_lmforge):
    """`logs summary DIR` on a quickstart-shaped DIR (DIR/run/runs/NAME) finds the log; one rank is singular."""
    log_file = model_dir / "runs" / "first" / "trainer_logs.json"
    log_file.write_text(log_file.read_text().replace('"world_size": 2', '"world_size": 1'))
    quickstart_dir = model_dir.parent
    text = run_lmforge("logs", "summary", quickstart_dir, check=True).stdout
    assert "(per-device 4, 1 rank, accumulation 2)" in text
    assert "1 ranks" not in text
