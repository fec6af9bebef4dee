"""Best-fit packing, packed-row boundaries, overflow policies and fill on the real rows."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.data import ChatDataset, SplitRows
from lmforge.data.chat import Document
from lmforge.data.packing import (
    IGNORE_INDEX,
    PackedCollator,
    best_fit_decreasing,
    build_row,
    cu_seqlens,
    greedy_pack,
)


def reference_best_fit_decreasing(lengths, max_length):
    """Linear-scan best-fit decreasing, the textbook definition."""
    bins, room = [], []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        candidates = [b for b in range(len(bins)) if room[b] >= lengths[item]]
        if candidates:
            best = min(candidates, key=lambda b: (room[b], b))
            bins[best].append(item)
            room[best] -= lengths[item]
        else:
            bins.append([item])
            room.append(max_length - lengths[item])
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_matches_linear_scan(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(400)]
    fast = best_fit_decreasing(lengths, 512)
    slow = reference_best_fit_decreasing(lengths, 512)
    assert fast == slow
    assert all(sum(lengths[i] for i in b) <= 512 for b in fast)
    assert sorted(i for b in fast for i in b) == list(range(400))


def test_best_fit_beats_greedy_bins():
    rng = random.Random(3)
    lengths = [rng.randint(20, 900) for _ in range(500)]
    assert len(best_fit_decreasing(lengths, 1024)) < len(greedy_pack(lengths, 1024))


def test_packed_row_restarts_positions_and_masks_boundaries():
    documents = [Document([10, 11, 12], 1), Document([20, 21], 1), Document([30, 31], 1)]
    row = build_row(documents)
    batch = PackedCollator(pad_token_id=0, max_length=8)([row])
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 20, 21, 30, 31, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 0]
    assert batch["labels"][0].tolist() == [11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, 31, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["seq_lens"][0].tolist() == [3, 2, 2, 1]
    assert cu_seqlens(batch["position_ids"]).tolist() == [0, 3, 5, 7, 8]
    assert "attention_mask" not in batch


def test_cu_seqlens_spans_flattened_batch():
    rows = [build_row([Document([1, 2, 3], 1)]), build_row([Document([4, 5], 1), Document([6], 1)])]
    batch = PackedCollator(pad_token_id=0, max_length=4)(rows)
    assert cu_seqlens(batch["position_ids"]).tolist() == [0, 3, 4, 6, 7, 8]


@pytest.mark.parametrize("overflow, expected_docs", [("truncate", 2), ("split", None), ("drop", 1)])
def test_long_row_overflow_policies(tmp_path, tiny_tokenizer, good_row, write_jsonl, overflow, expected_docs):
    long_text = "The quick brown fox jumps over the lazy dog. " * 1200  # ~10k tokens
    path = write_jsonl(tmp_path / "long.jsonl", [good_row(0, response=long_text), good_row(1)])
    dataset = ChatDataset(SplitRows(path, "all"), tiny_tokenizer, max_length=256, overflow=overflow)
    rows = list(dataset)
    assert dataset.stats[f"overflow_{overflow}"] == 1
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    documents = sum(len(r["seq_lens"]) for r in rows)
    if expected_docs is not None:
        assert documents == expected_docs
    else:
        long_tokens = len(tiny_tokenizer(long_text)["input_ids"])
        assert long_tokens > 10_000
        assert documents > long_tokens // 256


def test_fill_at_2048_on_real_rows(orca_parquet, tiny_tokenizer):
    dataset = ChatDataset(SplitRows(orca_parquet, "all"), tiny_tokenizer, max_length=2048, overflow="split")
    rows = list(dataset)
    assert dataset.stats["documents"] == 900
    assert dataset.fill_efficiency() >= 0.99
    assert all(len(r["input_ids"]) <= 2048 for r in rows)
    assert all(sum(r["seq_lens"]) == len(r["input_ids"]) for r in rows)


def test_padded_variant_one_document_per_row(orca_jsonl, tiny_tokenizer):
    dataset = ChatDataset(SplitRows(orca_jsonl, "all"), tiny_tokenizer, max_length=4096, packing=False)
    rows = [row for _, row in zip(range(4), dataset)]
    assert all(len(r["seq_lens"]) == 1 for r in rows)
    batch = dataset.collator()(rows)
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (4, width)
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(r["input_ids"]) for r in rows]
    pad_positions = batch["attention_mask"] == 0
    assert torch.all(batch["labels"][pad_positions] == IGNORE_INDEX)
