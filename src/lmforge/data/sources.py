"""Row sources for Open-Orca-shaped data: Hub streams, parquet files and shards, jsonl and json.

Every source yields raw rows (dicts with `id`, `system_prompt`, `question`,
`response`) together with the position just after that row, so a reader can stop
anywhere and later seek back to that position instead of replaying the stream:

    parquet   {"file": i, "row_group": g, "row": r}   next row to read
    jsonl     {"file": i, "offset": byte_offset}      next line to read
    json      {"file": i, "row": r}                   index into the file's array
    hub       {"hub_state": <datasets IterableDataset.state_dict()>}

A file that lacks an expected column fails when the source opens, before any row
is read. A line that is not valid UTF-8 or not valid JSON is yielded as a row with
the key `BAD_ROW_KEY` set to the skip reason, so the caller counts it and moves on.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

OPEN_ORCA_COLUMNS = ("id", "system_prompt", "question", "response")
DEFAULT_HUB_DATASET = "Open-Orca/OpenOrca"
BAD_ROW_KEY = "__lmforge_bad_row__"

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
# Rows decoded per parquet read; a seek decodes at most this many rows it then discards.
PARQUET_BATCH_ROWS = 1024
# Lines of a jsonl file inspected at open time to check that the expected keys exist.
JSONL_SCHEMA_PROBE_LINES = 64

Position = dict[str, Any]


class RowSource:
    """A resumable stream of raw rows.

    `iter_rows(position)` yields `(row, position_after_row)`; passing a yielded
    position back to `iter_rows` continues with the next row. A source holds no
    iteration state of its own, so one source can serve several readers.
    """

    description: str = ""

    def iter_rows(self, position: Position | None = None) -> Iterator[tuple[dict[str, Any], Position]]:
        raise NotImplementedError

    def num_rows(self) -> int | None:
        """Number of rows, when the file metadata gives it cheaply; None otherwise."""
        return None


def _missing_columns_error(path: Path, missing: Sequence[str], found: Sequence[str]) -> LmforgeError:
    return LmforgeError(
        f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(found) or 'none'})",
        hint=f"every row needs the columns {', '.join(OPEN_ORCA_COLUMNS)}; rename the columns or pass the right file",
    )


class ParquetSource(RowSource):
    """Rows from one or more parquet files, read row group by row group.

    A position names a file, a row group and a row inside it, so resuming decodes
    at most one batch of `PARQUET_BATCH_ROWS` rows that it does not use.
    """

    def __init__(self, paths: Sequence[Path], columns: Sequence[str] = OPEN_ORCA_COLUMNS):
        import pyarrow.parquet as pq

        self.paths = [Path(p) for p in paths]
        self.columns = list(columns)
        self.description = f"parquet ({len(self.paths)} file(s), first {self.paths[0]})"
        self._row_group_sizes: list[list[int]] = []
        for path in self.paths:
            try:
                metadata = pq.ParquetFile(path)
            except Exception as exc:  # pyarrow raises ArrowInvalid, OSError and others
                raise LmforgeError(f"{path}: not a readable parquet file ({exc})", hint="check the file") from exc
            names = metadata.schema_arrow.names
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise _missing_columns_error(path, missing, names)
            self._row_group_sizes.append(
                [metadata.metadata.row_group(g).num_rows for g in range(metadata.metadata.num_row_groups)]
            )

    def num_rows(self) -> int:
        return sum(sum(sizes) for sizes in self._row_group_sizes)

    def iter_rows(self, position: Position | None = None) -> Iterator[tuple[dict[str, Any], Position]]:
        import pyarrow.parquet as pq

        position = position or {"file": 0, "row_group": 0, "row": 0}
        start_file, start_group, start_row = position["file"], position["row_group"], position["row"]
        for file_index in range(start_file, len(self.paths)):
            parquet_file = pq.ParquetFile(self.paths[file_index])
            sizes = self._row_group_sizes[file_index]
            first_group = start_group if file_index == start_file else 0
            for group in range(first_group, len(sizes)):
                skip = start_row if (file_index == start_file and group == first_group) else 0
                row_in_group = 0
                for batch in parquet_file.iter_batches(
                    batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=self.columns
                ):
                    if row_in_group + batch.num_rows <= skip:
                        row_in_group += batch.num_rows
                        continue
                    offset = max(0, skip - row_in_group)
                    rows = batch.slice(offset).to_pylist()
                    row_in_group += offset
                    for row in rows:
                        row_in_group += 1
                        if row_in_group == sizes[group]:
                            after = {"file": file_index, "row_group": group + 1, "row": 0}
                        else:
                            after = {"file": file_index, "row_group": group, "row": row_in_group}
                        yield row, after


class JsonlSource(RowSource):
    """Rows from one or more jsonl files; a position is a byte offset, so resuming seeks."""

    def __init__(self, paths: Sequence[Path], columns: Sequence[str] = OPEN_ORCA_COLUMNS):
        self.paths = [Path(p) for p in paths]
        self.columns = list(columns)
        self.description = f"jsonl ({len(self.paths)} file(s), first {self.paths[0]})"
        for path in self.paths:
            self._check_columns(path)

    def _check_columns(self, path: Path) -> None:
        """Raise when no probed line of `path` has one of the expected keys."""
        seen: set[str] = set()
        probed = 0
        with open(path, "rb") as handle:
            for raw in handle:
                if probed >= JSONL_SCHEMA_PROBE_LINES:
                    break
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if isinstance(record, dict):
                    seen.update(record)
                    probed += 1
        if probed == 0:
            return  # an empty file, or only invalid lines: each one is counted when read
        missing = [c for c in self.columns if c not in seen]
        if missing:
            raise _missing_columns_error(path, missing, sorted(seen))

    def iter_rows(self, position: Position | None = None) -> Iterator[tuple[dict[str, Any], Position]]:
        position = position or {"file": 0, "offset": 0}
        for file_index in range(position["file"], len(self.paths)):
            with open(self.paths[file_index], "rb") as handle:
                if file_index == position["file"]:
                    handle.seek(position["offset"])
                while True:
                    raw = handle.readline()
                    if not raw:
                        break
                    after = {"file": file_index, "offset": handle.tell()}
                    if not raw.strip():
                        continue
                    yield _parse_json_line(raw), after


def _parse_json_line(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {BAD_ROW_KEY: "invalid_utf8"}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {BAD_ROW_KEY: "invalid_json"}
    if not isinstance(record, dict):
        return {BAD_ROW_KEY: "not_an_object"}
    return record


class JsonArraySource(RowSource):
    """Rows from `.json` files that each contain one JSON array of row objects."""

    def __init__(self, paths: Sequence[Path], columns: Sequence[str] = OPEN_ORCA_COLUMNS):
        self.paths = [Path(p) for p in paths]
        self.columns = list(columns)
        self.description = f"json ({len(self.paths)} file(s), first {self.paths[0]})"
        for path in self.paths:
            records = self._load(path)
            if records:
                seen = set().union(*(r for r in records[:JSONL_SCHEMA_PROBE_LINES] if isinstance(r, dict)))
                missing = [c for c in self.columns if c not in seen]
                if missing:
                    raise _missing_columns_error(path, missing, sorted(seen))

    @staticmethod
    def _load(path: Path) -> list[Any]:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LmforgeError(
                f"{path}: not a valid JSON file ({exc})",
                hint="a .json source must contain one array of row objects; use .jsonl for one object per line",
            ) from exc
        if not isinstance(records, list):
            raise LmforgeError(f"{path}: expected a JSON array of rows, found {type(records).__name__}")
        return records

    def iter_rows(self, position: Position | None = None) -> Iterator[tuple[dict[str, Any], Position]]:
        position = position or {"file": 0, "row": 0}
        for file_index in range(position["file"], len(self.paths)):
            records = self._load(self.paths[file_index])
            first = position["row"] if file_index == position["file"] else 0
            for index in range(first, len(records)):
                record = records[index]
                row = record if isinstance(record, dict) else {BAD_ROW_KEY: "not_an_object"}
                yield row, {"file": file_index, "row": index + 1}


class HubSource(RowSource):
    """Rows streamed from the Hugging Face Hub with `datasets.load_dataset(..., streaming=True)`.

    Nothing is downloaded up front. A position is the `datasets` IterableDataset
    state, which records the shard and the row inside it. `name` may also be a
    packaged builder such as "parquet" or "json" with `data_files`, which streams
    local files through the same code.
    NOTE: the test suite streams local files through the "parquet" builder; the
    Hub download itself needs network access and is not run there.
    """

    def __init__(self, name: str = DEFAULT_HUB_DATASET, split: str = "train", revision: str | None = None,
                 columns: Sequence[str] = OPEN_ORCA_COLUMNS, data_files: Any = None):
        self.name = name
        self.split = split
        self.revision = revision
        self.data_files = data_files
        self.columns = list(columns)
        self.description = f"Hub dataset {name} (split {split}, streamed)"
        self._shard: tuple[int, int] = (0, 1)

    def set_node(self, rank: int, world_size: int) -> None:
        """Read only this node's share of the Hub shards (`datasets.distributed.split_dataset_by_node`)."""
        self._shard = (rank, world_size)

    def _open(self):
        import datasets

        try:
            stream = datasets.load_dataset(self.name, split=self.split, streaming=True, revision=self.revision,
                                           data_files=self.data_files)
        except Exception as exc:  # network, authentication and missing-dataset errors
            raise LmforgeError(
                f"cannot open Hub dataset {self.name!r} (split {self.split}): {exc}",
                hint="check the dataset id and network access, or point the source at local parquet/jsonl files",
            ) from exc
        names = getattr(stream, "column_names", None)
        if names:
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise LmforgeError(
                    f"Hub dataset {self.name}: missing column(s) {', '.join(missing)} (found: {', '.join(names)})"
                )
        rank, world_size = self._shard
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        return stream

    def iter_rows(self, position: Position | None = None) -> Iterator[tuple[dict[str, Any], Position]]:
        stream = self._open()
        if position and position.get("hub_state") is not None:
            stream.load_state_dict(position["hub_state"])
        for row in stream:
            yield row, {"hub_state": stream.state_dict()}


def _expand_paths(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in PARQUET_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES)
        if not files:
            raise LmforgeError(
                f"no .parquet, .jsonl or .json files in directory {path}",
                hint="point the source at a directory of parquet shards or at a data file",
            )
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)))
        if not files:
            raise LmforgeError(f"no files match {spec}", hint="check the glob pattern")
        return files
    if path.exists():
        return [path]
    return []


def open_source(source: str | Path | Sequence[str | Path], *, hub_split: str = "train",
                hub_revision: str | None = None, columns: Sequence[str] = OPEN_ORCA_COLUMNS) -> RowSource:
    """Open a row source from a path, a directory, a glob, a list of files, or a Hub dataset id.

    A string that names no existing file and looks like `owner/name` is taken as a
    Hub dataset id. Files of one source must share one format.
    """
    if isinstance(source, (list, tuple)):
        paths = [p for item in source for p in _expand_paths(str(item))]
        if len(paths) < len(source):
            raise LmforgeError(f"data file(s) not found in {list(map(str, source))}", hint="check the paths")
    else:
        spec = str(source)
        paths = _expand_paths(spec)
        if not paths:
            looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
            if looks_like_hub_id and Path(spec).suffix == "":
                return HubSource(spec, split=hub_split, revision=hub_revision, columns=columns)
            raise LmforgeError(
                f"data source not found: {spec}",
                hint="pass a parquet/jsonl/json file, a directory of shards, a glob, or a Hub id such as Open-Orca/OpenOrca",
            )

    suffixes = {p.suffix for p in paths}
    if suffixes <= set(PARQUET_SUFFIXES):
        return ParquetSource(paths, columns)
    if suffixes <= set(JSONL_SUFFIXES):
        return JsonlSource(paths, columns)
    if suffixes <= set(JSON_SUFFIXES):
        return JsonArraySource(paths, columns)
    raise LmforgeError(
        f"data source mixes or uses unsupported file types: {', '.join(sorted(suffixes))}",
        hint="use one format per source: .parquet, .jsonl or .json",
    )
