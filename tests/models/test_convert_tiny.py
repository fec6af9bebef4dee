"""`lmforge convert` on tiny random Llamas built in the test session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lmforge.errors import LmforgeError
from lmforge.models.convert import ConvertOptions, convert_model
from lmforge.models.tiny import CHATML_TEMPLATE_PATH

PROMPT = "The quick brown fox jumps over the lazy dog. Translate the sentence into German."
CHATML = ["<|im_start|>", "<|im_end|>", "<|pad|>"]


def load_fp32(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        return set(handle.keys())


def test_chatml_tokens_added(tiny_base_dir, tiny_chat_dir):
    chat_dir, report = tiny_chat_dir
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    assert len(base_tokenizer) == 384
    assert len(tokenizer) == 387

    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in CHATML] == [384, 385, 386]
    for token in CHATML:
        assert token in tokenizer.all_special_tokens
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.bos_token == base_tokenizer.bos_token
    assert [change["added"] for change in report.tokens] == [True, True, True]

    # A special token is one token, never split into pieces.
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 384
    assert ids[-1] == 385


def test_chatml_config_and_generation_config(tiny_chat_dir):
    chat_dir, report = tiny_chat_dir
    config = json.loads((chat_dir / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(chat_dir)

    assert config["vocab_size"] == 387
    assert config["eos_token_id"] == 385
    assert config["pad_token_id"] == 386
    assert "auto_map" not in config
    assert "quantization_config" not in config
    assert 385 in generation.eos_token_id
    assert generation.pad_token_id == 386
    assert report.stop_token_ids == [0, 385]


def test_chatml_template_written(tiny_chat_dir):
    chat_dir, _ = tiny_chat_dir
    assert (chat_dir / "chat_template.jinja").read_text() == CHATML_TEMPLATE_PATH.read_text()

    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_logits_match_source(tiny_base_dir, tiny_chat_dir):
    chat_dir, report = tiny_chat_dir
    base_model, base_tokenizer = load_fp32(tiny_base_dir)
    chat_model, chat_tokenizer = load_fp32(chat_dir)
    ids = prompt_ids(base_tokenizer)
    assert torch.equal(ids, prompt_ids(chat_tokenizer))

    with torch.no_grad():
        base_out = base_model(input_ids=ids, labels=ids)
        chat_out = chat_model(input_ids=ids, labels=ids)
    max_abs_diff = (chat_out.logits[..., :384] - base_out.logits).abs().max().item()
    assert max_abs_diff <= 1e-4
    assert abs(chat_out.loss.item() - base_out.loss.item()) <= 1e-3
    assert report.check["max_abs_logit_diff"] <= 1e-4
    assert abs(report.check["loss_after"] - report.check["loss_before"]) <= 1e-3


def test_new_rows_are_mean(tiny_base_dir, tiny_chat_dir):
    chat_dir, _ = tiny_chat_dir
    base_model, _ = load_fp32(tiny_base_dir)
    chat_model, _ = load_fp32(chat_dir)
    base_rows = base_model.get_input_embeddings().weight
    chat_rows = chat_model.get_input_embeddings().weight

    assert chat_rows.shape == (387, base_rows.shape[1])
    assert torch.equal(chat_rows[:384], base_rows)
    expected = base_rows.mean(dim=0).expand(3, -1)
    torch.testing.assert_close(chat_rows[384:], expected, rtol=0, atol=1e-6)


def test_tied_embeddings_stay_tied(tiny_chat_dir):
    chat_dir, report = tiny_chat_dir
    chat_model, _ = load_fp32(chat_dir)
    assert report.embeddings["tied"] is True
    assert chat_model.config.tie_word_embeddings is True
    assert chat_model.get_output_embeddings().weight is chat_model.get_input_embeddings().weight
    assert "lm_head.weight" not in safetensors_keys(chat_dir)


def test_untied_lm_head_rows_are_mean(tiny_untied_base_dir, tmp_path):
    dst = tmp_path / "chat"
    report = convert_model(tiny_untied_base_dir, dst, ConvertOptions(add_tokens="chatml"))
    base_model, _ = load_fp32(tiny_untied_base_dir)
    chat_model, _ = load_fp32(dst)

    assert report.embeddings["tied"] is False
    assert chat_model.get_output_embeddings().weight is not chat_model.get_input_embeddings().weight
    for get in ("get_input_embeddings", "get_output_embeddings"):
        base_rows = getattr(base_model, get)().weight
        chat_rows = getattr(chat_model, get)().weight
        assert chat_rows.shape[0] == 387
        assert torch.equal(chat_rows[:384], base_rows)
        torch.testing.assert_close(chat_rows[384:], base_rows.mean(dim=0).expand(3, -1), rtol=0, atol=1e-6)
    assert report.check["max_abs_logit_diff"] <= 1e-4


def test_convert_twice_is_noop(tiny_chat_dir, tmp_path):
    chat_dir, _ = tiny_chat_dir
    dst = tmp_path / "again"
    report = convert_model(chat_dir, dst, ConvertOptions(add_tokens="chatml"))

    assert report.vocab_size_before == report.vocab_size_after == 387
    assert report.tokens
    assert not any(change["added"] for change in report.tokens)
    assert report.embeddings["old_rows"] == report.embeddings["new_rows"] == 387
    assert json.loads((dst / "tokenizer.json").read_text())["added_tokens"] == json.loads(
        (chat_dir / "tokenizer.json").read_text()
    )["added_tokens"]
    with safe_open(chat_dir / "model.safetensors", framework="pt") as before, safe_open(
        dst / "model.safetensors", framework="pt"
    ) as after:
        assert set(before.keys()) == set(after.keys())
        for key in before.keys():
            assert torch.equal(before.get_tensor(key), after.get_tensor(key)), key


def test_mean_noise_rows_near_mean(tiny_base_dir, tmp_path):
    dst = tmp_path / "noise"
    convert_model(tiny_base_dir, dst, ConvertOptions(add_tokens="chatml", new_token_init="mean_noise", seed=3))
    base_rows = load_fp32(tiny_base_dir)[0].get_input_embeddings().weight
    new_rows = load_fp32(dst)[0].get_input_embeddings().weight[384:]

    deviation = new_rows - base_rows.mean(dim=0)
    assert deviation.abs().max().item() > 0
    # The noise is 1% of each dimension's standard deviation, so 6 sigma bounds it.
    assert (deviation.abs() <= 0.06 * base_rows.std(dim=0)).all()
    assert not torch.equal(new_rows[0], new_rows[1])


def test_random_rows_fail_loss_check(tiny_base_dir, tmp_path):
    dst = tmp_path / "random"
    with pytest.raises(LmforgeError, match="loss on the check text changed") as excinfo:
        convert_model(tiny_base_dir, dst, ConvertOptions(add_tokens="chatml", new_token_init="random"))
    assert "--new-token-init random" in str(excinfo.value)
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_near_uniform_model_fails_loss_check(tmp_path):
    from lmforge.models.tiny import build_tiny_llama

    base = build_tiny_llama(tmp_path / "flat", chat_tokens=False)
    with pytest.raises(LmforgeError, match="near uniform"):
        convert_model(base, tmp_path / "chat", ConvertOptions(add_tokens="chatml"))
    assert not (tmp_path / "chat").exists()

    # 3 tokens added to 384 move a near-uniform loss by about log(387 / 384) = 0.0078.
    report = convert_model(base, tmp_path / "chat", ConvertOptions(add_tokens="chatml", loss_tolerance=0.01))
    assert 0.005 < report.check["loss_after"] - report.check["loss_before"] < 0.01
    assert report.check["loss_after_source_vocab"] == pytest.approx(report.check["loss_before"], abs=1e-6)


def test_token_file_roles(tiny_base_dir, tmp_path):
    token_file = tmp_path / "tokens.yaml"
    token_file.write_text(
        'special_tokens: ["<|user|>", "<|assistant|>", "<|end|>"]\n'
        'eos_token: "<|end|>"\n'
        'pad_token: "<|padding|>"\n'
    )
    dst = tmp_path / "model"
    report = convert_model(tiny_base_dir, dst, ConvertOptions(add_tokens=str(token_file)))
    tokenizer = AutoTokenizer.from_pretrained(dst)
    vocab = tokenizer.get_vocab()

    assert [change["token"] for change in report.tokens] == ["<|user|>", "<|assistant|>", "<|end|>", "<|padding|>"]
    assert all(change["added"] for change in report.tokens)
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.pad_token == "<|padding|>"
    assert len(tokenizer) == 388
    assert report.chat_template is None
    assert vocab["<|end|>"] in GenerationConfig.from_pretrained(dst).eos_token_id


def test_token_file_invalid_key(tiny_base_dir, tmp_path):
    token_file = tmp_path / "tokens.yaml"
    token_file.write_text('special_tokens: ["<|user|>"]\neos: "<|end|>"\n')
    with pytest.raises(LmforgeError, match=r"invalid key 'eos' in token file .*tokens.yaml"):
        convert_model(tiny_base_dir, tmp_path / "model", ConvertOptions(add_tokens=str(token_file)))


def test_dtype_bf16(tiny_base_dir, tmp_path):
    dst = tmp_path / "bf16"
    report = convert_model(tiny_base_dir, dst, ConvertOptions(add_tokens="chatml", dtype="bfloat16"))
    with safe_open(dst / "model.safetensors", framework="pt") as handle:
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert report.check["max_abs_logit_diff"] <= 1e-4


def test_max_length(tiny_base_dir, tmp_path):
    dst = tmp_path / "short"
    convert_model(tiny_base_dir, dst, ConvertOptions(max_length=256))
    assert json.loads((dst / "config.json").read_text())["max_position_embeddings"] == 256
    assert AutoTokenizer.from_pretrained(dst).model_max_length == 256


def test_sharded_output_loads(tiny_chat_dir, tmp_path):
    from lmforge.models import load_model_dir

    chat_dir, _ = tiny_chat_dir
    dst = tmp_path / "sharded"
    convert_model(chat_dir, dst, ConvertOptions(max_shard_size="100KB"))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert not (dst / "model.safetensors").exists()

    model, tokenizer = load_model_dir(dst)
    reference, _ = load_fp32(chat_dir)
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_chat_template_file(tiny_chat_dir, tmp_path):
    chat_dir, _ = tiny_chat_dir
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}")
    dst = tmp_path / "model"
    convert_model(chat_dir, dst, ConvertOptions(chat_template=str(template)))
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "user: Hi<|im_end|>\n"


def test_chat_template_syntax_error(tiny_chat_dir, tmp_path):
    chat_dir, _ = tiny_chat_dir
    template = tmp_path / "broken.jinja"
    template.write_text("line one\n{% for m in messages %}{{ m['content'] }\n")
    with pytest.raises(LmforgeError, match=r"invalid chat template .*broken.jinja:2"):
        convert_model(chat_dir, tmp_path / "model", ConvertOptions(chat_template=str(template)))


def test_force_replaces_destination(tiny_chat_dir, tmp_path):
    chat_dir, _ = tiny_chat_dir
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(LmforgeError, match="destination exists and is not empty"):
        convert_model(chat_dir, dst, ConvertOptions())
    assert (dst / "old.txt").exists()

    convert_model(chat_dir, dst, ConvertOptions(force=True))
    assert not (dst / "old.txt").exists()
    assert (dst / "model.safetensors").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_interrupted_convert_leaves_nothing(tiny_chat_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    chat_dir, _ = tiny_chat_dir
    original_save = PreTrainedTokenizerBase.save_pretrained

    def save_then_interrupt(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        raise KeyboardInterrupt

    # The weights are already written when the interrupt arrives.
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_model(chat_dir, tmp_path / "model", ConvertOptions())
    assert list(tmp_path.iterdir()) == []


def test_convert_copy_keeps_source_intact(tiny_chat_dir, tmp_path):
    chat_dir, _ = tiny_chat_dir
    copy = tmp_path / "copy"
    shutil.copytree(chat_dir, copy)
    with pytest.raises(LmforgeError, match="inside destination"):
        convert_model(copy, copy, ConvertOptions(force=True))
    assert (copy / "model.safetensors").exists()


def test_convert_from_pytorch_bin(tiny_base_dir, tmp_path):
    source = tmp_path / "bin_source"
    shutil.copytree(tiny_base_dir, source)
    base_model, _ = load_fp32(tiny_base_dir)
    (source / "model.safetensors").unlink()
    torch.save(base_model.state_dict(), source / "pytorch_model.bin")

    dst = tmp_path / "converted"
    report = convert_model(source, dst, ConvertOptions(add_tokens="chatml"))
    assert report.check["max_abs_logit_diff"] <= 1e-4
    assert (dst / "model.safetensors").exists()
    assert not (dst / "pytorch_model.bin").exists()
    converted, _ = load_fp32(dst)
    assert torch.equal(converted.get_input_embeddings().weight[:384], base_model.get_input_embeddings().weight)
