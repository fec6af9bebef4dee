"""Token-budget arithmetic as a pure function."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.optim.budget import compute_token_budget

REFERENCE = dict(
    total_tokens=1_000_000_000,
    annealing_tokens=200_000_000,
    warmup_tokens=20_000_000,
    world_size=4,
    per_device_batch_size=4,
    gradient_accumulation_steps=1,
    seq_len=2048,
    packing_efficiency=0.95,
    lr=1e-4,
    base_batch_size=16384,
    min_lr_ratio=0.1,
)


def test_reference_budget_numbers():
    budget = compute_token_budget(**REFERENCE)
    assert budget.tokens_per_step == 31_129  # floor(4 * 4 * 1 * 2048 * 0.95 = 31,129.6)
    assert budget.total_steps == 32_124  # floor(1e9 / 31,129 = 32,124.4)
    assert budget.warmup_steps == 642  # round(2e7 / 31,129 = 642.49)
    assert budget.annealing_steps == 6_425  # round(2e8 / 31,129 = 6,424.9)
    assert budget.decay_start_step == 25_699
    assert budget.peak_lr == pytest.approx(1.378e-4, abs=5e-8)
    assert budget.min_lr == pytest.approx(1.378e-5, abs=5e-9)
    assert budget.min_lr == pytest.approx(0.1 * budget.peak_lr, rel=1e-12)


def test_warmup_fraction_of_total_steps():
    settings = dict(REFERENCE, warmup_tokens=None, warmup_fraction=0.02)
    assert compute_token_budget(**settings).warmup_steps == 642  # round(0.02 * 32,124 = 642.48)


def test_warmup_floor_for_decay_start():
    settings = dict(REFERENCE, total_tokens=100_000_000)  # 3,212 steps, fewer than the 6,425 annealing steps
    budget = compute_token_budget(**settings)
    assert budget.total_steps == 3_212
    assert budget.decay_start_step == budget.warmup_steps == 642


def test_no_token_budget_waits_for_request():
    budget = compute_token_budget(**dict(REFERENCE, total_tokens=None))
    assert budget.total_steps == -1
    assert budget.decay_start_step == -1
    assert budget.warmup_steps == 642


def test_explicit_decay_start_wins():
    assert compute_token_budget(**REFERENCE, decay_start_step=1000).decay_start_step == 1000
    assert compute_token_budget(**REFERENCE, decay_start_step=-1).decay_start_step == -1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seq_len=0), "ns.seq_len must be >= 1, got 0"),
        (dict(world_size=0), "ns.world_size must be >= 1"),
        (dict(packing_efficiency=1.2), "ns.packing_efficiency must be in (0, 1], got 1.2"),
        (dict(base_batch_size=0), "ns.base_batch_size must be > 0"),
    ],
)
def test_invalid_shape_raises(change, message):
    with pytest.raises(LmforgeError) as info:
        compute_token_budget(**dict(REFERENCE, **change))
    assert message in str(info.value)
