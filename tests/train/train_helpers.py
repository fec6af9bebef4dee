"""Small in-memory datasets and factories for driving the Trainer directly in tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.train.arguments import TrainingArguments
from lmforge.train.trainer import Trainer


class TokenRowDataset:
    """Pre-tokenized rows, iterated in order, with resumable position.

    State: `state_dict()` contains `epoch` and `position` (rows already yielded in
    this epoch); the rows and the shard come from the constructor and `set_shard`.
    """

    def __init__(self, rows: list[dict]):
        self.all_rows = rows
        self.rows = rows
        self.epoch = 0
        self.position = 0

    def set_shard(self, rank: int, world_size: int) -> None:
        self.rows = self.all_rows[rank::world_size]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        while self.position < len(self.rows):
            row = self.rows[self.position]
            self.position += 1
            yield row

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.position = state["position"]


def make_rows(count: int, seq_len: int = 32, vocab_size: int = 300, seed: int = 0) -> list[dict]:
    """Rows of random tokens with a varying number of masked prompt tokens, so trained-token counts differ."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        input_ids = torch.randint(5, vocab_size, (seq_len,), generator=generator)
        labels = torch.cat([input_ids[1:], torch.tensor([-100])])
        prompt_length = int(torch.randint(0, seq_len - 4, (1,), generator=generator))
        labels[:prompt_length] = -100
        rows.append({
            "input_ids": input_ids.tolist(),
            "labels": labels.tolist(),
            "position_ids": list(range(seq_len)),
        })
    return rows


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([example[key] for example in examples]) for key in ("input_ids", "labels", "position_ids")}


def adamw_factory(lr: float = 1e-3):
    def build(named_parameters):
        return torch.optim.AdamW([parameter for _, parameter in named_parameters], lr=lr, weight_decay=0.01)

    return build


def linear_decay_factory(total_steps: int):
    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))

    return build


def model_factory(model_dir: Path):
    def build():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    return build


def build_trainer(model_dir: Path, output_dir: Path, rows: list[dict], eval_rows=None, callbacks=(), **argument_values) -> Trainer:
    from transformers import AutoTokenizer

    values = {"mixed_precision": "fp32", "logging_steps": 1, "eval_steps": 0, "save_steps": 1000}
    values.update(argument_values)
    args = TrainingArguments(output_dir=str(output_dir), **values)
    return Trainer(
        args=args,
        model_factory=model_factory(model_dir),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=TokenRowDataset(rows),
        eval_dataset=TokenRowDataset(eval_rows) if eval_rows is not None else None,
        data_collator=collate,
        optimizer_factory=adamw_factory(),
        lr_scheduler_factory=linear_decay_factory(max(args.max_steps, 1)),
        callbacks=callbacks,
        backend_options={"device": "cpu"},
    )
