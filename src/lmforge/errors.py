"""The error type that the CLI reports as one line, without a traceback.

Raise `LmforgeError` for bad input that the user can fix: a config, a data row, a
CLI value, an HTTP request body, a checkpoint. The CLI prints `error: <message>`
and, when a hint is given, `hint: <hint>`, then exits with status 2. `--debug`
shows the traceback as well.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """A user-facing error: what failed, on which value, and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message
