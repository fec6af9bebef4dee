"""Text generation for the inference server: a decode loop and a single-worker queue.

`Generation` runs one request: a prefill forward pass over the prompt, then one
forward pass per new token with the model's KV cache. It samples with transformers'
temperature and top-p logits warpers and a per-request `torch.Generator`, so `seed`
makes a request reproducible without touching the global RNG. It ends at a stop
token id, a stop string or `max_tokens`, and checks a cancellation flag before
every token. A custom loop is used in place of `model.generate` because the server needs
per-token text deltas, stop strings with the stop text removed, and cancellation
when the client disconnects.

`GenerationEngine` owns the model and runs one `Generation` at a time on a worker
thread. Requests wait in a FIFO queue, and each request's deltas reach the asyncio
event loop through an `asyncio.Queue`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Sequence

from lmforge.serve.textstream import IncrementalDetokenizer, StopStringMatcher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request."""

    max_tokens: int
    """Maximum number of tokens to generate, counting the stop token."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    seed: int | None = None
    """Seed of the request's sampler; None draws a random seed."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the decoded text and excluded from it."""


@dataclass
class GenerationResult:
    """Outcome of one request, known once generation has ended."""

    text: str
    finish_reason: str
    """"stop" (stop token or stop string), "length" (max_tokens reached) or "cancelled"."""
    prompt_tokens: int
    completion_tokens: int
    """Generated tokens, including a stop token id but not tokens after a stop string."""


class Generation:
    """One request's decode loop; iterate it for text deltas, then read the result fields.

    The loop stops at the first of these, with the given finish_reason:

    - a token in `stop_token_ids`: "stop"; the token is counted but not decoded.
    - a stop string in the decoded text: "stop"; the text from the stop string on is dropped.
    - `max_tokens` generated tokens: "length".
    - `is_cancelled()` returning True: "cancelled".
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Sequence[int],
        is_cancelled: Callable[[], bool] = lambda: False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_token_ids = frozenset(stop_token_ids)
        self.is_cancelled = is_cancelled
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        for delta in self._run():
            self.text += delta
            yield delta

    def run_to_end(self) -> GenerationResult:
        """Run the whole loop and return the result."""
        for _ in self:
            pass
        return self.result()

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            finish_reason=self.finish_reason or "cancelled",
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.completion_tokens,
        )

    def _logits_processors(self):
        from transformers import LogitsProcessorList
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        processors = LogitsProcessorList()
        if self.params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.params.temperature))
        if self.params.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.params.top_p))
        return processors

    def _run(self) -> Iterator[str]:
        import torch

        device = next(self.model.parameters()).device
        greedy = self.params.temperature == 0
        processors = None if greedy else self._logits_processors()
        sampler = torch.Generator(device=device)
        sampler.manual_seed(self.params.seed if self.params.seed is not None else random.getrandbits(63))

        detokenizer = IncrementalDetokenizer(self.tokenizer)
        matcher = StopStringMatcher(self.params.stop)
        prompt = torch.tensor([self.prompt_ids], dtype=torch.long, device=device)
        next_input = prompt
        # transformers 5.25 names the KV cache argument `cache`; earlier releases use `past_key_values`.
        forward_parameters = inspect.signature(self.model.forward).parameters
        cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
        cache = None

        with torch.inference_mode():
            for _ in range(self.params.max_tokens):
                if self.is_cancelled():
                    self.finish_reason = "cancelled"
                    return

                outputs = self.model(input_ids=next_input, use_cache=True, logits_to_keep=1, **{cache_argument: cache})
                cache = getattr(outputs, cache_argument)
                logits = outputs.logits[:, -1, :].float()
                if greedy:
                    token_id = int(logits.argmax(dim=-1).item())
                else:
                    scores = processors(prompt, logits)
                    probabilities = torch.softmax(scores, dim=-1)
                    token_id = int(torch.multinomial(probabilities, 1, generator=sampler).item())
                self.token_ids.append(token_id)
                self.completion_tokens += 1

                if token_id in self.stop_token_ids:
                    self.finish_reason = "stop"
                    break

                text, matched = matcher.feed(detokenizer.add(token_id))
                if text:
                    yield text
                if matched:
                    self.finish_reason = "stop"
                    return
                next_input = torch.tensor([[token_id]], dtype=torch.long, device=device)
            else:
                self.finish_reason = "length"

        # Ended at a stop token or max_tokens: release the text held back for a
        # possible stop string that did not complete.
        text, matched = matcher.feed(detokenizer.flush())
        if text:
            yield text
        if matched:
            self.finish_reason = "stop"
            return
        remainder = matcher.flush()
        if remainder:
            yield remainder


@dataclass
class _Done:
    result: GenerationResult | None = None
    error: BaseException | None = None


@dataclass
class RequestHandle:
    """A queued request as seen from the event loop: its deltas, result and cancel flag."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    _loop: asyncio.AbstractEventLoop
    _events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None

    def cancel(self) -> None:
        """Ask the worker to stop this request before its next token (or skip it while queued)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def deltas(self) -> AsyncIterator[str]:
        """Yield text deltas until generation ends; `result` is set afterwards.

        Raises the worker's exception if generation failed.
        """
        while True:
            event = await self._events.get()
            if isinstance(event, _Done):
                if event.error is not None:
                    raise event.error
                self.result = event.result
                return
            yield event

    async def wait(self) -> GenerationResult:
        """Wait for the whole result."""
        async for _ in self.deltas():
            pass
        assert self.result is not None
        return self.result

    def _put(self, event) -> None:
        """Hand `event` to the event loop; called on the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            # The event loop has closed at server shutdown, so no handler reads the events.
            self.cancel()


class GenerationEngine:
    """The served model and the worker thread that runs one request at a time.

    Construct it with a loaded model and tokenizer, call `start()` once, `submit()`
    from the event loop for each request, and `shutdown()` at exit. Requests run in
    submission order. A request cancelled while queued is skipped, and one
    cancelled while running stops before its next token.
    """

    def __init__(self, model, tokenizer, stop_token_ids: Sequence[int], *, model_name: str, context_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self.model_name = model_name
        self.context_length = context_length
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._running: RequestHandle | None = None
        self.completed_requests = 0
        self.cancelled_requests = 0
        self.failed_requests = 0
        self.generated_tokens = 0

    def start(self) -> None:
        if self._worker is not None:
            return
        self._worker = threading.Thread(target=self._work, name="lmforge-generation", daemon=True)
        self._worker.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel the running and queued requests and stop the worker thread."""
        if self._worker is None:
            return
        with self._lock:
            running = self._running
        if running is not None:
            running.cancel()
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.cancel()
                pending._put(_Done(result=GenerationResult("", "cancelled", len(pending.prompt_ids), 0)))
        self._queue.put(None)
        self._worker.join(timeout)
        self._worker = None

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        """Queue a request; call from the event loop that will read the handle's deltas."""
        handle = RequestHandle(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=list(prompt_ids),
            params=params,
            _loop=asyncio.get_running_loop(),
        )
        self._queue.put(handle)
        return handle

    def stats(self) -> dict:
        """Counters for /health: queue length, whether a request is running, totals."""
        with self._lock:
            busy = self._running is not None
        return {
            "queued_requests": self._queue.qsize(),
            "busy": busy,
            "completed_requests": self.completed_requests,
            "cancelled_requests": self.cancelled_requests,
            "failed_requests": self.failed_requests,
            "generated_tokens": self.generated_tokens,
        }

    def _work(self) -> None:
        while True:
            handle = self._queue.get()
            if handle is None:
                return
            with self._lock:
                self._running = handle
            try:
                self._run_request(handle)
            finally:
                with self._lock:
                    self._running = None

    def _run_request(self, handle: RequestHandle) -> None:
        if handle.cancelled:
            self.cancelled_requests += 1
            logger.info("Request %s cancelled while queued", handle.request_id)
            handle._put(_Done(result=GenerationResult("", "cancelled", len(handle.prompt_ids), 0)))
            return

        started = time.perf_counter()
        generation = Generation(
            self.model,
            self.tokenizer,
            handle.prompt_ids,
            handle.params,
            self.stop_token_ids,
            is_cancelled=lambda: handle.cancelled,
        )
        try:
            for delta in generation:
                handle._put(delta)
        except Exception as exc:  # reported to the client as a 500; the worker keeps serving
            self.failed_requests += 1
            logger.exception("Request %s failed after %d tokens: %s", handle.request_id, generation.completion_tokens, exc)
            handle._put(_Done(error=exc))
            return

        result = generation.result()
        self.generated_tokens += result.completion_tokens
        if result.finish_reason == "cancelled":
            self.cancelled_requests += 1
        else:
            self.completed_requests += 1
        seconds = time.perf_counter() - started
        logger.info(
            "Request %s: %d prompt tokens, %d completion tokens, finish_reason %s, %.2f s (%.1f tokens/s)",
            handle.request_id,
            result.prompt_tokens,
            result.completion_tokens,
            result.finish_reason,
            seconds,
            result.completion_tokens / seconds if seconds > 0 else 0.0,
        )
        handle._put(_Done(result=result))
