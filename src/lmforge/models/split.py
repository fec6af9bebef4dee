"""Split a Hugging Face Llama-family causal LM into pipeline stages.

A pipeline schedule runs one `nn.Module` per stage and passes only the hidden
states from one stage to the next. Every stage still needs the packed-document
structure of the batch. So each stage takes `position_ids` (and the optional
attention mask) as keyword arguments, which `torch.distributed.pipelining` passes
to every stage. It rebuilds the causal, document-restricted attention mask with
the same `transformers` function the unsplit model uses, so the result matches the
unsplit model up to floating-point rounding.

Placement, for a model with L decoder layers split into S stages:

    stage 0        embed_tokens + layers[0 : n0]
    stage s        layers[...]               (n_s = L // S, plus one for the first L % S stages)
    stage S - 1    layers[... : L] + norm + lm_head, which also computes the loss

Each stage keeps the Hugging Face parameter names (`model.layers.7.mlp.up_proj.weight`),
so the state dicts of all stages together form one `LlamaForCausalLM` state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import LmforgeError


def layers_per_stage(num_layers: int, num_stages: int) -> list[range]:
    """Return the decoder-layer indices of each stage, balanced by layer count.

    >>> layers_per_stage(30, 4)
    [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    """
    if num_stages < 1:
        raise LmforgeError(f"invalid number of pipeline stages: {num_stages}; it must be at least 1")
    if num_layers < num_stages:
        raise LmforgeError(
            f"cannot split a model with {num_layers} decoder layers into {num_stages} pipeline stages",
            hint="every stage needs at least one decoder layer: use fewer pipeline ranks or stages per rank",
        )
    base, extra = divmod(num_layers, num_stages)
    ranges = []
    start = 0
    for stage in range(num_stages):
        count = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + count))
        start += count
    return ranges


class _StageBody(nn.Module):
    """Container whose attribute names mirror `LlamaModel`, so state dict keys keep the `model.` prefix."""

    def __init__(self, embed_tokens, layers: dict[str, nn.Module], norm, rotary_emb):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleDict(layers)
        self.norm = norm
        self.rotary_emb = rotary_emb


class LlamaStage(nn.Module):
    """One pipeline stage of a Llama-family `*ForCausalLM`.

    `forward(x, position_ids, attention_mask=None, labels=None)` takes token ids
    (first stage) or hidden states (other stages). The last stage returns the
    summed cross-entropy over tokens with labels != -100 (a scalar, see
    `lmforge.train.loss.summed_token_loss`); the other stages return hidden states.

    Checkpoint behaviour: `state_dict()` contains this stage's parameters under their
    Hugging Face names (`model.embed_tokens.weight`, `model.layers.N.*`,
    `model.norm.weight`, `lm_head.weight`). The config, the layer split and the
    rotary embedding come from the constructor.
    """

    def __init__(
        self,
        model: nn.Module,
        stage_index: int,
        num_stages: int,
        layer_indices: range,
        loss_chunk_size: int = 0,
    ):
        super().__init__()
        decoder = model.model
        self.config = model.config
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.layer_indices = layer_indices
        self.loss_chunk_size = loss_chunk_size

        layers = {str(index): decoder.layers[index] for index in layer_indices}
        self.model = _StageBody(
            embed_tokens=decoder.embed_tokens if self.is_first else None,
            layers=layers,
            norm=decoder.norm if self.is_last else None,
            rotary_emb=decoder.rotary_emb,
        )
        self.lm_head = model.lm_head if self.is_last else None

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = self.model.embed_tokens(x) if self.is_first else x
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)

        # The same call LlamaModel.forward makes: a plain causal mask, restricted to each
        # packed document when position_ids restart inside a row.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        position_embeddings = self.model.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.model.layers.values():
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )

        if not self.is_last:
            return hidden

        from lmforge.train.loss import summed_token_loss

        hidden = self.model.norm(hidden)
        if labels is None:
            raise ValueError("the last pipeline stage needs `labels` to compute the loss")
        return summed_token_loss(hidden, self.lm_head, labels, self.loss_chunk_size)


def split_llama(
    model: nn.Module,
    stage_indices: list[int],
    num_stages: int,
    loss_chunk_size: int = 0,
) -> list[LlamaStage]:
    """Build the stages `stage_indices` (of `num_stages`) from a Llama-family causal LM.

    The stages share parameters with `model`, so modules no stage uses are freed
    once the caller drops `model`. A model may tie its input and output embeddings
    while the first and last stages are built by different calls (on different
    ranks). Then the last stage gets its own copy of the tied weight, and the
    pipeline backend keeps the two copies equal by summing their gradients.
    """
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(model, "lm_head"):
        raise LmforgeError(
            f"cannot split {type(model).__name__} into pipeline stages: expected a Llama-family "
            "*ForCausalLM with .model.layers and .lm_head",
            hint="use backend 'ddp' or 'single' for this model",
        )
    layer_ranges = layers_per_stage(len(decoder.layers), num_stages)

    tied = is_tied(model)
    holds_first = 0 in stage_indices
    holds_last = num_stages - 1 in stage_indices
    if tied and holds_last and not holds_first:
        untied_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=model.lm_head.bias is not None)
        untied_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.lm_head = untied_head

    return [
        LlamaStage(model, index, num_stages, layer_ranges[index], loss_chunk_size=loss_chunk_size)
        for index in stage_indices
    ]


def is_tied(model: nn.Module) -> bool:
    """Return True if the model's output projection shares its weight with the input embedding."""
    return model.lm_head.weight is model.model.embed_tokens.weight
