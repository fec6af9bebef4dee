"""The trainer loop shared by every backend.

Problem: single-device, DDP and pipeline training differ only in how one optimizer
step's forward and backward passes run. The loop around them must behave identically
on all three and resume exactly: data, loss normalisation, optimizer and scheduler,
logs, evaluation, checkpoints, control requests and the divergence guard.

Mechanism: `Trainer.train()` runs setup, the loop and teardown as separate
methods. Each optimizer step:

1. draws all `gradient_accumulation_steps` micro-batches first and counts their
   trained tokens (labels != -100), summed over the data-parallel ranks;
2. calls `backend.forward_backward(micro_batches, num_trained_tokens)`, which
   divides summed token losses by that count, so micro-batch 1 x accumulation 8
   and micro-batch 8 x accumulation 1 give the same gradients;
3. clips and measures the gradient norm, checks the loss for divergence (before
   the update, so the weights are still the last good ones), then steps the
   optimizer and the LR scheduler;
4. logs, evaluates and checkpoints on their intervals, then applies control
   requests (control socket, SIGTERM/SIGINT) on every rank at this boundary.

Usage (a config's `trainer` target builds it; see docs/training.md):
    Trainer(args=TrainingArguments(output_dir=run_dir, max_steps=100),
            model_factory=..., tokenizer=..., train_dataset=..., data_collator=...,
            optimizer_factory=..., lr_scheduler_factory=...).train()
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.train import checkpoints as ckpt
from lmforge.train.arguments import TrainingArguments
from lmforge.train.backends.base import Backend
from lmforge.train.callbacks import JsonLogWriter, TensorBoardLogger, TextGenerationCallback, TrainerCallback
from lmforge.train.divergence import DivergenceDetector
from lmforge.train.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

BACKENDS = {
    "single": "lmforge.train.backends.single:SingleDeviceBackend",
    "ddp": "lmforge.train.backends.ddp:DDPBackend",
    "pipeline": "lmforge.train.backends.pipeline:PipelineBackend",
}

CONTROL_COMMANDS = ("save", "save-stop", "stop", "abort", "start-annealing", "status")
_SIGNAL_CODES = {"save-stop": 1, "abort": 2}


def resolve_backend(name: str) -> type[Backend]:
    """Import the backend class registered under `name` ("single", "ddp", "pipeline")."""
    import importlib

    if name not in BACKENDS:
        raise LmforgeError(f"backend {name!r} is invalid", hint=f"use one of: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise LmforgeError(f"backend {name!r} is not available in this lmforge build ({module_name} is missing)") from exc
    return getattr(module, class_name)


class Trainer:
    """Trains a causal LM with one of the backends; `train()` runs to max_steps, an epoch limit or a stop request.

    Checkpoint behaviour: a checkpoint (see `lmforge.train.checkpoints`) contains the
    model weights, the optimizer and scheduler states, each rank's dataset and RNG
    states, and `trainer_state.json` with `global_step`, `tokens` (trained tokens
    so far), `epoch`, `best_train_loss`, `best_eval_loss`, `best_checkpoint`,
    `run_name`, `world_size` and the divergence detector's moving averages. On
    resume everything else comes from the constructor and the current config, so a
    changed `max_steps` or schedule takes effect.
    """

    def __init__(
        self,
        *,
        args: TrainingArguments,
        model_factory: Callable[[], torch.nn.Module],
        tokenizer,
        train_dataset: Iterable,
        data_collator: Callable[[list], dict],
        optimizer_factory: Callable[[list], torch.optim.Optimizer],
        lr_scheduler_factory: Optional[Callable] = None,
        eval_dataset: Optional[Iterable] = None,
        callbacks: Sequence[TrainerCallback] = (),
        backend: str = "single",
        backend_options: Optional[dict] = None,
        resolved_config: Optional[str] = None,
    ):
        validate_arguments(args)
        self.args = args
        self.model_factory = model_factory
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.data_collator = data_collator
        self.optimizer_factory = optimizer_factory
        self.lr_scheduler_factory = lr_scheduler_factory
        self.callbacks: list[TrainerCallback] = list(callbacks)
        self.backend_name = backend
        self.backend_options = dict(backend_options or {})
        self.resolved_config = resolved_config
        self.config_name: Optional[str] = None
        """Config name shown by `lmforge control list`; the worker sets it after constructing the trainer."""

        self.backend: Optional[Backend] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.lr_scheduler = None
        self.tensorboard: Optional[TensorBoardLogger] = None
        self.json_log: Optional[JsonLogWriter] = None
        self.control = None
        self.run_name: Optional[str] = None
        self.run_dir: Optional[Path] = None

        self.global_step = 0
        self.tokens = 0
        self.epoch = 0
        self.best_train_loss = math.inf
        self.best_eval_loss = math.inf
        self.best_checkpoint: Optional[str] = None
        self.last_eval_loss: Optional[float] = None
        self.last_learning_rate: Optional[float] = None
        """Learning rate applied in the most recent optimizer step."""
        self.last_loss: Optional[float] = None
        """Mean token loss of the most recent optimizer step."""
        self.divergence = DivergenceDetector(args.divergence_threshold, args.divergence_window, args.divergence_min_history)

        self._resume_checkpoint: Optional[Path] = None
        self._resume_step: Optional[int] = None
        self._local_requests: list[str] = []
        self._last_eval_step: Optional[int] = None
        self._last_save_step: Optional[int] = None
        self._train_iterator = None
        self._examples_this_epoch = 0
        self._stop_reason: Optional[str] = None
        self._eval_start_state: Optional[dict] = None

    # ------------------------------------------------------------------ public helpers

    @property
    def is_main_process(self) -> bool:
        return self.backend is None or self.backend.is_main_process

    @property
    def logging_interval(self) -> int:
        return _scaled_interval(self.args.logging_steps, self.args.step_cadence)

    @property
    def eval_interval(self) -> int:
        return _scaled_interval(self.args.eval_steps, self.args.step_cadence) if self.args.eval_steps > 0 else 0

    @property
    def save_interval(self) -> int:
        return _scaled_interval(self.args.save_steps, self.args.step_cadence)

    def request_control(self, command: str) -> None:
        """Queue a control command on this rank, applied at the next optimizer-step boundary.

        Safe to call from a signal handler. Only `save-stop` and `abort` are
        shared with the other ranks when they are requested on a rank other than 0.
        """
        if command not in CONTROL_COMMANDS:
            raise ValueError(f"unknown control command {command!r}; expected one of {CONTROL_COMMANDS}")
        self._local_requests.append(command)

    # ------------------------------------------------------------------ train

    def train(self) -> dict:
        """Run setup, the training loop and teardown; return the final record (see trainer_logs.json)."""
        self._setup()
        started = time.time()
        start_tokens = self.tokens
        try:
            self._train_loop()
        except KeyboardInterrupt:
            # A second SIGINT/SIGTERM in the worker: stop at once, without a checkpoint.
            self._stop_reason = "abort"
            raise
        finally:
            end_record = self._finish(started, start_tokens)
        return end_record

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        args = self.args
        backend_class = resolve_backend(self.backend_name)
        self.backend = backend_class(
            self.backend_options, mixed_precision=args.mixed_precision, loss_chunk_size=args.loss_chunk_size
        )
        self.backend.setup()
        self._check_output_dir()
        self._seed_everything(args.seed + self.backend.rank)

        self._resume_checkpoint = self._find_resume_checkpoint()
        state = self._read_trainer_state(self._resume_checkpoint) if self._resume_checkpoint else None
        self.run_name = args.run_name or (state or {}).get("run_name") or datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        self.run_dir = Path(args.output_dir) / "runs" / self.run_name

        self._build_model_and_optimizer()
        self._shard_datasets()
        if state is not None:
            self._load_checkpoint(self._resume_checkpoint, state)
        if args.start_annealing:
            # The scheduler ignores a second request, so repeating the flag on resume is harmless.
            self._start_annealing("--start-annealing")
        self._train_iterator = self._new_train_iterator()

        if self.is_main_process:
            self._open_run_logs()
        self._start_control_server()
        if args.eval_prompts_file and args.eval_steps > 0:
            self.callbacks.append(TextGenerationCallback(args.eval_prompts_file, args.eval_max_new_tokens))
        self._write_start_record()
        for callback in self.callbacks:
            callback.on_train_begin(self)

    def _check_output_dir(self) -> None:
        output_dir = Path(self.args.output_dir)
        if self.backend.is_main_process:
            try:
                ckpt.checkpoints_root(output_dir).mkdir(parents=True, exist_ok=True)
                probe = output_dir / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise LmforgeError(
                    f"output directory {output_dir} is not writable ({exc.strerror})",
                    hint="pass a writable run directory with -M",
                ) from exc
        self.backend.barrier()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _find_resume_checkpoint(self) -> Optional[Path]:
        resume = self.args.resume
        if resume in ("no", "false", None, False):
            return None
        if resume == "auto":
            found = ckpt.find_resume_checkpoint(self.args.output_dir)
            if found is not None:
                logger.info("Resuming from %s (newest complete checkpoint)", found)
            return found
        return ckpt.validate_checkpoint(resume)

    @staticmethod
    def _read_trainer_state(checkpoint: Path) -> dict:
        return json.loads((checkpoint / ckpt.TRAINER_STATE_NAME).read_text())

    def _build_model_and_optimizer(self) -> None:
        args = self.args
        model = self.model_factory()
        master_dtype = getattr(torch, args.master_weights_dtype)
        if any(parameter.dtype != master_dtype for parameter in model.parameters()):
            logger.info("Converting model weights to %s (master weights)", args.master_weights_dtype)
            model = model.to(master_dtype)
        if self._resume_checkpoint is not None:
            ckpt.load_model_weights(model, self._resume_checkpoint)
        if args.activation_checkpointing:
            _enable_activation_checkpointing(model)
        if args.torch_compile:
            # Compile each decoder layer in place, as torchtitan does. Parameter names stay
            # unchanged, so checkpoints, DDP and pipeline splits see the same model.
            for layer in model.get_decoder().layers:
                layer.compile()
        self.backend.prepare(model)
        self.optimizer = self.optimizer_factory(self.backend.named_parameters())
        self.lr_scheduler = self.lr_scheduler_factory(self.optimizer) if self.lr_scheduler_factory else None

    def _shard_datasets(self) -> None:
        for dataset in (self.train_dataset, self.eval_dataset):
            if dataset is not None and hasattr(dataset, "set_shard"):
                dataset.set_shard(rank=self.backend.data_rank, world_size=self.backend.data_world_size)
        if hasattr(self.eval_dataset, "state_dict") and hasattr(self.eval_dataset, "load_state_dict"):
            # A stateful eval dataset is rewound to this state before every evaluation.
            self._eval_start_state = copy.deepcopy(self.eval_dataset.state_dict())

    def _load_checkpoint(self, checkpoint: Path, state: dict) -> None:
        rank = self.backend.rank
        saved_world_size = state.get("world_size", 1)
        if saved_world_size != self.backend.world_size:
            raise LmforgeError(
                f"checkpoint {checkpoint} was written by {saved_world_size} processes, this run has {self.backend.world_size}",
                hint="resume with the same number of processes, or pass --no-resume to start fresh",
            )
        suffix = f"_rank{rank}" if self.backend.shards_optimizer_state else ""
        self.optimizer.load_state_dict(_torch_load(checkpoint / f"optimizer{suffix}.pt"))
        if self.lr_scheduler is not None:
            scheduler_path = checkpoint / f"scheduler{suffix}.pt"
            if scheduler_path.exists():
                self.lr_scheduler.load_state_dict(_torch_load(scheduler_path))
        dataset_path = checkpoint / f"dataset_rank{rank}.pt"
        if hasattr(self.train_dataset, "load_state_dict") and dataset_path.exists():
            self.train_dataset.load_state_dict(_torch_load(dataset_path))
        elif hasattr(self.train_dataset, "load_state_dict"):
            logger.warning("Checkpoint %s has no %s; the data restarts from the beginning", checkpoint, dataset_path.name)

        self.global_step = state["global_step"]
        self.tokens = state["tokens"]
        self.epoch = state.get("epoch", 0)
        self._examples_this_epoch = state.get("examples_this_epoch", 0)
        self.best_train_loss = _none_to_inf(state.get("best_train_loss"))
        self.best_eval_loss = _none_to_inf(state.get("best_eval_loss"))
        self.best_checkpoint = state.get("best_checkpoint")
        self.divergence.load_state_dict(state.get("divergence", {}))
        self._last_save_step = self.global_step
        self._resume_step = self.global_step
        ckpt.restore_rng_state(_torch_load(checkpoint / f"rng_rank{rank}.pt"))
        logger.info("Resumed from %s at step %d (%d tokens trained)", checkpoint, self.global_step, self.tokens)

    def _open_run_logs(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self._config_text())
        self.json_log = JsonLogWriter(self.run_dir / "trainer_logs.json")
        self.json_log.open(resume_step=self._resume_step)
        self.tensorboard = TensorBoardLogger(self.run_dir, resume_step=self._resume_step)
        self.tensorboard.log_text("config", self._config_text(), self.global_step)

    def _config_text(self) -> str:
        if self.resolved_config is not None:
            return self.resolved_config
        import yaml

        return yaml.safe_dump({"training_arguments": asdict(self.args)}, sort_keys=False)

    def _start_control_server(self) -> None:
        if not self.is_main_process:
            return
        try:
            from lmforge.train.control import ControlServer
        except ImportError:
            logger.debug("lmforge.train.control is not available; control requests are disabled")
            return
        job_info = {
            "config": self.config_name,
            "run_dir": str(Path(self.args.output_dir).resolve()),
            "run_name": self.run_name,
            "pid": os.getpid(),
            "world_size": self.backend.world_size,
            "max_steps": self.args.max_steps,
            "global_step": self.global_step,
        }
        try:
            self.control = ControlServer(job_info)
            self.control.start()
        except (OSError, LmforgeError) as exc:
            logger.warning("Control server failed to start (%s); control requests are disabled for this run", exc)
            self.control = None

    def _write_start_record(self) -> None:
        args = self.args
        world = self.backend.data_world_size
        record = {
            "event": "start",
            "time": time.time(),
            "global_step": self.global_step,
            "world_size": self.backend.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "seq_len": args.extra.get("seq_len"),
            "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
            "tokens_per_step": args.extra.get("tokens_per_step"),
            "max_steps": args.max_steps,
            "config": args.extra.get("config"),
            "run_name": self.run_name,
            "backend": self.backend_name,
            "resumed_from": str(self._resume_checkpoint) if self._resume_checkpoint else None,
        }
        record.update({key: value for key, value in args.extra.items() if key not in record})
        if self.json_log is not None:
            self.json_log.write(record)

    # ------------------------------------------------------------------ loop

    def _train_loop(self) -> None:
        args = self.args
        if args.eval_on_start and self.global_step == 0 and self.eval_interval:
            self._evaluate()
        progress = self._progress_bar()
        interval_loss, interval_steps = 0.0, 0
        interval_tokens, interval_start = 0, time.time()

        while self._stop_reason is None:
            if 0 <= args.max_steps <= self.global_step:
                self._stop_reason = "completed"
                break

            micro_batches, num_tokens, epoch_ended = self._draw_step_batches()
            if epoch_ended:
                if self._end_epoch():
                    break
                continue

            step_loss, grad_norm = self._forward_backward_step(micro_batches, num_tokens)
            if not self._check_divergence(step_loss, grad_norm):
                continue

            learning_rate = self.optimizer.param_groups[0]["lr"]
            self.last_learning_rate = learning_rate
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            self.tokens += num_tokens
            self.best_train_loss = min(self.best_train_loss, step_loss)
            self.last_loss = step_loss
            interval_loss += step_loss
            interval_steps += 1
            interval_tokens += num_tokens

            for callback in self.callbacks:
                callback.on_step_end(self, step_loss)
            if progress is not None:
                elapsed = max(time.time() - interval_start, 1e-9)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{learning_rate:.3g}", tok_s=f"{interval_tokens / elapsed:.0f}")
                progress.update(1)

            if self.global_step % self.logging_interval == 0:
                elapsed = max(time.time() - interval_start, 1e-9)
                self._log_step(interval_loss / interval_steps, grad_norm, learning_rate, interval_tokens / elapsed)
                interval_loss, interval_steps = 0.0, 0
                interval_tokens, interval_start = 0, time.time()
            # Evaluation and checkpoint time does not count against tokens_per_second.
            paused_at = time.time()
            if self.eval_interval and self.global_step % self.eval_interval == 0:
                self._evaluate()
            if args.save_strategy == "steps" and self.global_step % self.save_interval == 0:
                self._save_checkpoint()
            self._apply_control_requests()
            interval_start += time.time() - paused_at

        if interval_steps:
            # The last steps of a run that ends between logging intervals get their own record.
            elapsed = max(time.time() - interval_start, 1e-9)
            self._log_step(interval_loss / interval_steps, grad_norm, learning_rate, interval_tokens / elapsed)
        if progress is not None:
            progress.close()

    def _progress_bar(self):
        if not self.is_main_process:
            return None
        from tqdm.auto import tqdm

        total = self.args.max_steps if self.args.max_steps >= 0 else None
        return tqdm(total=total, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True)

    def _new_train_iterator(self):
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(self.epoch)
        return iter(self.train_dataset)

    def _next_micro_batch(self) -> Optional[dict]:
        examples = []
        while len(examples) < self.args.per_device_train_batch_size:
            try:
                examples.append(next(self._train_iterator))
            except StopIteration:
                break
        if not examples:
            return None
        self._examples_this_epoch += len(examples)
        return self.data_collator(examples)

    def _draw_step_batches(self) -> tuple[list[dict], int, bool]:
        """Draw this step's micro-batches and count their trained tokens over the data-parallel ranks.

        Returns (micro_batches, num_trained_tokens, epoch_ended); the epoch ends on
        every rank as soon as any rank has no micro-batch left.
        """
        micro_batches = []
        for _ in range(self.args.gradient_accumulation_steps):
            batch = self._next_micro_batch()
            if batch is None:
                break
            micro_batches.append(batch)
        local_tokens = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in micro_batches)
        counts = torch.tensor([local_tokens, 0 if micro_batches else 1], dtype=torch.int64, device=self.backend.device)
        self.backend.all_reduce_data_parallel(counts)
        return micro_batches, int(counts[0]), bool(counts[1])

    def _end_epoch(self) -> bool:
        """Close an epoch; return True when training is over (the epoch limit applies)."""
        self.epoch += 1
        self._examples_this_epoch = 0
        logger.info("Epoch %d finished at step %d", self.epoch, self.global_step)
        if self.args.save_strategy == "epoch" and self.global_step > 0:
            self._save_checkpoint()
        if self.args.max_steps < 0 and self.epoch >= self.args.num_train_epochs:
            self._stop_reason = "completed"
            return True
        if self.global_step == 0 and self.epoch > 1:
            raise LmforgeError("the training dataset yielded no examples", hint="check the dataset path and its filters")
        self._train_iterator = self._new_train_iterator()
        return False

    def _forward_backward_step(self, micro_batches: list[dict], num_tokens: int) -> tuple[float, float]:
        loss = self.backend.forward_backward(micro_batches, num_tokens)
        if self.backend.world_size > 1:
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
        grad_norm = self.backend.clip_grad_norm(self.args.max_grad_norm)
        return float(loss), float(grad_norm)

    def _check_divergence(self, step_loss: float, grad_norm: float) -> bool:
        """Return True when the update may be applied; otherwise handle the divergence."""
        reason = self.divergence.check_loss(step_loss)
        if reason is None and not math.isfinite(grad_norm):
            reason = f"gradient norm is {grad_norm}"
        if reason is None:
            spike = self.divergence.check_grad_norm(grad_norm)
            if spike and self.is_main_process:
                logger.warning("Gradient-norm spike at step %d: %s (loss %.4f); continuing", self.global_step + 1, spike, step_loss)
            return True

        step = self.global_step + 1
        average = self.divergence.loss_average
        if self.is_main_process:
            logger.error(
                "Divergence at step %d: %s (loss %s, moving average %s, grad_norm %s)",
                step, reason, step_loss, average, grad_norm,
            )
            if self.json_log is not None:
                self.json_log.write({
                    "event": "divergence", "global_step": step, "loss": step_loss, "grad_norm": grad_norm,
                    "loss_moving_average": average, "reason": reason, "time": time.time(),
                })
        self.optimizer.zero_grad(set_to_none=True)
        if self.args.divergence_action == "warn":
            if math.isfinite(step_loss) and math.isfinite(grad_norm):
                return True  # a finite spike: apply the update and carry on
            if self.is_main_process:
                logger.warning("Skipped the update of step %d because it is not finite", step)
            return False

        if self.global_step > 0 and self._last_save_step != self.global_step:
            self._save_checkpoint()
            if self.is_main_process:
                logger.error("Saved the last good state (step %d) to %s", self.global_step, ckpt.checkpoint_path(self.args.output_dir, self.global_step))
        self._stop_reason = "diverged"
        return False

    # ------------------------------------------------------------------ logging and eval

    def _log_step(self, loss: float, grad_norm: float, learning_rate: float, tokens_per_second: float) -> None:
        record = {
            "global_step": self.global_step,
            "epoch": self._epoch_progress(),
            "tokens": self.tokens,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "tokens_per_second": tokens_per_second,
            "peak_memory": _peak_memory_bytes(self.backend.device),
            "time": time.time(),
        }
        if self.is_main_process:
            self.json_log.write(record)
            self.tensorboard.log_scalars("train", {k: v for k, v in record.items() if k not in ("global_step", "time")}, self.global_step)
            if self.control is not None:
                self.control.update_status(
                    {**self._status(), "loss": loss, "grad_norm": grad_norm, "tokens_per_second": tokens_per_second}
                )
        for callback in self.callbacks:
            callback.on_log(self, record)

    def _epoch_progress(self) -> float:
        try:
            length = len(self.train_dataset)
        except TypeError:
            return float(self.epoch)
        return self.epoch + (self._examples_this_epoch / length if length else 0.0)

    def _status(self) -> dict:
        return {
            "global_step": self.global_step,
            "max_steps": self.args.max_steps,
            "tokens": self.tokens,
            "epoch": self.epoch,
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "eval_loss": self.last_eval_loss,
            "run_name": self.run_name,
        }

    def _evaluate(self) -> Optional[float]:
        if self.eval_dataset is None:
            for callback in self.callbacks:
                callback.on_evaluate(self, math.nan)
            return None

        started = time.time()
        totals = self._eval_loss_totals()
        if self.backend.world_size > 1:
            torch.distributed.all_reduce(totals)
        eval_loss = float(totals[0] / totals[1]) if totals[1] > 0 else math.nan
        self.last_eval_loss = eval_loss
        self._last_eval_step = self.global_step

        if self.is_main_process:
            logger.info("Step %d: eval_loss %.4f over %d tokens (%.1f s)", self.global_step, eval_loss, int(totals[1]), time.time() - started)
            self.json_log.write({"global_step": self.global_step, "eval_loss": eval_loss, "time": time.time()})
            self.tensorboard.log_scalars("eval", {"loss": eval_loss}, self.global_step)
        for callback in self.callbacks:
            callback.on_evaluate(self, eval_loss)
        return eval_loss

    def _eval_loss_totals(self) -> torch.Tensor:
        """Return this rank's [summed token loss, trained tokens] over at most max_eval_batches batches."""
        if self._eval_start_state is not None:
            self.eval_dataset.load_state_dict(copy.deepcopy(self._eval_start_state))
        totals = torch.zeros(2, dtype=torch.float64, device=self.backend.device)
        max_batches = self.args.max_eval_batches
        batch_size = self.args.per_device_eval_batch_size

        def add_batch(examples: list) -> None:
            loss_sum, num_tokens = self.backend.eval_loss(self.data_collator(examples))
            totals.add_(torch.tensor([loss_sum, num_tokens], dtype=torch.float64, device=totals.device))

        examples, batches = [], 0
        for example in self.eval_dataset:
            examples.append(example)
            if len(examples) == batch_size:
                add_batch(examples)
                examples, batches = [], batches + 1
                if max_batches is not None and batches >= max_batches:
                    return totals
        if examples:
            add_batch(examples)
        return totals

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self) -> Path:
        """Write checkpoint-STEP on every rank through a temporary directory; rank 0 renames it when complete."""
        step = self.global_step
        rank = self.backend.rank
        tmp_dir = ckpt.temporary_checkpoint_path(self.args.output_dir, step)
        final_dir = ckpt.checkpoint_path(self.args.output_dir, step)
        if self.is_main_process:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir)
            tmp_dir.mkdir(parents=True)
        self.backend.barrier()

        self.backend.save_model(tmp_dir)
        sharded = self.backend.shards_optimizer_state
        if sharded or self.is_main_process:
            suffix = f"_rank{rank}" if sharded else ""
            torch.save(self.optimizer.state_dict(), tmp_dir / f"optimizer{suffix}.pt")
            if self.lr_scheduler is not None:
                torch.save(self.lr_scheduler.state_dict(), tmp_dir / f"scheduler{suffix}.pt")
        if hasattr(self.train_dataset, "state_dict"):
            torch.save(self.train_dataset.state_dict(), tmp_dir / f"dataset_rank{rank}.pt")
        torch.save(ckpt.capture_rng_state(), tmp_dir / f"rng_rank{rank}.pt")

        if self.last_eval_loss is not None and self._last_eval_step == step and self.last_eval_loss < self.best_eval_loss:
            self.best_eval_loss = self.last_eval_loss
            self.best_checkpoint = str(final_dir)
        if self.is_main_process:
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp_dir)
            (tmp_dir / "config.yaml").write_text(self._config_text())
            ckpt.write_json_atomic(tmp_dir / ckpt.TRAINER_STATE_NAME, self._trainer_state())
        self.backend.barrier()

        if self.is_main_process:
            ckpt.finalize_checkpoint(tmp_dir, final_dir)
            ckpt.rotate_checkpoints(self.args.output_dir, self.args.save_total_limit, self.best_checkpoint)
            logger.info("Saved checkpoint %s (step %d)", final_dir, step)
        self.backend.barrier()
        self._last_save_step = step
        for callback in self.callbacks:
            callback.on_save(self, final_dir)
        return final_dir

    def _trainer_state(self) -> dict:
        return {
            "global_step": self.global_step,
            "tokens": self.tokens,
            "epoch": self.epoch,
            "examples_this_epoch": self._examples_this_epoch,
            "best_train_loss": _finite_or_none(self.best_train_loss),
            "best_eval_loss": _finite_or_none(self.best_eval_loss),
            "best_checkpoint": self.best_checkpoint,
            "last_eval_loss": self.last_eval_loss,
            "run_name": self.run_name,
            "world_size": self.backend.world_size,
            "divergence": self.divergence.state_dict(),
            "time": time.time(),
        }

    # ------------------------------------------------------------------ control requests

    def _collect_requests(self) -> list[tuple[str, Any]]:
        """Return this boundary's (command, request) pairs, identical on every rank."""
        local = self._local_requests
        self._local_requests = []
        remote = self.control.poll() if self.control is not None else []
        if self.backend.world_size == 1:
            return [(command, None) for command in local] + [(request.command, request) for request in remote]

        # One small all-reduce per step; the request objects travel only when there are any.
        signal_code = max((_SIGNAL_CODES.get(command, 0) for command in local), default=0)
        rank0_commands = [request.command for request in remote] + local if self.is_main_process else []
        flags = torch.tensor([len(rank0_commands), signal_code], dtype=torch.int64, device=self.backend.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        commands: list[str] = []
        if int(flags[0]) > 0:
            payload = [rank0_commands]
            torch.distributed.broadcast_object_list(payload, src=0)
            commands = payload[0]
        if int(flags[1]) == _SIGNAL_CODES["abort"]:
            commands.append("abort")
        elif int(flags[1]) == _SIGNAL_CODES["save-stop"] and "save-stop" not in commands:
            commands.append("save-stop")
        # On rank 0 the first len(remote) commands are the control-socket requests, in order.
        return [(command, remote[index] if index < len(remote) else None) for index, command in enumerate(commands)]

    def _apply_control_requests(self) -> None:
        if self.control is not None:
            # Every step, so `control status` and its ETA do not lag by a logging interval.
            self.control.update_status({"global_step": self.global_step, "tokens": self.tokens})
        for command, request in self._collect_requests():
            try:
                message, applied = self._apply_control_command(command), True
            except _RequestNotApplied as exc:
                message, applied = str(exc), False
            if self.is_main_process:
                logger.info("Control request %r at step %d: %s", command, self.global_step, message)
                if request is not None:
                    self.control.acknowledge(request, self.global_step, message, ok=applied)
            if self._stop_reason is not None:
                break

    def _apply_control_command(self, command: str) -> str:
        if command == "save":
            if self._last_save_step == self.global_step:
                return f"checkpoint-{self.global_step} already saved"
            return f"saved {self._save_checkpoint()}"
        if command == "save-stop":
            path = ckpt.checkpoint_path(self.args.output_dir, self.global_step)
            if self._last_save_step != self.global_step:
                path = self._save_checkpoint()
            self._stop_reason = "save-stop"
            return f"saved {path}; stopping"
        if command == "stop":
            self._stop_reason = "stop"
            return "stopping without saving"
        if command == "abort":
            self._stop_reason = "abort"
            return "aborting"
        if command == "start-annealing":
            started, message = self._start_annealing("control request")
            if not started:
                raise _RequestNotApplied(message)
            return message
        if self.control is not None:
            self.control.update_status(self._status())
        return "status updated"

    def _start_annealing(self, source: str) -> tuple[bool, str]:
        """Begin the WSD decay now; return (started, message), the message giving the reason when not started."""
        if self.lr_scheduler is None or not hasattr(self.lr_scheduler, "start_annealing"):
            message = "the LR scheduler has no start_annealing(); request ignored"
            logger.warning("%s: %s", source, message)
            return False, message
        if self.lr_scheduler.start_annealing() is False:
            configured = getattr(self.lr_scheduler, "decay_start_step", -1)
            triggered = getattr(self.lr_scheduler, "triggered_decay_start_step", None)
            if configured is not None and configured >= 0:
                return False, (
                    f"the config sets decay_start_step={configured}; "
                    "start the run with --decay-start-step -1 to start the decay on request"
                )
            if triggered is not None:
                return False, f"the decay already started after step {triggered}"
            return False, "the LR scheduler did not start annealing (see the job's log)"
        return True, f"annealing started at step {self.global_step}"

    # ------------------------------------------------------------------ teardown

    def _finish(self, started: float, start_tokens: int) -> dict:
        reason = self._stop_reason or "error"
        if reason == "completed":
            if self.eval_interval and self._last_eval_step != self.global_step and self.global_step > 0:
                self._evaluate()
            if self.args.save_strategy != "no" and self._last_save_step != self.global_step and self.global_step > 0:
                self._save_checkpoint()
        runtime = time.time() - started
        trained = self.tokens - start_tokens
        record = {
            "event": "end",
            "global_step": self.global_step,
            "tokens": self.tokens,
            "train_runtime": runtime,
            "train_tokens_per_second": trained / runtime if runtime > 0 else 0.0,
            "reason": reason,
            "best_train_loss": _finite_or_none(self.best_train_loss),
            "best_eval_loss": _finite_or_none(self.best_eval_loss),
            "time": time.time(),
        }
        for callback in self.callbacks:
            callback.on_train_end(self, record)
        if self.is_main_process:
            if self.json_log is not None:
                self.json_log.write(record)
                self.json_log.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.control is not None:
                self.control.close()
            logger.info("Training ended (%s) at step %d: %d tokens in %.1f s", reason, self.global_step, self.tokens, runtime)
        return record


# ---------------------------------------------------------------------- helpers


class _RequestNotApplied(Exception):
    """A control request that the trainer could not apply; the message is the reason sent to the client."""


def validate_arguments(args: TrainingArguments) -> None:
    """Raise LmforgeError for a TrainingArguments value outside its allowed set."""
    choices = {
        "mixed_precision": ("bf16", "fp32"),
        "master_weights_dtype": ("float32", "bfloat16"),
        "save_strategy": ("steps", "epoch", "no"),
        "divergence_action": ("stop", "warn"),
    }
    for name, allowed in choices.items():
        value = getattr(args, name)
        if value not in allowed:
            raise LmforgeError(f"training argument {name}={value!r} is invalid", hint=f"use one of: {', '.join(allowed)}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise LmforgeError(f"training argument {name}={getattr(args, name)} is invalid", hint="use a value of at least 1")
    if args.step_cadence <= 0:
        raise LmforgeError(f"step_cadence={args.step_cadence} is invalid", hint="use a positive multiplier such as 0.001 or 1")


def _scaled_interval(steps: int, cadence: float) -> int:
    return max(1, int(round(steps * cadence)))


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant torch checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):
        # transformers 5.x name; `gradient_checkpointing_enable` is deprecated there.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _none_to_inf(value: Optional[float]) -> float:
    return math.inf if value is None else value


def _peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _torch_load(path: Path):
    # Trainer files hold Python and NumPy RNG states; checkpoints are trusted like configs.
    return torch.load(path, map_location="cpu", weights_only=False)
