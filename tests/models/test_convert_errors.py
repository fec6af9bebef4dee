"""`lmforge convert` input errors: one `error:` line from the real console script, exit status 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest


def assert_one_line_error(proc, expected: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, proc.stderr
    assert expected in error_lines[0]
    return error_lines[0]


def test_source_missing(run_lmforge, tmp_path):
    proc = run_lmforge("convert", tmp_path / "missing", tmp_path / "out")
    line = assert_one_line_error(proc, "source not found")
    assert str(tmp_path / "missing") in line
    assert not (tmp_path / "out").exists()


def test_source_not_a_model(run_lmforge, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    proc = run_lmforge("convert", notes, tmp_path / "out")
    assert_one_line_error(proc, f"not a model directory: {notes} has no config.json")

    text_file = tmp_path / "weights.bin"
    text_file.write_text("hello")
    proc = run_lmforge("convert", text_file, tmp_path / "out")
    assert_one_line_error(proc, "is a file without the GGUF header")


def test_source_unsupported_architecture(run_lmforge, tiny_llama_dir, tmp_path):
    source = tmp_path / "vit"
    shutil.copytree(tiny_llama_dir, source)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "vit"
    (source / "config.json").write_text(json.dumps(config))
    proc = run_lmforge("convert", source, tmp_path / "out")
    assert_one_line_error(proc, "unsupported architecture")


def test_gguf_unsupported_architecture(run_lmforge, tmp_path):
    import gguf

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = run_lmforge("convert", path, tmp_path / "out")
    line = assert_one_line_error(proc, "unsupported architecture in GGUF file")
    assert "bert" in line
    assert "hint: " in proc.stderr
    assert "llama" in proc.stderr


def test_tokenizer_missing(run_lmforge, tiny_llama_dir, tmp_path):
    source = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_llama_dir, source)
    (source / "tokenizer.json").unlink()
    proc = run_lmforge("convert", source, tmp_path / "out")
    assert_one_line_error(proc, f"tokenizer missing in {source}")


def test_destination_exists(run_lmforge, tiny_llama_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("keep")
    proc = run_lmforge("convert", tiny_llama_dir, dst)
    assert_one_line_error(proc, f"destination exists and is not empty: {dst}")
    assert "--force" in proc.stderr
    assert sorted(path.name for path in dst.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--add-tokens", "chatlm"], "invalid --add-tokens value 'chatlm'"),
        (["--new-token-init", "zeros", "--add-tokens", "chatml"], "invalid --new-token-init 'zeros'"),
        (["--dtype", "int4"], "invalid dtype 'int4'"),
        (["--max-length", "0"], "invalid --max-length 0"),
    ],
)
def test_invalid_option(run_lmforge, tiny_llama_dir, tmp_path, args, expected):
    proc = run_lmforge("convert", tiny_llama_dir, tmp_path / "out", *args)
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "out").exists()
