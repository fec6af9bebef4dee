"""Checkpoint layout, atomic writes, discovery for auto-resume, and rotation.

A checkpoint is `OUTPUT_DIR/checkpoints/checkpoint-STEP/`:

    model.safetensors, config.json,        Hugging Face weights, loadable with
    generation_config.json                 `AutoModelForCausalLM.from_pretrained(path)`
    tokenizer files                        `tokenizer.save_pretrained(path)`
    optimizer.pt, scheduler.pt             one copy, or `optimizer_rank{r}.pt` and
                                           `scheduler_rank{r}.pt` when each rank's
                                           optimizer covers different parameters
    dataset_rank{r}.pt                     `train_dataset.state_dict()` of rank r
    rng_rank{r}.pt                         torch, CUDA, Python and NumPy RNG states of rank r
    trainer_state.json                     step, tokens, epoch, best losses, run name
    config.yaml                            the fully resolved config
    COMPLETE                               written last

Every rank writes its files into `checkpoints/.tmp-checkpoint-STEP/`; after a
barrier, rank 0 writes `COMPLETE` and renames the directory. A crash at any point
leaves either the previous checkpoints untouched or a directory without `COMPLETE`,
which auto-resume skips with a warning. The directory must be on a file system
that every rank can read and write (one node, or a shared mount across nodes).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"checkpoint-{step}"


def temporary_checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f".tmp-checkpoint-{step}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def checkpoint_step(path: Path) -> Optional[int]:
    match = _CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path, *, warn_incomplete: bool = False) -> list[Path]:
    """Return the complete checkpoints under `output_dir`, oldest step first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = checkpoint_step(path)
        if step is None or not path.is_dir():
            continue
        if is_complete(path):
            found.append((step, path))
        elif warn_incomplete:
            logger.warning("Skipping incomplete checkpoint %s (no %s marker; it was interrupted while saving)", path, COMPLETE_MARKER)
    return [path for _, path in sorted(found)]


def find_resume_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """Return the newest complete checkpoint, warning about newer incomplete ones."""
    complete = list_checkpoints(output_dir, warn_incomplete=True)
    return complete[-1] if complete else None


def validate_checkpoint(path: str | Path) -> Path:
    """Return `path` as a Path if it is a complete checkpoint, else raise LmforgeError."""
    from lmforge.errors import LmforgeError

    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"checkpoint {path} not found", hint="pass a checkpoints/checkpoint-STEP directory to --resume-from")
    if not is_complete(path):
        raise LmforgeError(
            f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker; it was interrupted while saving)",
            hint="resume from an older checkpoint, or delete this one",
        )
    if not (path / TRAINER_STATE_NAME).is_file():
        raise LmforgeError(f"checkpoint {path} has no {TRAINER_STATE_NAME}; it is a model directory, not a trainer checkpoint")
    return path


# ---------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- weights


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint's safetensors weights (single file or sharded index) into `model`."""
    from safetensors.torch import load_file

    index_path = checkpoint / "model.safetensors.index.json"
    if index_path.is_file():
        shard_names = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        shard_names = ["model.safetensors"]

    state: dict[str, torch.Tensor] = {}
    if not (checkpoint / shard_names[0]).is_file() and any(checkpoint.glob("model_rank*.safetensors")):
        # A pipeline checkpoint saved without the merged model: merge its per-rank stage files.
        from lmforge.train.pipeline_checkpoint import merge_rank_weights

        state = merge_rank_weights(checkpoint)
        shard_names = []
    for name in shard_names:
        state.update(load_file(str(checkpoint / name)))

    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        from lmforge.errors import LmforgeError

        raise LmforgeError(
            f"checkpoint {checkpoint} does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}",
            hint="resume with the same model config that wrote the checkpoint, or pass --no-resume",
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# ---------------------------------------------------------------- save / rotate


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def finalize_checkpoint(tmp_dir: Path, final_dir: Path) -> None:
    """Write the COMPLETE marker into `tmp_dir` and rename it to `final_dir` (replacing an older copy)."""
    (tmp_dir / COMPLETE_MARKER).write_text("")
    if final_dir.exists():
        # Re-saving the same step (e.g. a save request right after a scheduled save).
        trash = final_dir.with_name(f".old-{final_dir.name}")
        if trash.exists():
            shutil.rmtree(trash)
        final_dir.rename(trash)
        tmp_dir.rename(final_dir)
        shutil.rmtree(trash)
    else:
        tmp_dir.rename(final_dir)


def rotate_checkpoints(output_dir: str | Path, keep_last: Optional[int], best_checkpoint: Optional[str]) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, keeping the best one; return the deleted paths."""
    if keep_last is None or keep_last <= 0:
        return []
    complete = list_checkpoints(output_dir)
    keep = set(complete[-keep_last:])
    if best_checkpoint:
        keep.add(Path(best_checkpoint))
    deleted = []
    for path in complete:
        if path not in keep and path.resolve() not in {p.resolve() for p in keep}:
            shutil.rmtree(path)
            deleted.append(path)
            logger.debug("Deleted old checkpoint %s", path)
    return deleted
