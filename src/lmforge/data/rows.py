"""Row checks, the deterministic train/validation split, and per-rank row shares.

Open-Orca ships only a train split, so lmforge holds out a validation set by a hash
of each row's `id`: a row is in validation when
`sha1(f"{split_seed}:{id}")` read as a fraction of 2**64 is below `validation_fraction`.
The split depends on the id alone, so a row never lands in both splits, whatever
the file order, sharding or resume point.

Rows that cannot be trained on are skipped and counted by reason, never raised:
`missing_<field>`, `null_<field>`, `non_string_<field>`, `empty_question`,
`empty_response`, and for jsonl lines `invalid_utf8`, `invalid_json`, `not_an_object`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any, Iterator

from lmforge.data.sources import BAD_ROW_KEY, OPEN_ORCA_COLUMNS, Position, RowSource, open_source
from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "all")


def row_skip_reason(row: dict[str, Any]) -> str | None:
    """Return why `row` must be skipped, or None when it is a usable Open-Orca row."""
    if BAD_ROW_KEY in row:
        return row[BAD_ROW_KEY]
    for field in OPEN_ORCA_COLUMNS:
        if field not in row:
            return f"missing_{field}"
        value = row[field]
        if value is None:
            return f"null_{field}"
        if not isinstance(value, str):
            return f"non_string_{field}"
    if not row["question"].strip():
        return "empty_question"
    if not row["response"].strip():
        return "empty_response"
    return None


def in_validation_split(row_id: str, validation_fraction: float, split_seed: int = 0) -> bool:
    """Return True when the row with this id belongs to the held-out validation split."""
    if validation_fraction <= 0.0:
        return False
    digest = hashlib.sha1(f"{split_seed}:{row_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


class SplitRows:
    """Usable rows of one split of a source, restricted to this reader's share.

    Iterating yields row dicts with the keys `id`, `system_prompt`, `question`
    and `response`. `set_shard(rank, world_size)` keeps only the raw rows whose
    index in the source is congruent to `rank` modulo `world_size` (a streamed
    `datasets` source splits by node itself instead), so shares are
    disjoint and differ in size by at most one raw row. Every rank still decodes
    the whole file but validates, renders and tokenizes only its own rows.

    Checkpoint behaviour: `state_dict()` contains the source position after the
    last row handed out (file, row group and row, or a byte offset, or the Hub
    stream state), the raw row index, the share and the skip counts. The source,
    split and fraction come from the constructor on load.
    """

    def __init__(self, source: str | RowSource | list[str], split: str = "train", *,
                 validation_fraction: float = 0.01, split_seed: int = 0, hub_split: str = "train",
                 hub_revision: str | None = None):
        if split not in SPLITS:
            raise LmforgeError(f"invalid split {split!r}", hint=f"use one of: {', '.join(SPLITS)}")
        if not 0.0 <= validation_fraction < 1.0:
            raise LmforgeError(
                f"invalid validation_fraction {validation_fraction}", hint="use a fraction in [0, 1), e.g. 0.01"
            )
        if isinstance(source, RowSource):
            self.source = source
        else:
            self.source = open_source(source, hub_split=hub_split, hub_revision=hub_revision)
        self.split = split
        self.validation_fraction = float(validation_fraction)
        self.split_seed = int(split_seed)
        self.rank = 0
        self.world_size = 1
        self._filter_rank = 0
        self._filter_world_size = 1
        self.skipped: Counter[str] = Counter()
        self.rows_read = 0
        self._position: Position | None = None
        self._next_index = 0

    def set_shard(self, rank: int, world_size: int) -> None:
        """Read only share `rank` of `world_size`; call before iterating."""
        if not 0 <= rank < world_size:
            raise LmforgeError(f"invalid shard rank {rank} for world_size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        if hasattr(self.source, "set_node"):
            self.source.set_node(self.rank, self.world_size)
            self._filter_rank, self._filter_world_size = 0, 1
        else:
            self._filter_rank, self._filter_world_size = self.rank, self.world_size

    def _keeps(self, row: dict[str, Any]) -> bool:
        if self.split == "all":
            return True
        held_out = in_validation_split(row["id"], self.validation_fraction, self.split_seed)
        return held_out if self.split == "validation" else not held_out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield usable rows of this split and share, from the current position onwards.

        The position advances as rows are yielded, so `state_dict()` taken between
        two rows resumes with the next one.
        """
        index = self._next_index
        for row, after in self.source.iter_rows(self._position):
            own = index % self._filter_world_size == self._filter_rank
            index += 1
            self._position, self._next_index = after, index
            if not own:
                continue
            self.rows_read += 1
            reason = row_skip_reason(row)
            if reason is not None:
                self.skipped[reason] += 1
                if self.skipped[reason] == 1 or self.skipped[reason] % 1000 == 0:
                    logger.warning(
                        "skipping row %d of %s: %s (%d row(s) skipped for this reason so far)",
                        index - 1, self.source.description, reason, self.skipped[reason],
                    )
                continue
            if self._keeps(row):
                yield {k: row[k] for k in OPEN_ORCA_COLUMNS}

    def reset(self) -> None:
        """Start again from the first row (a new epoch); skip counts restart too."""
        self._position, self._next_index = None, 0
        self.skipped.clear()
        self.rows_read = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self._position,
            "next_index": self._next_index,
            "rank": self.rank,
            "world_size": self.world_size,
            "rows_read": self.rows_read,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise LmforgeError(
                f"data state was saved for shard {state['rank']} of {state['world_size']}, "
                f"but this reader is shard {self.rank} of {self.world_size}",
                hint="resume with the same number of data-parallel ranks, or start the data stream afresh",
            )
        self._position = state["position"]
        self._next_index = state["next_index"]
        self.rows_read = state["rows_read"]
        self.skipped = Counter(state["skipped"])
