"""Data pipeline speed and packing fill: lmforge's best-fit packer next to greedy, padding and TRL's bfd.

Measures, with one tokenizer and one chat template for every method:

1. Time to the first packed batch on a large local parquet file (make it with
   `bench/make_openorca_1m.py`): from constructing `ChatDataset` to the first
   collated batch, tokenizer loading excluded (reported separately). Also the time
   to resume at row 900,000 from a saved state and yield the next batch, and the
   fill and speed while streaming the first `--streaming-rows` rows of that file
   (no end-of-stream rows, so this is the steady-state fill).
   The same for TRL: `load_dataset("parquet")`, conversion to `messages`, then
   `SFTTrainer` with `packing=True` (bfd), which tokenizes and packs every row
   before it yields a batch, up to the first batch of `get_train_dataloader()`,
   and the fill of all its packed rows (`--trl-rows` limits the rows it reads).
2. On the sample rows, at each `--max-length`: packed rows per second through
   `ChatDataset` (read, render, tokenize, pack), and fill efficiency (non-pad
   tokens / token slots) of
   - `lmforge_bfd`: `ChatDataset` (best-fit decreasing over a 1024-document buffer);
   - `greedy`: the same documents packed in arrival order (next fit);
   - `padded_max_length`: one document per row, padded to max_length;
   - `padded_longest_b8`: one document per row, padded to the longest of each batch of 8;
   - `trl_bfd`: `trl.pack_dataset(..., strategy="bfd")` on the same documents
     (split at max_length first, as lmforge's `overflow="split"` does).

Usage:
    python bench/data_packing.py --sample SAMPLE.parquet --tokenizer MODEL_DIR_OR_GGUF \\
        --large bench/data/openorca_1m.parquet --json bench/results/data_packing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", required=True, help="Open-Orca-format parquet or jsonl file (the real rows).")
    parser.add_argument("--tokenizer", required=True, help="Model directory or .gguf file whose tokenizer to use.")
    parser.add_argument("--large", default=None, help="Large parquet file for the time-to-first-batch measurement.")
    parser.add_argument("--max-length", type=int, nargs="+", default=[512, 2048], help="Row lengths to measure.")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per batch for the first-batch timing.")
    parser.add_argument("--chat-template", default="chatml", help="Chat template: chatml, a .jinja path, or 'tokenizer'.")
    parser.add_argument("--json", default=None, help="Write the results to this JSON file as well.")
    parser.add_argument("--streaming-rows", type=int, default=20_000,
                        help="Source rows of the large file to stream for the steady-state fill (0 skips it).")
    parser.add_argument("--trl-rows", type=int, default=None,
                        help="Rows of the large file that TRL's pipeline reads (default: all; 0 skips TRL).")
    return parser.parse_args(argv)


def fill(tokens: int, slots: int) -> float:
    return tokens / slots if slots else 0.0


def measure_first_batch(path: str, tokenizer, chat_template, batch_size: int, max_length: int) -> dict:
    from lmforge.data import ChatDataset, SplitRows

    started = time.perf_counter()
    dataset = ChatDataset(SplitRows(path, "train"), tokenizer, max_length=max_length, chat_template=chat_template)
    iterator = iter(dataset)
    batch = dataset.collator()([next(iterator) for _ in range(batch_size)])
    first_batch_s = time.perf_counter() - started
    assert batch["input_ids"].shape == (batch_size, max_length)

    # Resume deep into the file: the reader seeks to the saved row group instead of replaying.
    rows = SplitRows(path, "train")
    row_groups = rows.source._row_group_sizes[0]
    target_row = 900_000
    group, remaining = 0, target_row
    while remaining >= row_groups[group]:
        remaining -= row_groups[group]
        group += 1
    # An empty packer buffer makes the resumed dataset read and pack a full buffer from the new position.
    state = dataset.state_dict()
    state["buffer"], state["ready"] = [], []
    state["rows"]["position"] = {"file": 0, "row_group": group, "row": remaining}
    state["rows"]["next_index"] = target_row
    started = time.perf_counter()
    resumed = ChatDataset(SplitRows(path, "train"), tokenizer, max_length=max_length, chat_template=chat_template)
    resumed.load_state_dict(state)
    resumed_iterator = iter(resumed)
    resumed.collator()([next(resumed_iterator) for _ in range(batch_size)])
    resume_s = time.perf_counter() - started
    return {"rows_in_file": rows.source.num_rows(), "first_batch_s": first_batch_s,
            "resume_at_900k_first_batch_s": resume_s, "batch_size": batch_size, "max_length": max_length}


def measure_streaming_fill(path: str, tokenizer, chat_template, max_length: int, source_rows: int) -> dict:
    """Fill and speed while streaming the first `source_rows` rows of a large file (no end-of-stream rows)."""
    from lmforge.data import ChatDataset, SplitRows

    dataset = ChatDataset(SplitRows(path, "train"), tokenizer, max_length=max_length, chat_template=chat_template)
    started = time.perf_counter()
    packed_rows = 0
    for _ in dataset:
        packed_rows += 1
        if dataset.rows.rows_read >= source_rows:
            break
    seconds = time.perf_counter() - started
    return {"source_rows": dataset.rows.rows_read, "packed_rows": packed_rows, "fill": dataset.fill_efficiency(),
            "rows_per_s": packed_rows / seconds, "tokens_per_s": dataset.stats["tokens"] / seconds,
            "max_length": max_length}


def to_messages(row: dict) -> list[dict]:
    """Return an Open-Orca row as chat messages (system only when the row has a system prompt)."""
    messages = []
    if row.get("system_prompt"):
        messages.append({"role": "system", "content": row["system_prompt"]})
    messages.append({"role": "user", "content": row["question"]})
    messages.append({"role": "assistant", "content": row["response"]})
    return messages


def measure_trl_first_batch(path: str, tokenizer, batch_size: int, max_length: int, num_rows: int | None) -> dict:
    """Time TRL's SFTTrainer data preparation on a parquet file, up to its first packed batch."""
    import tempfile

    import pyarrow.compute as pc
    from datasets import load_dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    # The model only has to accept the batch: a 2-layer Llama with the tokenizer's vocabulary.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as work:
        started = time.perf_counter()
        # A fresh cache directory: nothing is reused from an earlier run.
        dataset = load_dataset("parquet", data_files=path, split="train", cache_dir=f"{work}/cache")
        if num_rows:
            dataset = dataset.select(range(min(num_rows, len(dataset))))
        source_rows = len(dataset)
        dataset = dataset.map(lambda row: {"messages": to_messages(row)}, remove_columns=dataset.column_names)
        converted_s = time.perf_counter() - started
        config = SFTConfig(output_dir=f"{work}/out", per_device_train_batch_size=batch_size, max_length=max_length,
                           packing=True, packing_strategy="bfd", assistant_only_loss=False, report_to="none",
                           use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        first_batch_s = time.perf_counter() - started
        packed = trainer.train_dataset
        tokens = int(pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py())
    return {"source_rows": source_rows, "first_batch_s": first_batch_s, "load_and_convert_s": converted_s,
            "packed_rows": len(packed), "fill": fill(tokens, len(packed) * max_length), "tokens": tokens,
            "batch_tokens": int(batch["input_ids"].numel()), "batch_size": batch_size, "max_length": max_length}


def measure_packing(sample: str, tokenizer, chat_template, max_length: int) -> dict:
    from lmforge.data import ChatDataset, SplitRows
    from lmforge.data.packing import greedy_pack

    dataset = ChatDataset(SplitRows(sample, "all"), tokenizer, max_length=max_length, chat_template=chat_template)
    started = time.perf_counter()
    packed_rows = list(dataset)
    seconds = time.perf_counter() - started
    tokens = sum(len(r["input_ids"]) for r in packed_rows)
    results = {
        "documents": dataset.stats["documents"],
        "overflow_split": dataset.stats["overflow_split"],
        "tokens": tokens,
        "lmforge_bfd": {"rows": len(packed_rows), "fill": fill(tokens, len(packed_rows) * max_length),
                        "rows_per_s": len(packed_rows) / seconds, "seconds": seconds},
    }

    # The same documents (after the split at max_length) for the other methods.
    doc_ids = [r["input_ids"] for r in ChatDataset(SplitRows(sample, "all"), tokenizer, max_length=max_length,
                                                    chat_template=chat_template, packing=False)]
    lengths = [len(ids) for ids in doc_ids]
    assert sum(lengths) == tokens, "every method must see the same tokens"

    started = time.perf_counter()
    greedy_bins = greedy_pack(lengths, max_length)
    results["greedy"] = {"rows": len(greedy_bins), "fill": fill(tokens, len(greedy_bins) * max_length),
                         "pack_seconds": time.perf_counter() - started}
    results["padded_max_length"] = {"rows": len(lengths), "fill": fill(tokens, len(lengths) * max_length)}
    longest_slots = sum(max(lengths[i : i + 8]) * len(lengths[i : i + 8]) for i in range(0, len(lengths), 8))
    results["padded_longest_b8"] = {"rows": len(lengths), "fill": fill(tokens, longest_slots)}

    from datasets import Dataset
    from trl import pack_dataset

    table = Dataset.from_dict({"input_ids": doc_ids})
    started = time.perf_counter()
    trl_packed = pack_dataset(table, seq_length=max_length, strategy="bfd")
    trl_seconds = time.perf_counter() - started
    trl_tokens = sum(len(ids) for ids in trl_packed["input_ids"])
    results["trl_bfd"] = {"rows": len(trl_packed), "fill": fill(trl_tokens, len(trl_packed) * max_length),
                          "pack_seconds": trl_seconds, "tokens": trl_tokens}
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import transformers

    from lmforge.data.chat import load_tokenizer

    chat_template = None if args.chat_template == "tokenizer" else args.chat_template
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer_load_s = time.perf_counter() - started

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizer": str(args.tokenizer),
        "tokenizer_load_s": tokenizer_load_s,
        "packing": {},
    }
    if args.large:
        report["first_batch"] = measure_first_batch(args.large, tokenizer, chat_template, args.batch_size,
                                                    max(args.max_length))
        print(json.dumps(report["first_batch"], indent=2))
        if args.streaming_rows > 0:
            report["streaming"] = measure_streaming_fill(args.large, tokenizer, chat_template, max(args.max_length),
                                                         args.streaming_rows)
            print(json.dumps(report["streaming"], indent=2))
        if args.trl_rows != 0:
            report["trl_first_batch"] = measure_trl_first_batch(args.large, tokenizer, args.batch_size,
                                                                max(args.max_length), args.trl_rows)
            print(json.dumps(report["trl_first_batch"], indent=2))
    for max_length in args.max_length:
        report["packing"][str(max_length)] = measure_packing(args.sample, tokenizer, chat_template, max_length)
        print(max_length, json.dumps(report["packing"][str(max_length)], indent=2))

    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        temp = out.with_name(out.name + ".tmp")
        temp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(temp, out)


if __name__ == "__main__":
    main()
