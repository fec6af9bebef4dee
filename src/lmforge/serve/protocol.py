"""Request bodies of the OpenAI-compatible endpoints and the OpenAI error body.

The models are strict (JSON types are not coerced, so `"max_tokens": "10"` is
rejected) and ignore fields that lmforge does not implement, as tools such as
Open WebUI send many optional ones. Fields that would change the output and that
lmforge cannot honour (`n` > 1, `logprobs`, `echo`, penalties, `logit_bias`) are
rejected with an error instead of being ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """An invalid request, reported as an OpenAI-style error body with `status_code`."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int = 400,
        error_type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status_code = status_code
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Return the OpenAI error body `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False
    """If true, the stream ends with a chunk that has `usage` and no choices, before `data: [DONE]`."""


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and any(stop == "" for stop in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(self.stop)

    def check_supported(self) -> None:
        """Raise RequestError for fields that lmforge cannot honour."""
        if self.n != 1:
            raise RequestError(f"n={self.n} is not supported; lmforge returns one choice per request (n=1)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise RequestError(f"{name} is not supported; send 0 or leave it out", param=name)
        if self.logit_bias:
            raise RequestError("logit_bias is not supported; send {} or leave it out", param="logit_bias")


class CompletionRequest(_GenerationRequest):
    """Body of POST /v1/completions. The prompt is tokenized verbatim, without adding BOS."""

    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise RequestError(
                    f"prompt lists with {len(self.prompt)} entries are not supported; send one prompt string",
                    param="prompt",
                )
            return self.prompt[0]
        return self.prompt

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise RequestError("echo is not supported; send false or leave it out", param="echo")
        if self.logprobs is not None:
            raise RequestError("logprobs is not supported; leave it out", param="logprobs")


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal[MESSAGE_ROLES]  # type: ignore[valid-type]
    content: Union[str, list[TextContentPart], None] = None

    def content_text(self) -> str:
        """Return the content as one string, joining text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """Body of POST /v1/chat/completions; messages are rendered with the model's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None

    def effective_max_tokens(self) -> int | None:
        """Return `max_completion_tokens` (the newer OpenAI name) if set, else `max_tokens`."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise RequestError("messages must contain at least one message", param="messages")
        if self.logprobs:
            raise RequestError("logprobs is not supported; send false or leave it out", param="logprobs")

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": message.role, "content": message.content_text()} for message in self.messages]
