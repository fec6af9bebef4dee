"""`lmforge control`: list running training jobs and send them requests."""

from __future__ import annotations

import json
import time
from datetime import datetime

import typer

from lmforge.errors import LmforgeError

JOB_HELP = "Job id from `lmforge control list` (a unique prefix or the pid also works)."
TIMEOUT_HELP = "Seconds to wait for the job to acknowledge; a request applies at the next optimizer step."


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _format_time(unix_time: float | None) -> str:
    if not unix_time:
        return "-"
    return datetime.fromtimestamp(unix_time).strftime("%Y-%m-%d %H:%M:%S")


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _send(job: str, command: str, timeout: float) -> dict:
    from lmforge.train.control import JobRegistry, send_request

    record = JobRegistry().find(job)
    reply = send_request(record, command, timeout=timeout)
    step = reply.get("step")
    line = f"{record.job_id}: '{command}' applied"
    if step is not None:
        line += f" at step {step}"
    if reply.get("message"):
        line += f": {reply['message']}"
    typer.echo(line)
    return reply


def register(app: typer.Typer) -> None:
    control_app = typer.Typer(
        help="Steer running training jobs over their per-user control socket.",
        no_args_is_help=True,
    )
    app.add_typer(control_app, name="control")

    @control_app.command("list")
    def list_jobs(
        output_format: str = typer.Option("text", "--format", help="Output format: text or json."),
    ) -> None:
        """List registered training jobs; jobs whose process has exited are marked `dead`."""
        from lmforge.train.control import JobRegistry

        if output_format not in ("text", "json"):
            raise LmforgeError(f"invalid --format {output_format!r}; expected text or json")
        registry = JobRegistry()
        records = registry.jobs()
        if output_format == "json":
            typer.echo(json.dumps([record.to_dict() for record in records], indent=1))
            return
        if not records:
            typer.echo(f"No training jobs registered in {registry.directory}.")
            return
        rows = [["JOB ID", "PID", "STATE", "STEP", "STARTED", "CONFIG", "RUN DIR"]]
        for record in records:
            step = "-" if record.global_step is None else str(record.global_step)
            if record.max_steps and record.max_steps > 0 and record.global_step is not None:
                step = f"{record.global_step}/{record.max_steps}"
            rows.append([
                record.job_id,
                str(record.pid),
                "running" if record.alive else "dead",
                step,
                _format_time(record.start_time),
                record.config or "-",
                record.run_dir or "-",
            ])
        _print_table(rows)
        dead = sum(not record.alive for record in records)
        if dead:
            typer.echo(f"{dead} dead job(s); `lmforge control cleanup` removes their entries.")

    @control_app.command("status")
    def status(
        job: str = typer.Argument(..., help=JOB_HELP),
        output_format: str = typer.Option("text", "--format", help="Output format: text or json."),
        timeout: float = typer.Option(30.0, "--timeout", help="Seconds to wait for the reply."),
    ) -> None:
        """Show a job's step, tokens, loss, LR, tokens/s and ETA, as of its last step (no wait for the next one)."""
        from lmforge.train.control import JobRegistry, send_request

        if output_format not in ("text", "json"):
            raise LmforgeError(f"invalid --format {output_format!r}; expected text or json")
        record = JobRegistry().find(job)
        reply = send_request(record, "status", timeout=timeout)
        if output_format == "json":
            typer.echo(json.dumps(reply, indent=1))
            return
        values = reply.get("status", {})
        step = values.get("global_step")
        max_steps = values.get("max_steps")
        step_text = "-" if step is None else str(step)
        if step is not None and max_steps and max_steps > 0:
            step_text = f"{step} / {max_steps}"
        lines = [
            ("job", f"{reply['job_id']} (pid {reply['pid']})"),
            ("config", reply.get("config") or "-"),
            ("run dir", reply.get("run_dir") or "-"),
            ("running for", _format_duration(time.time() - reply["start_time"])),
            ("step", step_text),
            ("tokens", _format_number(values.get("tokens"), "{:,}")),
            ("loss", _format_number(values.get("loss"), "{:.4f}")),
            ("grad norm", _format_number(values.get("grad_norm"), "{:.4g}")),
            ("learning rate", _format_number(values.get("learning_rate"), "{:.3e}")),
            ("tokens/s", _format_number(values.get("tokens_per_second"), "{:,.0f}")),
            ("ETA", _format_duration(values.get("eta_seconds"))),
        ]
        shown = {"global_step", "max_steps", "tokens", "loss", "grad_norm", "learning_rate", "tokens_per_second", "eta_seconds"}
        for key, value in values.items():
            if key not in shown:
                lines.append((key, _format_number(value, "{:.6g}" if isinstance(value, float) else "{}")))
        width = max(len(name) for name, _ in lines)
        for name, value in lines:
            typer.echo(f"{name.ljust(width)}  {value}")

    @control_app.command("save")
    def save(
        job: str = typer.Argument(..., help=JOB_HELP),
        timeout: float = typer.Option(300.0, "--timeout", help=TIMEOUT_HELP),
    ) -> None:
        """Write a checkpoint at the next step boundary and keep training."""
        _send(job, "save", timeout)

    @control_app.command("save-stop")
    def save_stop(
        job: str = typer.Argument(..., help=JOB_HELP),
        timeout: float = typer.Option(300.0, "--timeout", help=TIMEOUT_HELP),
    ) -> None:
        """Write a checkpoint, then exit cleanly; `lmforge train` with the same run dir resumes from it."""
        _send(job, "save-stop", timeout)

    @control_app.command("stop")
    def stop(
        job: str = typer.Argument(..., help=JOB_HELP),
        timeout: float = typer.Option(300.0, "--timeout", help=TIMEOUT_HELP),
    ) -> None:
        """Exit cleanly at the next step boundary without writing a checkpoint."""
        _send(job, "stop", timeout)

    @control_app.command("abort")
    def abort(
        job: str = typer.Argument(..., help=JOB_HELP),
        force: bool = typer.Option(False, "--force", "-f", help="Do not ask for confirmation."),
        grace: float = typer.Option(
            30.0, "--grace", help="Seconds to wait for the next step boundary before killing the job with SIGKILL."
        ),
    ) -> None:
        """Exit without a checkpoint at the next step boundary, or kill the job after --grace seconds.

        Asks for confirmation unless --force. Progress since the last checkpoint is lost.
        """
        from lmforge.train.control import JobRegistry, abort_job

        record = JobRegistry().find(job)
        if not force:
            step = "-" if record.global_step is None else record.global_step
            typer.confirm(
                f"Abort job {record.job_id} (pid {record.pid}, step {step})? Progress since its last checkpoint is lost.",
                abort=True,
            )
        reply = abort_job(record, grace=grace)
        line = f"{record.job_id}: 'abort' applied"
        if reply.get("step") is not None:
            line += f" at step {reply['step']}"
        typer.echo(f"{line}: {reply['message']}")

    @control_app.command("start-annealing")
    def start_annealing(
        job: str = typer.Argument(..., help=JOB_HELP),
        timeout: float = typer.Option(300.0, "--timeout", help=TIMEOUT_HELP),
    ) -> None:
        """Begin the WSD learning-rate decay now (only when the config's decay_start_step is -1)."""
        _send(job, "start-annealing", timeout)

    @control_app.command("cleanup")
    def cleanup() -> None:
        """Remove the registry entries and sockets of jobs whose process has exited."""
        from lmforge.train.control import JobRegistry

        registry = JobRegistry()
        removed = registry.remove_dead()
        for record in removed:
            typer.echo(f"removed {record.job_id} (pid {record.pid}, last step {record.global_step})")
        typer.echo(f"Removed {len(removed)} dead job(s) from {registry.directory}.")


def _format_number(value, pattern: str) -> str:
    if value is None:
        return "-"
    try:
        return pattern.format(value)
    except (TypeError, ValueError):
        return str(value)
