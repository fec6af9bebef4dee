"""Run-plan formatting and the train-flag table."""

from __future__ import annotations

import pytest

from lmforge.optim.budget import compute_token_budget
from lmforge.optim.plan import TRAIN_FLAG_HELP, TRAIN_FLAG_TO_NS, format_plan, train_flag_sets

from .test_budget import REFERENCE


def reference_namespace(**changes) -> dict:
    inputs = dict(REFERENCE)
    inputs.update(changes)
    budget = compute_token_budget(**inputs)
    namespace = dict(inputs, **budget.as_dict())
    namespace.update(max_steps=budget.total_steps, backend="ddp", device_type="cuda", decay_shape="harmonic")
    return namespace


def test_plan_shows_reference_numbers():
    text = format_plan(reference_namespace(), title="llama3_1b/4gpu_ddp.yaml")
    assert text.splitlines()[0] == "Run plan for llama3_1b/4gpu_ddp.yaml"
    assert "tokens_per_step  31,129 (estimate)" in text
    assert "1,000,000,000 tokens -> total_steps 32,124" in text
    assert "max_steps        32,124, about 999,987,996 tokens" in text
    assert "warmup           steps 1-642 (642 steps, 19,984,818 tokens)" in text
    assert "stable           steps 643-25,699" in text
    assert "harmonic, steps 25,700-32,124 (6,425 steps, decay_start_step 25,699)" in text
    assert "peak 1.378e-04 (lr 1.000e-04 x sqrt(tokens_per_step / 16,384))" in text
    assert "min 1.378e-05 (0.1 x peak)" in text


def test_plan_without_budget_waits_for_request():
    namespace = reference_namespace(total_tokens=None)
    text = format_plan(namespace)
    assert "none (total_tokens not set)" in text
    assert "-1 (one epoch of the training data)" in text
    assert "until a start-annealing request" in text


def test_plan_notes_decay_after_max_steps():
    namespace = reference_namespace()
    namespace["max_steps"] = 30
    assert "not reached, the run stops at max_steps 30" in format_plan(namespace)


def test_plan_tolerates_missing_keys():
    text = format_plan({"seq_len": 512})
    assert "seq_len 512" in text
    assert "tokens_per_step  - (estimate)" in text


def test_train_flags_map_to_namespace():
    sets = train_flag_sets(
        {
            "--total-tokens": 2e8,
            "annealing_tokens": 4e7,
            "--lr": 3e-4,
            "--batch-size": 8,
            "--start-annealing": True,
            "--max-steps": None,
            "--decay-start-step": -1,
        }
    )
    assert sets == [
        "ns.total_tokens=200000000",
        "ns.annealing_tokens=40000000",
        "ns.lr=0.0003",
        "ns.per_device_batch_size=8",
        "ns.start_annealing=true",
        "ns.decay_start_step=-1",
    ]


def test_train_flag_tables_match():
    assert set(TRAIN_FLAG_HELP) == set(TRAIN_FLAG_TO_NS)
    with pytest.raises(KeyError, match="--epochs"):
        train_flag_sets({"--epochs": 2})


def test_plan_start_annealing_lines():
    manual = reference_namespace(decay_start_step=-1)
    manual["start_annealing"] = True
    assert "start-annealing  requested for the first step of this run" in format_plan(manual)

    configured = reference_namespace()
    configured["start_annealing"] = True
    assert "has no effect: decay_start_step is 25,699" in format_plan(configured)
