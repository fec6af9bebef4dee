"""Resume exactness (source position and packer buffer) and equal batch counts across ranks."""

from __future__ import annotations

import io
import os

import pyarrow.parquet as pq
import pytest
import torch

from lmforge.data import ChatDataset, SplitRows
from lmforge.data.packing import IGNORE_INDEX

BATCH_ROWS = 2


def make_dataset(path, tokenizer, **kwargs):
    options = dict(max_length=512, buffer_size=48, overflow="split")
    options.update(kwargs)
    return ChatDataset(SplitRows(path, "train", validation_fraction=0.05), tokenizer, **options)


def take_steps(iterator, steps):
    return [[next(iterator) for _ in range(BATCH_ROWS)] for _ in range(steps)]


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_after_step_10_matches_uninterrupted(tmp_path, orca_parquet, tiny_tokenizer, packing):
    path = tmp_path / "groups.parquet"
    pq.write_table(pq.read_table(orca_parquet), path, row_group_size=64)

    uninterrupted = take_steps(iter(make_dataset(path, tiny_tokenizer, packing=packing)), 20)

    first = make_dataset(path, tiny_tokenizer, packing=packing)
    iterator = iter(first)
    assert take_steps(iterator, 10) == uninterrupted[:10]
    state = roundtrip(first.state_dict())
    if packing:
        assert state["buffer"], "the checkpoint should hold documents waiting in the packer's buffer"
    del iterator

    resumed = make_dataset(path, tiny_tokenizer, packing=packing)
    resumed.load_state_dict(state)
    collate = resumed.collator()
    resumed_steps = take_steps(iter(resumed), 10)
    for expected, actual in zip(uninterrupted[10:], resumed_steps):
        assert torch.equal(collate(expected)["input_ids"], collate(actual)["input_ids"])
        assert torch.equal(collate(expected)["labels"], collate(actual)["labels"])
    assert resumed_steps == uninterrupted[10:]


def test_epoch_restarts_after_exhaustion(tmp_path, orca_jsonl, tiny_tokenizer):
    path = tmp_path / "head.jsonl"
    path.write_text("".join(orca_jsonl.read_text().splitlines(keepends=True)[:150]))
    dataset = make_dataset(path, tiny_tokenizer, max_length=1024)
    first_epoch = list(dataset)
    second_epoch = list(dataset)
    assert dataset.epoch == 2
    # Each epoch packs the same rows; the shuffle seed includes the epoch, so their order differs.
    assert sorted(row["input_ids"] for row in first_epoch) == sorted(row["input_ids"] for row in second_epoch)
    assert [row["input_ids"] for row in first_epoch] != [row["input_ids"] for row in second_epoch]


def test_packed_rows_shuffled_within_buffer(tmp_path, orca_jsonl, tiny_tokenizer):
    path = tmp_path / "head.jsonl"
    path.write_text("".join(orca_jsonl.read_text().splitlines(keepends=True)[:150]))
    ordered = list(make_dataset(path, tiny_tokenizer, max_length=1024, shuffle=False))
    shuffled = list(make_dataset(path, tiny_tokenizer, max_length=1024))
    assert sorted(row["input_ids"] for row in shuffled) == sorted(row["input_ids"] for row in ordered)
    # Without the shuffle, best-fit decreasing yields the row with the longest document first.
    assert max(ordered[0]["seq_lens"]) == max(max(row["seq_lens"]) for row in ordered)
    assert [row["input_ids"] for row in shuffled] != [row["input_ids"] for row in ordered]


def _count_rows_on_rank(rank, world_size, init_file, path, tokenizer_dir, results_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        counts = []
        for options in ({"epoch_end": "min"}, {"epoch_end": "pad"}, {"sync_ranks": False}):
            dataset = ChatDataset(SplitRows(path, "all"), tokenizer_dir, max_length=1024, buffer_size=32, **options)
            dataset.set_shard(rank, world_size)
            rows = list(dataset)
            counts += [len(rows), sum(1 for row in rows if row["labels"] == [IGNORE_INDEX])]
        with open(os.path.join(results_dir, f"rank{rank}.txt"), "w") as handle:
            handle.write(" ".join(map(str, counts)))
    finally:
        dist.destroy_process_group()


def test_ranks_yield_equal_row_counts(tmp_path, orca_parquet, tiny_llama_dir):
    # Two shares of unequal token volume: rank 1 gets the long responses.
    table = pq.read_table(orca_parquet).slice(0, 240)
    order = sorted(range(table.num_rows), key=lambda i: len(table.column("response")[i].as_py()))
    interleaved = [i for pair in zip(order[:120], order[120:]) for i in pair]
    path = tmp_path / "skewed.parquet"
    pq.write_table(table.take(interleaved), path)

    world_size = 2
    # fork: the children inherit the imported torch and transformers instead of importing them again.
    torch.multiprocessing.start_processes(
        _count_rows_on_rank,
        args=(world_size, str(tmp_path / "init"), str(path), str(tiny_llama_dir), str(tmp_path)),
        nprocs=world_size,
        start_method="fork",
    )
    counts = [list(map(int, (tmp_path / f"rank{r}.txt").read_text().split())) for r in range(world_size)]
    stop_at_min = [c[0] for c in counts]
    padded = [c[2] for c in counts]
    filler = [c[3] for c in counts]
    unsynced = [c[4] for c in counts]
    assert unsynced[0] != unsynced[1], "the test data should give the ranks unequal shares"
    assert stop_at_min == [min(unsynced)] * world_size
    assert padded == [max(unsynced)] * world_size
    assert filler == [max(unsynced) - n for n in unsynced]
