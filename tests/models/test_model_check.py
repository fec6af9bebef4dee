"""`lmforge model check DIR` on converted tiny models."""

from __future__ import annotations

import json
import shutil

from lmforge.models.model_check import check_model


def test_check_converted_passes(tiny_base_dir, tiny_chat_dir):
    chat_dir, _ = tiny_chat_dir
    report = check_model(chat_dir)
    assert report.ok, report.problems
    assert f"matches {tiny_base_dir}: max abs logit diff 0, " in " ".join(report.passed)
    assert "generation_config eos_token_id contains <|im_end|> (id 385)" in report.passed
    assert "input and output embeddings are tied" in report.passed
    assert report.facts["stop_token_ids"] == [0, 385]
    assert report.facts["max_abs_logit_diff"] == 0.0


def test_check_missing_turn_end_eos(run_lmforge, tiny_base_dir, tiny_chat_dir, tmp_path):
    chat_dir, _ = tiny_chat_dir
    model_dir = tmp_path / "model"
    shutil.copytree(chat_dir, model_dir)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = 0
    (model_dir / "generation_config.json").write_text(json.dumps(generation))

    report = check_model(model_dir)
    assert not report.ok
    assert len(report.problems) == 1
    assert "lacks the turn-closing token <|im_end|> (id 385)" in report.problems[0]

    proc = run_lmforge("model", "check", model_dir)
    assert proc.returncode == 2
    assert "error: model check failed" in proc.stderr
    assert "problem: generation_config.json eos_token_id [0]" in proc.stdout
    assert f"ok: matches {tiny_base_dir}: max abs logit diff 0" in proc.stdout


def test_check_against_other_source(tiny_chat_dir, tiny_untied_base_dir):
    chat_dir, _ = tiny_chat_dir
    report = check_model(chat_dir, source=tiny_untied_base_dir)
    assert not report.ok
    assert any(problem.startswith("logits differ from the source") for problem in report.problems)
    assert report.facts["max_abs_logit_diff"] > 1e-4


def test_check_pad_equal_eos_is_note(tiny_chat_dir, tmp_path):
    chat_dir, _ = tiny_chat_dir
    model_dir = tmp_path / "model"
    shutil.copytree(chat_dir, model_dir)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["pad_token"] = "<|im_end|>"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    report = check_model(model_dir, source=None)
    assert report.ok, report.problems
    assert any("pad token '<|im_end|>' is an EOS token" in note for note in report.notes)
