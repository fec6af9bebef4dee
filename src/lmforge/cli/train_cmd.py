"""`lmforge -t CFG train -M RUN_DIR [flags]`: check the setup, then start the run under torchrun.

Budget flags (`--total-tokens` ... `--batch-size`) become `ns.KEY=VALUE` overrides through
`lmforge.optim.plan.TRAIN_FLAG_TO_NS`; loop flags (`--save-strategy`, `--save-steps`,
`--step-cadence`, `--no-resume`, `--resume-from`) override the constructed
TrainingArguments in each worker. The behaviour lives in `lmforge.train.launcher`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmforge.cli.context import global_options


def register(app: typer.Typer) -> None:
    # Unknown options are the project's own flags (meta.yaml `flags`), checked in the command.
    app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train)


def train(
    ctx: typer.Context,
    run_dir: Optional[Path] = typer.Option(
        None, "-M", "--run-dir", help="Run directory: the base model is read from it (unless --model), checkpoints/ and runs/ are written under it."
    ),
    model: Optional[Path] = typer.Option(None, "--model", help="Base model directory, when it is not the run directory."),
    devices: Optional[str] = typer.Option(None, "-d", "--devices", help="CUDA devices, one process each, e.g. 0,1,3,4 (sets CUDA_VISIBLE_DEVICES)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Processes per node (CPU runs; default: the config's world_size)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Number of machines in a multi-node run."),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's index in a multi-node run (0 .. nnodes-1)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of node 0 for the multi-node rendezvous."),
    total_tokens: Optional[float] = typer.Option(None, "--total-tokens", help="Token budget of the run (e.g. 2e8); sets max_steps and the decay start."),
    annealing_tokens: Optional[float] = typer.Option(None, "--annealing-tokens", help="Tokens trained during the LR decay at the end of the run (e.g. 4e7)."),
    decay_start_step: Optional[int] = typer.Option(None, "--decay-start-step", help="Global step after which the LR decays; -1 waits for a start-annealing request."),
    start_annealing: bool = typer.Option(False, "--start-annealing", help="Start the LR decay at the first step of this run (needs decay_start_step -1)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate at base_batch_size tokens per step (the peak LR scales it)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps to run (default: the token budget's total_steps; -1 is one epoch)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per packed training row."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per micro-batch on each data-parallel rank."),
    save_strategy: Optional[str] = typer.Option(None, "--save-strategy", help="When to checkpoint: steps, epoch or no."),
    save_steps: Optional[int] = typer.Option(None, "--save-steps", help="Checkpoint every N optimizer steps (before --step-cadence scaling)."),
    step_cadence: Optional[float] = typer.Option(None, "--step-cadence", help="Multiply the save, eval and logging intervals by F (e.g. 0.001 for a smoke run)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start fresh even if RUN_DIR/checkpoints has a checkpoint."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Resume from this checkpoint directory instead of the newest one."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the torchrun command and the run plan, then exit."),
) -> None:
    """Fine-tune the config's model: checks first, then torchrun with one process per device.

    Example: `lmforge -t smollm2_135m/cpu_default.yaml train -M runs/smol --max-steps 30`.
    The project's meta.yaml may declare more flags (`flags:`), e.g. `--warmup-tokens 2e7`.
    """
    from lmforge.config import load_config
    from lmforge.config.config import resolve_config_path
    from lmforge.config.flags import declared_flag_sets
    from lmforge.errors import LmforgeError
    from lmforge.optim.plan import format_plan, train_flag_sets
    from lmforge.train import launcher

    opts = global_options(ctx)
    if run_dir is None:
        raise LmforgeError("run directory missing", hint="pass -M RUN_DIR (the base model directory, or add --model MODEL_DIR)")
    if no_resume and resume_from is not None:
        raise LmforgeError("--no-resume and --resume-from contradict each other", hint="give only one of them")
    if save_strategy is not None and save_strategy not in ("steps", "epoch", "no"):
        raise LmforgeError(f"--save-strategy {save_strategy!r} is invalid", hint="use steps, epoch or no")
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise LmforgeError(f"--node-rank {node_rank} is invalid for --nnodes {nnodes}", hint="use 0 .. nnodes-1")

    flag_values = {
        "--total-tokens": total_tokens, "--annealing-tokens": annealing_tokens, "--decay-start-step": decay_start_step,
        "--start-annealing": start_annealing, "--lr": lr, "--max-steps": max_steps, "--seq-len": seq_len,
        "--batch-size": batch_size,
    }
    config_name = _config_name(opts)
    _, project = resolve_config_path(config_name, opts.project)
    sets = list(opts.sets) + declared_flag_sets(project, ctx.args) + train_flag_sets(flag_values)
    config = load_config(config_name, project_dir=opts.project, sets=sets)
    namespace = config.namespace

    overrides: dict = {}
    for name, value in (("save_strategy", save_strategy), ("save_steps", save_steps), ("step_cadence", step_cadence)):
        if value is not None:
            overrides[name] = value
    if no_resume:
        overrides["resume"] = "no"
    elif resume_from is not None:
        from lmforge.train.checkpoints import validate_checkpoint

        overrides["resume"] = str(validate_checkpoint(resume_from.resolve()))

    device_list = launcher.parse_devices(devices) if devices is not None else None
    device_type = str(namespace.get("device_type") or "cpu")
    launcher.check_device_flags(device_type, device_list)
    run_dir = run_dir.resolve()
    request = launcher.LaunchRequest(
        config=str(config.path),
        project=str(config.project.dir) if config.project else None,
        sets=sets,
        run_dir=run_dir,
        model_dir=(model or run_dir).resolve(),
        nproc_per_node=launcher.resolve_process_count(namespace, device_list, nproc, nnodes),
        device_type=device_type,
        devices=device_list,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
        overrides=overrides,
        debug=opts.debug,
    )
    launcher.check_before_launch(request, namespace, check_gpus=not dry_run)
    command = launcher.torchrun_command(request)
    env = launcher.launch_environment(request)

    typer.echo(format_plan(namespace, title=config.name))
    if overrides:
        typer.echo("  overrides        " + ", ".join(f"{key}={value}" for key, value in overrides.items()))
    typer.echo("\n" + launcher.format_command(command, env, request))
    if dry_run:
        return
    raise typer.Exit(launcher.launch(command, env))


def _config_name(opts) -> Optional[str]:
    """Return `-t CONFIG`, or None to let load_config use the project's default_config."""
    return opts.template
