"""Best-fit packing, shifted labels across document boundaries, and document-isolated model inputs.

Packing three documents A (3 tokens), B (2 tokens) and C (2 tokens) into a row of
`max_length` 8, with one pad token at the end, gives

    input_ids     A0  A1  A2  B0  B1  C0  C1  <pad>
    position_ids   0   1   2   0   1   0   1   0
    labels        A1  A2 -100 B1 -100 C1 -100 -100
    seq_lens       3, 2, 2, 1              (the pad tail counts as its own segment)

`labels[t]` is the target for `input_ids[t]` (already shifted). The last token of
each document gets -100, so A2 never learns to predict B0. The attention mask the
model must see is block-diagonal causal: B0 attends only to B0, C1 to C0 and C1.

`model_inputs(batch)` gives a Hugging Face causal LM that mask. By default it
passes `position_ids` and no `attention_mask`; transformers 5 (`masking_utils.
find_packed_sequence_indices`) then starts a new document wherever a position id
does not follow the previous one by +1, for SDPA, eager and flex attention. An
all-ones 2D `attention_mask` or a KV cache would switch that detection off, so
`model_inputs` drops the mask and passes `use_cache=False`. With `mask="4d"` it builds the block-diagonal causal mask explicitly
instead, and for flash attention it flattens the batch into one row and passes
`cu_seq_lens_q/k` for the variable-length kernel.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Sequence

from lmforge.data.chat import Document

IGNORE_INDEX = -100
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


class CapacityIndex:
    """Open bins indexed by remaining capacity, with O(log max_length) best-fit lookup.

    A max-segment tree over capacities 0..max_length stores, at leaf `c`, the value
    `c` when some open bin has exactly `c` tokens left and -1 otherwise. The best
    fit for a document of length L is the leftmost leaf whose value is >= L, found
    by one root-to-leaf descent. Among bins with equal room the lowest bin id
    wins, which keeps the packing independent of insertion history.
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self._size = 1 << max(1, math.ceil(math.log2(max_length + 1)))
        self._tree = [-1] * (2 * self._size)
        self._bins_by_capacity: dict[int, list[int]] = {}

    def _refresh(self, capacity: int) -> None:
        node = capacity + self._size
        self._tree[node] = capacity if self._bins_by_capacity.get(capacity) else -1
        node //= 2
        while node:
            self._tree[node] = max(self._tree[2 * node], self._tree[2 * node + 1])
            node //= 2

    def add(self, bin_id: int, capacity: int) -> None:
        heapq.heappush(self._bins_by_capacity.setdefault(capacity, []), bin_id)
        self._refresh(capacity)

    def pop_best_fit(self, length: int) -> tuple[int, int] | None:
        """Remove and return `(bin_id, capacity)` of the fullest bin that fits `length`, or None."""
        if self._tree[1] < length:
            return None
        node = 1
        while node < self._size:
            node = 2 * node if self._tree[2 * node] >= length else 2 * node + 1
        capacity = node - self._size
        bin_id = heapq.heappop(self._bins_by_capacity[capacity])
        self._refresh(capacity)
        return bin_id, capacity


def best_fit_decreasing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Pack items by best-fit decreasing and return the bins as lists of item indices.

    Items are placed longest first, each into the open bin with the least room
    that still fits it; a new bin opens when none fits. Bins come back in the
    order they were opened, items within a bin in placement order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    index = CapacityIndex(max_length)
    bins: list[list[int]] = []
    for item in order:
        length = lengths[item]
        if length > max_length:
            raise ValueError(f"item {item} has length {length} > max_length {max_length}")
        fit = index.pop_best_fit(length)
        if fit is None:
            bins.append([item])
            index.add(len(bins) - 1, max_length - length)
        else:
            bin_id, capacity = fit
            bins[bin_id].append(item)
            index.add(bin_id, capacity - length)
    return bins


def greedy_pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Pack items in arrival order, starting a new bin whenever the next item does not fit."""
    bins: list[list[int]] = []
    used = max_length + 1
    for item, length in enumerate(lengths):
        if used + length > max_length:
            bins.append([])
            used = 0
        bins[-1].append(item)
        used += length
    return bins


def shifted_labels(document: Document) -> list[int]:
    """Return the shifted labels of one document: labels[t] = input_ids[t + 1] when that is a target."""
    ids = document.input_ids
    labels = [IGNORE_INDEX] * len(ids)
    for t in range(max(0, document.first_target - 1), len(ids) - 1):
        labels[t] = ids[t + 1]
    return labels


def build_row(documents: Sequence[Document]) -> dict[str, list[int]]:
    """Concatenate documents into one unpadded row with labels, position_ids and seq_lens."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for document in documents:
        input_ids.extend(document.input_ids)
        labels.extend(shifted_labels(document))
        position_ids.extend(range(len(document.input_ids)))
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "seq_lens": [len(d.input_ids) for d in documents],
    }


def _init_padding(collator, pad_token_id: int, max_length: int | None, pad_to: str) -> None:
    if pad_to not in ("max_length", "longest"):
        raise ValueError(f"invalid pad_to {pad_to!r}: use 'max_length' or 'longest'")
    if pad_to == "max_length" and max_length is None:
        raise ValueError("pad_to='max_length' needs max_length")
    collator.pad_token_id = pad_token_id
    collator.max_length = max_length
    collator.pad_to = pad_to


def _batch_width(collator, rows: Sequence[dict[str, list[int]]]) -> int:
    if collator.pad_to == "max_length":
        return collator.max_length
    return max(len(row["input_ids"]) for row in rows)


class PackedCollator:
    """Stack packed rows into the trainer's batch format.

    Rows are padded at the end to `max_length` (or, with `pad_to="longest"`, to the
    longest row of the batch). The pad tail is a segment of its own. Its
    position_ids restart at 0 and its labels are -100, so no document attends to
    it and it attends to no document. The batch contains `input_ids`, `labels`, `position_ids` and
    `seq_lens` ([batch, max segments], zero-filled), and no `attention_mask`.
    Stateless.
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None, pad_to: str = "max_length"):
        _init_padding(self, pad_token_id, max_length, pad_to)

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = _batch_width(self, rows)
        input_ids, labels, position_ids, seq_lens = [], [], [], []
        for row in rows:
            pad = width - len(row["input_ids"])
            if pad < 0:
                raise ValueError(f"packed row of {len(row['input_ids'])} tokens exceeds the batch width {width}")
            input_ids.append(row["input_ids"] + [self.pad_token_id] * pad)
            labels.append(row["labels"] + [IGNORE_INDEX] * pad)
            position_ids.append(row["position_ids"] + list(range(pad)))
            seq_lens.append(row["seq_lens"] + ([pad] if pad else []))
        max_segments = max(len(s) for s in seq_lens)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
            "seq_lens": torch.tensor([s + [0] * (max_segments - len(s)) for s in seq_lens], dtype=torch.long),
        }


class PaddedCollator:
    """Pad one-document rows to `max_length` or to the longest row, with an `attention_mask`.

    Padding goes on the right; pad tokens get label -100 and attention_mask 0,
    also when the pad token id equals the EOS id. Stateless.
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None, pad_to: str = "longest"):
        _init_padding(self, pad_token_id, max_length, pad_to)

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = _batch_width(self, rows)
        input_ids, labels, position_ids, attention_mask = [], [], [], []
        for row in rows:
            length = len(row["input_ids"])
            pad = width - length
            if pad < 0:
                raise ValueError(f"row of {length} tokens exceeds the batch width {width}")
            input_ids.append(row["input_ids"] + [self.pad_token_id] * pad)
            labels.append(row["labels"] + [IGNORE_INDEX] * pad)
            # Pads continue the count so the row does not read as packed; attention_mask hides them.
            position_ids.append(list(range(width)))
            attention_mask.append([1] * length + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }


def document_ids(position_ids):
    """Number the documents of each row: a document starts wherever a position id is not the previous one + 1."""
    import torch

    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    return starts.cumsum(-1)


def is_packed(position_ids) -> bool:
    """Return True when some row of `position_ids` contains more than one document."""
    return bool((document_ids(position_ids)[:, -1] > 0).any())


def cu_seqlens(position_ids):
    """Cumulative sequence lengths over the flattened batch (int32, starts with 0), for varlen attention."""
    import torch

    flat_starts = (torch.diff(position_ids, dim=-1) != 1)
    starts = torch.cat([torch.ones_like(position_ids[:, :1], dtype=torch.bool), flat_starts], dim=-1).reshape(-1)
    offsets = starts.nonzero().reshape(-1).to(torch.int32)
    total = torch.tensor([position_ids.numel()], dtype=torch.int32, device=position_ids.device)
    return torch.cat([offsets, total])


def block_causal_mask(position_ids, attention_mask=None, dtype=None):
    """Return the [batch, 1, seq, seq] block-diagonal causal mask of a packed batch.

    A query attends to keys of its own document at or before it. Keys with
    `attention_mask` 0 are masked, except that every query keeps its own
    position so no softmax row is empty. With `dtype=torch.bool` the mask is
    True where a query may attend (what SDPA takes); with a float dtype it is
    additive: 0 where a query may attend and the dtype's minimum elsewhere (what
    eager attention takes). The default is float32.
    """
    import torch

    dtype = dtype or torch.float32
    docs = document_ids(position_ids)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (docs[:, :, None] == docs[:, None, :]) & causal
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
        allowed |= torch.eye(seq, dtype=torch.bool, device=position_ids.device)
    if dtype == torch.bool:
        return allowed[:, None, :, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


def model_inputs(batch: dict[str, Any], attn_implementation: str | None = None, mask: str = "auto",
                 dtype=None) -> dict[str, Any]:
    """Return the keyword arguments for a Hugging Face causal LM's forward (no labels).

    For a packed batch, each document attends only to itself:
    - `mask="auto"` (default) passes `input_ids` and `position_ids` and no 2D
      `attention_mask`, so transformers builds the per-document causal mask from
      the position ids (SDPA, eager, flex). If the batch's `attention_mask` has
      zeros, it falls back to the explicit 4D mask below.
    - `mask="4d"` passes the block-diagonal causal mask of `block_causal_mask`:
      boolean for `attn_implementation="sdpa"` (so autocast dtypes need not
      match), otherwise additive in `dtype` (float32 by default), which SDPA and
      eager both accept.
    - `attn_implementation` naming flash attention flattens the batch to one row
      and passes `cu_seq_lens_q/k` and `max_length_q/k`. The logits then have
      shape [1, batch * seq, vocab], so compare them with `labels.reshape(1, -1)`.
    A batch of one document per row passes its `attention_mask` through.

    Every variant passes `use_cache=False`: with a KV cache present (the default
    in eval mode), transformers skips the packed-sequence detection.
    """
    if mask not in ("auto", "4d"):
        raise ValueError(f"invalid mask {mask!r}: use 'auto' or '4d'")
    input_ids = batch["input_ids"]
    position_ids = batch.get("position_ids")
    attention_mask = batch.get("attention_mask")
    if position_ids is None or not is_packed(position_ids):
        kwargs = {"input_ids": input_ids, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs

    if attn_implementation in FLASH_IMPLEMENTATIONS:
        # NOTE: not run in the test suite (no flash-attn on CPU); follows transformers 5.25
        # _flash_attention_forward, which takes precomputed cu_seq_lens for a flattened batch.
        lengths = cu_seqlens(position_ids)
        max_length = int((lengths[1:] - lengths[:-1]).max())
        return {
            "input_ids": input_ids.reshape(1, -1),
            "position_ids": position_ids.reshape(1, -1),
            "cu_seq_lens_q": lengths,
            "cu_seq_lens_k": lengths,
            "max_length_q": max_length,
            "max_length_k": max_length,
            "use_cache": False,
        }

    has_padding = attention_mask is not None and not bool(attention_mask.bool().all())
    if mask == "4d" or has_padding:
        if attn_implementation == "sdpa":
            import torch

            dtype = torch.bool
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": block_causal_mask(position_ids, attention_mask, dtype=dtype),
            "use_cache": False,
        }
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
