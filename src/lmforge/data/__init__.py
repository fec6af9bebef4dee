"""Data for instruction fine-tuning: row sources, chat rendering, packing and the training dataset.

Public API:
- `SplitRows`, `open_orca_split`: raw rows of a deterministic train/validation split.
- `ChatDataset`: tokenized, packed (or padded) rows; resumable and sharded.
- `PackedCollator`, `PaddedCollator`: batches in the trainer's format.
- `lmforge.data.packing.model_inputs`: forward kwargs that isolate packed documents.
"""

from lmforge.data.dataset import ChatDataset, open_orca_split
from lmforge.data.packing import PackedCollator, PaddedCollator, model_inputs
from lmforge.data.rows import SplitRows

__all__ = ["ChatDataset", "SplitRows", "open_orca_split", "PackedCollator", "PaddedCollator", "model_inputs"]
