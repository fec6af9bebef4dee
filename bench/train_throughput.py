"""Training throughput of lmforge next to TRL's SFTTrainer and the Hugging Face Trainer.

Every setup trains the same model on the same rows with the same sequence length,
per-device batch size, precision, optimizer (AdamW, lr 2e-5) and number of optimizer
steps. Each runs in its own subprocess, so peak memory is measured per setup:

- `lmforge_packed`: lmforge's best-fit packed dataset and trainer loop;
- `trl_packed`: TRL `SFTTrainer` with `packing=True` (`packing_strategy="bfd"`, padding-free);
- `hf_padded`: the Hugging Face `Trainer`, one row per sequence, padded to the longest in the batch.

Throughput is non-pad input tokens per second over the steps after the first
`--warmup-steps` (so start-up and the first allocations are left out). Peak memory is
the process's max RSS on CPU, or max allocated CUDA memory on GPU. The script also
measures the machine's bf16 and fp32 matmul peak and reports each setup's model FLOP/s
(6 x parameters x tokens/s) as a fraction of the peak of its precision.

Usage:
    python bench/train_throughput.py --model-dir MODEL_DIR \\
        --data ../shared/data/openorca/openorca_first900.jsonl --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SETUPS = ("lmforge_packed", "trl_packed", "hf_padded")
PRECISIONS = ("fp32", "bf16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="Hugging Face model directory (e.g. from `lmforge model fetch-demo`).")
    parser.add_argument("--data", required=True, help="Open-Orca-format jsonl file.")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per setup.")
    parser.add_argument("--warmup-steps", type=int, default=2, help="Steps left out of the throughput figure.")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="Per-device micro-batch size (rows).")
    parser.add_argument("--setups", default=",".join(SETUPS), help="Comma-separated subset of: " + ", ".join(SETUPS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="Comma-separated subset of: fp32, bf16")
    parser.add_argument("--output", default="bench/results/train_throughput.json", help="Where to write the JSON results.")
    parser.add_argument("--worker", nargs=2, metavar=("SETUP", "PRECISION"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def to_messages(row: dict) -> list[dict]:
    messages = []
    if row.get("system_prompt"):
        messages.append({"role": "system", "content": row["system_prompt"]})
    messages.append({"role": "user", "content": row["question"]})
    messages.append({"role": "assistant", "content": row["response"]})
    return messages


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepTimer:
    """Records the time and the token count at the end of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []

    def record(self, tokens_so_far: int) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(tokens_so_far)

    def tokens_per_second(self, warmup_steps: int) -> float:
        if len(self.times) <= warmup_steps + 1:
            raise RuntimeError(f"only {len(self.times)} steps recorded; need more than warmup_steps + 1 = {warmup_steps + 1}")
        start = warmup_steps - 1 if warmup_steps > 0 else 0
        elapsed = self.times[-1] - self.times[start]
        return (self.tokens[-1] - self.tokens[start]) / elapsed


def hf_training_arguments(args, precision: str, output_dir: str, **extra):
    import torch

    common = dict(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=2e-5,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        seed=0,
    )
    common.update(extra)
    return common


def run_hf_family(setup: str, precision: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    rows = load_rows(args.data)
    timer = StepTimer()

    class TimerCallback(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            timer.record(int(state.num_input_tokens_seen))

    output_dir = f"/tmp/lmforge-bench-{setup}-{precision}"
    if setup == "trl_packed":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_list([{"messages": to_messages(row)} for row in rows])
        config = SFTConfig(
            **hf_training_arguments(args, precision, output_dir),
            max_length=args.seq_len,
            packing=True,
            packing_strategy="bfd",
            assistant_only_loss=False,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[TimerCallback()])
    else:
        from datasets import Dataset
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        def tokenize(row):
            ids = tokenizer.apply_chat_template(to_messages(row), tokenize=True, return_dict=False)
            ids = ids[: args.seq_len]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

        dataset = Dataset.from_list(rows).map(tokenize, remove_columns=list(rows[0].keys()))
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        training_args = TrainingArguments(**hf_training_arguments(args, precision, output_dir))
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator, callbacks=[TimerCallback()])

    trainer.train()
    return {
        "tokens_per_second": timer.tokens_per_second(args.warmup_steps),
        "steps": len(timer.times),
        "tokens": timer.tokens[-1],
        "peak_memory_bytes": peak_memory_bytes(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_lmforge(precision: str, args) -> dict:
    from bench.lmforge_worker import run_lmforge_steps  # noqa: E402  (lives beside this script)

    result = run_lmforge_steps(
        model_dir=args.model_dir,
        data=args.data,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        precision=precision,
    )
    timer = StepTimer()
    timer.times, timer.tokens = result["step_times"], result["step_tokens"]
    return {
        "tokens_per_second": timer.tokens_per_second(args.warmup_steps),
        "steps": len(timer.times),
        "tokens": timer.tokens[-1],
        "peak_memory_bytes": peak_memory_bytes(),
        "parameters": result["parameters"],
    }


def measure_matmul_peak(dtype_name: str, size: int = 2048, repeats: int = 20) -> float:
    """Return the best observed FLOP/s of a square matmul in the given dtype on this device."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def worker_main(args) -> None:
    setup, precision = args.worker
    if setup == "lmforge_packed":
        result = run_lmforge(precision, args)
    else:
        result = run_hf_family(setup, precision, args)
    result.update(setup=setup, precision=precision)
    print("RESULT " + json.dumps(result), flush=True)


def versions() -> dict:
    import platform

    import torch
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        found["trl"] = trl.__version__
    except ImportError:
        pass
    import lmforge

    found["lmforge"] = lmforge.__version__
    found["cpu_count"] = os.cpu_count()
    return found


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return

    setups = [s for s in args.setups.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    for name in setups:
        if name not in SETUPS:
            sys.exit(f"error: unknown setup {name!r}; choose from {', '.join(SETUPS)}")
    for name in precisions:
        if name not in PRECISIONS:
            sys.exit(f"error: unknown precision {name!r}; choose from fp32, bf16")

    peaks = {p: measure_matmul_peak(p) for p in precisions}
    results = []
    repo_root = Path(__file__).resolve().parents[1]
    forwarded_args = list(sys.argv[1:] if argv is None else argv)
    for precision in precisions:
        for setup in setups:
            print(f"running {setup} ({precision}, {args.steps} steps)...", file=sys.stderr, flush=True)
            command = [sys.executable, str(Path(__file__).resolve()), *forwarded_args, "--worker", setup, precision]
            proc = subprocess.run(command, capture_output=True, text=True, cwd=repo_root, env={**os.environ, "PYTHONPATH": str(repo_root)})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{setup} ({precision}) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                results.append({"setup": setup, "precision": precision, "error": proc.stderr[-500:]})
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            result["flops_per_second"] = 6 * result["parameters"] * result["tokens_per_second"]
            result["fraction_of_matmul_peak"] = result["flops_per_second"] / peaks[precision]
            results.append(result)

    print(f"\nmatmul peak: " + ", ".join(f"{p} {peaks[p] / 1e9:.1f} GFLOP/s" for p in precisions))
    print(f"{'setup':<16} {'precision':<9} {'tokens/s':>9} {'peak mem GiB':>12} {'model FLOP/s':>13} {'of peak':>8}")
    for result in results:
        if "error" in result:
            print(f"{result['setup']:<16} {result['precision']:<9} failed")
            continue
        print(
            f"{result['setup']:<16} {result['precision']:<9} {result['tokens_per_second']:>9.1f} "
            f"{result['peak_memory_bytes'] / 2**30:>12.2f} {result['flops_per_second'] / 1e9:>10.1f} G "
            f"{result['fraction_of_matmul_peak']:>8.1%}"
        )

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps({"versions": versions(), "args": vars(args), "matmul_peak": peaks, "results": results}, indent=2))
    tmp.rename(output)
    print(f"\nresults written to {output}")


if __name__ == "__main__":
    main()
