"""The chunked cross-entropy's loss and gradients against full logits and F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.train.loss import summed_token_loss


def _case(bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(16, 50, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=generator) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(50, generator=generator))
    hidden = torch.randn(3, 11, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=generator)
    labels[0, :4] = -100  # untrained positions
    labels[2, 7:] = -100
    return head, hidden, labels


def _reference(head, hidden, labels):
    logits = head(hidden).float()
    return F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), reduction="sum")


def _grads(loss, head, hidden):
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("chunk_size", [0, 5, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_loss_and_grads_match_full_logits(chunk_size, bias):
    head, hidden, labels = _case(bias)
    expected = _reference(head, hidden, labels)
    expected_grads = _grads(expected * 0.5, head, hidden)

    loss = summed_token_loss(hidden, head, labels, chunk_size)
    grads = _grads(loss * 0.5, head, hidden)  # the backward pass scales by the incoming gradient

    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(grads[0][0, :4].abs().sum()) == 0.0  # untrained positions get no gradient


def test_bf16_autocast_matches_autocast_reference():
    head, hidden, labels = _case(bias=False, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(head, hidden, labels)
        loss = summed_token_loss(hidden, head, labels, chunk_size=6)
    expected_grads = _grads(expected, head, hidden)
    grads = _grads(loss, head, hidden)

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_no_grad_returns_the_same_loss():
    head, hidden, labels = _case(bias=True, seed=2)
    with torch.no_grad():
        loss = summed_token_loss(hidden, head, labels, chunk_size=5)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _reference(head, hidden, labels).detach(), rtol=1e-6, atol=1e-5)
