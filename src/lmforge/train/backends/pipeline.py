"""Pipeline-parallel backend on `torch.distributed.pipelining`.

The model is split into stages by decoder-layer count (`lmforge.models.split`), each
rank runs its stages, and a schedule from `torch.distributed.pipelining` orders the
micro-batch forward and backward passes. Every rank reads the same rows, because
`data_world_size` is 1. The first stage consumes `input_ids`, and the last stage
computes the loss. Every stage gets `position_ids` (and the attention mask when there
is one) as keyword arguments, so it can rebuild the packed-document mask.

Stage placement for W ranks:

    ZBVZeroBubble     2 stages per rank in a V: rank r holds stages r and 2W-1-r
    Interleaved1F1B   `stages_per_rank` stages per rank, looped: rank r holds r, r+W, ...
    1F1B, GPipe       1 stage per rank: rank r holds stage r

Loss: the last stage returns each micro-batch's summed token cross-entropy, and
the schedule's loss function divides it by the step's trained-token count
(`num_trained_tokens`, set before each step), with `scale_grads=False`. The
gradients therefore equal those of one process running the whole batch.

Checkpoints: every rank writes its stages' weights to `model_rank{r}.safetensors`
(Hugging Face names); rank 0 then merges those files into one Hugging Face model
(`model.safetensors` + `config.json`), so a checkpoint loads with
`from_pretrained` and resumes by loading the full weights before the split. The
merge needs the checkpoint directory on a file system every rank sees. With
`merge_checkpoint: false` only the per-rank files are written and
`lmforge checkpoint export` merges them later.

Tied embeddings (SmolLM2, the tiny test model): when the first and last stages
are on the same rank (ZBV) they share one parameter. When they are on different
ranks, the last stage holds a copy, and after each step the two ranks sum the
gradients of the two copies, so both apply the same update and stay equal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError
from lmforge.train.backends.base import Backend
from lmforge.train.backends.single import default_device

logger = logging.getLogger(__name__)

SCHEDULES = ("ZBVZeroBubble", "1F1B", "Interleaved1F1B", "GPipe")
IGNORE_INDEX = -100
PAD_VALUES = {"labels": IGNORE_INDEX}


def _schedule_class(name: str):
    from torch.distributed import pipelining

    classes = {
        "ZBVZeroBubble": pipelining.ScheduleZBVZeroBubble,
        "1F1B": pipelining.Schedule1F1B,
        "Interleaved1F1B": pipelining.ScheduleInterleaved1F1B,
        "GPipe": pipelining.ScheduleGPipe,
    }
    return classes[name]


def stage_to_rank_map(schedule: str, world_size: int, stages_per_rank: int | None = None) -> dict[int, int]:
    """Return {stage index: rank} for a schedule on `world_size` pipeline ranks."""
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    if schedule not in SCHEDULES:
        raise LmforgeError(
            f"unknown pipeline schedule {schedule!r}",
            hint=f"set backend_options.schedule to one of: {', '.join(SCHEDULES)}",
        )
    if schedule == "ZBVZeroBubble":
        return generate_stage_to_rank_mapping(world_size, 2 * world_size, style="v")
    if schedule == "Interleaved1F1B":
        count = stages_per_rank or 2
        return generate_stage_to_rank_mapping(world_size, count * world_size, style="loop")
    return {stage: stage for stage in range(world_size)}


class PipelineBackend(Backend):
    """Runs one optimizer step as a pipeline schedule over this rank's model stages.

    Options (the `backend_options` of a config): `schedule` (one of `SCHEDULES`,
    default ZBVZeroBubble), `n_microbatches` (pipeline micro-batches per trainer
    micro-batch; default the number of stages, the minimum the 1F1B family
    accepts), `stages_per_rank` (Interleaved1F1B only, default 2),
    `merge_checkpoint` (default true: also write the merged Hugging Face model into
    each checkpoint) and `device`.

    Checkpoint behaviour: the backend keeps no training state. The stage split is
    recomputed from the options and the world size, and the trainer loads the full
    weights before `prepare()`, so a checkpoint with a merged model resumes under
    any schedule and number of ranks; the optimizer state (`optimizer_rank{r}.pt`)
    covers only this rank's stages, so resuming it needs the same schedule and
    number of ranks.
    """

    shards_optimizer_state = True
    OPTION_NAMES = ("schedule", "n_microbatches", "stages_per_rank", "merge_checkpoint", "device")

    def __init__(self, options: Optional[dict] = None, **kwargs):
        super().__init__(options, **kwargs)
        unknown = set(self.options) - set(self.OPTION_NAMES)
        if unknown:
            raise LmforgeError(
                f"unknown backend_options for backend 'pipeline': {', '.join(sorted(unknown))}",
                hint=f"valid options: {', '.join(self.OPTION_NAMES)}",
            )
        self.schedule_name = str(self.options.get("schedule", "ZBVZeroBubble"))
        if self.schedule_name not in SCHEDULES:
            raise LmforgeError(
                f"unknown pipeline schedule {self.schedule_name!r}",
                hint=f"set backend_options.schedule to one of: {', '.join(SCHEDULES)}",
            )
        self.stages_per_rank = self.options.get("stages_per_rank")
        if self.stages_per_rank is not None and self.schedule_name != "Interleaved1F1B":
            raise LmforgeError(
                f"backend_options.stages_per_rank={self.stages_per_rank} only applies to schedule "
                f"Interleaved1F1B, not {self.schedule_name}",
                hint="remove stages_per_rank or set schedule: Interleaved1F1B",
            )
        self.merge_checkpoint = bool(self.options.get("merge_checkpoint", True))
        device = self.options.get("device")
        self.device = torch.device(device) if device else default_device()

        self.stage_map: dict[int, int] = {}
        self.num_stages = 0
        self.local_stage_indices: list[int] = []
        self.n_microbatches = 0
        self.stages: list[torch.nn.Module] = []
        self.model_config = None
        self.generation_config = None
        self._schedule = None
        self._num_trained_tokens = 1
        self._batch_shapes: dict[bool, tuple[int, int]] = {}
        self._tied = False
        self._tie_group = None
        self._holds_tied_copy = False

    # -- setup -------------------------------------------------------------

    def setup(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise LmforgeError(
                "backend 'pipeline' needs torch.distributed to be initialised",
                hint="launch with `lmforge train --nproc N` (or torchrun), not plain python",
            )
        super().setup()
        self.stage_map = stage_to_rank_map(self.schedule_name, self.world_size, self.stages_per_rank)
        self.num_stages = len(self.stage_map)
        self.local_stage_indices = sorted(stage for stage, rank in self.stage_map.items() if rank == self.rank)
        requested = self.options.get("n_microbatches")
        self.n_microbatches = int(requested) if requested is not None else self.num_stages
        if self.n_microbatches < 1:
            raise LmforgeError(f"invalid backend_options.n_microbatches={requested}; it must be at least 1")

    @property
    def data_world_size(self) -> int:
        return 1

    @property
    def data_rank(self) -> int:
        return 0

    @property
    def last_stage_rank(self) -> int:
        return self.stage_map[self.num_stages - 1]

    @property
    def holds_last_stage(self) -> bool:
        return self.num_stages - 1 in self.local_stage_indices

    def prepare(self, model: torch.nn.Module) -> None:
        from torch.distributed.pipelining import PipelineStage

        from lmforge.models.split import is_tied, layers_per_stage, split_llama

        if not self.stage_map:
            self.setup()
        self.model_config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self._tied = hasattr(model, "lm_head") and hasattr(model, "model") and is_tied(model)
        self._setup_tie_group()
        self.stages = split_llama(model, self.local_stage_indices, self.num_stages, self.loss_chunk_size)
        for stage in self.stages:
            stage.to(self.device)
        # No rank contains the whole model, so generation and other `hf_model` users must check for None.
        self.hf_model = None
        self._log_placement(layers_per_stage(len(model.model.layers), self.num_stages))
        if self.rank == 0:
            logger.info("Text generation during eval is disabled under the pipeline backend, because no rank contains the whole model")

        pipeline_stages = [
            PipelineStage(stage, stage.stage_index, self.num_stages, self.device) for stage in self.stages
        ]
        multi_stage = self.schedule_name in ("ZBVZeroBubble", "Interleaved1F1B")
        try:
            self._schedule = _schedule_class(self.schedule_name)(
                pipeline_stages if multi_stage else pipeline_stages[0],
                n_microbatches=self.n_microbatches,
                loss_fn=self._normalised_loss,
                scale_grads=False,
            )
        except ValueError as exc:
            raise LmforgeError(
                f"pipeline schedule {self.schedule_name} rejects n_microbatches={self.n_microbatches} "
                f"with {self.num_stages} stages: {exc}",
                hint=f"set backend_options.n_microbatches to at least {self.num_stages}",
            ) from exc

    def _log_placement(self, layer_ranges: list[range]) -> None:
        if self.rank != 0:
            return
        placement = ", ".join(
            f"stage {index} (layers {layer_ranges[index].start}-{layer_ranges[index].stop - 1}"
            f"{', embeddings' if index == 0 else ''}{', norm+lm_head' if index == self.num_stages - 1 else ''})"
            f" -> rank {self.stage_map[index]}"
            for index in range(self.num_stages)
        )
        logger.info(
            "pipeline schedule %s: %d stages on %d ranks, %d micro-batches per batch: %s",
            self.schedule_name,
            self.num_stages,
            self.world_size,
            self.n_microbatches,
            placement,
        )

    def _setup_tie_group(self) -> None:
        """Create the group of the ranks holding the first and last stage (a collective call on every rank)."""
        if not self._tied:
            return
        first_rank = self.stage_map[0]
        last_rank = self.stage_map[self.num_stages - 1]
        if first_rank == last_rank:
            return
        self._tie_group = dist.new_group(sorted({first_rank, last_rank}))
        self._holds_tied_copy = self.rank in (first_rank, last_rank)

    # -- parameters ----------------------------------------------------------

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters under Hugging Face names, each parameter once.

        A tied output projection held as a copy on the last stage is named
        `model.embed_tokens.weight`, like the tied parameter of the unsplit model, so
        optimizer groups (no weight decay on embeddings, say) treat both copies alike.
        """
        seen: set[int] = set()
        named = []
        for stage in self.stages:
            for name, param in stage.named_parameters():
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                if self._tied and name == "lm_head.weight":
                    name = "model.embed_tokens.weight"
                named.append((name, param))
        return named

    def model_state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for stage in self.stages:
            state.update(stage.state_dict())
        return state

    def load_model_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's stage weights from a dict with Hugging Face names; other keys are ignored."""
        for stage in self.stages:
            own_keys = set(stage.state_dict().keys())
            stage_state = {key: value for key, value in state_dict.items() if key in own_keys}
            if self._tied and stage.is_last and "lm_head.weight" not in stage_state:
                if "model.embed_tokens.weight" in state_dict:
                    stage_state["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
            missing = own_keys - set(stage_state)
            if missing:
                raise LmforgeError(
                    f"no weights for pipeline stage {stage.stage_index}: missing "
                    f"{', '.join(sorted(missing)[:3])}{' ...' if len(missing) > 3 else ''}",
                    hint="load a merged checkpoint, or resume with the schedule and number of ranks that wrote it",
                )
            stage.load_state_dict(stage_state)

    def save_model(self, directory: Path) -> None:
        """Write `model_rank{r}.safetensors` on every rank, then (rank 0) the merged Hugging Face model."""
        from safetensors.torch import save_file

        directory = Path(directory)
        own = {key: value.detach().cpu().contiguous() for key, value in self.model_state_dict().items()}
        if self._tied and "model.embed_tokens.weight" in own:
            # The tied output projection is the same tensor here; safetensors rejects shared storage.
            own.pop("lm_head.weight", None)
        metadata = {
            "format": "pt",
            "stages": ",".join(str(index) for index in self.local_stage_indices),
            "num_stages": str(self.num_stages),
            "schedule": self.schedule_name,
        }
        save_file(own, str(directory / f"model_rank{self.rank}.safetensors"), metadata=metadata)
        dist.barrier()
        if self.rank == 0:
            self.model_config.save_pretrained(directory)
            if self.generation_config is not None:
                self.generation_config.save_pretrained(directory)
            if self.merge_checkpoint:
                from lmforge.train.pipeline_checkpoint import write_merged_model

                write_merged_model(directory, directory, self.model_config)
        dist.barrier()

    def generation_model(self) -> Optional[torch.nn.Module]:
        return None

    # -- steps --------------------------------------------------------------

    def _normalised_loss(self, summed_loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return summed_loss / self._num_trained_tokens

    def _stage_inputs(self, batch: dict[str, torch.Tensor], train: bool):
        """Return (args, kwargs, target) for `schedule.step`, padded to a fixed shape.

        Pipeline stages exchange buffers sized from the first batch of each mode
        (train or eval), so a smaller batch (the last of an epoch) is padded with
        untrained positions (labels -100), which leaves the loss unchanged. Eval
        batches are also padded to a multiple of `n_microbatches` rows.
        """
        rows, columns = batch["input_ids"].shape
        if train and rows % self.n_microbatches != 0:
            raise LmforgeError(
                f"a batch of {rows} rows does not split into backend_options.n_microbatches="
                f"{self.n_microbatches} equal pipeline micro-batches",
                hint="make the per-device batch size (ns.per_device_batch_size, --batch-size) a multiple of ns.n_microbatches",
            )
        if train not in self._batch_shapes:
            padded_rows = -(-rows // self.n_microbatches) * self.n_microbatches
            self._batch_shapes[train] = (padded_rows, columns)
        target_rows, target_columns = self._batch_shapes[train]
        if rows > target_rows or columns > target_columns:
            raise LmforgeError(
                f"pipeline batch shape {rows}x{columns} exceeds the first batch's {target_rows}x{target_columns}",
                hint="pad batches to a fixed seq_len (packing does) and keep the per-device batch size fixed",
            )

        def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
            if tuple(tensor.shape) != (target_rows, target_columns):
                padded = torch.full((target_rows, target_columns), value, dtype=tensor.dtype)
                padded[:rows, :columns] = tensor
                tensor = padded
            return tensor.to(self.device)

        padded = {}
        for key in ("input_ids", "labels", "position_ids", "attention_mask"):
            if batch.get(key) is not None:
                padded[key] = pad(batch[key], PAD_VALUES.get(key, 0))
        if "position_ids" not in padded:
            padded["position_ids"] = torch.arange(target_columns).expand(target_rows, -1).contiguous().to(self.device)
        # The same document masking as the unsplit model: position_ids alone, or a 4D
        # block-causal mask when the batch also has padding.
        from lmforge.data.packing import model_inputs

        # NOTE: flash-attention inputs (a flattened batch with cu_seqlens) are not supported
        # here: stages always get [batch, seq] tensors and build an SDPA/eager mask.
        inputs = model_inputs(padded)
        labels = padded["labels"]
        kwargs = {"position_ids": inputs["position_ids"], "labels": labels}
        if inputs.get("attention_mask") is not None:
            kwargs["attention_mask"] = inputs["attention_mask"]
        args = (inputs["input_ids"],) if 0 in self.local_stage_indices else ()
        return args, kwargs, labels

    def _run_schedule(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run one batch through the schedule; return its summed loss (zero off the last stage)."""
        args, kwargs, target = self._stage_inputs(batch, train=True)
        losses: list[torch.Tensor] = []
        with self.autocast():
            self._schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if self.holds_last_stage:
            return torch.stack([loss.detach().float() for loss in losses]).sum()
        return torch.zeros((), dtype=torch.float32, device=self.device)

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], num_trained_tokens: int) -> torch.Tensor:
        for stage in self.stages:
            stage.train()
        self._num_trained_tokens = max(int(num_trained_tokens), 1)
        step_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in micro_batches:
            step_loss += self._run_schedule(batch)
        self._sum_tied_gradients()
        return step_loss

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        for stage in self.stages:
            stage.eval()
        loss_sum = self._forward_only(batch)
        if not self.holds_last_stage:
            return 0.0, 0
        return float(loss_sum), int((batch["labels"] != IGNORE_INDEX).sum())

    def _forward_only(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the summed token loss of `batch` (zero off the last stage), running stages in order.

        `ScheduleZBVZeroBubble.eval()` fails in torch 2.13 because its action list
        still contains backward steps, so evaluation does not use the schedule:
        every rank walks the stages in order for each micro-batch, runs the ones it
        holds, and sends the hidden states (as fp32) to the rank of the next stage
        with blocking send/recv. Eval runs without pipelining overlap.
        """
        args, kwargs, _ = self._stage_inputs(batch, train=False)
        rows, columns = kwargs["labels"].shape
        micro_rows = rows // self.n_microbatches
        local_stages = {stage.stage_index: stage for stage in self.stages}
        hidden_size = self.model_config.hidden_size
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        with self.autocast():
            for micro_batch in range(self.n_microbatches):
                rows_slice = slice(micro_batch * micro_rows, (micro_batch + 1) * micro_rows)
                micro_kwargs = {key: value[rows_slice] for key, value in kwargs.items()}
                hidden = None
                for index in range(self.num_stages):
                    if self.stage_map[index] != self.rank:
                        continue
                    if index == 0:
                        stage_input = args[0][rows_slice]
                    elif self.stage_map[index - 1] != self.rank:
                        stage_input = torch.empty(micro_rows, columns, hidden_size, dtype=torch.float32, device=self.device)
                        dist.recv(stage_input, src=self.stage_map[index - 1])
                    else:
                        stage_input = hidden
                    output = local_stages[index](stage_input, **micro_kwargs)
                    if index == self.num_stages - 1:
                        total += output.float()
                    elif self.stage_map[index + 1] != self.rank:
                        dist.send(output.float().contiguous(), dst=self.stage_map[index + 1])
                    else:
                        hidden = output
        return total

    def _sum_tied_gradients(self) -> None:
        if not self._holds_tied_copy:
            return
        stage = self.stages[0] if self.stages[0].is_first else self.stages[-1]
        weight = stage.model.embed_tokens.weight if stage.is_first else stage.lm_head.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=self._tie_group)

    def clip_grad_norm(self, max_norm: Optional[float]) -> torch.Tensor:
        """Return the gradient norm over all stages of all ranks, clipping to `max_norm` when given."""
        squares = torch.zeros((), device=self.device, dtype=torch.float32)
        grads = []
        for name, param in self.named_parameters():
            if param.grad is None:
                continue
            grads.append(param.grad)
            # The last stage's tied copy repeats the first stage's gradient: count it once.
            if self._holds_tied_copy and self.rank != self.stage_map[0] and name == "model.embed_tokens.weight":
                continue
            squares += param.grad.detach().float().pow(2).sum()
        dist.all_reduce(squares)
        norm = squares.sqrt()
        if max_norm is not None and max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(scale)
        return norm
