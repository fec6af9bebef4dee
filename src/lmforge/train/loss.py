"""Causal-LM loss computed in chunks, so the full [batch, seq, vocab] logits never exist.

At a 128k vocabulary and 8k tokens per row, fp32 logits take 4 GiB per row, and the
cross-entropy backward keeps another copy. `CausalLMLoss` instead runs the decoder
to its final hidden states, keeps only the positions that are trained
(labels != -100), and applies the output projection and cross-entropy to
`chunk_size` of those positions at a time. While training, each chunk's gradients
with respect to the hidden states and the output weight are computed right after its
loss, in the forward pass, and its logits are freed: the peak extra memory is one
chunk's logits, `chunk_size * vocab` floats, plus one fp32 copy of the output weight's
gradient. The backward pass only scales the stored gradients, so the output projection
is never recomputed (the matmul work is that of an unchunked loss).

The loss returned is the SUM over trained tokens (not the mean). The trainer
divides by the number of trained tokens in the whole optimizer step, across all
micro-batches and data-parallel ranks, so the gradient does not depend on how the
step is split into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _compute_dtype(device_type: str) -> torch.dtype | None:
    """Return the autocast dtype when autocast is on for `device_type`, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias`, whose gradients are computed chunk by chunk in forward.

    Matmuls run in `compute_dtype` (the autocast dtype, or the weight's dtype), and the
    log-softmax in float32, as autocast would run them. The gradient of the summed loss
    with respect to the logits is softmax(logits) - one_hot(target). It goes into the
    hidden-state and weight gradients at once, so no chunk's logits are kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, compute_dtype: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            hidden_c = hidden.to(compute_dtype)
            weight_c = weight.to(compute_dtype)
            bias_c = bias.to(compute_dtype) if bias is not None else None
            grad_hidden = torch.empty_like(hidden_c)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, targets.numel(), chunk_size):
                stop = start + chunk_size
                chunk_targets = targets[start:stop]
                logits = F.linear(hidden_c[start:stop], weight_c, bias_c).float()
                log_norm = torch.logsumexp(logits, dim=-1)
                total += (log_norm - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
                # The gradient with respect to the logits, softmax - one_hot, overwrites the logits.
                probs = logits.sub_(log_norm[:, None]).exp_()
                probs[torch.arange(probs.shape[0], device=probs.device), chunk_targets] -= 1.0
                grad_logits = probs.to(compute_dtype)
                del logits, probs
                grad_hidden[start:stop] = grad_logits @ weight_c
                grad_weight += (grad_logits.t() @ hidden_c[start:stop]).float()
                if grad_bias is not None:
                    grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_total.float()
        return (
            (grad_hidden.float() * scale).to(hidden_dtype),
            (grad_weight * scale).to(weight_dtype),
            (grad_bias * scale).to(bias_dtype) if grad_bias is not None else None,
            None,
            None,
            None,
        )


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
    if chunk_size <= 0:
        chunk_size = targets.numel()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_size):
            stop = start + chunk_size
            total = total + _summed_cross_entropy(hidden[start:stop], weight, bias, targets[start:stop])
        return total
    compute_dtype = _compute_dtype(hidden.device.type) or weight.dtype
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, compute_dtype)


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
