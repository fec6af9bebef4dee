"""The 4-GPU DDP and pipeline configs plan and print their torchrun command here (`--dry-run`)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lmforge.cli.main import app


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """A tiny Llama with 4096 positions, so seq_len 2048 passes the pre-launch model check."""
    from lmforge.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_long") / "model", max_position_embeddings=4096)


@pytest.mark.parametrize(
    ("config", "backend_line"),
    [
        ("llama3_1b/4gpu_ddp.yaml", "4 on cuda (ddp backend, 4 data-parallel)"),
        ("llama2_7b/4gpu_pp.yaml", "4 on cuda (pipeline backend, 1 data-parallel)"),
    ],
)
def test_gpu_config_dry_run(repo_root, long_context_model, config, backend_line):
    project = repo_root / "configs" / "open_orca"
    result = CliRunner().invoke(app, ["-p", str(project), "-t", config, "train", "-M", str(long_context_model), "--dry-run"])

    assert result.exit_code == 0, result.output
    assert backend_line in result.output
    assert "--nproc-per-node=4" in result.output
    assert "--device-type cuda" in result.output
