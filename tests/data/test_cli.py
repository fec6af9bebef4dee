"""`lmforge dataset` on the dataset project and a training config.

Most tests call the console script's entry point (`lmforge.cli.main.run`) in this
process, which skips the interpreter start-up; the error-format test runs the real
script in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DATASET_PROJECT = ("-p", "configs/datasets/open_orca")


@pytest.fixture
def run_in_process(monkeypatch, capsys):
    """Run `lmforge ARGS...` through `lmforge.cli.main.run` and return (exit code, stdout, stderr)."""
    from lmforge.cli.main import run

    def invoke(*args, cwd):
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["lmforge", *map(str, args)])
        try:
            run()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return invoke


def test_raw_rows_of_train_split(run_in_process, repo_root, orca_jsonl):
    proc = run_in_process(*DATASET_PROJECT, "-t", "openorca-packed.yaml", "dataset", "--source", orca_jsonl,
                          "--target", "train_dataset_split", "-n", "2", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    first_ids = [json.loads(line)["id"] for line in orca_jsonl.read_text().splitlines()[:2]]
    assert proc.stdout.count("=== row ") == 2
    assert f"(id {first_ids[0]})" in proc.stdout
    assert "--- response ---" in proc.stdout


def test_packed_rows_with_labels(run_in_process, repo_root, tiny_llama_dir):
    sample = repo_root / "configs/datasets/open_orca/data/sample.jsonl"
    proc = run_in_process(*DATASET_PROJECT, "-t", "openorca-packed.yaml", "--set", "ns.train_on=assistant",
                       "--set", "ns.chat_template=chatml", "dataset", "--source", sample,
                       "--target", "train_dataset", "-T", tiny_llama_dir, "--max-length", "1024", "-s", "-n", "1",
                       "--labels", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "=== packed row 0:" in out
    assert "----- document 2:" in out
    assert "<|im_start|>assistant" in out
    assert "[masked]  '<|endoftext|><|im_start|>" in out
    assert "<|im_end|>\\n<|im_end|>'" in out  # the trained run ends with the turn close and the EOS
    assert "[trained]" in out


def test_stats_count_skips_and_plot(run_in_process, repo_root, tmp_path, good_row, write_jsonl, tiny_llama_dir):
    rows = [good_row(i) for i in range(30)] + [good_row(99, response=None), b"\xff\xfe not json"]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    plot = tmp_path / "lengths.png"
    proc = run_in_process(*DATASET_PROJECT, "-t", "openorca.yaml", "--set", "ns.validation_fraction=0",
                          "dataset", "--source", path, "--target", "train_dataset", "-T", tiny_llama_dir,
                          "--max-length", "128", "--stats", "--plot", plot, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "rows read: 32" in out
    assert "rows skipped: 2" in out
    assert "  null_response: 1" in out
    assert "  invalid_utf8: 1" in out
    assert "examples: 30" in out
    assert "fill efficiency" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_column_is_one_error_line(run_lmforge, repo_root, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "wrong.jsonl", [{"id": "a", "system_prompt": "", "question": "q"}])
    proc = run_lmforge(*DATASET_PROJECT, "dataset", "--source", path, "--target", "train_dataset_split",
                       cwd=repo_root)
    assert proc.returncode == 2
    first_line = proc.stderr.splitlines()[0]
    assert first_line.startswith("error: ")
    assert f"{path}: missing column(s) response" in first_line
    assert "Traceback" not in proc.stderr


def test_training_config_train_dataset(run_in_process, repo_root, orca_jsonl, tiny_llama_dir):
    proc = run_in_process("-p", "configs/open_orca", "dataset", "--source", orca_jsonl, "--target", "train_dataset",
                          "-T", tiny_llama_dir, "--max-length", "256", "-n", "1", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert "=== packed row 0:" in proc.stdout
    assert "of 256 (" in proc.stdout


def test_tokenized_target_without_tokenizer(run_in_process, repo_root):
    sample = repo_root / "configs/datasets/open_orca/data/sample.jsonl"
    proc = run_in_process(*DATASET_PROJECT, "dataset", "--source", sample, "--target", "train_dataset",
                          cwd=repo_root)
    assert proc.returncode == 2
    assert "error: target 'train_dataset' tokenizes rows, so it needs a tokenizer" in proc.stderr
    assert "hint: pass -T MODEL_DIR" in proc.stderr
