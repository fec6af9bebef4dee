"""The Open-Orca training configs: template chain, budget arithmetic in Jinja, overrides, construction."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.optim.budget import compute_token_budget
from lmforge.optim.wsd import WSDScheduler

CONFIGS = {
    # config: (backend, world_size, seq_len, per_device_batch_size, device_type)
    "llama3_1b/1gpu_default.yaml": ("single", 1, 2048, 4, "cuda"),
    "llama3_1b/4gpu_ddp.yaml": ("ddp", 4, 2048, 4, "cuda"),
    "llama2_7b/1gpu_default.yaml": ("single", 1, 1536, 1, "cuda"),
    "llama2_7b/4gpu_pp.yaml": ("pipeline", 4, 2048, 2, "cuda"),
    "smollm2_135m/cpu_default.yaml": ("single", 1, 512, 4, "cpu"),
    "smollm2_135m/cpu_ddp.yaml": ("ddp", 2, 512, 4, "cpu"),
    "smollm2_135m/cpu_pp.yaml": ("pipeline", 2, 512, 4, "cpu"),
    "tiny/cpu_test.yaml": ("single", 1, 128, 2, "cpu"),
}


@pytest.fixture(scope="module")
def project_dir(repo_root):
    return repo_root / "configs" / "open_orca"


def load(project_dir, name, sets=()):
    return load_config(name, project_dir=project_dir, sets=sets)


def test_reference_numbers_through_config(project_dir):
    config = load(project_dir, "llama3_1b/4gpu_ddp.yaml")
    ns = config.namespace
    assert ns["tokens_per_step"] == 31_129
    assert ns["total_steps"] == 32_124
    assert ns["max_steps"] == 32_124
    assert ns["warmup_steps"] == 642  # round(20,000,000 warmup tokens / 31,129)
    assert ns["annealing_steps"] == 6_425
    assert ns["decay_start_step"] == 25_699
    assert f"{ns['peak_lr']:.3e}" == "1.378e-04"
    assert f"{ns['min_lr']:.3e}" == "1.378e-05"
    assert ns["optimizer"] == "adafactor"
    assert ns["max_grad_norm"] is None


def test_reference_numbers_in_preprocessed_yaml(project_dir):
    text = load(project_dir, "llama3_1b/4gpu_ddp.yaml").preprocessed
    assert "    tokens_per_step: 31129\n" in text
    assert "    decay_start_step: 25699\n" in text
    assert "    annealing_steps: 6425\n" in text
    assert "    max_steps: 32124\n" in text


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_shape_and_chain(project_dir, name):
    backend, world_size, seq_len, batch, device_type = CONFIGS[name]
    config = load(project_dir, name)
    ns = config.namespace
    assert ns["backend"] == backend
    assert ns["world_size"] == world_size
    assert ns["seq_len"] == seq_len
    assert ns["per_device_batch_size"] == batch
    assert ns["device_type"] == device_type
    chain = " ".join(config.template_chain)
    assert "open_orca.yaml" in chain
    assert "projects/finetune.yaml" in chain
    assert ns["max_steps"] == ns["total_steps"] > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_template_arithmetic_matches_python(project_dir, name):
    ns = load(project_dir, name).namespace
    expected = compute_token_budget(
        total_tokens=ns["total_tokens"],
        annealing_tokens=ns["annealing_tokens"],
        warmup_tokens=ns["warmup_tokens"],
        warmup_fraction=ns["warmup_fraction"],
        world_size=ns["data_parallel_size"],
        per_device_batch_size=ns["per_device_batch_size"],
        gradient_accumulation_steps=ns["gradient_accumulation_steps"],
        seq_len=ns["seq_len"],
        packing_efficiency=ns["packing_efficiency"],
        lr=ns["lr"],
        base_batch_size=ns["base_batch_size"],
        min_lr_ratio=ns["min_lr_ratio"],
    )
    for key, value in expected.as_dict().items():
        assert ns[key] == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize(
    "sets",
    [
        ["ns.total_tokens=5e8"],
        ["ns.total_tokens=123456789", "ns.annealing_tokens=0"],
        ["ns.warmup_tokens=null", "ns.warmup_fraction=0.05"],
        ["ns.per_device_batch_size=3", "ns.gradient_accumulation_steps=5", "ns.packing_efficiency=0.9"],
        ["ns.total_tokens=1e7", "ns.annealing_tokens=5e8"],
    ],
)
def test_overrides_recompute_budget(project_dir, sets):
    ns = load(project_dir, "llama3_1b/4gpu_ddp.yaml", sets).namespace
    expected = compute_token_budget(
        total_tokens=ns["total_tokens"],
        annealing_tokens=ns["annealing_tokens"],
        warmup_tokens=ns["warmup_tokens"],
        warmup_fraction=ns["warmup_fraction"],
        world_size=4,
        per_device_batch_size=ns["per_device_batch_size"],
        gradient_accumulation_steps=ns["gradient_accumulation_steps"],
        seq_len=2048,
        packing_efficiency=ns["packing_efficiency"],
        lr=1e-4,
        base_batch_size=16384,
    )
    for key, value in expected.as_dict().items():
        assert ns[key] == pytest.approx(value, rel=1e-12), key
    assert ns["max_steps"] == ns["total_steps"]


def test_pipeline_tokens_count_one_data_parallel_rank(project_dir):
    ns = load(project_dir, "llama2_7b/4gpu_pp.yaml").namespace
    assert ns["data_parallel_size"] == 1
    assert ns["tokens_per_step"] == 3_891  # floor(1 x 2 x 1 x 2048 x 0.95)
    assert ns["backend_options"] == {"schedule": "ZBVZeroBubble", "n_microbatches": 2}


def test_manual_decay_and_flags(project_dir):
    sets = ["ns.decay_start_step=-1", "ns.start_annealing=true", "ns.max_steps=100", "ns.lr=3e-4", "ns.seq_len=1024"]
    ns = load(project_dir, "llama3_1b/4gpu_ddp.yaml", sets).namespace
    assert ns["decay_start_step"] == -1
    assert ns["start_annealing"] is True
    assert ns["max_steps"] == 100
    assert ns["tokens_per_step"] == 15_564  # floor(4 x 4 x 1024 x 0.95)
    assert ns["total_steps"] == 64_250  # floor(1e9 / 15,564)
    assert ns["peak_lr"] == pytest.approx(3e-4 * (15_564 / 16384) ** 0.5, rel=1e-12)


def test_no_token_budget_runs_one_epoch(project_dir):
    ns = load(project_dir, "llama3_1b/4gpu_ddp.yaml", ["ns.total_tokens=null"]).namespace
    assert ns["total_steps"] == -1
    assert ns["max_steps"] == -1
    assert ns["decay_start_step"] == -1
    assert ns["warmup_steps"] == 642


def test_misspelled_override_names_close_key(project_dir):
    with pytest.raises(LmforgeError) as info:
        load(project_dir, "llama3_1b/4gpu_ddp.yaml", ["ns.anealing_tokens=1e8"])
    assert "ns.anealing_tokens" in str(info.value)
    assert "ns.annealing_tokens" in str(info.value)


def test_cpu_configs_read_sample_rows(project_dir, openorca_dir):
    ns = load(project_dir, "smollm2_135m/cpu_default.yaml").namespace
    assert ns["dataset_path"] == str(openorca_dir.resolve() / "openorca_first900.parquet")
    assert ns["mixed_precision"] == "bf16"
    assert 30 <= ns["max_steps"] <= 300
    assert 0 < ns["warmup_steps"] < ns["decay_start_step"] < ns["max_steps"]
    assert ns["decay_start_step"] + ns["annealing_steps"] == ns["max_steps"]


def test_gpu_configs_default_to_hub_dataset(project_dir, repo_root):
    ns = load(project_dir, "llama3_1b/4gpu_ddp.yaml").namespace
    assert ns["dataset_path"] == "Open-Orca/OpenOrca"
    assert ns["eval_prompts_file"] == str(repo_root / "prompts" / "open_orca_eval.yaml")


def test_constructed_schedule_follows_plan(project_dir):
    config = load(project_dir, "llama3_1b/4gpu_ddp.yaml")
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(2, 2), "norm": torch.nn.LayerNorm(2)})
    optimizer = config.construct("optimizer_factory")(list(model.named_parameters()))
    scheduler = config.construct("lr_scheduler_factory")(optimizer)
    assert type(optimizer) is torch.optim.Adafactor
    assert isinstance(scheduler, WSDScheduler)
    peak = config.namespace["peak_lr"]
    assert scheduler.lr_factor(1) * peak == pytest.approx(peak / 642, rel=1e-12)
    assert scheduler.lr_factor(642) == 1.0
    assert scheduler.lr_factor(25_699) == 1.0
    assert scheduler.lr_factor(25_700) < 1.0
    assert scheduler.lr_factor(32_124) * peak == pytest.approx(config.namespace["min_lr"], rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(peak / 642, rel=1e-12)


def test_tiny_config_builds_trainer_and_batches(project_dir, tiny_llama_dir, tmp_path):
    from lmforge.train.trainer import Trainer

    config = load(project_dir, "tiny/cpu_test.yaml")
    trainer = config.construct("trainer", run_dir=str(tmp_path), model_dir=str(tiny_llama_dir), rank=0, world_size=1)
    assert isinstance(trainer, Trainer)
    assert trainer.args.max_steps == 10
    assert trainer.args.output_dir == str(tmp_path)
    assert trainer.args.extra["tokens_per_step"] == 243

    rows = []
    for row in trainer.train_dataset:
        rows.append(row)
        if len(rows) == 2:
            break
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape == (2, 128)
    assert (batch["labels"] != -100).any()

    model = trainer.model_factory()
    assert next(model.parameters()).dtype == torch.float32
    optimizer = trainer.optimizer_factory(list(model.named_parameters()))
    scheduler = trainer.lr_scheduler_factory(optimizer)
    assert [scheduler.lr_factor(step) for step in (1, 2, 8)] == [0.5, 1.0, 1.0]
    assert scheduler.lr_factor(10) == pytest.approx(0.1)


def test_plan_command_prints_reference_plan(run_lmforge, project_dir):
    result = run_lmforge("-t", "llama3_1b/4gpu_ddp.yaml", "plan", cwd=project_dir)
    assert result.returncode == 0, result.stderr
    assert "tokens_per_step  31,129 (estimate)" in result.stdout
    assert "decay_start_step 25,699" in result.stdout
    assert "peak 1.378e-04" in result.stdout


def test_plan_command_json_with_override(project_dir):
    from typer.testing import CliRunner

    from lmforge.cli.main import app

    args = ["-p", str(project_dir), "-t", "llama3_1b/4gpu_ddp.yaml", "--set", "ns.total_tokens=2e8", "plan", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    values = json.loads(result.stdout)
    assert values["total_steps"] == 6_424
    assert values["decay_start_step"] == 642  # max(642 warmup steps, 6,424 - 6,425)


def test_dataset_targets_take_tokenizer_variable(project_dir, tiny_llama_dir):
    config = load(project_dir, "tiny/cpu_test.yaml")
    dataset = config.construct("train_dataset", tokenizer=str(tiny_llama_dir), max_length=64)
    row = next(iter(dataset))
    assert len(row["input_ids"]) <= 64
    assert dataset.max_length == 64
    raw = next(iter(config.construct("train_dataset_split")))
    assert set(raw) >= {"id", "system_prompt", "question", "response"}


def test_optimizer_and_clipping_from_namespace(project_dir, tmp_path):
    sets = ["ns.optimizer=adamw", "ns.weight_decay=0.1", "ns.max_grad_norm=1.0", "ns.decay_shape=cosine"]
    config = load(project_dir, "tiny/cpu_test.yaml", sets)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(2, 2), "norm": torch.nn.LayerNorm(2)})
    optimizer = config.construct("optimizer_factory")(list(model.named_parameters()))
    assert type(optimizer) is torch.optim.AdamW
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    assert config.construct("lr_scheduler_factory")(optimizer).decay_shape == "cosine"

    args = config.construct("training_args", run_dir=str(tmp_path))
    assert args.max_grad_norm == 1.0
    assert load(project_dir, "tiny/cpu_test.yaml").construct("training_args", run_dir=str(tmp_path)).max_grad_norm is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("ns.seq_len=abc", "invalid ns.seq_len abc: must be a positive integer"),
        ("ns.seq_len=-5", "invalid ns.seq_len -5"),
        ("ns.per_device_batch_size=0", "invalid ns.per_device_batch_size 0"),
        ("ns.gradient_accumulation_steps=0", "invalid ns.gradient_accumulation_steps 0"),
        ("ns.lr=-1", "invalid ns.lr -1: must be a positive number"),
        ("ns.max_steps=0", "invalid ns.max_steps 0"),
        ("ns.total_tokens=-7", "invalid ns.total_tokens -7"),
        ("ns.annealing_tokens=-1", "invalid ns.annealing_tokens -1"),
        ("ns.packing_efficiency=1.5", "invalid ns.packing_efficiency 1.5"),
        ("ns.min_lr_ratio=2", "invalid ns.min_lr_ratio 2"),
        ("ns.decay_start_step=-2", "invalid ns.decay_start_step -2"),
    ],
)
def test_invalid_budget_values_rejected(project_dir, override, message):
    with pytest.raises(LmforgeError) as excinfo:
        load_config("tiny/cpu_test.yaml", project_dir=project_dir, sets=[override])
    assert message in str(excinfo.value)
    assert "finetune.yaml" in str(excinfo.value)


def test_no_budget_values_accepted(project_dir):
    config = load_config(
        "tiny/cpu_test.yaml",
        project_dir=project_dir,
        sets=["ns.total_tokens=-1", "ns.max_steps=-1", "ns.decay_start_step=-1"],
    )
    assert config.namespace["total_steps"] == -1
    assert config.namespace["max_steps"] == -1
