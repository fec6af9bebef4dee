"""Profile one lmforge optimizer step with torch.profiler and print where the time goes.

Runs the same trainer setup as `bench/lmforge_worker.py` (packed rows, AdamW,
single device) for WARMUP + 1 steps and records the last one. It prints the
operators by self CPU time and the time of each phase of the step (data, forward,
loss, backward, gradient clipping, optimizer), and writes a Chrome trace when
`--trace` is given (open it in https://ui.perfetto.dev).

Usage:
    python bench/profile_lmforge_step.py --model-dir MODEL_DIR \\
        --data ../shared/data/openorca/openorca_first900.jsonl --precision bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="Hugging Face model directory.")
    parser.add_argument("--data", required=True, help="Open-Orca-format jsonl file.")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--warmup", type=int, default=2, help="Steps run before the profiled step.")
    parser.add_argument("--rows", type=int, default=25, help="Operators to list.")
    parser.add_argument("--trace", help="Write a Chrome trace of the profiled step to this file.")
    return parser.parse_args(argv)


# Phases of a step: (label, record_function range or operator name in the profile).
PHASES = (
    ("forward (decoder)", "## decoder forward"),
    ("loss (lm_head + cross-entropy)", "## loss forward"),
    ("backward", "## backward"),
    ("grad clip", "## clip_grad_norm"),
    ("optimizer step", "Optimizer.step#AdamW.step"),
    ("zero_grad", "Optimizer.zero_grad#AdamW.zero_grad"),
    ("data + collate", "## data"),
)


def instrument() -> None:
    """Wrap the step's phases in record_function ranges, so the profile shows their totals."""
    import torch
    from torch.profiler import record_function

    from lmforge.train import loss as loss_module
    from lmforge.train import trainer as trainer_module
    from lmforge.train.backends import base as base_module

    original_summed = loss_module.summed_token_loss

    def summed_token_loss(*args, **kwargs):
        with record_function("## loss forward"):
            return original_summed(*args, **kwargs)

    loss_module.summed_token_loss = summed_token_loss

    original_forward = loss_module.CausalLMLoss.forward

    def forward(self, batch):
        decoder = self.model.get_decoder()
        original_decoder_forward = decoder.forward

        def timed_decoder_forward(*args, **kwargs):
            with record_function("## decoder forward"):
                return original_decoder_forward(*args, **kwargs)

        decoder.forward = timed_decoder_forward
        try:
            return original_forward(self, batch)
        finally:
            del decoder.forward

    loss_module.CausalLMLoss.forward = forward

    original_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        with record_function("## backward"):
            return original_backward(self, *args, **kwargs)

    torch.Tensor.backward = backward

    original_clip = base_module.Backend.clip_grad_norm

    def clip_grad_norm(self, max_norm):
        with record_function("## clip_grad_norm"):
            return original_clip(self, max_norm)

    base_module.Backend.clip_grad_norm = clip_grad_norm

    original_draw = trainer_module.Trainer._draw_step_batches

    def draw(self):
        with record_function("## data"):
            return original_draw(self)

    trainer_module.Trainer._draw_step_batches = draw


def main(argv=None) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from bench import lmforge_worker
    from lmforge.train.callbacks import TrainerCallback

    args = parse_args(argv)
    instrument()
    steps = args.warmup + 1
    profiler = profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=args.warmup, active=1, repeat=1),
        record_shapes=True,
    )

    class StepProfiler(TrainerCallback):
        def on_train_begin(self, trainer):
            profiler.start()

        def on_step_end(self, trainer, loss):
            profiler.step()

        def on_train_end(self, trainer, record):
            profiler.stop()

    result = lmforge_worker.run_lmforge_steps(
        args.model_dir, args.data, steps, args.seq_len, args.batch_size, args.precision, callbacks=[StepProfiler()]
    )
    times = result["step_times"]
    tokens = result["step_tokens"]
    step_seconds = times[-1] - times[-2]
    step_tokens = tokens[-1] - tokens[-2]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {args.precision}")
    print(f"profiled step: {step_seconds:.2f} s, {step_tokens} non-pad tokens, {step_tokens / step_seconds:.1f} tokens/s")

    events = profiler.key_averages()
    totals = {event.key: event.cpu_time_total for event in events}
    print("\nphase                            seconds  share")
    for label, key in PHASES:
        seconds = totals.get(key, 0.0) / 1e6
        print(f"{label:<32} {seconds:>7.2f}  {seconds / step_seconds:>5.1%}")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12))
    if args.trace:
        profiler.export_chrome_trace(args.trace)
        print(f"trace written to {args.trace}")


if __name__ == "__main__":
    main()
