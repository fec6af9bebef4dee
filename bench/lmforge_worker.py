"""The lmforge side of `bench/train_throughput.py`: timed optimizer steps on the real lmforge pieces.

`run_lmforge_steps` builds what a training config builds (the packed `ChatDataset`
over the rows of one jsonl file, its collator, `lmforge.optim.build_optimizer`, the
`lmforge.train.trainer.Trainer` with the single-device backend) and runs it in this
process. The settings match the peers in `train_throughput.py`: AdamW at a constant
lr 2e-5 with weight decay 0, gradient clipping at 1.0 (the Hugging Face Trainer's
default), no evaluation and no checkpoints. A trainer callback records the time at
the end of each optimizer step and the input tokens that are not padding.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

PRECISIONS = ("fp32", "bf16")


class _CountingCollator:
    """A collator wrapper that counts the non-pad input tokens of the rows it collates, cumulatively."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = 0

    def __call__(self, rows):
        self.tokens += sum(len(row["input_ids"]) for row in rows)
        return self.collator(rows)


def run_lmforge_steps(model_dir, data, steps: int, seq_len: int, batch_size: int, precision: str, callbacks=(),
                      torch_compile: bool = False) -> dict:
    """Train STEPS optimizer steps of BATCH_SIZE packed rows of SEQ_LEN tokens and time each step.

    Returns `{"step_times": [perf_counter at each optimizer step end], "step_tokens":
    [cumulative non-pad input tokens at that step], "parameters": int}`. DATA is an
    Open-Orca-format jsonl file. Every row trains (no validation split). PRECISION is
    `fp32`, or `bf16` for bf16 autocast over fp32 weights, as in lmforge's configs.
    CALLBACKS are extra `TrainerCallback`s (the profiler script adds one).
    TORCH_COMPILE compiles each decoder layer, as the config key `torch_compile` does.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.data.chat import load_tokenizer
    from lmforge.data.dataset import ChatDataset, open_orca_split
    from lmforge.optim import build_optimizer
    from lmforge.train.arguments import TrainingArguments
    from lmforge.train.callbacks import TrainerCallback
    from lmforge.train.trainer import Trainer

    if precision not in PRECISIONS:
        raise ValueError(f"invalid precision {precision!r}: use fp32 or bf16")
    tokenizer = load_tokenizer(str(model_dir))
    rows = open_orca_split(str(data), "train", validation_fraction=0.0)
    dataset = ChatDataset(rows, tokenizer, max_length=seq_len, packing=True)
    collator = _CountingCollator(dataset.collator())
    parameters: list[int] = []

    def model_factory():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        parameters.append(sum(parameter.numel() for parameter in model.parameters()))
        return model

    step_times: list[float] = []
    step_tokens: list[int] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, trainer, loss):
            step_times.append(time.perf_counter())
            step_tokens.append(collator.tokens)

    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1,
            seed=0,
            mixed_precision=precision,
            max_grad_norm=1.0,
            logging_steps=steps + 1,
            eval_steps=0,
            save_strategy="no",
            resume="no",
            torch_compile=torch_compile,
        )
        trainer = Trainer(
            args=args,
            model_factory=model_factory,
            tokenizer=tokenizer,
            train_dataset=dataset,
            data_collator=collator,
            optimizer_factory=lambda named: build_optimizer(named, name="adamw", lr=2e-5, weight_decay=0.0),
            callbacks=[StepTimes(), *callbacks],
            backend="single",
        )
        end = trainer.train()

    if end["reason"] != "completed" or len(step_times) != steps:
        raise RuntimeError(f"lmforge stopped after {len(step_times)} of {steps} steps (reason {end['reason']!r})")
    return {"step_times": step_times, "step_tokens": step_tokens, "parameters": parameters[0]}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Time lmforge optimizer steps on one device.")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--torch-compile", action="store_true")
    cli = parser.parse_args()
    result = run_lmforge_steps(Path(cli.model_dir), Path(cli.data), cli.steps, cli.seq_len, cli.batch_size, cli.precision,
                               torch_compile=cli.torch_compile)
    print(json.dumps(result))
