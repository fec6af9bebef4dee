"""Read `trainer_logs.json`, including the logs of runs that crashed.

The trainer writes the file as a JSON array, one record at a time: `[\\n`, then
records separated by `,\\n`, and the closing `\\n]` only at a clean exit. A run
that crashed or was killed leaves two kinds of damage, and the reader recovers
each one without raising:

- a missing closing bracket: every complete record is kept;
- a half-written last record (the process died mid-write): it is dropped, and
  `TrainerLog.problems` records how many bytes were dropped at which offset.

Anything else (no opening bracket, damage before the last record) is an error,
because silently skipping records in the middle would give a wrong summary.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

LOG_FILE_NAME = "trainer_logs.json"


@dataclass
class TrainerLog:
    """The records of one `trainer_logs.json` and what was recovered while reading it."""

    path: Path
    records: list[dict]
    complete: bool
    """True when the file ended with the closing bracket (a clean exit)."""
    problems: list[str] = field(default_factory=list)
    """One sentence per recovered defect, e.g. the missing closing bracket."""

    @property
    def label(self) -> str:
        """Short name for legends and table headers: the run directory name, or the file name."""
        if self.path.name == LOG_FILE_NAME:
            return self.path.parent.name
        return self.path.stem

    @property
    def train_records(self) -> list[dict]:
        """Per-logging-step records (those with a `loss`)."""
        return [r for r in self.records if "loss" in r and "event" not in r]

    @property
    def eval_records(self) -> list[dict]:
        """Evaluation records (those with an `eval_loss`)."""
        return [r for r in self.records if "eval_loss" in r]

    @property
    def start_records(self) -> list[dict]:
        """One `start` record per launch; more than one means the run was resumed."""
        return [r for r in self.records if r.get("event") == "start"]

    @property
    def end_record(self) -> dict | None:
        """The last `end` record, or None when the run never finished."""
        ends = [r for r in self.records if r.get("event") == "end"]
        return ends[-1] if ends else None


def read_trainer_log(path: str | Path) -> TrainerLog:
    """Parse one `trainer_logs.json`, recovering the crash damage listed in the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"log file not found: {path}", hint=f"pass a {LOG_FILE_NAME}, a run directory or a model directory")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise LmforgeError(f"log file {path} is empty; the run wrote no records", hint="check that the run started training")

    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_damaged(path, text)
    if not isinstance(data, list) or not all(isinstance(record, dict) for record in data):
        raise LmforgeError(f"{path} is not a trainer log: expected a JSON array of objects")
    return TrainerLog(path=path, records=data, complete=True)


def _read_damaged(path: Path, text: str) -> TrainerLog:
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, 0)
    if not text.startswith("[", position):
        raise LmforgeError(f"{path} is not a trainer log: it does not start with '['")
    position += 1

    records: list[dict] = []
    problems: list[str] = []
    complete = False
    while True:
        position = _skip_whitespace(text, position)
        if position >= len(text):
            problems.append("the closing bracket is missing (the run did not exit cleanly)")
            break
        if text[position] == "]":
            complete = True
            break
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            if _complete_record_follows(decoder, text, position + 1):
                line = text.count("\n", 0, exc.pos) + 1
                raise LmforgeError(
                    f"{path} line {line}: invalid JSON in a record that is not the last one ({exc.msg})",
                    hint="the file was damaged after it was written; only a half-written last record is recovered",
                ) from None
            if not text.rstrip().endswith("]"):
                problems.append("the closing bracket is missing (the run did not exit cleanly)")
            problems.append(f"dropped a half-written last record ({len(text) - position} bytes at offset {position})")
            break
        if not isinstance(record, dict):
            raise LmforgeError(f"{path}: record {len(records) + 1} is not a JSON object")
        records.append(record)
        position = _skip_whitespace(text, end)
        if position < len(text) and text[position] == ",":
            position += 1

    for problem in problems:
        logger.debug("%s: %s", path, problem)
    return TrainerLog(path=path, records=records, complete=complete, problems=problems)


def _complete_record_follows(decoder: json.JSONDecoder, text: str, position: int) -> bool:
    """Return True when a line at or after `position` starts (after an optional comma) a complete JSON object."""
    while True:
        position = text.find("\n", position)
        if position < 0:
            return False
        position += 1
        start = _skip_whitespace(text, position)
        if text.startswith(",", start):
            start = _skip_whitespace(text, start + 1)
        if text.startswith("{", start):
            try:
                decoder.raw_decode(text, start)
                return True
            except json.JSONDecodeError:
                continue


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


MAX_LOG_DEPTH = 3
"""How many directory levels below a path `find_trainer_logs` searches (DIR/run/runs/NAME is 3)."""


def find_trainer_logs(paths: list[str | Path]) -> list[Path]:
    """Expand each path into `trainer_logs.json` files.

    A path may be the file itself, or a directory with logs up to three levels
    down: a run directory (`runs/NAME/`), a `runs/` directory, a model directory
    with `runs/*/`, or a directory above one (a quickstart DIR has `run/runs/*/`).
    Raise `LmforgeError` for a path that does not exist or contains no log.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
            continue
        if not path.exists():
            raise LmforgeError(f"log path not found: {path}", hint=f"pass a {LOG_FILE_NAME}, a run directory or a model directory")
        candidates = [path / LOG_FILE_NAME]
        for depth in range(1, MAX_LOG_DEPTH + 1):
            candidates += sorted(path.glob("*/" * depth + LOG_FILE_NAME))
        logs = [candidate for candidate in candidates if candidate.is_file()]
        if not logs:
            raise LmforgeError(
                f"no {LOG_FILE_NAME} found in {path} or up to {MAX_LOG_DEPTH} levels below it",
                hint=f"pass a run directory, e.g. {path}/runs/NAME, or a directory above its runs/ directory",
            )
        found.extend(logs)
    return list(dict.fromkeys(found))
