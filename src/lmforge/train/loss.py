"""Causal-LM loss computed in chunks, so the full [batch, seq, vocab] logits never exist.

At a 128k vocabulary and 8k tokens per row, fp32 logits take 4 GiB per row, and the
cross-entropy backward keeps another copy. `CausalLMLoss` instead runs the decoder
to its final hidden states, keeps only the positions that are trained
(labels != -100), and applies the output projection and cross-entropy to
`chunk_size` of those positions at a time. Each chunk runs under activation
checkpointing, so its logits are recomputed in the backward pass rather than kept:
the peak extra memory is one chunk's logits, `chunk_size * vocab` floats.

The loss returned is the SUM over trained tokens (not the mean). The trainer
divides by the number of trained tokens in the whole optimizer step, across all
micro-batches and data-parallel ranks, so the gradient does not depend on how the
step is split into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _model_inputs(batch: dict[str, torch.Tensor], attn_implementation=None) -> dict[str, torch.Tensor]:
    """Return the decoder kwargs that keep packed documents from attending to each other."""
    try:
        from lmforge.data.packing import model_inputs
    except ImportError:
        # NOTE: without lmforge.data.packing, only position_ids mark document starts, so
        # with SDPA attention a packed document still attends to the ones before it.
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        if "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"]
        return inputs
    return model_inputs(batch, attn_implementation=attn_implementation)


def _summed_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, reduction="sum")


def summed_token_loss(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Sum the cross-entropy of `lm_head(hidden_states)` over positions with labels != -100.

    `hidden_states` is [batch, seq, hidden] and `labels` [batch, seq], already shifted.
    With `chunk_size` 0 the logits of all trained positions are computed at once.
    """
    flat_labels = labels.reshape(-1)
    trained = flat_labels != IGNORE_INDEX
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])[trained]
    targets = flat_labels[trained]
    if targets.numel() == 0:
        # Keep the graph connected so every rank runs the same backward collectives.
        return hidden_states.sum() * 0.0

    weight, bias = lm_head.weight, lm_head.bias
    if chunk_size <= 0 or targets.numel() <= chunk_size:
        return _summed_cross_entropy(hidden, weight, bias, targets)

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        total = total + checkpoint(
            _summed_cross_entropy, hidden[start:stop], weight, bias, targets[start:stop], use_reentrant=False
        )
    return total


class CausalLMLoss(torch.nn.Module):
    """Wraps a Hugging Face causal LM so that `forward(batch)` returns the summed token loss.

    Backends wrap this module (with DDP, for instance) instead of the bare model, so
    gradient hooks see the output projection too. It has no state of its own:
    `state_dict()` is the wrapped model's, under the `model.` prefix.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (summed loss over trained tokens, number of trained tokens) for one micro-batch."""
        decoder = self.model.get_decoder()
        attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        inputs = _model_inputs(batch, attn_implementation)
        inputs["use_cache"] = False
        outputs = decoder(**inputs)
        labels = batch["labels"]
        loss_sum = summed_token_loss(outputs.last_hidden_state, self.model.get_output_embeddings(), labels, self.chunk_size)
        return loss_sum, (labels != IGNORE_INDEX).sum()
