"""build_optimizer: optimizer choice, no-decay parameter groups, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.errors import LmforgeError
from lmforge.optim import build_optimizer


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def group_names(optimizer) -> list[list[str]]:
    return [group["param_names"] for group in optimizer.param_groups]


def test_adafactor_is_default(llama):
    optimizer = build_optimizer(llama.named_parameters(), lr=1e-3)
    assert type(optimizer) is torch.optim.Adafactor
    assert all(group["lr"] == 1e-3 for group in optimizer.param_groups)


def test_adamw_takes_extra_options(llama):
    optimizer = build_optimizer(llama.named_parameters(), name="AdamW", lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert optimizer.param_groups[0]["eps"] == 1e-6


def test_norms_biases_embeddings_skip_decay(llama):
    optimizer = build_optimizer(llama.named_parameters(), name="adafactor", lr=1e-3, weight_decay=0.1)
    decay, plain = optimizer.param_groups
    assert decay["weight_decay"] == 0.1
    assert plain["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in plain["param_names"]
    assert "model.norm.weight" in plain["param_names"]
    assert "model.layers.0.input_layernorm.weight" in plain["param_names"]
    assert "model.layers.1.post_attention_layernorm.weight" in plain["param_names"]
    assert "model.layers.0.self_attn.q_proj.weight" in decay["param_names"]
    assert "lm_head.weight" in decay["param_names"]
    all_names = {name for name, _ in llama.named_parameters()}
    assert set(decay["param_names"]) | set(plain["param_names"]) == all_names
    assert not set(decay["param_names"]) & set(plain["param_names"])


def test_empty_no_decay_decays_everything(llama):
    optimizer = build_optimizer(llama.named_parameters(), lr=1e-3, weight_decay=0.1, no_decay=())
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


def test_frozen_parameters_are_left_out(llama):
    llama.model.embed_tokens.weight.requires_grad_(False)
    try:
        optimizer = build_optimizer(llama.named_parameters(), lr=1e-3)
    finally:
        llama.model.embed_tokens.weight.requires_grad_(True)
    names = [name for names in group_names(optimizer) for name in names]
    assert "model.embed_tokens.weight" not in names
    assert "model.norm.weight" in names


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_weight_decay_changes_only_decay_group(name):
    """With zero gradients, decoupled weight decay alone moves the parameters."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model.named_parameters(), name=name, lr=0.5, weight_decay=0.2)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()

    after = dict(model.named_parameters())
    assert torch.allclose(after["proj.weight"], before["proj.weight"] * (1 - 0.5 * 0.2))
    assert torch.equal(after["proj.bias"], before["proj.bias"])
    assert torch.equal(after["norm.weight"], before["norm.weight"])
    assert torch.equal(after["norm.bias"], before["norm.bias"])


def test_adafactor_trains_llama(llama):
    optimizer = build_optimizer(llama.named_parameters(), lr=1e-2)
    input_ids = torch.arange(32).reshape(2, 16) % 64
    losses = []
    for _ in range(3):
        loss = llama(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="adafactr"), "unknown optimizer name 'adafactr'\nhint: did you mean adafactor"),
        (dict(name="sgd"), "hint: use one of: adafactor, adamw"),
        (dict(lr=0.0), "optimizer lr must be > 0, got 0.0"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(name="adamw", beta2_decay=-0.8), "invalid option for AdamW"),
    ],
)
def test_invalid_arguments_raise(llama, kwargs, message):
    with pytest.raises(LmforgeError) as info:
        build_optimizer(llama.named_parameters(), **{"lr": 1e-3, **kwargs})
    assert message in str(info.value)


def test_adamw_fused_by_default():
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model.named_parameters(), name="adamw", lr=1e-3)
    assert optimizer.defaults["fused"] is True

    unfused = build_optimizer(model.named_parameters(), name="adamw", lr=1e-3, foreach=False)
    assert not unfused.defaults.get("fused")


def test_fused_adamw_matches_unfused_step():
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 8)
    fused_model = torch.nn.Linear(8, 8)
    fused_model.load_state_dict(reference.state_dict())
    unfused = build_optimizer(reference.named_parameters(), name="adamw", lr=1e-2, foreach=False)
    fused = build_optimizer(fused_model.named_parameters(), name="adamw", lr=1e-2)
    batch = torch.randn(16, 8)
    for model, optimizer in ((reference, unfused), (fused_model, fused)):
        for _ in range(3):
            optimizer.zero_grad()
            model(batch).pow(2).mean().backward()
            optimizer.step()
    for expected, actual in zip(reference.parameters(), fused_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
