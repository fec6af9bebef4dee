"""The config commands through the real `lmforge` console script, on tests/fixtures/sample_project."""

from __future__ import annotations

import shutil


def test_pp_shows_chain_and_yaml(run_lmforge, sample_project):
    result = run_lmforge("-p", sample_project, "-t", "small.yaml", "pp", check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "# config: small.yaml"
    assert lines[1] == (
        "# template chain: configs/small.yaml -> templates/base.yaml -> configs/small.yaml#trainer.custom"
        " -> templates/trainer.yaml"
    )
    assert "total_steps=250" in lines[2]
    assert "    total_steps: 250" in lines
    assert "        seed: 42" in lines


def test_set_overrides_child(run_lmforge, sample_project):
    result = run_lmforge("-p", sample_project, "--set", "ns.total_tokens=1e4", "--set", "ns.seq_len=25",
                         "pp", check=True)
    lines = result.stdout.splitlines()
    assert "    total_steps: 200" in lines
    assert lines[3] == "# overrides: --set ns.total_tokens=1e4 --set ns.seq_len=25"


def test_targets(run_lmforge, sample_project):
    result = run_lmforge("-p", sample_project, "-t", "small.yaml", "targets", check=True)
    assert result.stdout.split() == ["meta", "trainer"]


def test_trefs_tree(run_lmforge, sample_project):
    result = run_lmforge("-p", sample_project, "-t", "small.yaml", "trefs", check=True)
    assert result.stdout.splitlines() == [
        "configs/small.yaml",
        "├── extends templates/base.yaml",
        "└── include configs/small.yaml#trainer.custom",
        "    └── extends templates/trainer.yaml",
    ]


def test_construct_target(run_lmforge, sample_project):
    result = run_lmforge("-p", sample_project, "-t", "small.yaml", "construct", "--target", "trainer",
                         "--var", "run_dir=/tmp/sample-run", check=True)
    out = result.stdout
    assert "schedule=namespace(total_steps=250, tokens_per_step=20)" in out
    assert "args=namespace(lr=0.1, seed=42)" in out
    assert "run_dir='/tmp/sample-run'" in out
    assert "label_a='a:x'" in out
    assert "label_b='b:x'" in out


def test_ls_lists_configs_and_errors(run_lmforge, sample_project, tmp_path):
    project = shutil.copytree(sample_project, tmp_path / "sample_project")
    result = run_lmforge("ls", cwd=tmp_path, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "sample (sample_project): A small project that the config tests load through the real CLI"
    broken = next(line for line in lines if "experiments/broken.yaml" in line)
    assert "error: config experiments/broken.yaml: ns.total_step is not defined" in broken
    assert "configs/experiments/broken.yaml:5" in broken
    small = next(line for line in lines if "small.yaml" in line)
    assert small.startswith(" *small.yaml")
    assert small.endswith("Small run: 5000 tokens, custom trainer arguments.")
    assert project.is_dir()


def test_error_exit_status_and_debug(run_lmforge, sample_project):
    result = run_lmforge("-p", sample_project, "-t", "experiments/broken.yaml", "pp")
    assert result.returncode == 2
    assert result.stderr.startswith("error: config experiments/broken.yaml: ns.total_step is not defined")
    assert "  5 | -- set ns.warmup_steps = ns.total_step // 10" in result.stderr
    assert "chain: configs/experiments/broken.yaml:2 -> templates/base.yaml:7" in result.stderr
    assert "Traceback" not in result.stderr

    debug = run_lmforge("--debug", "-p", sample_project, "-t", "experiments/broken.yaml", "pp")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    assert "UndefinedError" in debug.stderr


def test_misspelled_set_key_cli(run_lmforge, sample_project):
    result = run_lmforge("-p", sample_project, "--set", "ns.seqlen=3", "targets")
    assert result.returncode == 2
    assert "override key ns.seqlen is not used by config small.yaml" in result.stderr
    assert "did you mean ns.seq_len" in result.stderr


def test_ls_missing_project_dir_fails(run_lmforge, tmp_path):
    result = run_lmforge("-p", tmp_path / "nope", "ls")
    assert result.returncode == 2
    assert f"error: -p {tmp_path / 'nope'}: directory not found" in result.stderr
    assert "no projects" not in result.stdout
