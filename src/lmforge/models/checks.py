"""Numerical checks that a converted model computes what its source computed.

`lmforge convert` takes a reference from the source model before it changes anything,
then reloads the written directory and compares:

- logits on a fixed prompt made only of tokens the source already had, over the source
  vocabulary's columns: the max abs difference must stay at or below 1e-4 in float32;
- the mean next-token loss on a short text over the full new vocabulary, which must
  match within 1e-3 (`loss_tolerance`). Added tokens join the softmax, so with
  mean-initialised rows this loss grows by about log(1 + k * exp(mean logit) / Z) for
  k added tokens. That is tiny for a trained model, whose logits peak on a few tokens,
  but about log(1 + k / V) for an untrained model with near-uniform outputs over V
  tokens: 3 tokens added to a vocabulary of 384 give 0.0078. The loss over the source
  vocabulary alone is reported too, so a failure shows whether the old weights changed
  or the added tokens took the probability mass.

When the destination dtype is not float32, the reference is taken from the source
weights rounded to that dtype, so the check measures the conversion and not the
rounding the user requested. Both sides run in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CHECK_PROMPT = "The quick brown fox jumps over the lazy dog. A language model predicts the next token."
LOSS_TEXT = "Question: What is the capital of France? Answer: The capital of France is Paris."
LOGITS_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-3


@dataclass
class Reference:
    """Outputs of the source model, taken before conversion."""

    prompt_ids: list[int]
    loss_ids: list[int]
    logits: object
    """Float32 logits of shape (prompt length, source vocabulary size), on CPU."""
    loss: float
    vocab_size: int
    """Number of source tokens: logit columns at or above it belong to added tokens."""


@dataclass
class CheckResult:
    """Comparison of a converted model against a Reference."""

    max_abs_diff: float
    loss_before: float
    loss_after: float
    loss_after_source_vocab: float
    """Loss of the converted model with the softmax over the source vocabulary only."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def encode_plain(tokenizer, text: str) -> list[int]:
    """Encode `text` without BOS/EOS, so the ids are only the text's own tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _forward(model, ids: list[int]):
    import torch

    with torch.no_grad():
        input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
        return model(input_ids=input_ids, labels=input_ids)


def _next_token_loss(logits, ids: list[int]) -> float:
    """Return the mean cross-entropy of `logits[:-1]` (positions, vocabulary) against `ids[1:]`."""
    import torch

    targets = torch.tensor(ids[1:], dtype=torch.long)
    return float(torch.nn.functional.cross_entropy(logits[:-1].float().cpu(), targets))


def text_loss(model, tokenizer, text: str = LOSS_TEXT) -> float:
    """Return the model's mean next-token loss on `text`."""
    ids = encode_plain(tokenizer, text)
    return _next_token_loss(_forward(model, ids).logits[0], ids)


def take_reference(model, tokenizer) -> Reference:
    """Run the source model on the check prompt and the loss text, in float32."""
    vocab_size = min(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    prompt_ids = encode_plain(tokenizer, CHECK_PROMPT)
    loss_ids = encode_plain(tokenizer, LOSS_TEXT)
    logits = _forward(model, prompt_ids).logits[0, :, :vocab_size].float().cpu()
    loss = _next_token_loss(_forward(model, loss_ids).logits[0], loss_ids)
    return Reference(prompt_ids=prompt_ids, loss_ids=loss_ids, logits=logits, loss=loss, vocab_size=vocab_size)


def compare_with_reference(
    model, tokenizer, reference: Reference, loss_tolerance: float = LOSS_TOLERANCE
) -> CheckResult:
    """Compare `model` (float32) with the source outputs in `reference`."""
    problems = []
    if encode_plain(tokenizer, CHECK_PROMPT) != reference.prompt_ids:
        problems.append("the converted tokenizer encodes the check prompt differently from the source tokenizer")
    if encode_plain(tokenizer, LOSS_TEXT) != reference.loss_ids:
        problems.append("the converted tokenizer encodes the loss text differently from the source tokenizer")

    logits = _forward(model, reference.prompt_ids).logits[0, :, : reference.vocab_size].float().cpu()
    max_abs_diff = float((logits - reference.logits).abs().max())
    loss_logits = _forward(model, reference.loss_ids).logits[0]
    loss_after = _next_token_loss(loss_logits, reference.loss_ids)
    loss_after_source_vocab = _next_token_loss(loss_logits[:, : reference.vocab_size], reference.loss_ids)

    if not max_abs_diff <= LOGITS_TOLERANCE:
        problems.append(
            f"logits differ from the source: max abs diff {max_abs_diff:.3g} > {LOGITS_TOLERANCE:g} (float32)"
        )
    if not math.isfinite(loss_after) or abs(loss_after - reference.loss) > loss_tolerance:
        problems.append(
            f"loss on the check text changed from {reference.loss:.6f} to {loss_after:.6f} "
            f"(tolerance {loss_tolerance:g}; over the source vocabulary only: {loss_after_source_vocab:.6f}). "
            "When the loss over the source vocabulary is unchanged, the added tokens took the probability mass: "
            "their rows are random (--new-token-init random) or the source's outputs are near uniform, "
            "as in an untrained model; --loss-tolerance raises the limit"
        )
    return CheckResult(
        max_abs_diff=max_abs_diff,
        loss_before=reference.loss,
        loss_after=loss_after,
        loss_after_source_vocab=loss_after_source_vocab,
        problems=problems,
    )
