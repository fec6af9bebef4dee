"""read_trainer_log on complete and crash-damaged logs, and log discovery from directories."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.logs.reader import find_trainer_logs, read_trainer_log


def test_complete_log(model_dir):
    log = read_trainer_log(model_dir / "runs" / "first" / "trainer_logs.json")
    assert log.complete
    assert log.problems == []
    assert len(log.records) == 10
    assert len(log.start_records) == 2
    assert [r["global_step"] for r in log.train_records] == [2, 4, 6, 8]
    assert [r["eval_loss"] for r in log.eval_records] == [4.2, 3.9]
    assert log.end_record["reason"] == "completed"
    assert log.label == "first"


def test_missing_closing_bracket(tmp_path, resumed_log_text):
    path = tmp_path / "trainer_logs.json"
    path.write_text(resumed_log_text.rstrip().removesuffix("]"))
    log = read_trainer_log(path)
    assert not log.complete
    assert len(log.records) == 10
    assert log.problems == ["the closing bracket is missing (the run did not exit cleanly)"]


def test_half_written_last_record(tmp_path, resumed_log_text):
    cut = resumed_log_text.index('"tokens": 12288') + 5
    path = tmp_path / "trainer_logs.json"
    path.write_text(resumed_log_text[:cut])
    log = read_trainer_log(path)
    assert not log.complete
    assert [r.get("global_step") for r in log.records] == [0, 2, 4, 4, 4, 4]
    assert log.problems[0] == "the closing bracket is missing (the run did not exit cleanly)"
    assert log.problems[1].startswith("dropped a half-written last record (")


def test_damage_before_last_record_is_an_error(tmp_path, resumed_log_text):
    lines = resumed_log_text.splitlines()
    lines[2] = lines[2][:40]
    path = tmp_path / "trainer_logs.json"
    path.write_text("\n".join(lines))
    with pytest.raises(LmforgeError, match=r"line 3: invalid JSON in a record that is not the last one"):
        read_trainer_log(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(LmforgeError, match="log file not found"):
        read_trainer_log(tmp_path / "nope.json")
    empty = tmp_path / "trainer_logs.json"
    empty.write_text("")
    with pytest.raises(LmforgeError, match="is empty"):
        read_trainer_log(empty)
    empty.write_text('{"loss": 1}')
    with pytest.raises(LmforgeError, match="expected a JSON array"):
        read_trainer_log(empty)


def test_find_logs_from_each_path_kind(model_dir):
    log_file = model_dir / "runs" / "first" / "trainer_logs.json"
    second = model_dir / "runs" / "second"
    second.mkdir()
    (second / "trainer_logs.json").write_text("[\n")

    assert find_trainer_logs([log_file]) == [log_file]
    assert find_trainer_logs([log_file.parent]) == [log_file]
    assert find_trainer_logs([model_dir / "runs"]) == [log_file, second / "trainer_logs.json"]
    assert find_trainer_logs([model_dir]) == [log_file, second / "trainer_logs.json"]
    # A quickstart DIR keeps its logs three levels down, in DIR/run/runs/NAME.
    assert find_trainer_logs([model_dir.parent]) == [log_file, second / "trainer_logs.json"]

    empty_dir = model_dir.parent / "empty"
    empty_dir.mkdir()
    with pytest.raises(LmforgeError, match="no trainer_logs.json found in"):
        find_trainer_logs([empty_dir])
    with pytest.raises(LmforgeError, match="log path not found"):
        find_trainer_logs([model_dir.parent / "missing"])
