"""WSDScheduler: LRs against the closed form, start-annealing, and save/resume."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.optim import build_optimizer
from lmforge.optim.wsd import WSDScheduler

PEAK = 2e-3
MIN_RATIO = 0.1


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))


def make_run(model: torch.nn.Module, optimizer_name: str = "adamw", **schedule):
    optimizer = build_optimizer(model.named_parameters(), name=optimizer_name, lr=PEAK, weight_decay=0.01)
    settings = dict(warmup_steps=4, max_steps=10, decay_start_step=6, annealing_steps=4, min_lr_ratio=MIN_RATIO)
    settings.update(schedule)
    return optimizer, WSDScheduler(optimizer, **settings)


def train_steps(model, optimizer, scheduler, steps: int, on_step=None) -> list[float]:
    """Run `steps` optimizer steps on a fixed regression batch; return the LR each step used."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 4, generator=generator)
    targets = torch.randn(8, 1, generator=generator)
    used = []
    for _ in range(steps):
        if on_step is not None:
            on_step(scheduler)
        lrs = {group["lr"] for group in optimizer.param_groups}
        assert len(lrs) == 1, "both parameter groups must share the LR"
        used.append(lrs.pop())
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return used


def harmonic(t: int, annealing: int) -> float:
    """Return the harmonic decay LR: peak / (1 + (peak/min - 1) * t / A)."""
    min_lr = PEAK * MIN_RATIO
    return PEAK / (1 + (PEAK / min_lr - 1) * t / annealing)


def test_warmup_stable_decay_closed_form():
    model = make_model()
    optimizer, scheduler = make_run(model)
    used = train_steps(model, optimizer, scheduler, 10)
    expected = [PEAK * 1 / 4, PEAK * 2 / 4, PEAK * 3 / 4, PEAK, PEAK, PEAK] + [harmonic(t, 4) for t in (1, 2, 3, 4)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[0] > 0
    assert used[-1] == pytest.approx(PEAK * MIN_RATIO, rel=1e-12)
    assert scheduler.get_last_lr()[0] == pytest.approx(PEAK * MIN_RATIO, rel=1e-12)


def test_decay_starting_at_warmup_end():
    model = make_model()
    optimizer, scheduler = make_run(model, decay_start_step=4, max_steps=8)
    used = train_steps(model, optimizer, scheduler, 8)
    expected = [PEAK * n / 4 for n in (1, 2, 3, 4)] + [harmonic(t, 4) for t in (1, 2, 3, 4)]
    assert used == pytest.approx(expected, rel=1e-12)


def test_lr_stays_at_min_after_decay():
    model = make_model()
    optimizer, scheduler = make_run(model, decay_start_step=4, max_steps=-1)
    used = train_steps(model, optimizer, scheduler, 12)
    assert used[8:] == pytest.approx([PEAK * MIN_RATIO] * 4, rel=1e-12)


def test_manual_trigger_starts_decay():
    model = make_model()
    optimizer, scheduler = make_run(model, decay_start_step=-1, max_steps=-1)

    def trigger_after_seven(sched):
        if sched.last_epoch == 7:
            assert sched.start_annealing() is True

    used = train_steps(model, optimizer, scheduler, 12, on_step=trigger_after_seven)
    expected = [PEAK * n / 4 for n in (1, 2, 3, 4)] + [PEAK] * 3 + [harmonic(t, 4) for t in (1, 2, 3, 4)]
    expected.append(PEAK * MIN_RATIO)
    assert used == pytest.approx(expected, rel=1e-12)
    assert scheduler.triggered_decay_start_step == 7


def test_manual_trigger_waits_without_request():
    model = make_model()
    optimizer, scheduler = make_run(model, decay_start_step=-1, max_steps=-1)
    used = train_steps(model, optimizer, scheduler, 20)
    assert used[3:] == [PEAK] * 17


def test_trigger_inside_warmup_moves_to_warmup_end(caplog):
    model = make_model()
    optimizer, scheduler = make_run(model, decay_start_step=-1, max_steps=-1)
    with caplog.at_level(logging.WARNING, logger="lmforge.optim.wsd"):
        scheduler.start_annealing()
    assert scheduler.triggered_decay_start_step == 4
    assert "inside the warmup" in caplog.text
    used = train_steps(model, optimizer, scheduler, 8)
    assert used == pytest.approx([PEAK * n / 4 for n in (1, 2, 3, 4)] + [harmonic(t, 4) for t in (1, 2, 3, 4)])


def test_trigger_with_configured_start_warns(caplog):
    model = make_model()
    optimizer, scheduler = make_run(model)
    with caplog.at_level(logging.WARNING, logger="lmforge.optim.wsd"):
        assert scheduler.start_annealing() is False
    assert "has no effect" in caplog.text
    assert "decay_start_step=6" in caplog.text
    assert scheduler.triggered_decay_start_step is None


@pytest.mark.parametrize(
    "shape, formula",
    [
        ("linear", lambda p: PEAK - (PEAK - PEAK * MIN_RATIO) * p),
        ("cosine", lambda p: PEAK * MIN_RATIO + (PEAK - PEAK * MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * p))),
        ("1-sqrt", lambda p: PEAK * MIN_RATIO + (PEAK - PEAK * MIN_RATIO) * (1 - math.sqrt(p))),
    ],
)
def test_other_decay_shapes(shape, formula):
    model = make_model()
    optimizer, scheduler = make_run(model, decay_shape=shape)
    used = train_steps(model, optimizer, scheduler, 10)
    assert used[6:] == pytest.approx([formula(t / 4) for t in (1, 2, 3, 4)], rel=1e-12)
    assert used[-1] == pytest.approx(PEAK * MIN_RATIO, rel=1e-12)


def test_absolute_min_lr():
    model = make_model()
    optimizer, scheduler = make_run(model, min_lr=PEAK * 0.25, min_lr_ratio=None, decay_shape="linear")
    used = train_steps(model, optimizer, scheduler, 10)
    assert used[-1] == pytest.approx(PEAK * 0.25, rel=1e-12)


def test_decay_longer_than_run_is_shortened(caplog):
    model = make_model()
    with caplog.at_level(logging.WARNING, logger="lmforge.optim.wsd"):
        optimizer, scheduler = make_run(model, decay_start_step=6, annealing_steps=8, max_steps=10)
    assert scheduler.annealing_steps == 4
    assert "after max_steps 10" in caplog.text
    used = train_steps(model, optimizer, scheduler, 10)
    assert used[-1] == pytest.approx(PEAK * MIN_RATIO, rel=1e-12)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(min_lr_ratio=None), "exactly one of min_lr"),
        (dict(min_lr=1e-5), "exactly one of min_lr"),
        (dict(min_lr_ratio=0.0), "harmonic decay needs min_lr > 0"),
        (dict(min_lr_ratio=1.5), "outside"),
        (dict(decay_shape="exp"), "unknown decay_shape 'exp'"),
        (dict(decay_start_step=-2), "decay_start_step must be -1"),
        (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    ],
)
def test_invalid_settings_raise(settings, message):
    with pytest.raises(LmforgeError, match=message):
        make_run(make_model(), **settings)


def save_and_restore(model, optimizer, scheduler, **schedule):
    """Round-trip model, optimizer and scheduler state through bytes into fresh objects."""
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    new_model = make_model()
    new_model.load_state_dict(saved["model"])
    new_optimizer, new_scheduler = make_run(new_model, **schedule)
    new_optimizer.load_state_dict(saved["optimizer"])
    new_scheduler.load_state_dict(saved["scheduler"])
    return new_model, new_optimizer, new_scheduler


@pytest.mark.parametrize("optimizer_name", ["adamw", "adafactor"])
@pytest.mark.parametrize("stop_after", [3, 6, 8])  # inside warmup, at the decay start, inside the decay
def test_resume_is_bit_identical(stop_after, optimizer_name):
    model = make_model()
    optimizer, scheduler = make_run(model, optimizer_name)
    straight = train_steps(model, optimizer, scheduler, 10)
    straight_weights = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    optimizer, scheduler = make_run(model, optimizer_name)
    first = train_steps(model, optimizer, scheduler, stop_after)
    model, optimizer, scheduler = save_and_restore(model, optimizer, scheduler, optimizer_name=optimizer_name)
    second = train_steps(model, optimizer, scheduler, 10 - stop_after)

    assert first + second == straight
    for resumed, reference in zip(model.parameters(), straight_weights):
        assert torch.equal(resumed.detach(), reference)


def test_resume_keeps_triggered_decay():
    def trigger_after_five(sched):
        if sched.last_epoch == 5 and sched.triggered_decay_start_step is None:
            sched.start_annealing()

    model = make_model()
    optimizer, scheduler = make_run(model, decay_start_step=-1, max_steps=-1)
    straight = train_steps(model, optimizer, scheduler, 11, on_step=trigger_after_five)

    model = make_model()
    optimizer, scheduler = make_run(model, decay_start_step=-1, max_steps=-1)
    first = train_steps(model, optimizer, scheduler, 7, on_step=trigger_after_five)
    model, optimizer, scheduler = save_and_restore(model, optimizer, scheduler, decay_start_step=-1, max_steps=-1)
    assert scheduler.state_dict()["triggered_decay_start_step"] == 5
    second = train_steps(model, optimizer, scheduler, 4)
    assert first + second == straight
    assert straight[5:9] == pytest.approx([harmonic(t, 4) for t in (1, 2, 3, 4)], rel=1e-12)


def test_edited_decay_start_applies_after_resume():
    model = make_model()
    optimizer, scheduler = make_run(model, decay_start_step=8, max_steps=12)
    first = train_steps(model, optimizer, scheduler, 5)
    assert first == pytest.approx([PEAK * n / 4 for n in (1, 2, 3, 4)] + [PEAK])

    # The resumed run's config moves the decay start from 8 to 6.
    model, optimizer, scheduler = save_and_restore(model, optimizer, scheduler, decay_start_step=6, max_steps=12)
    assert scheduler.decay_start_step == 6
    second = train_steps(model, optimizer, scheduler, 7)
    expected = [PEAK] + [harmonic(t, 4) for t in (1, 2, 3, 4)] + [PEAK * MIN_RATIO] * 2
    assert second == pytest.approx(expected, rel=1e-12)


def test_resume_uses_config_peak_lr_not_checkpoint_lr():
    model = make_model()
    optimizer, scheduler = make_run(model)
    train_steps(model, optimizer, scheduler, 5)
    assert optimizer.param_groups[0]["lr"] == PEAK

    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    new_optimizer = build_optimizer(model.named_parameters(), name="adamw", lr=PEAK / 2)
    new_scheduler = WSDScheduler(
        new_optimizer, warmup_steps=4, max_steps=10, decay_start_step=6, annealing_steps=4, min_lr_ratio=MIN_RATIO
    )
    new_optimizer.load_state_dict(saved["optimizer"])
    assert new_optimizer.param_groups[0]["lr"] == PEAK  # the optimizer state carries the saved run's LR
    new_scheduler.load_state_dict(saved["scheduler"])
    assert new_optimizer.param_groups[0]["lr"] == PEAK / 2


def test_state_dict_holds_only_progress():
    model = make_model()
    optimizer, scheduler = make_run(model)
    train_steps(model, optimizer, scheduler, 3)
    assert scheduler.state_dict() == {"last_epoch": 3, "_step_count": 4, "triggered_decay_start_step": None}
