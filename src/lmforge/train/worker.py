"""The per-process entry point that `torchrun` starts: `python -m lmforge.train.worker ...`.

Each process initialises torch.distributed (gloo on CPU, nccl on CUDA) before the
config is constructed, so datasets and backends can query their rank. It then
constructs the config's `trainer` target with the variables `run_dir`, `model_dir`,
`rank`, `local_rank`, `world_size` and `resolved_config`, applies the `train`
command's loop overrides (`--save-strategy` and the like) to `trainer.args`, and
calls `train()`.

Signals: the first SIGTERM or SIGINT requests save-stop at the next optimizer-step
boundary (all ranks agree on it there); a second one aborts at once without saving.
`lmforge train` starts torchrun in its own session and forwards the signals it gets,
so one Ctrl-C in a terminal reaches each worker once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from datetime import timedelta

logger = logging.getLogger("lmforge.train.worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmforge.train.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config path, relative to the project's config directory")
    parser.add_argument("--project", help="project directory")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="ns.KEY=VALUE override (repeatable)")
    parser.add_argument("--run-dir", required=True, help="run directory: checkpoints/ and runs/ are written here")
    parser.add_argument("--model-dir", required=True, help="base model directory")
    parser.add_argument("--device-type", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--overrides", default="{}", help="JSON object of TrainingArguments fields to override")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser.parse_args(argv)


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun's environment; return (rank, local_rank, world_size)."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        # Checkpoint saves and evaluations can keep ranks apart for a long time.
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
    return rank, local_rank, world_size


class SignalState:
    """Turns the first SIGTERM/SIGINT into a save-stop request and the second into an abort."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.count = 0

    def __call__(self, signum, frame):
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            logger.warning("%s received: saving a checkpoint and stopping at the next step boundary "
                           "(send it again to abort without saving)", name)
            self.trainer.request_control("save-stop")
            return
        logger.error("%s received again: aborting without saving", name)
        raise KeyboardInterrupt

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)


def run(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.errors import LmforgeError
    from lmforge.train.trainer import validate_arguments

    rank, local_rank, world_size = init_distributed(args.device_type)
    try:
        config = load_config(args.config, project_dir=args.project, sets=args.sets)
        trainer = config.construct(
            "trainer",
            run_dir=args.run_dir,
            model_dir=args.model_dir,
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            resolved_config=config.preprocessed,
        )
        trainer.config_name = config.name
        # The start log record reports these plan values even when the config's `extra:` omits them.
        trainer.args.extra.setdefault("config", config.name)
        for key in ("seq_len", "tokens_per_step"):
            if config.namespace.get(key) is not None:
                trainer.args.extra.setdefault(key, config.namespace[key])
        for name, value in json.loads(args.overrides).items():
            setattr(trainer.args, name, value)
        validate_arguments(trainer.args)
        SignalState(trainer).install()
        end = trainer.train()
    except LmforgeError as exc:
        if args.debug:
            raise
        print(f"error: [rank {rank}] {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if end["reason"] in ("completed", "save-stop", "stop") else 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    if args.debug:
        level = logging.DEBUG
    elif rank == 0:
        level = logging.INFO
    else:
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    sys.exit(run(args))


if __name__ == "__main__":
    main()
