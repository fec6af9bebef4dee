"""Optimizers, parameter groups and the WSD learning-rate schedule.

Configs build the optimizer through `build_optimizer`, usually as a factory that the
trainer calls with the model's named parameters::

    optimizer_factory: !partial:lmforge.optim:build_optimizer
        name: adafactor
        lr: {{ ns.peak_lr }}
        weight_decay: {{ ns.weight_decay }}
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.optim.wsd import WSDScheduler

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adafactor", "adamw")
DEFAULT_NO_DECAY = ("norm", "bias", "embed")


def split_decay_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    no_decay: Sequence[str] = DEFAULT_NO_DECAY,
) -> list[dict[str, Any]]:
    """Split parameters into a weight-decay group and a no-decay group.

    A parameter goes to the no-decay group when any `no_decay` string is a substring
    of its lower-cased name (the defaults match Llama's `*_layernorm`/`norm` weights,
    biases and `embed_tokens`). Only names count: a LayerNorm registered as `1` in an
    `nn.Sequential` is decayed unless `no_decay` matches its name. Frozen parameters (requires_grad False) are left out,
    and so are empty groups. Each group carries `param_names`, which optimizers keep in
    their state_dict.
    """
    patterns = [pattern.lower() for pattern in no_decay]
    decay_names, decay_params, plain_names, plain_params = [], [], [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if any(pattern in name.lower() for pattern in patterns):
            plain_names.append(name)
            plain_params.append(param)
        else:
            decay_names.append(name)
            decay_params.append(param)

    groups = []
    if decay_params:
        groups.append({"params": decay_params, "param_names": decay_names, "weight_decay": float(weight_decay)})
    if plain_params:
        groups.append({"params": plain_params, "param_names": plain_names, "weight_decay": 0.0})
    if not groups:
        raise LmforgeError("build_optimizer got no trainable parameters", hint="check that the model is not fully frozen")
    return groups


def build_optimizer(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    name: str = "adafactor",
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer over `named_parameters` with weight decay off for `no_decay` names.

    Args:
        named_parameters: `(name, parameter)` pairs, e.g. `model.named_parameters()`.
        name: `adafactor` (`torch.optim.Adafactor`) or `adamw` (`torch.optim.AdamW`).
        lr: peak learning rate; a scheduler such as `WSDScheduler` scales it per step.
        weight_decay: decoupled weight decay for the parameters that `no_decay` does not match.
        no_decay: name substrings (case-insensitive) of parameters trained without weight
            decay; `()` decays every parameter.
        **kwargs: passed to the optimizer class, e.g. `betas=(0.9, 0.95)` for AdamW or
            `beta2_decay=-0.8` for Adafactor. AdamW runs fused unless `fused` or
            `foreach` is given.
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, OPTIMIZERS, n=2)
        hint = f"did you mean {' or '.join(close)}?" if close else f"use one of: {', '.join(OPTIMIZERS)}"
        raise LmforgeError(f"unknown optimizer name {name!r}", hint=hint)
    if float(lr) <= 0:
        raise LmforgeError(f"optimizer lr must be > 0, got {lr}", hint="set ns.lr (or pass --lr) to a positive value")
    if float(weight_decay) < 0:
        raise LmforgeError(f"weight_decay must be >= 0, got {weight_decay}", hint="set ns.weight_decay to 0 or more")

    groups = split_decay_groups(named_parameters, float(weight_decay), no_decay)
    optimizer_class = torch.optim.Adafactor if key == "adafactor" else torch.optim.AdamW
    if optimizer_class is torch.optim.AdamW and "fused" not in kwargs and "foreach" not in kwargs:
        # One fused kernel per step replaces a dozen element-wise passes over every tensor.
        # torch runs it for floating-point parameters on CPU and CUDA (tested here on 2.13).
        devices = {p.device.type for group in groups for p in group["params"]}
        if devices <= {"cpu", "cuda"}:
            kwargs["fused"] = True
    try:
        optimizer = optimizer_class(groups, lr=float(lr), **kwargs)
    except TypeError as exc:
        raise LmforgeError(
            f"invalid option for {optimizer_class.__name__}: {exc}",
            hint="remove the option from the optimizer's arguments in the config",
        ) from exc
    logger.debug(
        "built %s (lr %g): %s",
        optimizer_class.__name__,
        float(lr),
        ", ".join(f"{len(g['params'])} tensors with weight_decay {g['weight_decay']:g}" for g in groups),
    )
    return optimizer

__all__ = ["build_optimizer", "split_decay_groups", "WSDScheduler", "OPTIMIZERS", "DEFAULT_NO_DECAY"]
