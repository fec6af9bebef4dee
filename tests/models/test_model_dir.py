"""Detection and loading of model directories, and their one-line errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models import is_model_dir, load_model_dir


def test_load_model_dir_tiny(tiny_llama_dir):
    model, tokenizer = load_model_dir(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size
    assert not model.training


def test_load_model_dir_bf16(tiny_llama_dir):
    model, _ = load_model_dir(tiny_llama_dir, dtype="bf16")
    assert model.dtype == torch.bfloat16


def test_is_model_dir(tiny_llama_dir, tmp_path):
    assert is_model_dir(tiny_llama_dir)
    assert not is_model_dir(tmp_path)
    assert not is_model_dir(tmp_path / "missing")
    assert not is_model_dir(tiny_llama_dir / "config.json")


def test_load_missing_dir(tmp_path):
    with pytest.raises(LmforgeError, match="model directory not found"):
        load_model_dir(tmp_path / "missing")


def test_load_not_model_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LmforgeError, match="has no config.json"):
        load_model_dir(tmp_path)


def test_load_config_without_weights(tiny_llama_dir, tmp_path):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(LmforgeError, match="no weights"):
        load_model_dir(tmp_path)


def test_load_tokenizer_missing(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(LmforgeError, match="tokenizer missing"):
        load_model_dir(model_dir)


def test_load_invalid_dtype(tiny_llama_dir):
    with pytest.raises(LmforgeError, match="invalid dtype 'int7'"):
        load_model_dir(tiny_llama_dir, dtype="int7")


def test_load_rejects_remote_code(tiny_llama_dir, tmp_path):
    import json

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match="auto_map"):
        load_model_dir(model_dir)


def test_load_unsupported_architecture(tiny_llama_dir, tmp_path):
    import json

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "vit"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match="model_type 'vit'"):
        load_model_dir(model_dir)


def test_load_dir_with_only_gguf(tmp_path):
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(LmforgeError, match="contains model.Q4_0.gguf") as excinfo:
        load_model_dir(tmp_path)
    assert "lmforge convert" in excinfo.value.hint
