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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable

import torch


class Backend(ABC):
    """Runs the forward and backward passes of one optimizer step.

    Checkpoint behaviour: a backend stores no training state of its own. The
    trainer saves the model through `model_state_dict()` and the optimizer built
    over `parameters()`; a backend that shards the model (pipeline) saves and
    loads each rank's part through the same two calls.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

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

    @abstractmethod
    def prepare(self, model: torch.nn.Module) -> None:
        """Place the model on this rank's device, wrapping or splitting it as needed."""

    @abstractmethod
    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters this rank updates, for the optimizer."""

    @abstractmethod
    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], num_trained_tokens: int) -> torch.Tensor:
        """Accumulate gradients for one optimizer step and return the step's mean loss.

        `num_trained_tokens` counts tokens with labels != -100 across all
        micro-batches and all data-parallel ranks, so the summed token losses are
        divided by the same number however the step is split.
        """

    @abstractmethod
    def model_state_dict(self) -> dict[str, Any]:
        """This rank's model weights, with Hugging Face parameter names."""

    def barrier(self) -> None:
        """Wait for all ranks (no-op on a single process)."""
