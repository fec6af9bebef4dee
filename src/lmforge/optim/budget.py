"""Token-budget arithmetic: from a token budget and a batch shape to steps and learning rates.

Training configs compute these values in Jinja, in the template namespace `ns`, so that
`lmforge -t CFG pp` shows them. `compute_token_budget` is the same arithmetic in Python;
tests check that the templates and this function agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class TokenBudget:
    """Derived schedule values of a training run; the `ns` keys of the same names hold them in configs."""

    tokens_per_step: int
    """Estimated trained tokens per optimizer step across all data-parallel ranks."""
    total_steps: int
    """floor(total_tokens / tokens_per_step); -1 when there is no token budget (one epoch)."""
    warmup_steps: int
    """Optimizer steps of linear LR warmup."""
    annealing_steps: int
    """Optimizer steps of the LR decay: round(annealing_tokens / tokens_per_step)."""
    decay_start_step: int
    """Global step after which the LR decays; -1 waits for a start-annealing request."""
    peak_lr: float
    """lr * sqrt(tokens_per_step / base_batch_size)."""
    min_lr: float
    """min_lr_ratio * peak_lr."""

    def as_dict(self) -> dict:
        return asdict(self)


def compute_token_budget(
    *,
    total_tokens: float | None,
    annealing_tokens: float,
    world_size: int,
    per_device_batch_size: int,
    gradient_accumulation_steps: int,
    seq_len: int,
    lr: float,
    base_batch_size: float,
    warmup_tokens: float | None = None,
    warmup_fraction: float | None = None,
    packing_efficiency: float = 0.95,
    min_lr_ratio: float = 0.1,
    decay_start_step: int | None = None,
) -> TokenBudget:
    """Compute steps and learning rates from a token budget.

    - tokens_per_step = floor(world_size * per_device_batch_size * gradient_accumulation_steps
      * seq_len * packing_efficiency), where world_size counts data-parallel ranks and
      packing_efficiency estimates the share of a packed row that holds trained tokens.
    - total_steps = floor(total_tokens / tokens_per_step), or -1 when total_tokens is None
      or negative.
    - warmup_steps = round(warmup_tokens / tokens_per_step) when warmup_tokens is given,
      else round(warmup_fraction * total_steps) (0 when neither applies).
    - annealing_steps = round(annealing_tokens / tokens_per_step).
    - decay_start_step: the given value when not None, else
      max(warmup_steps, total_steps - annealing_steps), or -1 without a token budget.
    - peak_lr = lr * sqrt(tokens_per_step / base_batch_size); min_lr = min_lr_ratio * peak_lr.

    Rounding uses Python's `round` (halves go to the even number), as Jinja's `round` does.
    """
    shape = {
        "world_size": world_size,
        "per_device_batch_size": per_device_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "seq_len": seq_len,
    }
    for key, value in shape.items():
        if int(value) < 1:
            raise LmforgeError(f"ns.{key} must be >= 1, got {value}", hint=f"set ns.{key} to a positive integer")
    if not 0 < float(packing_efficiency) <= 1:
        raise LmforgeError(
            f"ns.packing_efficiency must be in (0, 1], got {packing_efficiency}",
            hint="use the measured share of trained tokens per packed row, e.g. 0.95",
        )
    if float(base_batch_size) <= 0:
        raise LmforgeError(f"ns.base_batch_size must be > 0 tokens, got {base_batch_size}")

    tokens_per_step = math.floor(
        int(world_size)
        * int(per_device_batch_size)
        * int(gradient_accumulation_steps)
        * int(seq_len)
        * float(packing_efficiency)
    )
    if total_tokens is None or float(total_tokens) < 0:
        total_steps = -1
    else:
        # Floor division, as the templates' `//`: floor(a / b) could round a near-integer quotient up.
        total_steps = int(float(total_tokens) // tokens_per_step)

    if warmup_tokens is not None:
        warmup_steps = round(float(warmup_tokens) / tokens_per_step)
    elif warmup_fraction is not None and total_steps > 0:
        warmup_steps = round(float(warmup_fraction) * total_steps)
    else:
        warmup_steps = 0
    annealing_steps = round(float(annealing_tokens) / tokens_per_step)

    if decay_start_step is not None:
        decay_start = int(decay_start_step)
    elif total_steps >= 0:
        decay_start = max(warmup_steps, total_steps - annealing_steps)
    else:
        decay_start = -1

    peak_lr = float(lr) * math.sqrt(tokens_per_step / float(base_batch_size))
    return TokenBudget(
        tokens_per_step=tokens_per_step,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        annealing_steps=annealing_steps,
        decay_start_step=decay_start,
        peak_lr=peak_lr,
        min_lr=float(min_lr_ratio) * peak_lr,
    )
