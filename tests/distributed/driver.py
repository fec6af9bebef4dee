"""Minimal training loop for the backend equivalence tests, run under torchrun.

It trains a tiny Llama for a few steps on fixed synthetic packed rows with one
backend (`single` runs in one process without torch.distributed) and writes a JSON
report: the loss of every step, the steps each rank took and, from rank 0, the
merged final weights as a safetensors file.

Rows are drawn from a fixed seed, so every process and every backend sees the
same global batch at each step: row `step * global_batch + i`. A data-parallel
rank r takes the rows with i % world_size == r.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def synthetic_rows(num_rows: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Packed rows of two documents each, with shifted labels and -100 at each document's last token."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        input_ids = torch.randint(3, vocab_size, (seq_len,), generator=generator)
        split = int(torch.randint(4, seq_len - 4, (1,), generator=generator))
        position_ids = torch.cat([torch.arange(split), torch.arange(seq_len - split)])
        labels = torch.full((seq_len,), -100)
        labels[: split - 1] = input_ids[1:split]
        labels[split : seq_len - 1] = input_ids[split + 1 :]
        # An untrained prompt prefix in the first document, so token counts differ per row.
        prompt = int(torch.randint(0, split // 2, (1,), generator=generator))
        labels[:prompt] = -100
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def build_optimizer(name: str, named_parameters, lr: float):
    params = [param for _, param in named_parameters]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["single", "ddp", "pipeline"], required=True)
    parser.add_argument("--schedule", default="ZBVZeroBubble")
    parser.add_argument("--n-microbatches", type=int, default=None)
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-grad-norm", type=float, default=None)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient-accumulation micro-batches per step and rank")
    parser.add_argument("--eval-rows", type=int, default=0, help="after training, evaluate the first N rows")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    backend = None
    rank, world_size = 0, 1
    if args.backend != "single":
        dist.init_process_group("gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if args.backend == "ddp":
            from lmforge.train.backends.ddp import DDPBackend

            backend = DDPBackend({}, mixed_precision="fp32", loss_chunk_size=16)
        else:
            from lmforge.train.backends.pipeline import PipelineBackend

            options = {"schedule": args.schedule}
            if args.n_microbatches:
                options["n_microbatches"] = args.n_microbatches
            backend = PipelineBackend(options, mixed_precision="fp32", loss_chunk_size=16)
        backend.setup()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    vocab_size = model.config.vocab_size
    if args.activation_checkpointing:
        # As the trainer does: each decoder layer recomputes its activations in backward.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = synthetic_rows(args.steps * args.global_batch, args.seq_len, vocab_size)

    if backend is None:
        from lmforge.train.backends.single import SingleDeviceBackend

        backend_single = SingleDeviceBackend({"device": "cpu"}, mixed_precision="fp32", loss_chunk_size=16)
        backend_single.prepare(model)
        named = backend_single.named_parameters()
    else:
        backend.prepare(model)
        named = backend.named_parameters()
        del model
    optimizer = build_optimizer(args.optimizer, named, args.lr)

    data_rank = backend.data_rank if backend else 0
    data_world = backend.data_world_size if backend else 1
    losses, grad_norms = [], []
    step = 0
    while step < args.steps:
        step_rows = rows[step * args.global_batch : (step + 1) * args.global_batch]
        mine = [row for index, row in enumerate(step_rows) if index % data_world == data_rank]
        batch = collate(mine)
        local_tokens = int((batch["labels"] != -100).sum())
        rows_per_micro_batch = len(mine) // args.micro_batches
        micro_batches = [
            collate(mine[index : index + rows_per_micro_batch]) for index in range(0, len(mine), rows_per_micro_batch)
        ]
        optimizer.zero_grad(set_to_none=True)
        if backend is None:
            loss = float(backend_single.forward_backward(micro_batches, local_tokens))
            grad_norm = float(backend_single.clip_grad_norm(args.max_grad_norm))
        else:
            tokens = int(backend.all_reduce_data_parallel(torch.tensor(local_tokens)))
            step_loss = backend.forward_backward(micro_batches, tokens)
            # Each rank returns its share of the step loss; the sum over all ranks is the step's mean loss.
            dist.all_reduce(step_loss)
            loss = float(step_loss)
            grad_norm = float(backend.clip_grad_norm(args.max_grad_norm))
        optimizer.step()
        losses.append(loss)
        grad_norms.append(grad_norm)
        step += 1

    report = {"rank": rank, "world_size": world_size, "steps": step, "losses": losses, "grad_norms": grad_norms}
    if args.eval_rows:
        eval_rows = [row for index, row in enumerate(rows[: args.eval_rows]) if index % data_world == data_rank]
        if backend is None:
            loss_sum, count = backend_single.eval_loss(collate(eval_rows))
        else:
            totals = torch.tensor(backend.eval_loss(collate(eval_rows)), dtype=torch.float64)
            dist.all_reduce(totals)
            loss_sum, count = float(totals[0]), int(totals[1])
        report["eval_loss_sum"], report["eval_tokens"] = loss_sum, count

    out = Path(args.out)
    (out.parent / f"{out.stem}.rank{rank}.json").write_text(json.dumps(report))

    state = model.state_dict() if backend is None else backend.model_state_dict()
    if backend is not None and args.backend == "pipeline":
        gathered = [None] * world_size
        dist.all_gather_object(gathered, {key: value.detach().cpu() for key, value in state.items()})
        state = {}
        for part in gathered:
            state.update(part)
    if rank == 0:
        tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
        tensors.pop("lm_head.weight", None) if "model.embed_tokens.weight" in tensors and _tied(tensors) else None
        save_file(tensors, str(out.with_suffix(".safetensors")))
        out.write_text(json.dumps(report))
    if backend is not None:
        dist.barrier()
        dist.destroy_process_group()


def _tied(tensors: dict[str, torch.Tensor]) -> bool:
    return "lm_head.weight" in tensors and torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
