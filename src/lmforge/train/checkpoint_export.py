"""Export a trainer checkpoint as a Hugging Face model directory without trainer state.

The export contains `config.json`, `generation_config.json`, the weights
(`model.safetensors` or shards with their index) and the tokenizer files. The
optimizer, scheduler, dataset and RNG states, `trainer_state.json`, `config.yaml`
and the `COMPLETE` marker stay behind. For a pipeline checkpoint the per-rank
`model_rank{r}.safetensors` files are merged into one model, so this also works
on checkpoints saved with `merge_checkpoint: false`. The export is written to a
temporary directory beside the destination and renamed when complete.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

# Trainer state that a model directory does not need.
TRAINER_STATE_PATTERNS = (
    r"optimizer(_rank\d+)?\.pt",
    r"scheduler(_rank\d+)?\.pt",
    r"dataset_rank\d+\.pt",
    r"rng_rank\d+\.pt",
    r"model_rank\d+\.safetensors",
    r"trainer_state\.json",
    r"config\.yaml",
    r"COMPLETE",
)
WEIGHT_PATTERN = r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?"


def _is_trainer_state(name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in TRAINER_STATE_PATTERNS)


def export_checkpoint(checkpoint: str | Path, destination: str | Path, overwrite: bool = False) -> Path:
    """Write the model of `checkpoint` to `destination` (see the module docstring); return `destination`."""
    from lmforge.train.pipeline_checkpoint import rank_weight_files, write_merged_model

    checkpoint, destination = Path(checkpoint), Path(destination)
    if not (checkpoint / "config.json").is_file():
        raise LmforgeError(
            f"{checkpoint} is not a checkpoint: config.json not found",
            hint="pass a RUN_DIR/checkpoints/checkpoint-STEP directory",
        )
    if destination.exists() and not overwrite:
        raise LmforgeError(f"destination {destination} already exists", hint="choose a new directory or pass --overwrite")

    merge = bool(rank_weight_files(checkpoint))
    has_merged = any(re.fullmatch(WEIGHT_PATTERN, path.name) for path in checkpoint.iterdir())
    if not merge and not has_merged:
        raise LmforgeError(
            f"{checkpoint} has no model weights (model.safetensors or model_rank*.safetensors)",
            hint="the checkpoint is incomplete: export another one",
        )

    tmp_dir = destination.with_name(f".tmp-{destination.name}")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        for path in checkpoint.iterdir():
            if path.is_file() and not _is_trainer_state(path.name):
                # A pipeline export rewrites the weights from the rank files below.
                if merge and re.fullmatch(WEIGHT_PATTERN, path.name):
                    continue
                shutil.copy2(path, tmp_dir / path.name)
        if merge:
            write_merged_model(checkpoint, tmp_dir)
        if destination.exists():
            shutil.rmtree(destination)
        tmp_dir.rename(destination)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Exported %s to %s (%s)", checkpoint, destination, "merged pipeline stages" if merge else "copied")
    return destination
