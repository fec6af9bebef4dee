"""Training throughput of lmforge next to TRL's SFTTrainer and the Hugging Face Trainer.

Every setup trains the same model on the same rows with the same sequence length,
per-device batch size, precision, optimizer (AdamW, lr 2e-5) and number of optimizer
steps. Each runs in its own subprocess, so peak memory is measured per setup:

- `lmforge_packed`: lmforge's best-fit packed dataset and trainer loop;
- `lmforge_compiled`: the same with `torch_compile: true` (each decoder layer compiled
  by torch.compile; the compile time falls in the warmup steps);
- `trl_packed`: TRL `SFTTrainer` with `packing=True` (`packing_strategy="bfd"`, padding-free);
- `hf_padded`: the Hugging Face `Trainer`, one row per sequence, padded to the longest in the batch.

Throughput is non-pad input tokens per second over the steps after the first
`--warmup-steps` (so start-up and the first allocations are left out). Peak memory is
the process's max RSS on CPU, or max allocated CUDA memory on GPU. The script also
measures the machine's bf16 and fp32 matmul peak and reports each setup's model FLOP/s
(6 x parameters x tokens/s) as a fraction of the peak of its precision.

With `--large FILE.parquet`, each setup's data pipeline also runs on the first
`--large-rows` rows of that file (copied to a temporary parquet file first), in its own
subprocess: the time from reading the file to the first collated batch, and the fill
(non-pad tokens / token slots) over all its rows. lmforge streams and packs a buffer at
a time; TRL's `SFTTrainer` tokenizes and packs every row before the first batch; the
padded Trainer setup tokenizes every row (`Dataset.map`) and pads each batch of
`--batch-size` rows to its longest (fill over consecutive batches in file order).

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

SETUPS = ("lmforge_packed", "lmforge_compiled", "trl_packed", "hf_padded")
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
    parser.add_argument("--large", default=None, help="Large Open-Orca-format parquet file for the data columns.")
    parser.add_argument("--large-rows", type=int, default=100_000, help="Rows of --large that each data pipeline reads.")
    parser.add_argument("--worker", nargs=2, metavar=("SETUP", "PRECISION"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


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

    from bench.data_packing import to_messages
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


def run_lmforge(precision: str, args, torch_compile: bool = False) -> dict:
    from bench.lmforge_worker import run_lmforge_steps  # noqa: E402  (lives beside this script)

    result = run_lmforge_steps(
        model_dir=args.model_dir,
        data=args.data,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        precision=precision,
        torch_compile=torch_compile,
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


def run_data_pipeline(setup: str, path: str, args) -> dict:
    """Time SETUP's data pipeline on the parquet file PATH to its first batch, then measure its fill."""
    import pyarrow.parquet as pq

    from bench.data_packing import fill, measure_trl_first_batch, to_messages
    from lmforge.data.chat import load_tokenizer

    tokenizer = load_tokenizer(str(args.model_dir))
    num_rows = pq.ParquetFile(path).metadata.num_rows
    if setup == "trl_packed":
        result = measure_trl_first_batch(path, tokenizer, args.batch_size, args.seq_len, None)
        return {"first_batch_s": result["first_batch_s"], "fill": result["fill"], "source_rows": num_rows}
    if setup in ("lmforge_packed", "lmforge_compiled"):
        from lmforge.data.dataset import ChatDataset, open_orca_split

        started = time.perf_counter()
        dataset = ChatDataset(open_orca_split(path, "train", validation_fraction=0.0), tokenizer,
                              max_length=args.seq_len, packing=True)
        iterator = iter(dataset)
        dataset.collator()([next(iterator) for _ in range(args.batch_size)])
        first_batch_s = time.perf_counter() - started
        for _ in iterator:
            pass
        return {"first_batch_s": first_batch_s, "fill": dataset.fill_efficiency(), "source_rows": num_rows}

    import tempfile

    from datasets import load_dataset
    from transformers import DataCollatorForSeq2Seq

    with tempfile.TemporaryDirectory(prefix="hf-bench-") as cache:
        started = time.perf_counter()

        def tokenize(row):
            ids = tokenizer.apply_chat_template(to_messages(row), tokenize=True, return_dict=False)[: args.seq_len]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

        dataset = load_dataset("parquet", data_files=path, split="train", cache_dir=cache)
        dataset = dataset.map(tokenize, remove_columns=dataset.column_names)
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        collator([dataset[i] for i in range(args.batch_size)])
        first_batch_s = time.perf_counter() - started
        lengths = [len(ids) for ids in dataset["input_ids"]]
    batches = [lengths[i : i + args.batch_size] for i in range(0, len(lengths), args.batch_size)]
    slots = sum(max(batch) * len(batch) for batch in batches)
    return {"first_batch_s": first_batch_s, "fill": fill(sum(lengths), slots), "source_rows": num_rows}


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


def write_first_rows(source: str, num_rows: int, destination: Path) -> dict:
    """Copy the first NUM_ROWS rows of the parquet file SOURCE to DESTINATION (one pipeline input for all setups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(source)
    batches, rows_taken = [], 0
    for batch in reader.iter_batches(batch_size=10_000):
        batches.append(batch.slice(0, num_rows - rows_taken))
        rows_taken += batches[-1].num_rows
        if rows_taken >= num_rows:
            break
    pq.write_table(pa.Table.from_batches(batches), destination, row_group_size=10_000)
    return {"path": str(destination), "rows": rows_taken}


def worker_main(args) -> None:
    setup, precision = args.worker
    if precision == "data":
        result = run_data_pipeline(setup, args.large, args)
    elif setup in ("lmforge_packed", "lmforge_compiled"):
        result = run_lmforge(precision, args, torch_compile=setup == "lmforge_compiled")
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

    def run_worker(setup: str, mode: str, extra: list[str]) -> dict | None:
        command = [sys.executable, str(Path(__file__).resolve()), *forwarded_args, *extra, "--worker", setup, mode]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=repo_root, env={**os.environ, "PYTHONPATH": str(repo_root)})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{setup} ({mode}) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return None
        return json.loads(lines[-1][len("RESULT "):])

    data = {}
    if args.large:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-large-") as work:
            subset = write_first_rows(args.large, args.large_rows, Path(work) / "rows.parquet")
            # Compiling changes the model, not the data pipeline: one data row for both lmforge setups.
            for setup in [name for name in setups if name != "lmforge_compiled"]:
                print(f"running {setup} data pipeline ({subset['rows']:,} rows of {args.large})...", file=sys.stderr, flush=True)
                data[setup] = run_worker(setup, "data", ["--large", subset["path"]])

    for precision in precisions:
        for setup in setups:
            print(f"running {setup} ({precision}, {args.steps} steps)...", file=sys.stderr, flush=True)
            result = run_worker(setup, precision, [])
            if result is None:
                results.append({"setup": setup, "precision": precision, "error": True})
                continue
            result["flops_per_second"] = 6 * result["parameters"] * result["tokens_per_second"]
            result["fraction_of_matmul_peak"] = result["flops_per_second"] / peaks[precision]
            results.append(result)

    print("\nmatmul peak: " + ", ".join(f"{p} {peaks[p] / 1e9:.1f} GFLOP/s" for p in precisions))
    header = f"{'setup':<16} {'precision':<9} {'tokens/s':>9} {'peak mem GiB':>12} {'model FLOP/s':>13} {'of peak':>8}"
    if data:
        rows_read = next((d["source_rows"] for d in data.values() if d), 0)
        header += f" {'first batch s':>13} {'fill':>7}"
        print(f"(first batch and fill: data pipeline on the first {rows_read:,} rows of {args.large}, seq_len {args.seq_len})")
    print(header)
    # Without training runs (--precisions ''), the table has one row per data pipeline.
    for result in results or [{"setup": setup, "precision": "-", "data_only": True} for setup in setups]:
        line = f"{result['setup']:<16} {result['precision']:<9} "
        if "data_only" in result:
            line += f"{'-':>9} {'-':>12} {'-':>13} {'-':>8}"
        elif "error" in result:
            line += f"{'failed':>9} {'':>12} {'':>13} {'':>8}"
        else:
            line += (f"{result['tokens_per_second']:>9.1f} {result['peak_memory_bytes'] / 2**30:>12.2f} "
                     f"{result['flops_per_second'] / 1e9:>11.1f} G {result['fraction_of_matmul_peak']:>8.1%}")
        if data:
            measured = data.get("lmforge_packed" if result["setup"] == "lmforge_compiled" else result["setup"])
            line += f" {measured['first_batch_s']:>13.1f} {measured['fill']:>7.1%}" if measured else f" {'failed':>13} {'':>7}"
        print(line)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps({"versions": versions(), "args": vars(args), "matmul_peak": peaks, "results": results,
                               "data_pipelines": data}, indent=2))
    tmp.rename(output)
    print(f"\nresults written to {output}")


if __name__ == "__main__":
    main()
