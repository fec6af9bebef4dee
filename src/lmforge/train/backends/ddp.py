"""Data-parallel backend on `torch.nn.parallel.DistributedDataParallel`.

Every rank holds the whole model and reads a disjoint share of the rows
(`data_rank`, `data_world_size`). DDP all-reduces gradients during the backward
pass of the last micro-batch of a step (`no_sync()` on the others) and divides
them by the world size. The backend multiplies each rank's loss by the world
size first, so the averaged gradient equals the gradient of

    sum over all ranks and micro-batches of token losses / num_trained_tokens

which is what one process running the whole global batch computes.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError
from lmforge.train.backends.base import Backend
from lmforge.train.backends.single import default_device
from lmforge.train.loss import CausalLMLoss

logger = logging.getLogger(__name__)


class DDPBackend(Backend):
    """Runs each micro-batch through a DDP-wrapped `CausalLMLoss` of the whole model.

    Options (the `backend_options` of a config): `find_unused_parameters` and
    `static_graph` (passed to DDP), `device` (default `cuda:LOCAL_RANK` when CUDA is
    available, else the CPU).

    Checkpoint behaviour: the backend keeps no training state. Every rank holds
    the same weights, so rank 0 saves the whole model and one optimizer state; the
    data-iterator and RNG states are per rank and saved by the trainer.
    """

    def __init__(self, options: Optional[dict] = None, **kwargs):
        super().__init__(options, **kwargs)
        unknown = set(self.options) - {"find_unused_parameters", "static_graph", "device"}
        if unknown:
            raise LmforgeError(
                f"unknown backend_options for backend 'ddp': {', '.join(sorted(unknown))}",
                hint="valid options: find_unused_parameters, static_graph, device",
            )
        device = self.options.get("device")
        self.device = torch.device(device) if device else default_device()
        self._ddp: Optional[torch.nn.parallel.DistributedDataParallel] = None

    def setup(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise LmforgeError(
                "backend 'ddp' needs torch.distributed to be initialised",
                hint="launch with `lmforge train --nproc N` (or torchrun), not plain python",
            )
        super().setup()

    def prepare(self, model: torch.nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.hf_model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers here, so all ranks start equal.
        self._ddp = DistributedDataParallel(
            CausalLMLoss(self.hf_model, chunk_size=self.loss_chunk_size),
            device_ids=device_ids,
            find_unused_parameters=bool(self.options.get("find_unused_parameters", False)),
            static_graph=bool(self.options.get("static_graph", False)),
        )
        if self.rank == 0:
            logger.info("DDP over %d ranks on %s (rank 0)", self.world_size, self.device)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, parameter) for name, parameter in self.hf_model.named_parameters() if parameter.requires_grad]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], num_trained_tokens: int) -> torch.Tensor:
        if not micro_batches:
            raise ValueError("forward_backward needs at least one micro-batch")
        self.hf_model.train()
        divisor = max(int(num_trained_tokens), 1)
        step_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        last = len(micro_batches) - 1
        for index, batch in enumerate(micro_batches):
            # Gradients are all-reduced once per step, during the last micro-batch's backward.
            sync = contextlib.nullcontext() if index == last else self._ddp.no_sync()
            with sync:
                with self.autocast():
                    loss_sum, _ = self._ddp(self._to_device(batch))
                # DDP divides the all-reduced gradient by world_size; multiplying here makes
                # it the global token-loss sum divided by the global trained-token count.
                (loss_sum * (self.world_size / divisor)).backward()
            step_loss += loss_sum.detach().float() / divisor
        return step_loss

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        self.hf_model.eval()
        with self.autocast():
            # The unwrapped module: a forward through DDP would wait for a matching backward.
            loss_sum, num_tokens = self._ddp.module(self._to_device(batch))
        return float(loss_sum), int(num_tokens)
