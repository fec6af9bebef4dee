"""One process, one device: the model runs unwrapped; gradients accumulate over micro-batches."""

from __future__ import annotations

from typing import Optional

import torch

from lmforge.train.backends.base import Backend
from lmforge.train.loss import CausalLMLoss


def default_device() -> torch.device:
    """Return `cuda:LOCAL_RANK` when CUDA is available, else the CPU."""
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class SingleDeviceBackend(Backend):
    """Trains the whole model on this process's device.

    Options: `device` (e.g. "cpu" or "cuda:0"; default CUDA when available).
    State: none (see `Backend`).
    """

    def __init__(self, options: Optional[dict] = None, **kwargs):
        super().__init__(options, **kwargs)
        device = self.options.get("device")
        self.device = torch.device(device) if device else default_device()
        self.loss_module: Optional[CausalLMLoss] = None

    def prepare(self, model: torch.nn.Module) -> None:
        self.hf_model = model.to(self.device)
        self.loss_module = CausalLMLoss(self.hf_model, self.loss_chunk_size)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, parameter) for name, parameter in self.hf_model.named_parameters() if parameter.requires_grad]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], num_trained_tokens: int) -> torch.Tensor:
        self.hf_model.train()
        step_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        divisor = max(num_trained_tokens, 1)
        for batch in micro_batches:
            with self.autocast():
                loss_sum, _ = self.loss_module(self._to_device(batch))
            loss = loss_sum / divisor
            loss.backward()
            step_loss += loss.detach().float()
        return step_loss

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        self.hf_model.eval()
        with self.autocast():
            loss_sum, num_tokens = self.loss_module(self._to_device(batch))
        return float(loss_sum), int(num_tokens)
