"""Fixtures for the inference server tests.

`tiny_server` is the tiny random Llama behind a live uvicorn server on a free
loopback port, shared by the session's tests. `tiny_engine` is its engine, and
tests use its model and tokenizer to compute expected outputs in-process.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir: Path):
    from lmforge.models.model_dir import load_model_dir

    return load_model_dir(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    from lmforge.serve.loading import engine_for_model

    model, tokenizer = tiny_model
    return engine_for_model(model, tokenizer, "tiny")


@pytest.fixture(scope="session")
def tiny_server(tiny_engine):
    from lmforge.serve.app import create_app
    from lmforge.serve.server import BackgroundServer

    with BackgroundServer(create_app(tiny_engine)) as server:
        yield server


@pytest.fixture(scope="session")
def openai_client(tiny_server):
    import openai

    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()
