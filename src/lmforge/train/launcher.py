"""Checks before a run, the torchrun command line, and the launch with signal forwarding.

`lmforge train` always starts training through torchrun, even for one process, so a
one-process run and a 4-GPU DDP run go through the same worker, process group and
checkpoint code. Checks that need only the config's namespace and the files on disk
run here, before torchrun starts, so bad input fails in a second with one message.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# Seconds torchrun waits for workers to save and exit after forwarding a signal, before SIGKILL.
SHUTDOWN_TIMEOUT_S = 1800
_LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")


@dataclass
class LaunchRequest:
    """Everything `lmforge train` resolved from its flags and the config."""

    config: Optional[str]
    project: Optional[str]
    sets: list[str]
    run_dir: Path
    model_dir: Path
    nproc_per_node: int
    device_type: str = "cpu"
    devices: Optional[list[int]] = None
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    debug: bool = False


def parse_devices(value: str) -> list[int]:
    """Parse `-d 0,1,3,4` into device indices."""
    try:
        devices = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise LmforgeError(f"-d {value!r} is invalid", hint="list CUDA device indices, e.g. -d 0,1,3,4") from None
    if not devices or len(set(devices)) != len(devices) or min(devices) < 0:
        raise LmforgeError(f"-d {value!r} is invalid", hint="list distinct CUDA device indices, e.g. -d 0,1,3,4")
    return devices


def resolve_process_count(namespace: Mapping[str, Any], devices: Optional[list[int]], nproc: Optional[int], nnodes: int) -> int:
    """Return processes per node, checked against the config's `ns.world_size`."""
    world_size = int(namespace.get("world_size") or 1)
    if devices is not None and nproc is not None and nproc != len(devices):
        raise LmforgeError(f"--nproc {nproc} does not match the {len(devices)} devices in -d", hint="give only one of -d and --nproc")
    per_node = len(devices) if devices is not None else nproc
    if per_node is None:
        if world_size % nnodes:
            raise LmforgeError(f"the config's world_size {world_size} is not divisible by --nnodes {nnodes}")
        return world_size // nnodes
    if per_node * nnodes != world_size:
        source = f"-d lists {per_node} devices" if devices is not None else f"--nproc is {per_node}"
        raise LmforgeError(
            f"{source} on {nnodes} node(s), but the config's world_size is {world_size}",
            hint=f"use a config for {per_node * nnodes} processes, or --set ns.world_size={per_node * nnodes}",
        )
    return per_node


def check_before_launch(request: LaunchRequest, namespace: Mapping[str, Any], check_gpus: bool = True) -> None:
    """Raise LmforgeError for a problem that would make the run fail later (item by item, one message each).

    `check_gpus=False` (for `--dry-run`) logs a GPU mismatch as a warning instead, so a
    GPU run can be planned on a machine without those GPUs.
    """
    if check_gpus:
        _check_devices(request)
    else:
        try:
            _check_devices(request)
        except LmforgeError as exc:
            logger.warning("%s (ignored by --dry-run; a real run stops here)", exc.message)
    _check_model(request.model_dir, namespace)
    _check_dataset_path(namespace.get("dataset_path"))
    _check_eval_prompts(namespace.get("eval_prompts_file"))
    _check_writable(request.run_dir)


def check_device_flags(device_type: str, devices: Optional[list[int]]) -> None:
    """Reject `-d` on a CPU config (before process counts are compared)."""
    if device_type != "cuda" and devices is not None:
        raise LmforgeError(f"-d selects CUDA devices, but the config's device_type is {device_type}", hint="use --nproc N for CPU runs")


def _check_devices(request: LaunchRequest) -> None:
    check_device_flags(request.device_type, request.devices)
    if request.device_type != "cuda":
        return
    import torch

    available = torch.cuda.device_count()
    if available == 0:
        raise LmforgeError(
            "the config's device_type is cuda, but this machine has no CUDA GPU",
            hint="pick a CPU config, or --set ns.device_type=cpu",
        )
    if request.devices is not None:
        missing = [device for device in request.devices if device >= available]
        if missing:
            raise LmforgeError(f"-d lists devices {missing}, but this machine has {available} GPU(s) (0..{available - 1})")
    elif request.nproc_per_node > available:
        raise LmforgeError(
            f"{request.nproc_per_node} processes need {request.nproc_per_node} GPUs, but this machine has {available}",
            hint="use fewer processes or a config with a smaller world_size",
        )


def _check_model(model_dir: Path, namespace: Mapping[str, Any]) -> None:
    from lmforge.models.model_dir import check_model_dir, read_model_config

    if not model_dir.exists():
        raise LmforgeError(
            f"model directory not found: {model_dir}",
            hint="make one with `lmforge model fetch-demo DIR` (or `lmforge convert SRC DIR`), "
            "then train with -M DIR, or keep -M for the run and pass --model DIR",
        )
    check_model_dir(model_dir)
    model_config = read_model_config(model_dir)
    max_positions = model_config.get("max_position_embeddings")
    seq_len = namespace.get("seq_len")
    if max_positions and seq_len and int(seq_len) > int(max_positions):
        raise LmforgeError(
            f"seq_len {seq_len} is above the model's max_position_embeddings {max_positions} ({model_dir}/config.json)",
            hint=f"use --seq-len {max_positions} or less",
        )
    _check_chat_tokens(model_dir, namespace)


def _check_chat_tokens(model_dir: Path, namespace: Mapping[str, Any]) -> None:
    """Check the ChatML tokens, which the packed data uses unless the config names another chat template."""
    chat_template = namespace.get("chat_template")
    if chat_template and "<|im_start|>" not in str(chat_template) and "chatml" not in str(chat_template).lower():
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    missing = []
    for token in CHATML_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or len(tokenizer.encode(token, add_special_tokens=False)) != 1:
            missing.append(token)
    if missing:
        raise LmforgeError(
            f"the tokenizer in {model_dir} lacks the ChatML tokens {', '.join(missing)} that the training data uses",
            hint=f"add them first: lmforge convert --add-tokens chatml {model_dir} NEW_DIR",
        )


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.endswith(_LOCAL_DATA_SUFFIXES) or Path(path).exists()


def _check_dataset_path(dataset_path: Any) -> None:
    paths = dataset_path if isinstance(dataset_path, (list, tuple)) else [dataset_path]
    for path in paths:
        if isinstance(path, str) and _looks_local(path) and not Path(path).expanduser().exists():
            raise LmforgeError(f"dataset path {path} not found", hint="fix ns.dataset_path, e.g. --set ns.dataset_path=/data/rows.jsonl")


def _check_eval_prompts(prompts_file: Any) -> None:
    """Read the eval prompts file now, so a missing or malformed one fails before model loading."""
    if prompts_file:
        from lmforge.train.callbacks import load_prompts

        load_prompts(prompts_file)


def _check_writable(run_dir: Path) -> None:
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LmforgeError(f"run directory {run_dir} is not writable ({existing} is read-only or not a directory)",
                           hint="pass a writable directory with -M")
    for sub in ("checkpoints", "runs"):
        path = run_dir / sub
        if path.exists() and not os.access(path, os.W_OK | os.X_OK):
            raise LmforgeError(f"run directory {path} is not writable", hint="fix its permissions or pass another -M")


_ENDPOINT = re.compile(r"^[\w.\-\[\]:]+:\d+$")


def torchrun_command(request: LaunchRequest) -> list[str]:
    """Build the torchrun command line that starts `lmforge.train.worker` on this node."""
    # lmforge.train.torchrun is torchrun that reports a failed worker in one line; --debug
    # runs torchrun itself, with its traceback and failure table.
    entry = "torch.distributed.run" if request.debug else "lmforge.train.torchrun"
    command = [sys.executable, "-m", entry, f"--nproc-per-node={request.nproc_per_node}"]
    if request.nnodes > 1 or request.rdzv_endpoint:
        if not request.rdzv_endpoint or not _ENDPOINT.match(request.rdzv_endpoint):
            raise LmforgeError(
                f"--rdzv-endpoint {request.rdzv_endpoint!r} is invalid for a {request.nnodes}-node run",
                hint="give HOST:PORT of node 0, e.g. --rdzv-endpoint 10.0.0.1:29400",
            )
        command += [f"--nnodes={request.nnodes}", f"--node-rank={request.node_rank}", f"--rdzv-endpoint={request.rdzv_endpoint}"]
    else:
        # One node: torchrun picks a free port for the rendezvous on this machine.
        command.append("--standalone")
    command += [f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", "-m", "lmforge.train.worker"]
    if request.config:
        command += ["--config", request.config]
    if request.project:
        command += ["--project", str(request.project)]
    for value in request.sets:
        command += ["--set", value]
    command += ["--run-dir", str(request.run_dir), "--model-dir", str(request.model_dir), "--device-type", request.device_type]
    if request.overrides:
        import json

        command += ["--overrides", json.dumps(request.overrides)]
    if request.debug:
        command.append("--debug")
    return command


def launch_environment(request: LaunchRequest) -> dict[str, str]:
    env = dict(os.environ)
    if request.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, request.devices))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // request.nproc_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def format_command(command: Sequence[str], env: Mapping[str, str], request: LaunchRequest) -> str:
    prefix = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " if request.devices is not None else ""
    return prefix + shlex.join(command)


def _child_pids(pid: int) -> list[int]:
    """Return the child processes of `pid` (Linux /proc; empty elsewhere)."""
    children = []
    for children_file in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(child) for child in children_file.read_text().split()]
        except OSError:
            continue
    return children


def launch(command: list[str], env: dict[str, str]) -> int:
    """Run torchrun in its own session, forward SIGINT/SIGTERM/SIGHUP, and return its exit status.

    Signals go straight to the workers (torchrun's children): the first makes them save
    and stop at the next step boundary, the second makes them abort. torchrun then sees
    its workers exit on their own and exits with their status. Sending the signal to
    torchrun instead would make it report a failure and stop waiting at the second one.
    Before the workers exist (or without Linux /proc), the signal goes to torchrun.
    """
    process = subprocess.Popen(command, env=env, start_new_session=True)
    received = []

    def forward(signum, frame):
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            logger.warning("%s received: the training processes save a checkpoint and stop at the next step boundary "
                           "(send it again to abort)", name)
        else:
            logger.warning("%s received again: aborting the training processes without saving", name)
        workers = _child_pids(process.pid)
        if workers:
            # The workers count SIGINT and SIGTERM alike. Two deliveries of one signal number that
            # arrive while a worker is inside a long C call (a matmul) reach its Python handler as
            # one call, so the first request goes as SIGTERM and every later one as SIGINT.
            sent = signal.SIGTERM if len(received) == 1 else signal.SIGINT
        else:
            # torchrun itself: it handles SIGINT and SIGTERM, so a hang-up counts as SIGTERM.
            sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        for pid in workers or [process.pid]:
            try:
                os.kill(pid, sent)
            except ProcessLookupError:
                logger.debug("Process %d exited before %s reached it", pid, name)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
