"""Row sources, bad-row handling, the validation split and row shares, on real and malformed files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.rows import SplitRows, in_validation_split
from lmforge.errors import LmforgeError


def test_jsonl_and_parquet_give_same_rows(orca_jsonl, orca_parquet):
    from_jsonl = list(SplitRows(orca_jsonl, "all"))
    from_parquet = list(SplitRows(orca_parquet, "all"))
    assert len(from_jsonl) == 900
    assert from_jsonl == from_parquet
    assert set(from_jsonl[0]) == {"id", "system_prompt", "question", "response"}


def test_validation_split_is_disjoint_and_stable(orca_jsonl, orca_parquet):
    train = [r["id"] for r in SplitRows(orca_jsonl, "train", validation_fraction=0.1)]
    validation = [r["id"] for r in SplitRows(orca_parquet, "validation", validation_fraction=0.1)]
    assert not set(train) & set(validation)
    assert len(train) + len(validation) == 900
    assert 50 <= len(validation) <= 130
    assert all(in_validation_split(row_id, 0.1) for row_id in validation)
    reseeded = [r["id"] for r in SplitRows(orca_jsonl, "validation", validation_fraction=0.1, split_seed=7)]
    assert reseeded != validation


def test_shares_are_disjoint_and_complete(orca_parquet):
    shares = []
    for rank in range(3):
        rows = SplitRows(orca_parquet, "all")
        rows.set_shard(rank, 3)
        shares.append([r["id"] for r in rows])
    assert sorted(len(s) for s in shares) == [300, 300, 300]
    assert set().union(*map(set, shares)) == {r["id"] for r in SplitRows(orca_parquet, "all")}


def test_bad_rows_are_skipped_and_counted(tmp_path, good_row, write_jsonl):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good_row(0),
        good_row(1, response=None),
        good_row(2, response="   "),
        good_row(3, question=""),
        good_row(4, system_prompt=7),
        {k: v for k, v in good_row(5).items() if k != "question"},
        b'{"id": "t.6", "question": "caf\xe9", "response": "x", "system_prompt": ""}',
        b'{"id": "t.7", "question": ',
        good_row(8),
    ])
    rows = SplitRows(path, "all")
    kept = [r["id"] for r in rows]
    assert kept == ["t.0", "t.8"]
    assert dict(rows.skipped) == {
        "null_response": 1,
        "empty_response": 1,
        "empty_question": 1,
        "non_string_system_prompt": 1,
        "missing_question": 1,
        "invalid_utf8": 1,
        "invalid_json": 1,
    }
    assert rows.rows_read == 9


def test_parquet_missing_column_fails_at_open(tmp_path):
    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"id": ["a"], "question": ["q"], "answer": ["r"]}), path)
    with pytest.raises(LmforgeError) as excinfo:
        SplitRows(path, "all")
    message = str(excinfo.value)
    assert "system_prompt" in message
    assert "response" in message
    assert str(path) in message


def test_jsonl_missing_column_fails_at_open(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "wrong.jsonl", [{"id": "a", "system_prompt": "", "prompt": "q", "response": "r"}])
    with pytest.raises(LmforgeError, match=r"wrong.jsonl: missing column\(s\) question"):
        SplitRows(path, "all")


def test_parquet_shard_directory_and_json_array(tmp_path, orca_parquet):
    table = pq.read_table(orca_parquet)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    pq.write_table(table.slice(0, 400), shard_dir / "part-0.parquet", row_group_size=128)
    pq.write_table(table.slice(400), shard_dir / "part-1.parquet", row_group_size=128)
    from_dir = [r["id"] for r in SplitRows(shard_dir, "all")]
    assert from_dir == table.column("id").to_pylist()

    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps(table.slice(0, 20).to_pylist()))
    assert [r["id"] for r in SplitRows(json_path, "all")] == from_dir[:20]


def test_missing_source_names_path(tmp_path):
    with pytest.raises(LmforgeError, match="data source not found"):
        SplitRows(str(tmp_path / "nope.jsonl"), "all")


@pytest.mark.parametrize("row_group_size", [100, 1000])
def test_parquet_resume_continues_at_next_row(tmp_path, orca_parquet, row_group_size):
    path = tmp_path / "groups.parquet"
    pq.write_table(pq.read_table(orca_parquet), path, row_group_size=row_group_size)
    reference = [r["id"] for r in SplitRows(path, "train")]

    first = SplitRows(path, "train")
    iterator = iter(first)
    head = [next(iterator)["id"] for _ in range(250)]
    state = json.loads(json.dumps(first.state_dict()))

    resumed = SplitRows(path, "train")
    resumed.load_state_dict(state)
    assert head + [r["id"] for r in resumed] == reference


def test_jsonl_resume_seeks_without_replay(tmp_path, orca_jsonl):
    path = tmp_path / "copy.jsonl"
    path.write_bytes(orca_jsonl.read_bytes())
    rows = SplitRows(path, "all")
    iterator = iter(rows)
    head = [next(iterator)["id"] for _ in range(100)]
    state = rows.state_dict()
    offset = state["position"]["offset"]

    # Overwrite everything before the saved offset: a reader that replays from the
    # start would count 100 bad rows.
    data = bytearray(path.read_bytes())
    data[: offset - 1] = b"\xff" * (offset - 1)
    path.write_bytes(bytes(data))

    resumed = SplitRows(path, "all")
    resumed.load_state_dict(state)
    tail = [r["id"] for r in resumed]
    assert len(head) + len(tail) == 900
    assert dict(resumed.skipped) == {}


def test_streamed_source_resumes_from_stream_state(orca_parquet):
    """The Hub code path (datasets streaming, its state_dict, node split) on a local parquet builder."""
    from lmforge.data.sources import HubSource

    def streamed():
        return SplitRows(HubSource("parquet", data_files=str(orca_parquet)), "train")

    reference = [r["id"] for r in SplitRows(orca_parquet, "train")]
    first = streamed()
    iterator = iter(first)
    head = [next(iterator)["id"] for _ in range(40)]
    state = first.state_dict()
    del iterator

    resumed = streamed()
    resumed.load_state_dict(state)
    assert head + [r["id"] for r in resumed] == reference

    # One file is one shard, so datasets gives each node every second row; SplitRows must not filter again.
    all_ids = [r["id"] for r in SplitRows(orca_parquet, "all")]
    node_rows = SplitRows(HubSource("parquet", data_files=str(orca_parquet)), "all")
    node_rows.set_shard(1, 2)
    assert [r["id"] for r in node_rows] == all_ids[1::2]
