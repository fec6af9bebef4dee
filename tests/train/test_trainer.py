"""The Trainer driven directly in Python with the tiny Llama and in-memory token rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.train import checkpoints as ckpt
from lmforge.train.callbacks import TrainerCallback, read_json_log
from lmforge.train.loss import CausalLMLoss
from lmforge.train.trainer import _enable_activation_checkpointing
from .train_helpers import build_trainer, collate, make_rows


class StepRecorder(TrainerCallback):
    """Records (global_step, loss, learning rate used) after every step; can request a control command."""

    def __init__(self, request_at: int | None = None, command: str = "save-stop"):
        self.steps: list[tuple[int, float, float]] = []
        self.request_at = request_at
        self.command = command

    def on_step_end(self, trainer, loss):
        self.steps.append((trainer.global_step, loss, trainer.last_learning_rate))
        if trainer.global_step == self.request_at:
            trainer.request_control(self.command)


def test_accumulation_matches_large_batch(tiny_llama_dir):
    from lmforge.train.backends.single import SingleDeviceBackend
    from transformers import AutoModelForCausalLM

    rows = make_rows(8, seq_len=24)
    grads = []
    for micro_size in (1, 8):
        backend = SingleDeviceBackend({"device": "cpu"}, mixed_precision="fp32", loss_chunk_size=16)
        backend.prepare(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
        micro_batches = [collate(rows[start:start + micro_size]) for start in range(0, 8, micro_size)]
        num_tokens = sum(int((batch["labels"] != -100).sum()) for batch in micro_batches)
        loss = backend.forward_backward(micro_batches, num_tokens)
        grads.append((float(loss), {name: p.grad.clone() for name, p in backend.named_parameters()}))

    (loss_1x8, grads_1x8), (loss_8x1, grads_8x1) = grads
    assert loss_1x8 == pytest.approx(loss_8x1, rel=1e-5)
    for name, grad in grads_8x1.items():
        torch.testing.assert_close(grads_1x8[name], grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name} differs")

    # A per-micro-batch mean (the common mistake) would weight the rows differently.
    counts = [int((torch.tensor(row["labels"]) != -100).sum()) for row in rows]
    assert len(set(counts)) > 1


def test_chunked_loss_matches_full_logits(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    batch = collate(make_rows(3, seq_len=40, seed=3))
    chunked, num_tokens = CausalLMLoss(model, chunk_size=7)(batch)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    reference = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="sum"
    )
    assert int(num_tokens) == int((batch["labels"] != -100).sum())
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-4)


def test_exact_resume_bit_identical(tiny_llama_dir, tmp_path):
    rows = make_rows(200, seq_len=24)
    common = dict(max_steps=20, per_device_train_batch_size=2, gradient_accumulation_steps=2, save_steps=1000)

    straight = StepRecorder()
    build_trainer(tiny_llama_dir, tmp_path / "straight", rows, callbacks=[straight], **common).train()

    first = StepRecorder(request_at=10)
    end = build_trainer(tiny_llama_dir, tmp_path / "resumed", rows, callbacks=[first], **common).train()
    assert end["reason"] == "save-stop"
    second = StepRecorder(request_at=15)
    end = build_trainer(tiny_llama_dir, tmp_path / "resumed", rows, callbacks=[second], **common).train()
    assert end["reason"] == "save-stop"
    third = StepRecorder()
    end = build_trainer(tiny_llama_dir, tmp_path / "resumed", rows, callbacks=[third], **common).train()
    assert end["reason"] == "completed"

    assert [s for s, _, _ in first.steps] == list(range(1, 11))
    assert [s for s, _, _ in second.steps] == list(range(11, 16))
    assert [s for s, _, _ in third.steps] == list(range(16, 21))
    resumed = first.steps + second.steps + third.steps
    assert resumed == straight.steps  # bit-identical losses and learning rates

    log = read_json_log(next((tmp_path / "resumed" / "runs").iterdir()) / "trainer_logs.json")
    starts = [record for record in log if record.get("event") == "start"]
    assert [record["global_step"] for record in starts] == [0, 10, 15]
    step_records = [record["global_step"] for record in log if "loss" in record and "event" not in record]
    assert step_records == list(range(1, 21))


def test_checkpoint_layout_and_loading(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = build_trainer(
        tiny_llama_dir, tmp_path / "run", make_rows(40), eval_rows=make_rows(6, seed=9),
        max_steps=6, save_steps=2, eval_steps=2, save_total_limit=1, per_device_train_batch_size=2,
    )
    trainer.train()
    checkpoints = ckpt.list_checkpoints(tmp_path / "run")
    names = [path.name for path in checkpoints]
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    best = state["best_checkpoint"]
    # The newest one plus the best by eval loss survive rotation.
    assert names[-1] == "checkpoint-6"
    assert set(names) == {"checkpoint-6", best.rsplit("/", 1)[-1]}

    latest = checkpoints[-1]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "optimizer.pt",
                 "scheduler.pt", "dataset_rank0.pt", "rng_rank0.pt", "trainer_state.json", "config.yaml", "COMPLETE"):
        assert (latest / name).is_file(), name
    assert state["global_step"] == 6
    assert state["tokens"] == trainer.tokens
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))

    model = AutoModelForCausalLM.from_pretrained(latest)
    trained = trainer.backend.hf_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert AutoTokenizer.from_pretrained(latest).convert_tokens_to_ids("<|im_end|>") is not None


def test_incomplete_checkpoint_skipped(tiny_llama_dir, tmp_path, caplog):
    rows = make_rows(40)
    build_trainer(tiny_llama_dir, tmp_path / "run", rows, max_steps=2, save_steps=2).train()
    broken = tmp_path / "run" / "checkpoints" / "checkpoint-9"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")

    recorder = StepRecorder()
    with caplog.at_level("WARNING"):
        build_trainer(tiny_llama_dir, tmp_path / "run", rows, callbacks=[recorder], max_steps=3, save_steps=2).train()
    assert "Skipping incomplete checkpoint" in caplog.text
    assert "checkpoint-9" in caplog.text
    assert [step for step, _, _ in recorder.steps] == [3]


def test_no_resume_starts_fresh(tiny_llama_dir, tmp_path):
    rows = make_rows(40)
    build_trainer(tiny_llama_dir, tmp_path / "run", rows, max_steps=2, save_steps=2).train()
    recorder = StepRecorder()
    build_trainer(tiny_llama_dir, tmp_path / "run", rows, callbacks=[recorder], max_steps=2, resume="no").train()
    assert [step for step, _, _ in recorder.steps] == [1, 2]


def test_divergence_stops_on_nan(tiny_llama_dir, tmp_path):
    trainer = build_trainer(tiny_llama_dir, tmp_path / "run", make_rows(40), max_steps=10, save_steps=1000)
    calls = {"count": 0}

    class PoisonAtStepFive(TrainerCallback):
        def on_train_begin(self, trainer):
            embed = trainer.backend.hf_model.get_input_embeddings()

            def poison(module, inputs, output):
                calls["count"] += 1
                return output * float("nan") if trainer.global_step == 4 else output

            embed.register_forward_hook(poison)

    trainer.callbacks.append(PoisonAtStepFive())
    good_weights = {}

    class KeepWeights(TrainerCallback):
        def on_step_end(self, trainer, loss):
            if trainer.global_step == 4:
                good_weights.update({k: v.clone() for k, v in trainer.backend.hf_model.state_dict().items()})

    trainer.callbacks.append(KeepWeights())
    end = trainer.train()

    assert end["reason"] == "diverged"
    assert end["global_step"] == 4
    saved = ckpt.checkpoint_path(tmp_path / "run", 4)
    assert ckpt.is_complete(saved)
    from safetensors.torch import load_file

    weights = load_file(str(saved / "model.safetensors"))
    for name, tensor in weights.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, good_weights[name]), name
    log = read_json_log(trainer.run_dir / "trainer_logs.json")
    divergence = [record for record in log if record.get("event") == "divergence"]
    assert len(divergence) == 1
    assert divergence[0]["global_step"] == 5
    assert divergence[0]["loss"] == "nan"
    assert log[-1]["reason"] == "diverged"


def test_divergence_warn_skips_update(tiny_llama_dir, tmp_path):
    trainer = build_trainer(
        tiny_llama_dir, tmp_path / "run", make_rows(40), max_steps=4, divergence_action="warn", save_strategy="no"
    )

    class PoisonOnce(TrainerCallback):
        def on_train_begin(self, trainer):
            state = {"done": False}

            def poison(module, inputs, output):
                if trainer.global_step == 2 and not state["done"] and module.training:
                    state["done"] = True
                    return output * float("nan")
                return output

            trainer.backend.hf_model.get_input_embeddings().register_forward_hook(poison)

    trainer.callbacks.append(PoisonOnce())
    end = trainer.train()
    assert end["reason"] == "completed"
    assert end["global_step"] == 4
    for name, tensor in trainer.backend.hf_model.state_dict().items():
        assert torch.isfinite(tensor).all(), name


def test_json_log_repairs_crash(tmp_path):
    from lmforge.train.callbacks import JsonLogWriter

    path = tmp_path / "trainer_logs.json"
    path.write_text('[\n{"event": "start", "global_step": 0},\n{"global_step": 1, "loss": 2.0},\n{"global_step": 2, "loss": 1.5},\n{"global_st')
    writer = JsonLogWriter(path)
    writer.open(resume_step=1)
    writer.write({"event": "start", "global_step": 1})
    writer.close()
    records = json.loads(path.read_text())
    assert records == [
        {"event": "start", "global_step": 0},
        {"global_step": 1, "loss": 2.0},
        {"event": "start", "global_step": 1},
    ]
    assert (tmp_path / "trainer_logs.json.bak").is_file()


def test_invalid_arguments_rejected(tiny_llama_dir, tmp_path):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="save_strategy='sometimes' is invalid"):
        build_trainer(tiny_llama_dir, tmp_path / "run", make_rows(4), save_strategy="sometimes")


def test_bf16_autocast_keeps_fp32_weights(tiny_llama_dir, tmp_path):
    trainer = build_trainer(tiny_llama_dir, tmp_path / "run", make_rows(8), max_steps=2, mixed_precision="bf16", save_strategy="no")
    end = trainer.train()
    assert end["global_step"] == 2
    assert all(parameter.dtype == torch.float32 for parameter in trainer.backend.hf_model.parameters())
    assert all(state["exp_avg"].dtype == torch.float32 for state in trainer.optimizer.state.values())
    assert math.isfinite(trainer.last_loss)


def test_activation_checkpointing_same_gradients(tiny_llama_dir):
    from lmforge.train.backends.single import SingleDeviceBackend
    from transformers import AutoModelForCausalLM

    batch = collate(make_rows(2, seq_len=24, seed=5))
    num_tokens = int((batch["labels"] != -100).sum())
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        if checkpointing:
            _enable_activation_checkpointing(model)
            assert model.is_activation_checkpointing
        backend = SingleDeviceBackend({"device": "cpu"}, mixed_precision="fp32")
        backend.prepare(model)
        backend.forward_backward([batch], num_tokens)
        grads.append({name: parameter.grad.clone() for name, parameter in backend.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=f"gradient of {name} differs")


def test_resume_from_older_checkpoint(tiny_llama_dir, tmp_path):
    rows = make_rows(40)
    build_trainer(tiny_llama_dir, tmp_path / "run", rows, max_steps=4, save_steps=2, save_total_limit=None).train()
    recorder = StepRecorder()
    older = ckpt.checkpoint_path(tmp_path / "run", 2)
    build_trainer(tiny_llama_dir, tmp_path / "run", rows, callbacks=[recorder], max_steps=3, resume=str(older)).train()
    assert [step for step, _, _ in recorder.steps] == [3]


def test_epoch_strategy_saves_each_epoch(tiny_llama_dir, tmp_path):
    trainer = build_trainer(
        tiny_llama_dir, tmp_path / "run", make_rows(8), max_steps=-1, num_train_epochs=2,
        per_device_train_batch_size=2, save_strategy="epoch", save_total_limit=None,
    )
    end = trainer.train()
    assert end["reason"] == "completed"
    assert end["global_step"] == 8
    assert [path.name for path in ckpt.list_checkpoints(tmp_path / "run")] == ["checkpoint-4", "checkpoint-8"]
    assert trainer.epoch == 2


def test_divergence_detector_spike_and_recovery():
    from lmforge.train.divergence import DivergenceDetector

    detector = DivergenceDetector(threshold=3.0, window=10, min_history=3)
    assert detector.check_loss(20.0) is None  # too little history to judge a spike
    for loss in (2.0, 2.1, 1.9):
        assert detector.check_loss(loss) is None
    assert "above 3 x the moving average" in detector.check_loss(40.0)
    assert detector.check_loss(2.0) is None  # the spike was not added to the average
    for norm in (1.0, 1.2, 0.9):
        assert detector.check_grad_norm(norm) is None
    assert "gradient norm 30" in detector.check_grad_norm(30.0)
    assert detector.check_grad_norm(1.1) is None

    restored = DivergenceDetector(threshold=3.0, window=10, min_history=3)
    restored.load_state_dict(detector.state_dict())
    assert restored.loss_average == detector.loss_average
    assert restored.grad_norm_average == detector.grad_norm_average


def test_torch_compile_matches_eager(tiny_llama_dir, tmp_path):
    """`torch_compile` compiles each decoder layer and trains to the same losses as eager mode."""
    rows = make_rows(8)
    losses = {}
    for compiled in (False, True):
        recorder = StepRecorder()
        trainer = build_trainer(
            tiny_llama_dir, tmp_path / f"run-{compiled}", rows, callbacks=[recorder],
            max_steps=2, save_strategy="no", torch_compile=compiled,
        )
        trainer.train()
        losses[compiled] = [loss for _, loss, _ in recorder.steps]
        if compiled:
            layers = trainer.backend.hf_model.get_decoder().layers
            assert all(layer._compiled_call_impl is not None for layer in layers)
    assert len(losses[True]) == 2
    for eager, compiled in zip(losses[False], losses[True]):
        assert compiled == pytest.approx(eager, rel=1e-4)


def test_eval_on_start_logs_base_model_loss(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    eval_rows = make_rows(4, seed=9)
    trainer = build_trainer(tiny_llama_dir, tmp_path / "run", make_rows(20), eval_rows=eval_rows,
                            max_steps=2, eval_steps=2, eval_on_start=True, per_device_train_batch_size=2)
    trainer.train()
    log = read_json_log(next((tmp_path / "run" / "runs").iterdir()) / "trainer_logs.json")
    evals = [record for record in log if "eval_loss" in record and "event" not in record]
    assert [record["global_step"] for record in evals] == [0, 2]

    # The step-0 record is the untrained model's loss over the same eval rows.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():  # the helper trains in fp32
        totals = [CausalLMLoss(model)(collate([row])) for row in eval_rows]
    base_loss = sum(float(loss) for loss, _ in totals) / sum(int(count) for _, count in totals)
    assert evals[0]["eval_loss"] == pytest.approx(base_loss, rel=1e-5)
    assert evals[1]["eval_loss"] != evals[0]["eval_loss"]

    # A resumed run does not evaluate at its start again.
    trainer = build_trainer(tiny_llama_dir, tmp_path / "run", make_rows(20), eval_rows=eval_rows,
                            max_steps=4, eval_steps=2, eval_on_start=True, per_device_train_batch_size=2)
    trainer.train()
    log = read_json_log(next((tmp_path / "run" / "runs").iterdir()) / "trainer_logs.json")
    assert [r["global_step"] for r in log if "eval_loss" in r and "event" not in r] == [0, 2, 4]


def test_last_steps_logged_between_intervals(tiny_llama_dir, tmp_path):
    recorder = StepRecorder()
    build_trainer(tiny_llama_dir, tmp_path / "run", make_rows(40), callbacks=[recorder],
                  max_steps=5, logging_steps=2, per_device_train_batch_size=2).train()
    log = read_json_log(next((tmp_path / "run" / "runs").iterdir()) / "trainer_logs.json")
    steps = [record for record in log if "loss" in record and "event" not in record]
    assert [record["global_step"] for record in steps] == [2, 4, 5]
    assert steps[-1]["loss"] == pytest.approx(recorder.steps[-1][1])  # step 5 alone
    assert steps[-1]["learning_rate"] == recorder.steps[-1][2]
