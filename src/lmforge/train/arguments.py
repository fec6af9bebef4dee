"""Settings of one training run, as the trainer loop reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrainingArguments:
    """What the trainer loop does and how often; the model, data and optimizer come separately.

    Intervals are in optimizer steps. `step_cadence` scales `logging_steps`,
    `eval_steps` and `save_steps` together (0.001 turns a 32k-step plan's
    intervals into a few steps for a smoke run); each scaled interval is at least 1.
    """

    output_dir: str
    """Run directory (`-M`): `checkpoints/` and `runs/RUN_NAME/` are written under it."""
    run_name: Optional[str] = None
    """Name of the `runs/` subdirectory; None means a timestamp such as `2026-12-04T19-50-00`."""

    max_steps: int = -1
    """Optimizer steps to run; -1 means `num_train_epochs` passes over the training data."""
    num_train_epochs: int = 1
    """Epochs when `max_steps` is -1."""
    per_device_train_batch_size: int = 1
    """Rows per micro-batch on each data-parallel rank."""
    per_device_eval_batch_size: int = 1
    """Rows per eval micro-batch on each data-parallel rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each data-parallel rank."""
    seed: int = 42
    """Seed for torch, Python and NumPy RNGs (each rank adds its rank)."""

    mixed_precision: str = "bf16"
    """`bf16` (forward passes under bf16 autocast) or `fp32` (no autocast)."""
    master_weights_dtype: str = "float32"
    """Dtype of the trained weights and optimizer updates: `float32`, or `bfloat16` to train in pure bf16."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass to save memory."""
    torch_compile: bool = False
    """Compile the model with `torch.compile`."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the chunked cross-entropy, so full logits are never materialised; 0 disables chunking."""
    max_grad_norm: Optional[float] = None
    """Clip the global gradient norm to this value; None disables clipping (the norm is still logged)."""

    logging_steps: int = 10
    """Write a `trainer_logs.json` record and TensorBoard scalars every N steps."""
    eval_steps: int = 500
    """Run the held-out loss and the generation callback every N steps; 0 disables eval."""
    max_eval_batches: Optional[int] = None
    """Cap on eval batches per evaluation; None evaluates the whole eval dataset."""
    eval_on_start: bool = False
    """Evaluate the base model before the first step of a fresh run (the step-0 eval record)."""
    save_strategy: str = "steps"
    """`steps` (every `save_steps`), `epoch` (at each epoch end) or `no`; a final checkpoint is written unless `no`."""
    save_steps: int = 1000
    """Checkpoint every N steps when `save_strategy` is `steps`."""
    save_total_limit: Optional[int] = 2
    """Keep the newest N checkpoints plus the best by eval loss; None keeps all."""
    step_cadence: float = 1.0
    """Multiplier applied to `logging_steps`, `eval_steps` and `save_steps`."""

    resume: str = "auto"
    """`auto` resumes the newest complete checkpoint, `no` starts fresh, or a checkpoint path."""
    start_annealing: bool = False
    """Begin the WSD decay at the first step of this run (only when the scheduler's decay_start_step is -1)."""

    eval_prompts_file: Optional[str] = None
    """YAML list of prompts for the generation callback; None disables it."""
    eval_max_new_tokens: int = 128
    """Token limit for each generated eval response."""

    divergence_action: str = "stop"
    """On a NaN/inf loss or a loss spike: `stop` (save the last good state and exit) or `warn`."""
    divergence_threshold: float = 5.0
    """A loss above `threshold` times its moving average counts as divergence."""
    divergence_window: int = 50
    """Steps in the loss moving average."""
    divergence_min_history: int = 5
    """Finite losses needed before the moving-average test applies (NaN/inf always counts)."""

    extra: dict = field(default_factory=dict)
    """Free-form values recorded in the run's first log record (e.g. the token-budget plan)."""
