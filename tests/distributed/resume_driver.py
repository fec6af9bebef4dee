"""Train the tiny Open-Orca config through the real Trainer under torchrun, in phases.

Run as `torchrun --nproc-per-node 2 resume_driver.py --backend ddp --model DIR --work DIR`.
Phases, in one launch so the tests pay for process start-up once:

1. `full`: 6 steps in WORK/full, saving checkpoints at steps 3 and 6;
2. `resumed`: WORK/resumed starts with a copy of full's checkpoint-3 and resumes it to step 6;
3. `short` (with --short-rows N): one epoch over the first N Open-Orca rows, so the
   two ranks' data shares differ in length.

Each rank writes WORK/PHASE.rank{r}.json with its final record; the tests compare
the phases' trainer_logs.json and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT = REPO_ROOT / "configs" / "open_orca"


def train_phase(name: str, work: Path, model_dir: Path, sets: list[str], rank: int, world_size: int) -> dict:
    from lmforge.config import load_config

    run_dir = work / name
    config = load_config("tiny/cpu_test.yaml", project_dir=PROJECT, sets=sets)
    trainer = config.construct(
        "trainer",
        run_dir=str(run_dir),
        model_dir=str(model_dir),
        rank=rank,
        local_rank=rank,
        world_size=world_size,
        resolved_config=config.preprocessed,
    )
    end = trainer.train()
    stats = getattr(trainer.train_dataset, "stats", {})
    record = {
        "global_step": trainer.global_step,
        "reason": end.get("reason"),
        "documents": stats.get("documents", 0),
        "packed_rows": stats.get("rows", 0),
    }
    (work / f"{name}.rank{rank}.json").write_text(json.dumps(record))
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["ddp", "pipeline"], required=True)
    parser.add_argument("--schedule", default="ZBVZeroBubble")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--short-rows", type=int, default=0)
    args = parser.parse_args()

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sets = [
        f"ns.backend={args.backend}",
        f"ns.world_size={world_size}",
        f"ns.pipeline_schedule={args.schedule}",
        "ns.max_steps=6",
        "ns.save_steps=3",
        "ns.eval_steps=3",
        "ns.save_total_limit=null",
    ]

    train_phase("full", args.work, args.model, sets, rank, world_size)

    resumed_checkpoints = args.work / "resumed" / "checkpoints"
    if rank == 0:
        resumed_checkpoints.mkdir(parents=True)
        shutil.copytree(args.work / "full" / "checkpoints" / "checkpoint-3", resumed_checkpoints / "checkpoint-3")
    dist.barrier()
    train_phase("resumed", args.work, args.model, sets, rank, world_size)

    if args.short_rows:
        rows = args.work / "short_rows.jsonl"
        if rank == 0:
            source = REPO_ROOT.parent / "shared" / "data" / "openorca" / "openorca_first900.jsonl"
            with open(source) as lines:
                rows.write_text("".join(next(lines) for _ in range(args.short_rows)))
        dist.barrier()
        short_sets = sets + [f"ns.dataset_path={rows}", "ns.max_steps=-1", "ns.validation_fraction=0", "ns.eval_steps=0"]
        train_phase("short", args.work, args.model, short_sets, rank, world_size)

    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
