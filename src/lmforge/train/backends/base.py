"""The interface between the trainer loop and an execution backend.

The trainer owns the loop: it draws micro-batches, steps the optimizer and the LR
scheduler, logs, evaluates and checkpoints. A backend owns how one optimizer step's
forward and backward passes run across processes: one device, data parallel (DDP),
or a pipeline schedule. Keeping that split lets every backend share the loop, the
checkpoint format and the control requests.

Batch format (what the data collator produces and every backend consumes):
    input_ids     LongTensor [batch, seq]
    labels        LongTensor [batch, seq], already shifted so that labels[:, t] is
                  the target for position t; -100 marks tokens that are not trained
                  (padding, masked prompt tokens, and the last token of each packed
                  document, so no label crosses a document boundary)
    position_ids  LongTensor [batch, seq], restarting at 0 at each packed document
    attention_mask (optional) LongTensor [batch, seq], 1 for real tokens

Call order in the trainer, on every rank:
    backend = BackendClass(options, mixed_precision=..., loss_chunk_size=...)
    backend.setup()                       # after torch.distributed is initialised
    model = model_factory(); (load resume weights); backend.prepare(model)
    optimizer = optimizer_factory(backend.named_parameters())
    per step: backend.forward_backward(micro_batches, num_trained_tokens)
              backend.clip_grad_norm(max_norm); optimizer.step(); optimizer.zero_grad()
    per eval batch: backend.eval_loss(batch)
    per checkpoint: backend.save_model(directory)     # every rank calls it
Values that the trainer sums over ranks (the step loss, eval sums) are summed over
ALL ranks of the default process group, so a pipeline stage without the loss
returns zeros.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Optional

import torch


class Backend(ABC):
    """Runs the forward and backward passes of one optimizer step.

    Checkpoint behaviour: a backend stores no training state of its own. The
    trainer saves the model through `save_model()` and the optimizer built over
    `named_parameters()`. When `shards_optimizer_state` is True (a pipeline, where
    each rank has different parameters), the trainer saves the optimizer and
    scheduler state per rank (`optimizer_rank{r}.pt`); otherwise rank 0 saves one
    copy. On resume, the trainer loads the full Hugging Face weights into the
    model BEFORE `prepare()`, so a backend that splits the model needs no load hook.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    shards_optimizer_state: bool = False
    """True when each rank's optimizer covers different parameters (saved as one file per rank)."""

    def __init__(self, options: Optional[dict] = None, *, mixed_precision: str = "bf16", loss_chunk_size: int = 1024):
        self.options = dict(options or {})
        self.mixed_precision = mixed_precision
        self.loss_chunk_size = loss_chunk_size
        self.hf_model: Optional[torch.nn.Module] = None
        """The unwrapped Hugging Face model, set by `prepare()`."""

    @property
    def is_main_process(self) -> bool:
        """True on the rank that writes logs, TensorBoard events and checkpoints."""
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Index of the data share this rank reads."""
        return self.rank

    @property
    def data_world_size(self) -> int:
        """Number of disjoint data shares (1 for a pipeline: every rank reads the same rows)."""
        return self.world_size

    def setup(self) -> None:
        """Read rank, world size and device from torch.distributed (already initialised, or absent)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank = torch.distributed.get_rank()
            self.world_size = torch.distributed.get_world_size()

    def autocast(self):
        """Return the autocast context for forward passes (bf16 unless mixed_precision is fp32)."""
        if self.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    @abstractmethod
    def prepare(self, model: torch.nn.Module) -> None:
        """Place the model on this rank's device, wrapping or splitting it as needed; sets `hf_model`."""

    @abstractmethod
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Return the (Hugging Face name, parameter) pairs this rank updates, for the optimizer factory."""

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """Return the parameters this rank updates."""
        return [parameter for _, parameter in self.named_parameters()]

    @abstractmethod
    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], num_trained_tokens: int) -> torch.Tensor:
        """Accumulate gradients for one optimizer step and return this rank's share of the step loss.

        `num_trained_tokens` counts tokens with labels != -100 across all
        micro-batches and all data-parallel ranks, so the summed token losses are
        divided by the same number however the step is split. The return value is
        this rank's summed token loss divided by `num_trained_tokens`, as a detached
        fp32 scalar. Summed over all ranks, it is the step's mean loss.
        """

    @abstractmethod
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Return (summed token loss, trained tokens) of one batch without gradients (zeros on ranks without the loss)."""

    def clip_grad_norm(self, max_norm: Optional[float]) -> torch.Tensor:
        """Clip gradients to `max_norm` (None: no clipping) and return the global gradient norm before clipping."""
        limit = float("inf") if max_norm is None else max_norm
        return torch.nn.utils.clip_grad_norm_(self.parameters(), limit)

    def all_reduce_data_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over the data-parallel ranks (ranks that read different rows)."""
        if self.data_world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def model_state_dict(self) -> dict[str, Any]:
        """This rank's model weights, with Hugging Face parameter names."""
        return self.hf_model.state_dict()

    def save_model(self, directory: Path) -> None:
        """Write Hugging Face `model.safetensors`, `config.json` and `generation_config.json` into `directory`.

        Every rank calls it; the default writes on the main process only. A
        sharded backend gathers or writes per-stage files here.
        """
        if self.is_main_process:
            self.hf_model.save_pretrained(directory, state_dict=self.model_state_dict(), safe_serialization=True)

    def generation_model(self) -> Optional[torch.nn.Module]:
        """Return the full model for text generation on the main process, or None when no rank has it."""
        return self.hf_model

    def barrier(self) -> None:
        """Wait for all ranks (no-op on a single process)."""
        if self.world_size > 1:
            torch.distributed.barrier()
