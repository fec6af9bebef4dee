"""OpenAI-compatible inference server for lmforge model directories and checkpoints.

- `build_engine` loads a model (or the newest complete checkpoint) and returns a
  `GenerationEngine`.
- `create_app` wraps the engine in a FastAPI application.
- `run_server` serves the application with uvicorn, and `BackgroundServer` does the
  same on a thread.

Importing this package does not import torch or transformers.
"""

from __future__ import annotations

__all__ = ["BackgroundServer", "build_engine", "create_app", "run_server"]


def __getattr__(name: str):
    if name == "build_engine":
        from lmforge.serve.loading import build_engine

        return build_engine
    if name == "create_app":
        from lmforge.serve.app import create_app

        return create_app
    if name in ("run_server", "BackgroundServer"):
        from lmforge.serve import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
