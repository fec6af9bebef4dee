"""Merge the per-rank weight files of a pipeline checkpoint into one Hugging Face model.

A pipeline rank holds only its stages, so each rank saves `model_rank{r}.safetensors`
with its stages' parameters under Hugging Face names; the file's metadata lists
the stage indices (`stages`), the total `num_stages` and the `schedule`. Merging
checks that the files together cover every stage exactly once, drops the
duplicate `lm_head.weight` of a tied model, and writes `model.safetensors` (or
5 GB shards with an index) beside `config.json`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

RANK_FILE_GLOB = "model_rank*.safetensors"


def rank_weight_files(checkpoint: Path) -> list[Path]:
    """Return the `model_rank{r}.safetensors` files of a checkpoint, in rank order."""
    files = list(Path(checkpoint).glob(RANK_FILE_GLOB))
    return sorted(files, key=lambda path: int(path.stem.removeprefix("model_rank")))


def merge_rank_weights(checkpoint: Path) -> dict[str, Any]:
    """Load every rank's stage weights and return one state dict with Hugging Face names."""
    from safetensors import safe_open

    files = rank_weight_files(checkpoint)
    if not files:
        raise LmforgeError(
            f"no {RANK_FILE_GLOB} files in {checkpoint}",
            hint="pass a checkpoint written by the pipeline backend",
        )
    merged: dict[str, Any] = {}
    seen_stages: list[int] = []
    num_stages: Optional[int] = None
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "stages" not in metadata or "num_stages" not in metadata:
                raise LmforgeError(f"{path} has no stage metadata; it was not written by the pipeline backend")
            seen_stages += [int(index) for index in metadata["stages"].split(",")]
            if num_stages is None:
                num_stages = int(metadata["num_stages"])
            elif num_stages != int(metadata["num_stages"]):
                raise LmforgeError(
                    f"{path} belongs to a {metadata['num_stages']}-stage pipeline, the other files to a "
                    f"{num_stages}-stage one",
                    hint="remove stale model_rank*.safetensors files from an older run",
                )
            for key in handle.keys():
                merged[key] = handle.get_tensor(key)
    if sorted(seen_stages) != list(range(num_stages)):
        raise LmforgeError(
            f"the rank files in {checkpoint} hold stages {sorted(seen_stages)}, expected each of 0..{num_stages - 1} once",
            hint="the checkpoint is incomplete: copy every rank's model_rank*.safetensors into it",
        )
    return merged


def write_merged_model(checkpoint: Path, destination: Path, config=None) -> Path:
    """Write the merged weights of `checkpoint` as a Hugging Face model into `destination`.

    `config` is the model's `PretrainedConfig`; without it `config.json` is read
    from the checkpoint. Returns `destination`.
    """
    from huggingface_hub import save_torch_state_dict

    checkpoint, destination = Path(checkpoint), Path(destination)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(checkpoint)
    state = merge_rank_weights(checkpoint)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    destination.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, destination, metadata={"format": "pt"})
    logger.info("merged %d pipeline rank files of %s into %s", len(rank_weight_files(checkpoint)), checkpoint, destination)
    return destination
