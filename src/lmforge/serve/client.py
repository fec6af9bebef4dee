"""A small client for OpenAI-compatible servers, used by `lmforge inf client` and `inf eval`.

It talks plain HTTP with httpx (the `openai` package is not a runtime dependency),
streams server-sent events, and turns connection failures and error responses
into one-line `LmforgeError`s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from lmforge.errors import LmforgeError

DEFAULT_URL = "http://127.0.0.1:8000"
_ESCAPE_SEQUENCES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE_PATTERN = re.compile(r"\\([ntr\\])")


def interpret_escapes(text: str) -> str:
    r"""Replace the escape sequences `\n`, `\t`, `\r` and `\\` with the characters they name."""
    return _ESCAPE_PATTERN.sub(lambda match: _ESCAPE_SEQUENCES[match.group(1)], text)


def api_base(url: str) -> str:
    """Return the `/v1` base URL for a server URL given with or without `/v1`."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise LmforgeError(f"invalid server URL {url!r}", hint="use a full URL such as http://127.0.0.1:8000")
    return url if url.endswith("/v1") else f"{url}/v1"


@dataclass
class Reply:
    """One response: its text, finish_reason and token usage (None when the server sent none)."""

    text: str
    finish_reason: str | None
    usage: dict[str, int] | None = None


class InferenceClient:
    """HTTP client for one server; `model=None` uses the first id from GET /v1/models."""

    def __init__(self, url: str = DEFAULT_URL, *, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        import httpx

        self.base_url = api_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self._model = model

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def models(self) -> list[str]:
        response = self._request("GET", "/models")
        return [entry["id"] for entry in response.json().get("data", [])]

    @property
    def model(self) -> str:
        if self._model is None:
            ids = self.models()
            if not ids:
                raise LmforgeError(f"the server at {self.base_url} lists no models", hint="pass --model NAME")
            self._model = ids[0]
        return self._model

    def chat(self, messages: list[dict[str, str]], *, on_delta: Callable[[str], None] | None = None, **params) -> Reply:
        """Send a chat request; with `on_delta` the response is streamed and each delta passed to it."""
        body = {"model": self.model, "messages": messages, **_without_none(params)}
        if on_delta is None:
            data = self._request("POST", "/chat/completions", json=body).json()
            choice = data["choices"][0]
            return Reply(choice["message"].get("content") or "", choice.get("finish_reason"), data.get("usage"))
        return self._stream("/chat/completions", body, lambda choice: (choice.get("delta") or {}).get("content"), on_delta)

    def complete(self, prompt: str, *, on_delta: Callable[[str], None] | None = None, **params) -> Reply:
        """Send a completion request for `prompt`, fed to the model verbatim."""
        body = {"model": self.model, "prompt": prompt, **_without_none(params)}
        if on_delta is None:
            data = self._request("POST", "/completions", json=body).json()
            choice = data["choices"][0]
            return Reply(choice.get("text") or "", choice.get("finish_reason"), data.get("usage"))
        return self._stream("/completions", body, lambda choice: choice.get("text"), on_delta)

    def _stream(self, path: str, body: dict[str, Any], delta_of: Callable[[dict], str | None], on_delta) -> Reply:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        parts: list[str] = []
        finish_reason = None
        usage = None
        for chunk in self._events(path, body):
            if "error" in chunk:
                raise LmforgeError(f"the server failed while streaming: {chunk['error'].get('message')}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                delta = delta_of(choice)
                if delta:
                    parts.append(delta)
                    on_delta(delta)
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
        return Reply("".join(parts), finish_reason, usage)

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import httpx

        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _response_error(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:") :].strip()
                    if payload == "[DONE]":
                        return
                    yield json.loads(payload)
        except httpx.TransportError as exc:
            raise _connection_error(self.base_url, exc) from exc

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _connection_error(self.base_url, exc) from exc
        if response.status_code >= 400:
            raise _response_error(response)
        return response


def _without_none(params: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in params.items() if value is not None}


def _connection_error(base_url: str, exc: Exception) -> LmforgeError:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return LmforgeError(
            f"cannot connect to the server at {base_url}: {exc}",
            hint="start it with `lmforge inf server -m MODEL_DIR`, or pass --url with the server's address",
        )
    if isinstance(exc, httpx.TimeoutException):
        return LmforgeError(f"the request to {base_url} timed out", hint="raise --timeout or lower --max-tokens")
    return LmforgeError(f"the connection to {base_url} failed: {type(exc).__name__}: {exc}")


def _response_error(response) -> LmforgeError:
    try:
        error = response.json().get("error") or {}
        message = error.get("message") or response.text
    except (ValueError, AttributeError):
        message = response.text
    hint = "pass the server's key with --api-key or LMFORGE_API_KEY" if response.status_code == 401 else None
    return LmforgeError(f"the server returned HTTP {response.status_code}: {message}", hint=hint)


# ----------------------------------------------------------------- prompts files

CHATML_TURN_END = "<|im_end|>"


def render_chatml(user: str, system: str | None = None) -> str:
    """Render one user turn (and an optional system turn) as ChatML with the assistant prompt."""
    text = f"<|im_start|>system\n{system}{CHATML_TURN_END}\n" if system else ""
    return text + f"<|im_start|>user\n{user}{CHATML_TURN_END}\n<|im_start|>assistant\n"


def load_eval_prompts(path: str | Path) -> list[tuple[str, str]]:
    """Read a prompts YAML file and return `(name, prompt_text)` pairs.

    Accepted layouts: a list of fully rendered prompt strings (sent verbatim), or
    the training eval layout, a mapping with `format: chatml|raw` and `prompts:`, a
    list of `{name, system?, user}` (rendered as ChatML) or `{name, text}` (raw).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"prompts file not found: {path}", hint="pass a YAML file such as prompts/open_orca_eval.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LmforgeError(f"invalid YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from exc

    prompt_format = "rendered"
    entries = data
    if isinstance(data, dict):
        prompt_format = data.get("format", "chatml")
        entries = data.get("prompts")
        if prompt_format not in ("chatml", "raw"):
            raise LmforgeError(f"{path}: format {prompt_format!r} is invalid", hint="use `format: chatml` or `format: raw`")
    if not isinstance(entries, list) or not entries:
        raise LmforgeError(
            f"{path} contains no prompts",
            hint="write a YAML list of rendered prompt strings, or a mapping with a `prompts:` list",
        )

    prompts = []
    for number, entry in enumerate(entries, 1):
        name = f"prompt_{number}"
        if isinstance(entry, str):
            prompts.append((name, entry))
            continue
        if not isinstance(entry, dict):
            raise LmforgeError(f"{path}: prompt {number} is a {type(entry).__name__}, expected a string or a mapping")
        name = str(entry.get("name", name))
        if "text" in entry and (prompt_format in ("raw", "rendered")):
            prompts.append((name, str(entry["text"])))
        elif "user" in entry:
            prompts.append((name, render_chatml(str(entry["user"]), entry.get("system"))))
        else:
            raise LmforgeError(f"{path}: prompt {number} ({name}) has no `user:` or `text:` field")
    return prompts
