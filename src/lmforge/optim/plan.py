"""The run plan: token budget, steps and LR schedule of a training config, as text.

`lmforge -t CFG plan` prints `format_plan(config.namespace)`, and `lmforge train` prints
it before launching. `TRAIN_FLAG_TO_NS` maps the `train` command's budget flags onto the
namespace keys that training configs define, so `train --total-tokens 2e8` is the same as
`--set ns.total_tokens=200000000`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# `train` option -> namespace key it overrides.
TRAIN_FLAG_TO_NS: dict[str, str] = {
    "--total-tokens": "ns.total_tokens",
    "--annealing-tokens": "ns.annealing_tokens",
    "--decay-start-step": "ns.decay_start_step",
    "--start-annealing": "ns.start_annealing",
    "--lr": "ns.lr",
    "--max-steps": "ns.max_steps",
    "--seq-len": "ns.seq_len",
    "--batch-size": "ns.per_device_batch_size",
}

# Help text for each flag in TRAIN_FLAG_TO_NS, with its unit.
TRAIN_FLAG_HELP: dict[str, str] = {
    "--total-tokens": "Token budget of the run (e.g. 2e8); sets max_steps and the decay start.",
    "--annealing-tokens": "Tokens trained during the LR decay at the end of the run (e.g. 4e7).",
    "--decay-start-step": "Global step after which the LR decays; -1 waits for a start-annealing request.",
    "--start-annealing": "Start the LR decay at the first step of this run (needs decay_start_step -1).",
    "--lr": "Learning rate at base_batch_size tokens per step; the peak LR scales it by sqrt(tokens_per_step / base_batch_size).",
    "--max-steps": "Optimizer steps to run (default: the token budget's total_steps; -1 is one epoch).",
    "--seq-len": "Tokens per packed training row.",
    "--batch-size": "Rows per micro-batch on each data-parallel rank.",
}


def train_flag_sets(values: Mapping[str, Any]) -> list[str]:
    """Turn `train` flag values into `ns.KEY=VALUE` overrides, skipping flags left at None or False.

    `values` maps flag names (`--total-tokens`, or the option name `total_tokens`) to values.
    Whole-number floats such as 2e8 are written as integers, so templates see 200000000.
    """
    sets = []
    for flag, value in values.items():
        if value is None or value is False:
            continue
        key = flag if flag.startswith("--") else "--" + flag.replace("_", "-")
        if key not in TRAIN_FLAG_TO_NS:
            raise KeyError(f"{flag!r} is not a train flag that maps to the config namespace")
        sets.append(f"{TRAIN_FLAG_TO_NS[key]}={_format_value(value)}")
    return sets


def _format_value(value: Any) -> str:
    if value is True:
        return "true"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
        return str(int(value))
    return str(value)


def _count(value: Any) -> str:
    """Format a whole number with thousands separators, or return the value as text."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isfinite(number) and number.is_integer():
        return f"{int(number):,}"
    return f"{number:,.4g}"


def _lr(value: Any) -> str:
    try:
        return f"{float(value):.3e}"
    except (TypeError, ValueError):
        return "-"


def _int_or_none(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def format_plan(namespace: Mapping[str, Any], title: str | None = None) -> str:
    """Format the run plan of a training config from its namespace values.

    Missing keys show as `-`, so the plan of a partly written config still prints.
    """
    ns = dict(namespace)
    get = ns.get
    tokens_per_step = _int_or_none(get("tokens_per_step"))
    max_steps = _int_or_none(get("max_steps"))
    total_steps = _int_or_none(get("total_steps"))
    warmup_steps = _int_or_none(get("warmup_steps")) or 0
    annealing_steps = _int_or_none(get("annealing_steps")) or 0
    decay_start = _int_or_none(get("decay_start_step"))

    lines = [f"Run plan{f' for {title}' if title else ''}"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<17}{text}")

    data_parallel = get("data_parallel_size", get("world_size"))
    row(
        "processes",
        f"{_count(get('world_size'))} on {get('device_type', '-')} ({get('backend', '-')} backend, "
        f"{_count(data_parallel)} data-parallel)",
    )
    row(
        "batch",
        f"data-parallel ranks {_count(data_parallel)} x rows {_count(get('per_device_batch_size'))} x "
        f"accumulation {_count(get('gradient_accumulation_steps'))} x seq_len {_count(get('seq_len'))} x "
        f"packing efficiency {get('packing_efficiency', '-')}",
    )
    row("tokens_per_step", f"{_count(tokens_per_step)} (estimate)")

    total_tokens = get("total_tokens")
    if total_steps is not None and total_steps >= 0:
        row("token budget", f"{_count(total_tokens)} tokens -> total_steps {_count(total_steps)}")
    else:
        row("token budget", "none (total_tokens not set)")
    if max_steps is not None and max_steps > 0:
        trained = f", about {_count(max_steps * tokens_per_step)} tokens" if tokens_per_step else ""
        row("max_steps", f"{_count(max_steps)}{trained}")
    else:
        row("max_steps", "-1 (one epoch of the training data)")

    warmup_tokens = f", {_count(warmup_steps * tokens_per_step)} tokens" if tokens_per_step else ""
    row("warmup", f"steps 1-{_count(warmup_steps)} ({warmup_steps:,} steps{warmup_tokens})" if warmup_steps else "none")

    shape = get("decay_shape", "harmonic")
    if decay_start is None or decay_start < 0:
        row("stable", f"from step {_count(warmup_steps + 1)} until a start-annealing request")
        row("decay", f"{shape}, {annealing_steps:,} steps after the request (decay_start_step -1)")
    else:
        decay_end = decay_start + annealing_steps
        row("stable", f"steps {_count(warmup_steps + 1)}-{_count(decay_start)}")
        decay_text = (
            f"{shape}, steps {_count(decay_start + 1)}-{_count(decay_end)} "
            f"({annealing_steps:,} steps, decay_start_step {decay_start:,})"
        )
        if max_steps is not None and 0 < max_steps <= decay_start:
            decay_text += f"; not reached, the run stops at max_steps {max_steps:,}"
        elif max_steps is not None and 0 < max_steps < decay_end:
            decay_text += f"; shortened to end at max_steps {max_steps:,}"
        row("decay", decay_text)

    if get("start_annealing") in (True, "true", "True"):
        if decay_start is not None and decay_start >= 0:
            row("start-annealing", f"has no effect: decay_start_step is {decay_start:,} (set it to -1 to decay on request)")
        else:
            row("start-annealing", "requested for the first step of this run")
    row(
        "learning rate",
        f"peak {_lr(get('peak_lr'))} (lr {_lr(get('lr'))} x sqrt(tokens_per_step / {_count(get('base_batch_size'))})), "
        f"min {_lr(get('min_lr'))} ({get('min_lr_ratio', '-')} x peak)",
    )
    return "\n".join(lines)
