"""Fixtures for the data tests: the tiny ChatML tokenizer and malformed data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def orca_jsonl(openorca_dir) -> Path:
    return openorca_dir / "openorca_first900.jsonl"


@pytest.fixture(scope="session")
def orca_parquet(openorca_dir) -> Path:
    return openorca_dir / "openorca_first900.parquet"


def good_row(index: int, **overrides) -> dict:
    row = {
        "id": f"t.{index}",
        "system_prompt": "You are a helpful assistant.",
        "question": f"What is {index} plus {index}?",
        "response": f"{index} plus {index} is {2 * index}.",
    }
    row.update(overrides)
    return row


def write_jsonl(path: Path, records: list) -> Path:
    """Write records (dicts, or bytes written verbatim as one line) to a jsonl file."""
    with open(path, "wb") as handle:
        for record in records:
            line = record if isinstance(record, bytes) else json.dumps(record).encode("utf-8")
            handle.write(line + b"\n")
    return path


@pytest.fixture(name="good_row")
def good_row_fixture():
    return good_row


@pytest.fixture(name="write_jsonl")
def write_jsonl_fixture():
    return write_jsonl
