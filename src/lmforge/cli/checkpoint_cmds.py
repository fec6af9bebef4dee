"""`lmforge checkpoint export`: turn a trainer checkpoint into a plain Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import typer

checkpoint_app = typer.Typer(help="Inspect and export trainer checkpoints.", no_args_is_help=True)


@checkpoint_app.command("export")
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoints/checkpoint-STEP directory."),
    destination: Path = typer.Argument(..., help="New model directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DESTINATION if it exists."),
) -> None:
    """Write CHECKPOINT's model, config and tokenizer to DESTINATION, without trainer state.

    A pipeline checkpoint's per-rank weight files (model_rank*.safetensors) are
    merged into one model; other checkpoints are copied.
    """
    from lmforge.train.checkpoint_export import export_checkpoint

    path = export_checkpoint(checkpoint, destination, overwrite=overwrite)
    typer.echo(f"exported {checkpoint} to {path}")


def register(app: typer.Typer) -> None:
    """Add the `checkpoint` sub-app to the root app."""
    app.add_typer(checkpoint_app, name="checkpoint")
