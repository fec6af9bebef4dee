"""Warmup-stable-decay (WSD) learning-rate schedule.

A WSD schedule keeps the learning rate at its peak for most of a run and spends
a fixed window at the end decaying it. Unlike cosine, the decay start does not
depend on the run length, so a run can be extended or cut short and only the
final decay window has to move.

`WSDScheduler` computes every LR in closed form from the step counter, so a
resumed run follows exactly the LRs of an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

DECAY_SHAPES = ("harmonic", "linear", "cosine", "1-sqrt")


def decay_factor(progress: float, min_lr_ratio: float, shape: str) -> float:
    """Return the LR as a fraction of peak after `progress` (0..1) of the decay window.

    With r = min_lr_ratio, every shape goes from 1 at progress 0 to r at progress 1:
    - harmonic: 1 / (1 + (1/r - 1) * progress)
    - linear:   1 - (1 - r) * progress
    - cosine:   r + (1 - r) * (1 + cos(pi * progress)) / 2
    - 1-sqrt:   r + (1 - r) * (1 - sqrt(progress))
    """
    if shape == "harmonic":
        return 1.0 / (1.0 + (1.0 / min_lr_ratio - 1.0) * progress)
    if shape == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if shape == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - math.sqrt(progress))
    raise LmforgeError(
        f"unknown decay_shape {shape!r}",
        hint=f"use one of: {', '.join(DECAY_SHAPES)}",
    )


def warmup_stable_decay_factor(
    step: int,
    *,
    warmup_steps: int,
    decay_start_step: int | None,
    annealing_steps: int,
    min_lr_ratio: float,
    decay_shape: str = "harmonic",
) -> float:
    """Return the LR, as a fraction of peak, for the optimizer step that makes `global_step == step`.

    Steps count from 1, so the first optimizer step uses `warmup_stable_decay_factor(1, ...)`.
    - warmup (step <= warmup_steps): step / warmup_steps, so step 1 already trains.
    - stable (warmup_steps < step <= decay_start_step, or decay not started): 1.
    - decay (step > decay_start_step): `decay_factor(t / annealing_steps)` with
      t = step - decay_start_step, reaching min_lr_ratio at
      step = decay_start_step + annealing_steps and staying there.
    `decay_start_step=None` means the decay has not started.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if decay_start_step is None or step <= decay_start_step:
        return 1.0
    if annealing_steps <= 0:
        return min_lr_ratio
    progress = min(1.0, (step - decay_start_step) / annealing_steps)
    return decay_factor(progress, min_lr_ratio, decay_shape)


class WSDScheduler(LRScheduler):
    """Linear warmup, a stable phase at the peak LR, then a decay to `min_lr` over `annealing_steps`.

    The peak LR of each parameter group is the group's `lr` when the scheduler is built.
    The LR for the optimizer step that makes `global_step == n` (n counts from 1) is::

        warmup   n <= W:            peak * n / W
        stable   W < n <= D:        peak
        decay    D < n <= D + A:    peak / (1 + (peak/min_lr - 1) * (n - D) / A)   (harmonic)
        after    n > D + A:         min_lr

    with W = warmup_steps, D = the decay start and A = annealing_steps. For example,
    W=4, D=6, A=4 (max_steps 10), peak 1.0, min_lr 0.1 gives the LRs of steps 1..10::

        0.25 0.5 0.75 1.0 | 1.0 1.0 | 0.3077 0.1818 0.1290 0.1

    `decay_shape` selects `harmonic` (above), `linear`, `cosine` or `1-sqrt`; all of them
    go from peak at n = D to min_lr at n = D + A.

    The decay start D is `decay_start_step` when it is 0 or more. With `decay_start_step=-1`
    the stable phase lasts until `start_annealing()` is called (by `train --start-annealing`
    or a control request), and D is the global step at that call, or the end of the
    warmup when the call comes earlier.

    Checkpoint behaviour: `state_dict()` holds only the step counter (`last_epoch`, the
    number of completed optimizer steps), `_step_count`, and the triggered decay start
    (`triggered_decay_start_step`, None until `start_annealing()` took effect). Everything
    else comes from the constructor, that is from the current config: warmup_steps,
    max_steps, decay_start_step, annealing_steps, min_lr, decay_shape and the peak LR.
    So a run resumed with an edited `decay_start_step` follows the new value.
    `load_state_dict()` then writes the closed-form LR for the restored step into the
    optimizer's param groups. Load the optimizer's state first and the scheduler's
    state after it, because `Optimizer.load_state_dict` restores the LRs of the saved run.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup_steps: int,
        max_steps: int = -1,
        decay_start_step: int = -1,
        annealing_steps: int,
        min_lr: float | None = None,
        min_lr_ratio: float | None = None,
        decay_shape: str = "harmonic",
    ) -> None:
        """Build the schedule; see the class docstring.

        Args:
            warmup_steps: optimizer steps of linear warmup; 0 starts at the peak LR.
            max_steps: planned optimizer steps of the run; -1 when unknown (epoch-based).
                A decay window that would end after `max_steps` is shortened to end
                there, with a warning.
            decay_start_step: global step after which the decay begins; -1 waits for
                `start_annealing()`.
            annealing_steps: optimizer steps from the decay start to `min_lr`.
            min_lr: LR at the end of the decay, in absolute units, for the group with the
                largest peak LR (other groups keep the same ratio). Give this or `min_lr_ratio`.
            min_lr_ratio: LR at the end of the decay as a fraction of each group's peak.
            decay_shape: `harmonic` (default), `linear`, `cosine` or `1-sqrt`.
        """
        self.warmup_steps = _non_negative_int("warmup_steps", warmup_steps)
        self.annealing_steps = _non_negative_int("annealing_steps", annealing_steps)
        self.max_steps = int(max_steps)
        self.decay_start_step = int(decay_start_step)
        if decay_shape not in DECAY_SHAPES:
            raise LmforgeError(
                f"unknown decay_shape {decay_shape!r}",
                hint=f"use one of: {', '.join(DECAY_SHAPES)}",
            )
        self.decay_shape = decay_shape
        self.triggered_decay_start_step: int | None = None

        peak_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.min_lr_ratio = _resolve_min_lr_ratio(min_lr, min_lr_ratio, max(peak_lrs), decay_shape)
        self._check_decay_window()
        super().__init__(optimizer)

    def _check_decay_window(self) -> None:
        if self.decay_start_step < -1:
            raise LmforgeError(
                f"decay_start_step must be -1 (start on request) or a step >= 0, got {self.decay_start_step}",
                hint="set ns.decay_start_step (or pass --decay-start-step) to -1 or a global step",
            )
        if 0 <= self.decay_start_step < self.warmup_steps:
            logger.warning(
                "decay_start_step %d is inside the warmup of %d steps; starting the decay at step %d",
                self.decay_start_step,
                self.warmup_steps,
                self.warmup_steps,
            )
            self.decay_start_step = self.warmup_steps
        decay_end = self.decay_start_step + self.annealing_steps
        if self.decay_start_step < 0 or self.max_steps <= 0 or decay_end <= self.max_steps:
            return
        if self.decay_start_step >= self.max_steps:
            # A smoke run capped with --max-steps ends before the planned decay; that is expected.
            logger.info(
                "decay_start_step %d is at or after max_steps %d: this run ends before the LR decay",
                self.decay_start_step,
                self.max_steps,
            )
        else:
            shortened = self.max_steps - self.decay_start_step
            logger.warning(
                "decay from step %d over %d steps would end at step %d, after max_steps %d; "
                "using annealing_steps %d so the LR reaches min_lr at max_steps",
                self.decay_start_step,
                self.annealing_steps,
                decay_end,
                self.max_steps,
                shortened,
            )
            self.annealing_steps = shortened

    @property
    def active_decay_start_step(self) -> int | None:
        """Global step after which the decay runs, or None while it waits for `start_annealing()`."""
        if self.decay_start_step >= 0:
            return self.decay_start_step
        return self.triggered_decay_start_step

    def lr_factor(self, step: int) -> float:
        """Return the LR of the optimizer step that makes `global_step == step`, as a fraction of peak."""
        return warmup_stable_decay_factor(
            step,
            warmup_steps=self.warmup_steps,
            decay_start_step=self.active_decay_start_step,
            annealing_steps=self.annealing_steps,
            min_lr_ratio=self.min_lr_ratio,
            decay_shape=self.decay_shape,
        )

    def get_lr(self) -> list[float]:
        # `last_epoch` counts completed optimizer steps, so the next step makes global_step last_epoch + 1.
        factor = self.lr_factor(self.last_epoch + 1)
        return [base_lr * factor for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def start_annealing(self, step: int | None = None) -> bool:
        """Start the decay after global step `step` (default: the current global step).

        Takes effect only when the scheduler was built with `decay_start_step=-1`; with a
        configured decay start it logs a warning and changes nothing. A start inside the
        warmup moves to the end of the warmup. Returns True when the decay start was set.
        """
        if self.decay_start_step >= 0:
            logger.warning(
                "start-annealing has no effect: the config sets decay_start_step=%d "
                "(set ns.decay_start_step=-1 to start the decay on request)",
                self.decay_start_step,
            )
            return False
        if self.triggered_decay_start_step is not None:
            logger.warning(
                "start-annealing ignored: the decay already started after step %d",
                self.triggered_decay_start_step,
            )
            return False

        start = self.last_epoch if step is None else int(step)
        if start < self.warmup_steps:
            logger.warning(
                "start-annealing at step %d is inside the warmup of %d steps; starting the decay at step %d",
                start,
                self.warmup_steps,
                self.warmup_steps,
            )
            start = self.warmup_steps
        self.triggered_decay_start_step = start
        self._apply_lrs()
        if 0 < self.max_steps < start + self.annealing_steps:
            logger.warning(
                "the decay started after step %d ends at step %d, after max_steps %d; "
                "the run stops before the LR reaches min_lr",
                start,
                start + self.annealing_steps,
                self.max_steps,
            )
        logger.info(
            "LR decay starts after step %d and reaches min_lr at step %d (%s, %d annealing steps)",
            start,
            start + self.annealing_steps,
            self.decay_shape,
            self.annealing_steps,
        )
        return True

    def state_dict(self) -> dict[str, Any]:
        """Return the step counter and the triggered decay start (see the class docstring)."""
        return {
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "triggered_decay_start_step": self.triggered_decay_start_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counter and triggered decay start; the schedule itself comes from the constructor."""
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        triggered = state_dict.get("triggered_decay_start_step")
        self.triggered_decay_start_step = None if triggered is None else int(triggered)
        if self.triggered_decay_start_step is not None and self.decay_start_step >= 0:
            logger.info(
                "the checkpoint's triggered decay start (step %d) is replaced by the config's decay_start_step %d",
                self.triggered_decay_start_step,
                self.decay_start_step,
            )
        self._apply_lrs()

    def _apply_lrs(self) -> None:
        """Write the closed-form LRs for the current step into the optimizer."""
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def _non_negative_int(name: str, value: Any) -> int:
    number = int(value)
    if number < 0:
        raise LmforgeError(f"{name} must be >= 0, got {value}", hint=f"set ns.{name} to 0 or more")
    return number


def _resolve_min_lr_ratio(
    min_lr: float | None, min_lr_ratio: float | None, peak_lr: float, decay_shape: str
) -> float:
    """Return min_lr as a fraction of the peak LR, from whichever of the two was given."""
    if (min_lr is None) == (min_lr_ratio is None):
        raise LmforgeError(
            "WSDScheduler needs exactly one of min_lr (absolute) and min_lr_ratio (fraction of peak)",
            hint="pass min_lr_ratio=0.1, or min_lr=<LR at the end of the decay>",
        )
    if min_lr is not None:
        if peak_lr <= 0:
            raise LmforgeError(f"the optimizer's peak lr must be > 0 to use min_lr, got {peak_lr}")
        ratio = float(min_lr) / peak_lr
        source = f"min_lr {min_lr} (peak {peak_lr})"
    else:
        ratio = float(min_lr_ratio)
        source = f"min_lr_ratio {min_lr_ratio}"
    harmonic = decay_shape == "harmonic"
    lowest = math.nextafter(0.0, 1.0) if harmonic else 0.0
    if not lowest <= ratio <= 1.0:
        interval = "(0, 1]" if harmonic else "[0, 1]"
        raise LmforgeError(
            f"invalid min_lr: {source} gives a final LR of {ratio:g} x peak, outside {interval}",
            hint="the harmonic decay needs min_lr > 0; use a min_lr between 0 and the peak LR",
        )
    return ratio
