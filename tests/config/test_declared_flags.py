"""Flags that a project declares in meta.yaml and `lmforge train` accepts."""

from __future__ import annotations

import pytest

from lmforge.config import load_project
from lmforge.config.flags import declared_flag_sets
from lmforge.errors import LmforgeError


@pytest.fixture
def open_orca(repo_root):
    return load_project(repo_root / "configs" / "open_orca")


def test_flags_become_namespace_sets(open_orca):
    sets = declared_flag_sets(open_orca, ["--warmup-tokens", "972", "--optimizer=adamw"])
    assert sets == ["ns.warmup_tokens=972", "ns.optimizer=adamw"]


def test_misspelled_flag_names_close_match(open_orca):
    with pytest.raises(LmforgeError) as excinfo:
        declared_flag_sets(open_orca, ["--warmup-tokns", "972"])
    assert "no such option: --warmup-tokns" in str(excinfo.value)
    assert "--warmup-tokens" in excinfo.value.hint


def test_root_option_after_command_explained(open_orca):
    with pytest.raises(LmforgeError) as excinfo:
        declared_flag_sets(open_orca, ["--set", "ns.seq_len=256"])
    assert "no such option: --set" in str(excinfo.value)
    assert "put it before the command" in excinfo.value.hint


def test_flag_without_value_rejected(open_orca):
    with pytest.raises(LmforgeError) as excinfo:
        declared_flag_sets(open_orca, ["--optimizer"])
    assert "needs a value" in str(excinfo.value)


def test_meta_flag_must_name_namespace_key(tmp_path):
    (tmp_path / "meta.yaml").write_text("name: p\nflags:\n  warmup: warmup_tokens\n")
    with pytest.raises(LmforgeError) as excinfo:
        load_project(tmp_path)
    assert "flag 'warmup' maps to 'warmup_tokens'" in str(excinfo.value)


def test_train_flag_overrides_template(run_lmforge, repo_root, tiny_llama_dir, tmp_path):
    project = repo_root / "configs" / "open_orca"
    base = ["-p", project, "-t", "tiny/cpu_test.yaml", "train", "-M", tmp_path / "run", "--model", tiny_llama_dir, "--dry-run"]
    default = run_lmforge(*base, check=True)
    assert "warmup           steps 1-2 (2 steps, 486 tokens)" in default.stdout

    flagged = run_lmforge(*base, "--warmup-tokens", "972", check=True)
    assert "warmup           steps 1-4 (4 steps, 972 tokens)" in flagged.stdout
    assert "--set ns.warmup_tokens=972" in flagged.stdout

    wrong = run_lmforge(*base, "--warmup-tokns", "972")
    assert wrong.returncode == 2
    assert "error: no such option: --warmup-tokns" in wrong.stderr
    assert "Traceback" not in wrong.stderr
