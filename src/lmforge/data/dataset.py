"""The training dataset: streamed rows, tokenized, packed (or one per row), resumable and sharded.

Problem: a DDP step is a collective, so if one rank's data share runs out one step
before the others, the other ranks wait forever in the next all-reduce. Packing
makes the number of rows per share data-dependent, so equal row shares do not give
equal batch counts.

Mechanism: when `torch.distributed` is initialized and the data world size is
larger than 1, every rank takes part in one all-reduce (on a gloo group of its
own) before it yields each row, which tells every rank how many ranks still have a
row. `epoch_end` picks the rule, and both give every rank the same number of rows:
- "min" (default for training rows): the epoch ends on every rank at the first
  row that some rank does not have, so the longer shares drop their last rows;
- "pad" (default for validation rows): ranks that have run out yield filler rows
  (one pad token, label -100, nothing trained) until every rank has run out, so
  no row is dropped and an evaluation sees the whole split.
This needs every rank to draw the same number of rows per step, which DDP with
equal per-device batch sizes does.

Usage: build `ChatDataset(SplitRows(source), tokenizer, max_length=2048)`, let the
trainer call `set_shard(rank, world_size)`, iterate, and collate with
`dataset.collator()`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from typing import Any, Iterator

from lmforge.data.chat import ChatTokenizer, Document, load_tokenizer
from lmforge.data.packing import IGNORE_INDEX, PackedCollator, PaddedCollator, best_fit_decreasing, build_row
from lmforge.data.rows import SplitRows
from lmforge.errors import LmforgeError

try:  # torch is a hard dependency, but keep this module importable for the CLI's --help
    from torch.utils.data import IterableDataset
except ImportError:  # pragma: no cover
    IterableDataset = object  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("truncate", "split", "drop")
EPOCH_END_RULES = ("min", "pad")
# Rows rendered and tokenized per tokenizer call.
ENCODE_BATCH_ROWS = 64


class ChatDataset(IterableDataset):
    """Open-Orca rows as packed (or padded) token rows for a causal LM.

    Each yielded row is a dict with `input_ids`, `labels` (shifted, -100 where not
    trained), `position_ids` (restarting at 0 per document) and `seq_lens`.
    With `packing=True`, documents from a look-ahead buffer of `buffer_size`
    documents are packed by best-fit decreasing into rows of at most
    `max_length` tokens. Rows filled below `carry_over_below` go back into the
    next buffer once, so only the stream's end leaves a short row. With
    `shuffle=True` (default), each buffer's packed rows are yielded in a seeded random
    order instead of longest documents first. With `packing=False`, each row holds one
    document.

    Documents longer than `max_length` follow `overflow`: `truncate` keeps the
    first `max_length` tokens, `split` cuts them into `max_length` pieces (each
    its own document), `drop` skips them; every case is counted in `stats`.

    Under torch.distributed, `epoch_end` ("min" or "pad", see the module
    docstring) makes every rank yield the same number of rows. None means "pad"
    for the validation split and "min" otherwise.

    Checkpoint behaviour: `state_dict()` contains the row reader's state (source
    position, shard, skip counts), the packer's buffer (tokenized documents not
    yet packed), the rows packed but not yet yielded, the epoch, the count of buffers
    packed in it (the shuffle seed's input) and `stats`.
    Tokenizer, max_length and every other setting come from the constructor on
    load, so load a state only into a dataset built with the same settings.
    """

    def __init__(self, rows: SplitRows | str, tokenizer: Any, *, max_length: int = 2048, packing: bool = True,
                 buffer_size: int = 1024, carry_over_below: float = 0.98, overflow: str = "split",
                 chat_template: str | None = None, add_bos: bool = True, add_eos: bool = True,
                 train_on: str = "all", pad_to: str | None = None, sync_ranks: bool = True,
                 epoch_end: str | None = None, shuffle: bool = True, shuffle_seed: int = 0):
        super().__init__()
        if overflow not in OVERFLOW_POLICIES:
            raise LmforgeError(f"invalid overflow {overflow!r}", hint=f"use one of: {', '.join(OVERFLOW_POLICIES)}")
        if epoch_end is not None and epoch_end not in EPOCH_END_RULES:
            raise LmforgeError(f"invalid epoch_end {epoch_end!r}", hint=f"use one of: {', '.join(EPOCH_END_RULES)}")
        if int(max_length) < 2:
            raise LmforgeError(f"invalid max_length {max_length}", hint="use at least 2 tokens, e.g. 2048")
        if int(buffer_size) < 1:
            raise LmforgeError(f"invalid buffer_size {buffer_size}", hint="use at least 1 document, e.g. 1024")
        self.rows = rows if isinstance(rows, SplitRows) else SplitRows(rows)
        self.tokenizer = load_tokenizer(tokenizer)
        self.chat = ChatTokenizer(
            self.tokenizer, chat_template=chat_template, add_bos=add_bos, add_eos=add_eos, train_on=train_on
        )
        self.max_length = int(max_length)
        self.packing = bool(packing)
        self.buffer_size = int(buffer_size)
        self.carry_over_below = float(carry_over_below)
        self.overflow = overflow
        self.pad_to = pad_to or ("max_length" if packing else "longest")
        self.sync_ranks = sync_ranks
        if epoch_end is None:
            epoch_end = "pad" if self.rows.split == "validation" else "min"
        self.epoch_end = epoch_end
        self.epoch = 0
        self.shuffle = bool(shuffle)
        self.shuffle_seed = int(shuffle_seed)
        self._packed_buffers = 0  # buffers packed so far this epoch; seeds each buffer's row shuffle
        self.stats: Counter[str] = Counter()
        self._buffer: list[tuple[Document, bool]] = []  # (document, already carried over once)
        self._ready: deque[list[Document]] = deque()  # packed rows not yet yielded
        self._sync_group = None
        self._sync = False
        # Rows read and skipped in the last finished epoch; the row reader's own counts restart each epoch.
        self.last_epoch_rows: dict[str, Any] | None = None
        # A list here receives each document's token length before the overflow policy (for --stats).
        self.observed_lengths: list[int] | None = None

    # --- sharding -------------------------------------------------------------------------

    def set_shard(self, rank: int, world_size: int) -> None:
        """Read share `rank` of `world_size` and, under torch.distributed, end epochs together.

        Call on every rank, in the same order for every dataset, before iterating.
        """
        self.rows.set_shard(rank, world_size)
        self._sync = False
        if world_size <= 1 or not self.sync_ranks:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            logger.warning(
                "data shard %d of %d without torch.distributed: ranks cannot agree on the epoch end, "
                "so shares may yield different numbers of rows", rank, world_size,
            )
            return
        if dist.get_world_size() != world_size:
            # NOTE: a data-parallel group smaller than the world (e.g. DP x PP) needs its own group here.
            logger.warning(
                "data world size %d differs from the process group size %d; the epoch end is not synchronized",
                world_size, dist.get_world_size(),
            )
            return
        # A group of its own keeps these row checks apart from the training collectives (and off NCCL).
        self._sync_group = dist.new_group(backend="gloo")
        self._sync = True

    def _ranks_with_row(self, has_row: bool) -> tuple[bool, bool]:
        """Return (every rank has a row, some rank has a row), agreed by all ranks."""
        import torch
        import torch.distributed as dist

        flag = 1 if has_row else 0
        flags = torch.tensor([flag, -flag], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self._sync_group)
        return bool(flags[0].item()), bool(-flags[1].item())

    def _filler_row(self) -> dict[str, list[int]]:
        """Return a one-token row with nothing to train, for a rank whose share has run out."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        self.stats["filler_rows"] += 1
        return {"input_ids": [pad_id], "labels": [IGNORE_INDEX], "position_ids": [0], "seq_lens": [1]}

    # --- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            # NOTE: with several DataLoader workers each worker reads a sub-share, and the epoch end is
            # not synchronized across ranks (workers cannot join collectives); use num_workers <= 1 for DDP.
            self.rows.set_shard(
                self.rows.rank * worker.num_workers + worker.id, self.rows.world_size * worker.num_workers
            )
            self._sync = False

        if not self._sync:
            yield from self._iter_local_rows()
            self._end_epoch()
            return

        local_rows = self._iter_local_rows()
        while True:
            row = next(local_rows, None)
            every_rank, some_rank = self._ranks_with_row(row is not None)
            if not some_rank:
                break
            if not every_rank and self.epoch_end == "min":
                logger.info("data epoch %d ends on every rank: some rank's share has no more rows", self.epoch)
                break
            yield row if row is not None else self._filler_row()
        self._end_epoch()

    def _end_epoch(self) -> None:
        self.last_epoch_rows = {"rows_read": self.rows.rows_read, "skipped": dict(self.rows.skipped)}
        logger.info(
            "data epoch %d done: %d rows read, skipped %s, %d documents, %d rows packed, fill %.4f",
            self.epoch, self.rows.rows_read, dict(self.rows.skipped) or "none", self.stats["documents"],
            self.stats["rows"], self.fill_efficiency(),
        )
        self.epoch += 1
        self._packed_buffers = 0
        self.rows.reset()
        self._buffer.clear()
        self._ready.clear()

    def _iter_local_rows(self) -> Iterator[dict[str, list[int]]]:
        row_iter = iter(self.rows)
        exhausted = False
        while True:
            if self._ready:
                documents = self._ready.popleft()
                row = build_row(documents)
                self.stats["rows"] += 1
                self.stats["tokens"] += len(row["input_ids"])
                yield row
                continue
            if exhausted and not self._buffer:
                return
            wanted = self.buffer_size - len(self._buffer) if self.packing else ENCODE_BATCH_ROWS
            while wanted > 0 and not exhausted:
                chunk = []
                for raw in row_iter:
                    chunk.append(raw)
                    if len(chunk) >= min(wanted, ENCODE_BATCH_ROWS):
                        break
                else:
                    exhausted = True
                documents = self._fit_documents(self.chat.encode_rows(chunk))
                self._buffer.extend((document, False) for document in documents)
                wanted -= len(chunk)
            if self.packing:
                self._pack_buffer(final=exhausted)
            else:
                self._ready.extend([document] for document, _ in self._buffer)
                self._buffer.clear()

    def _fit_documents(self, documents: list[Document]) -> list[Document]:
        """Apply the overflow policy to documents longer than max_length and count them."""
        fitted = []
        for document in documents:
            self.stats["documents"] += 1
            length = len(document.input_ids)
            if self.observed_lengths is not None:
                self.observed_lengths.append(length)
            if length <= self.max_length:
                fitted.append(document)
                continue
            self.stats[f"overflow_{self.overflow}"] += 1
            if self.overflow == "truncate":
                fitted.append(Document(document.input_ids[: self.max_length], document.first_target))
            elif self.overflow == "split":
                for start in range(0, length, self.max_length):
                    piece = document.input_ids[start : start + self.max_length]
                    if len(piece) > 1:  # a 1-token piece has no target
                        fitted.append(Document(piece, max(1, document.first_target - start)))
        return fitted

    def _pack_buffer(self, final: bool) -> None:
        """Pack the buffer into ready rows; unless `final`, return under-filled rows' documents once."""
        documents = [document for document, _ in self._buffer]
        carried = [was_carried for _, was_carried in self._buffer]
        bins = best_fit_decreasing([len(d.input_ids) for d in documents], self.max_length)
        carry: list[tuple[Document, bool]] = []
        packed_rows: list[list[Document]] = []
        for items in bins:
            used = sum(len(documents[i].input_ids) for i in items)
            can_carry = not final and all(not carried[i] for i in items) and len(carry) + len(items) < self.buffer_size // 2
            if can_carry and used < self.carry_over_below * self.max_length:
                carry.extend((documents[i], True) for i in items)
            else:
                packed_rows.append([documents[i] for i in items])
        if self.shuffle:
            # Best-fit decreasing emits the longest documents first; without a shuffle each
            # buffer's steps would see documents ordered by length. The seed depends only on
            # (shuffle_seed, epoch, buffer count), which the state contains, so a resume repeats it.
            seed = (self.shuffle_seed * 1_000_003 + self.epoch) * 1_000_003 + self._packed_buffers
            random.Random(seed).shuffle(packed_rows)
        self._packed_buffers += 1
        self._ready.extend(packed_rows)
        self._buffer = carry

    # --- collation and stats --------------------------------------------------------------

    def collator(self):
        """Return the collator for this dataset's rows (packed or padded), padding with the pad token."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        if self.packing:
            return PackedCollator(pad_id, self.max_length, pad_to=self.pad_to)
        return PaddedCollator(pad_id, self.max_length, pad_to=self.pad_to)

    def fill_efficiency(self) -> float:
        """Non-pad tokens / token slots of the rows yielded so far (rows padded to max_length)."""
        slots = self.stats["rows"] * self.max_length
        return self.stats["tokens"] / slots if slots else 0.0

    # --- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows.state_dict(),
            "buffer": [(list(d.input_ids), d.first_target, carried) for d, carried in self._buffer],
            "ready": [[(list(d.input_ids), d.first_target) for d in row] for row in self._ready],
            "epoch": self.epoch,
            "packed_buffers": self._packed_buffers,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        self._buffer = [(Document(list(ids), first), carried) for ids, first, carried in state["buffer"]]
        self._ready = deque([Document(list(ids), first) for ids, first in row] for row in state["ready"])
        self.epoch = state["epoch"]
        self._packed_buffers = state.get("packed_buffers", 0)
        self.stats = Counter(state["stats"])


def open_orca_split(source: str | list[str], split: str = "train", *, validation_fraction: float = 0.01,
                    split_seed: int = 0, hub_revision: str | None = None) -> SplitRows:
    """Return the raw rows of one split of an Open-Orca-shaped source (see `SplitRows`)."""
    return SplitRows(source, split, validation_fraction=validation_fraction, split_seed=split_seed,
                     hub_revision=hub_revision)
