"""Write a 1M-row Open-Orca-format parquet file by repeating sample rows under new ids.

Row k is sample row k % N with the id `<original id>#<k // N>`, so ids stay unique and
the hash-based validation split treats every copy as a new row. Rows are written in
row groups of `--row-group-size` rows, through a temporary file and a rename.

Usage:
    python bench/make_openorca_1m.py --sample SAMPLE.parquet --out bench/data/openorca_1m.parquet
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", required=True, help="Open-Orca-format parquet or jsonl file to repeat.")
    parser.add_argument("--out", default="bench/data/openorca_1m.parquet", help="Output parquet file.")
    parser.add_argument("--rows", type=int, default=1_000_000, help="Rows to write.")
    parser.add_argument("--row-group-size", type=int, default=10_000, help="Rows per parquet row group.")
    args = parser.parse_args(argv)

    sample_path = Path(args.sample)
    if not sample_path.is_file():
        parser.error(f"sample file {sample_path} not found; pass the real rows, e.g. "
                     "--sample ../shared/data/openorca/openorca_first900.parquet")
    if sample_path.suffix == ".parquet":
        sample = pq.read_table(sample_path)
    else:
        import pyarrow.json as pajson

        sample = pajson.read_json(sample_path)
    sample = sample.select(["id", "system_prompt", "question", "response"])
    base_ids = sample.column("id").to_pylist()
    n = sample.num_rows

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(out.name + ".tmp")
    started = time.perf_counter()
    with pq.ParquetWriter(temp, sample.schema, compression="zstd") as writer:
        for start in range(0, args.rows, args.row_group_size):
            stop = min(start + args.row_group_size, args.rows)
            indices = pa.array([k % n for k in range(start, stop)])
            group = sample.take(indices)
            ids = pa.array([f"{base_ids[k % n]}#{k // n}" for k in range(start, stop)])
            group = group.set_column(0, "id", ids)
            writer.write_table(group, row_group_size=args.row_group_size)
    os.replace(temp, out)
    print(f"wrote {args.rows} rows to {out} ({out.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
