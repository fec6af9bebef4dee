"""The FastAPI application: OpenAI-compatible routes over a `GenerationEngine`.

Routes: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/completions` (the prompt is tokenized verbatim) and
`POST /v1/chat/completions` (messages rendered with the tokenizer's chat template
and a generation prompt). Streaming responses are server-sent events, one
`data: {json}` chunk per text delta and `data: [DONE]` at the end.

Every error is returned as `{"error": {"message", "type", "param", "code"}}`,
including FastAPI's validation errors (422 by default) and unknown routes. The
status codes are 400 for an invalid request, 401 for a missing or wrong API key,
404 for an unknown route or model id, 405 for a wrong method and 500 when
generation fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.engine import GenerationEngine, GenerationResult, RequestHandle, SamplingParams
from lmforge.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    _GenerationRequest,
    error_body,
)

logger = logging.getLogger(__name__)

# OpenAI's documented default for /v1/completions; chat requests default to the rest of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# How often a non-streaming request checks whether its client has disconnected.
DISCONNECT_POLL_SECONDS = 0.25


def create_app(engine: GenerationEngine, *, api_key: str | None = None) -> FastAPI:
    """Build the application around a started or unstarted engine.

    The engine's worker thread is started on application startup and shut down at
    exit. With `api_key`, every /v1 route requires `Authorization: Bearer API_KEY`;
    /health stays open for liveness probes.
    """

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()
        stats = engine.stats()
        logger.info(
            "Server stopped after %d completed, %d cancelled and %d failed requests (%d tokens generated)",
            stats["completed_requests"],
            stats["cancelled_requests"],
            stats["failed_requests"],
            stats["generated_tokens"],
        )

    app = FastAPI(title="lmforge inference server", lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_name, **engine.stats()}

    router = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_checker(api_key))])
    _add_model_routes(router, engine)
    _add_generation_routes(router, engine)
    app.include_router(router)
    return app


def _api_key_checker(api_key: str | None) -> Callable:
    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError(
                f"Missing or incorrect API key from {_client(request)}; send the server's --api-key as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                status_code=401,
            )

    return check_api_key


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown client"


# ----------------------------------------------------------------- errors


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        logger.info("Rejected %s %s with %d: %s", request.method, request.url.path, exc.status_code, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(exc.errors())
        logger.info("Rejected %s %s: %s", request.method, request.url.path, message)
        return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
            code = "unknown_url"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
            code = "method_not_allowed"
        else:
            message = str(exc.detail)
            code = None
        return JSONResponse(
            error_body(message, "invalid_request_error", None, code), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed: %s", request.method, request.url.path, exc)
        return JSONResponse(error_body(f"Internal server error: {exc}", "server_error"), status_code=500)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Return `(message, param)` for pydantic errors of one request body.

    Errors of a union field (one per union member) share a location prefix, so the
    message joins them and `param` is that prefix, e.g. `stop` or `messages[0].content`.
    """
    if not errors:
        return "Invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return f"Invalid JSON in request body: {detail}", None

    location = list(first.get("loc", ()))[1:]  # drop "body"
    if not location:
        if first.get("type") == "missing":
            return "Missing request body: send a JSON object", None
        return f"Invalid request body: expected a JSON object ({first.get('msg')})", None

    field = location[0]
    same_field = [error for error in errors if list(error.get("loc", ()))[1:2] == [field]]
    prefix = location
    for error in same_field[1:]:
        other = list(error.get("loc", ()))[1:]
        common = 0
        while common < min(len(prefix), len(other)) and prefix[common] == other[common]:
            common += 1
        prefix = prefix[:common]
    param = _format_location(prefix)

    if first.get("type") == "missing" and len(same_field) == 1:
        return f"Missing required parameter: '{param}'", param
    messages = []
    for error in same_field:
        text = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if text not in messages:
            messages.append(text)
    value = json.dumps(first.get("input"), default=str)
    if len(value) > 80:
        value = value[:77] + "..."
    return f"Invalid value for '{param}': {'; or '.join(messages)} (got {value})", param


def _format_location(location: list) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


# ----------------------------------------------------------------- models


def _add_model_routes(router: APIRouter, engine: GenerationEngine) -> None:
    created = int(time.time())

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "lmforge"}

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if model_id != engine.model_name:
            raise RequestError(
                f"The model '{model_id}' does not exist; this server serves '{engine.model_name}'",
                param="model",
                code="model_not_found",
                status_code=404,
            )
        return model_card()


# ----------------------------------------------------------------- generation


def _add_generation_routes(router: APIRouter, engine: GenerationEngine) -> None:
    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_common(body, engine)
        prompt = body.prompt_text()
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        prompt_ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        params = _sampling_params(body, body.max_tokens, len(prompt_ids), engine, DEFAULT_COMPLETION_MAX_TOKENS)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        handle = engine.submit(prompt_ids, params, request_id)
        created = int(time.time())

        def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return {"id": request_id, "object": "text_completion", "created": created, "model": engine.model_name, "choices": [choice]}

        if body.stream:
            return _event_stream(handle, request, chunk, first_chunk=None, include_usage=_include_usage(body))

        result = await _wait_for_result(handle, request)
        response = chunk(result.text, result.finish_reason)
        response["usage"] = _usage(result)
        return response

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_common(body, engine)
        prompt = _render_chat(body, engine.tokenizer)
        prompt_ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        params = _sampling_params(body, body.effective_max_tokens(), len(prompt_ids), engine, None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        handle = engine.submit(prompt_ids, params, request_id)
        created = int(time.time())

        def chunk(text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": engine.model_name,
                "choices": [choice],
            }

        if body.stream:
            first_chunk = chunk("", None, role=True)
            stream_chunk = lambda text, finish_reason: chunk(text if text else None, finish_reason)  # noqa: E731
            return _event_stream(handle, request, stream_chunk, first_chunk=first_chunk, include_usage=_include_usage(body))

        result = await _wait_for_result(handle, request)
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": engine.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": _usage(result),
        }


def _check_common(body: _GenerationRequest, engine: GenerationEngine) -> None:
    if body.model is not None and body.model != engine.model_name:
        raise RequestError(
            f"The model '{body.model}' does not exist; this server serves '{engine.model_name}' (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    body.check_supported()


def _render_chat(body: ChatCompletionRequest, tokenizer) -> str:
    """Render the messages with the chat template and the assistant generation prompt."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(
            "this model's tokenizer has no chat template, so chat requests cannot be rendered; "
            "use /v1/completions with a rendered prompt, or restart the server with --chat-template FILE",
            param="messages",
        )
    try:
        return tokenizer.apply_chat_template(body.template_messages(), add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise RequestError(f"the chat template rejected the messages: {exc}", param="messages") from exc


def _sampling_params(
    body: _GenerationRequest,
    max_tokens: int | None,
    prompt_tokens: int,
    engine: GenerationEngine,
    default_max_tokens: int | None,
) -> SamplingParams:
    """Check `max_tokens` against the context length and build the sampling settings."""
    context_length = engine.context_length
    available = context_length - prompt_tokens
    if max_tokens is not None and max_tokens <= 0:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if available <= 0:
        raise RequestError(
            f"This model's maximum context length is {context_length} tokens, "
            f"but the prompt alone has {prompt_tokens} tokens; shorten the prompt",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = available if default_max_tokens is None else min(default_max_tokens, available)
    elif max_tokens > available:
        raise RequestError(
            f"This model's maximum context length is {context_length} tokens, but {prompt_tokens + max_tokens} "
            f"were requested ({prompt_tokens} in the prompt, {max_tokens} for the completion); "
            f"set max_tokens to at most {available}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
    )


def _include_usage(body: _GenerationRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


async def _wait_for_result(handle: RequestHandle, request: Request) -> GenerationResult:
    """Wait for a non-streaming result, cancelling generation if the client disconnects."""
    waiter = asyncio.ensure_future(handle.wait())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                break
            if await request.is_disconnected():
                logger.info("Client %s disconnected; cancelling request %s", _client(request), handle.request_id)
                handle.cancel()
        result = waiter.result()
    finally:
        if not waiter.done():
            # The handler itself was cancelled (server shutdown or client gone).
            handle.cancel()
            waiter.cancel()
    if result.finish_reason == "cancelled":
        raise RequestError(
            "the request was cancelled before it finished (client disconnect or server shutdown)",
            status_code=503,
            error_type="server_error",
        )
    return result


def _event_stream(
    handle: RequestHandle,
    request: Request,
    make_chunk: Callable[[str, str | None], dict[str, Any]],
    *,
    first_chunk: dict[str, Any] | None,
    include_usage: bool,
) -> StreamingResponse:
    """Return the SSE response for `handle`; generation is cancelled when the stream stops early."""

    def event(data: dict[str, Any] | str) -> str:
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        return f"data: {payload}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            if first_chunk is not None:
                yield event(first_chunk)
            async for delta in handle.deltas():
                yield event(make_chunk(delta, None))
            result = handle.result
            yield event(make_chunk("", result.finish_reason))
            if include_usage:
                usage_chunk = make_chunk("", None)
                usage_chunk["choices"] = []
                usage_chunk["usage"] = _usage(result)
                yield event(usage_chunk)
        except Exception as exc:  # generation failed after the 200 status was sent
            logger.error("Request %s failed while streaming: %s", handle.request_id, exc)
            yield event(error_body(f"Internal server error: {exc}", "server_error"))
        finally:
            if handle.result is None:
                logger.info("Stream of request %s closed early (%s); cancelling it", handle.request_id, _client(request))
                handle.cancel()
        yield event("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
