"""Fixtures for the models tests: tiny random base models and one ChatML conversion of each.

The base models use `initializer_range=0.5`, which gives peaked next-token
distributions like a trained model's. With the default 0.02 the outputs are close to
uniform, and any added token then takes about k/V of the probability mass (see
`test_near_uniform_model_fails_loss_check`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.models.convert import ConvertOptions, convert_model
from lmforge.models.tiny import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with tied embeddings and no chat tokens (vocabulary 384)."""
    return build_tiny_llama(tmp_path_factory.mktemp("base") / "model", chat_tokens=False, initializer_range=0.5)


@pytest.fixture(scope="session")
def tiny_untied_base_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a separate lm_head and no chat tokens."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("base_untied") / "model",
        chat_tokens=False,
        tie_word_embeddings=False,
        initializer_range=0.5,
    )


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_base_dir, tmp_path_factory):
    """`tiny_base_dir` converted with `--add-tokens chatml`; returns (directory, ConvertReport)."""
    dst = tmp_path_factory.mktemp("chat") / "model"
    report = convert_model(tiny_base_dir, dst, ConvertOptions(add_tokens="chatml"))
    return dst, report
