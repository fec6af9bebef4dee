"""The inference server on a live loopback port with the tiny random Llama.

The model has random weights, so expected outputs come from running the same
decode loop in-process (`Generation`) with the same seed or greedy decoding, and
outcomes are steered with max_tokens and stop strings.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from lmforge.serve.engine import Generation, SamplingParams

PROMPT = "The quick brown fox"


def generate_locally(engine, prompt: str, **params):
    prompt_ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generation = Generation(engine.model, engine.tokenizer, prompt_ids, SamplingParams(**params), engine.stop_token_ids)
    generation.run_to_end()
    return generation


def render_chat(engine, messages) -> str:
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def stream_completion(client, **kwargs):
    """Return (text, finish_reasons, usage) from a streamed completion."""
    parts, finish_reasons, usage = [], [], None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.text)
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
    return "".join(parts), finish_reasons, usage


def stream_chat(client, **kwargs):
    parts, finish_reasons, roles = [], [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
    return "".join(parts), finish_reasons, roles


# ----------------------------------------------------------------- OpenAI SDK


def test_models_list_and_retrieve(openai_client):
    models = openai_client.models.list()

    assert [model.id for model in models.data] == ["tiny"]
    assert openai_client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("other")


def test_completion_matches_local_decode(openai_client, tiny_engine):
    expected = generate_locally(tiny_engine, PROMPT, max_tokens=12, temperature=0)

    response = openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)

    choice = response.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(tiny_engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_completion_seed_reproducible(openai_client, tiny_engine):
    params = dict(model="tiny", prompt=PROMPT, max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)
    expected = generate_locally(tiny_engine, PROMPT, max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)

    first = openai_client.completions.create(**params).choices[0].text
    second = openai_client.completions.create(**params).choices[0].text
    other_seed = openai_client.completions.create(**{**params, "seed": 99}).choices[0].text

    assert first == second
    assert first == expected.text
    assert other_seed != first


def test_chat_uses_template_and_prompt(openai_client, tiny_engine):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}]
    rendered = render_chat(tiny_engine, messages)
    expected = generate_locally(tiny_engine, rendered, max_tokens=10, temperature=0)

    response = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)

    assert rendered.endswith("<|im_start|>assistant\n")
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(tiny_engine.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_chat_streaming_equals_non_streaming(openai_client):
    params = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=15, temperature=0.8, seed=5)

    response = openai_client.chat.completions.create(**params)
    text, finish_reasons, roles = stream_chat(openai_client, **params)

    assert text == response.choices[0].message.content
    assert finish_reasons == [response.choices[0].finish_reason]
    assert roles == ["assistant"]


def test_completion_streaming_sse_format(tiny_server):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}

    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
        content_type = response.headers["content-type"]

    assert content_type.startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_content_parts_and_new_names(openai_client, tiny_engine):
    messages = [{"role": "user", "content": "Hello there"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    expected = generate_locally(tiny_engine, render_chat(tiny_engine, messages), max_tokens=6, temperature=0)

    response = openai_client.chat.completions.create(model="tiny", messages=parts, max_completion_tokens=6, temperature=0)
    usage_chunks = [
        chunk.usage
        for chunk in openai_client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        if chunk.usage is not None
    ]

    assert response.choices[0].message.content == expected.text
    assert response.usage.completion_tokens == 6
    assert len(usage_chunks) == 1
    assert usage_chunks[0].completion_tokens == 6
    assert usage_chunks[0].prompt_tokens == response.usage.prompt_tokens


def test_chat_template_missing_and_override(tmp_path, repo_root):
    from lmforge.models.tiny import build_tiny_llama
    from lmforge.serve.app import create_app
    from lmforge.serve.loading import build_engine
    from lmforge.serve.server import BackgroundServer

    model_dir = build_tiny_llama(tmp_path / "plain", chat_tokens=False)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}

    with BackgroundServer(create_app(build_engine(model_dir, device="cpu"))) as server:
        without_template = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        completion = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
    engine = build_engine(model_dir, device="cpu", chat_template=repo_root / "chat_templates" / "chatml.jinja")
    with BackgroundServer(create_app(engine)) as server:
        with_template = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)

    assert without_template.status_code == 400
    assert "--chat-template" in without_template.json()["error"]["message"]
    assert completion.status_code == 200
    assert with_template.status_code == 200
    assert with_template.json()["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------------- stopping


def find_boundary_stop(engine, prompt: str):
    """Find a seeded sample whose text contains a 4-character stop string spanning two tokens.

    Returns (params, text, stop, tokens_needed): the first occurrence of `stop` in
    the text starts 2 characters before a token boundary, and `tokens_needed`
    tokens must be generated before the stop string is complete.
    """
    tokenizer = engine.tokenizer
    for seed in range(30):
        params = dict(max_tokens=40, temperature=0.7, seed=seed)
        generation = generate_locally(engine, prompt, **params)
        text, ids = generation.text, generation.token_ids
        for boundary in range(2, len(ids) - 1):
            before = tokenizer.decode(ids[:boundary], skip_special_tokens=True)
            one_less = tokenizer.decode(ids[: boundary - 1], skip_special_tokens=True)
            one_more = tokenizer.decode(ids[: boundary + 1], skip_special_tokens=True)
            offset = len(before)
            stop = text[offset - 2 : offset + 2]
            if (
                len(one_less) <= offset - 2
                and len(one_more) >= offset + 2
                and text.startswith(one_more)
                and "\ufffd" not in stop
                and stop.isprintable()
                and text.find(stop) == offset - 2
            ):
                return params, text, stop, boundary + 1
    pytest.fail("no seeded sample of the tiny model has a stop string candidate across a token boundary")


def test_stop_string_across_token_boundary(openai_client, tiny_engine):
    params, text, stop, tokens_needed = find_boundary_stop(tiny_engine, PROMPT)
    expected_text = text[: text.find(stop)]
    request = dict(model="tiny", prompt=PROMPT, **params)

    full = openai_client.completions.create(**request)
    stopped = openai_client.completions.create(stop=[stop], **request)
    streamed_text, finish_reasons, usage = stream_completion(openai_client, stop=stop, **request)

    assert full.choices[0].text == text
    assert stopped.choices[0].text == expected_text
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == tokens_needed
    assert streamed_text == expected_text
    assert finish_reasons == ["stop"]
    assert usage.completion_tokens == tokens_needed


def test_earliest_of_several_stops_wins(openai_client, tiny_engine):
    params, text, stop, _ = find_boundary_stop(tiny_engine, PROMPT)
    later_stop = text[text.find(stop) + 3 : text.find(stop) + 6]
    request = dict(model="tiny", prompt=PROMPT, **params)

    response = openai_client.completions.create(stop=["never-in-output", later_stop, stop], **request)

    assert response.choices[0].text == text[: min(text.find(stop), text.find(later_stop))]
    assert response.choices[0].finish_reason == "stop"


def test_unfinished_stop_prefix_is_released(openai_client, tiny_engine):
    expected = generate_locally(tiny_engine, PROMPT, max_tokens=8, temperature=0)
    dangling_stop = expected.text[-1] + "\u2603never"
    request = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stop=dangling_stop)

    response = openai_client.completions.create(**request)
    streamed_text, finish_reasons, _ = stream_completion(openai_client, **request)

    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == "length"
    assert streamed_text == expected.text
    assert finish_reasons == ["length"]


def test_stop_token_ends_chat_without_special_text(openai_client, tiny_engine):
    """Find a seed where the model emits <|im_end|> and check that the reply stops there."""
    tokenizer = tiny_engine.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "Hi"}]
    rendered = render_chat(tiny_engine, messages)
    for seed in range(200):
        generation = generate_locally(tiny_engine, rendered, max_tokens=30, temperature=1.0, seed=seed)
        if generation.finish_reason == "stop":
            break
    else:
        pytest.fail("no seed in 0..199 made the tiny model emit a stop token within 30 tokens")

    response = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=1.0, seed=seed)
    streamed_text, finish_reasons, _ = stream_chat(openai_client, model="tiny", messages=messages, max_tokens=30, temperature=1.0, seed=seed)

    assert generation.token_ids[-1] in tiny_engine.stop_token_ids
    assert im_end in tiny_engine.stop_token_ids
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == generation.text
    assert response.usage.completion_tokens == len(generation.token_ids)
    assert "<|im_end|>" not in response.choices[0].message.content
    assert streamed_text == generation.text
    assert finish_reasons == ["stop"]


# ----------------------------------------------------------------- concurrency


def test_concurrent_requests_all_answered(openai_client, tiny_engine):
    prompts = [f"{PROMPT} {number}" for number in range(6)]
    expected = [generate_locally(tiny_engine, prompt, max_tokens=16, temperature=0.9, seed=number).text for number, prompt in enumerate(prompts)]

    def send(number: int) -> str:
        request = dict(model="tiny", prompt=prompts[number], max_tokens=16, temperature=0.9, seed=number)
        if number % 2:
            return stream_completion(openai_client, **request)[0]
        return openai_client.completions.create(**request).choices[0].text

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        answers = list(pool.map(send, range(len(prompts))))

    assert answers == expected
    assert tiny_engine.stats()["queued_requests"] == 0


# ----------------------------------------------------------------- errors


def post_raw(server, path: str, content: str | bytes, headers: dict | None = None) -> httpx.Response:
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)


ERROR_CASES = [
    ("/v1/completions", "{not json", None),
    ("/v1/completions", "[1, 2]", None),
    ("/v1/completions", "", None),
    ("/v1/completions", '{"prompt": 5}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": -3}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 5000}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "temperature": "hot"}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "temperature": 3}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "top_p": 0}', "top_p"),
    ("/v1/completions", '{"prompt": "x", "stream": "yes"}', "stream"),
    ("/v1/completions", '{"prompt": "x", "stop": 7}', "stop"),
    ("/v1/completions", '{"prompt": "x", "stop": [""]}', "stop"),
    ("/v1/completions", '{"prompt": "x", "n": 2}', "n"),
    ("/v1/completions", '{"prompt": "x", "echo": true}', "echo"),
    ("/v1/completions", '{"prompt": "x", "logit_bias": {"5": 10}}', "logit_bias"),
    ("/v1/completions", '{"prompt": "x", "presence_penalty": 0.5}', "presence_penalty"),
    ("/v1/completions", '{"prompt": ["a", "b"]}', "prompt"),
    ("/v1/completions", '{"prompt": ""}', "prompt"),
    ("/v1/completions", '{"model": "gpt-4", "prompt": "x"}', "model"),
    ("/v1/chat/completions", '{"messages": []}', "messages"),
    ("/v1/chat/completions", '{"messages": "hi"}', "messages"),
    ("/v1/chat/completions", '{"prompt": "hi"}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', "model"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1020}', "max_tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), ERROR_CASES)
def test_invalid_request_returns_400(tiny_server, path, body, param):
    response = post_raw(tiny_server, path, body)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_context_length_error_names_limit(tiny_server):
    response = post_raw(tiny_server, "/v1/completions", '{"prompt": "x", "max_tokens": 5000}')

    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "1024" in error["message"]
    assert "1023" in error["message"]


def test_unknown_route_and_method(tiny_server):
    missing = httpx.get(f"{tiny_server.url}/v1/embeddings", timeout=10)
    wrong_method = httpx.get(f"{tiny_server.url}/v1/completions", timeout=10)

    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_sdk_raises_bad_request(openai_client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        openai_client.chat.completions.create(model="tiny", messages=[], max_tokens=5)

    assert excinfo.value.status_code == 400
    assert "at least one message" in str(excinfo.value)


def test_health_reports_counters(tiny_server):
    health = httpx.get(f"{tiny_server.url}/health", timeout=10).json()

    assert health["status"] == "ok"
    assert health["model"] == "tiny"
    assert health["busy"] is False
    assert health["completed_requests"] >= 0


# ----------------------------------------------------------------- API key


def test_api_key_required(tiny_model):
    from lmforge.serve.app import create_app
    from lmforge.serve.server import BackgroundServer
    from lmforge.serve.loading import engine_for_model

    model, tokenizer = tiny_model
    with BackgroundServer(create_app(engine_for_model(model, tokenizer, "tiny"), api_key="s3cret")) as server:
        body = {"prompt": PROMPT, "max_tokens": 2}
        no_key = httpx.post(f"{server.url}/v1/completions", json=body, timeout=10)
        wrong_key = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=10)
        models_no_key = httpx.get(f"{server.url}/v1/models", timeout=10)
        health = httpx.get(f"{server.url}/health", timeout=10)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        with_key = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        bad_client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad_client.models.list()

    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    assert wrong_key.status_code == 401
    assert models_no_key.status_code == 401
    assert health.status_code == 200
    assert with_key.usage.completion_tokens == 2


# ----------------------------------------------------------------- disconnects


@pytest.fixture(scope="module")
def long_context_server(tmp_path_factory):
    """A tiny model with 4096 positions, so an uncancelled request would run for thousands of tokens."""
    from lmforge.models.model_dir import load_model_dir
    from lmforge.models.tiny import build_tiny_llama
    from lmforge.serve.app import create_app
    from lmforge.serve.server import BackgroundServer
    from lmforge.serve.loading import engine_for_model

    model_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny_long") / "model", max_position_embeddings=4096)
    model, tokenizer = load_model_dir(model_dir)
    engine = engine_for_model(model, tokenizer, "tiny-long")
    with BackgroundServer(create_app(engine)) as server:
        yield server, engine


def wait_until_idle(engine, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if not stats["busy"] and stats["queued_requests"] == 0:
            return stats
        time.sleep(0.05)
    pytest.fail(f"the engine was still busy {timeout} s after the client disconnected: {engine.stats()}")


def long_request_body(stream: bool) -> dict:
    # Greedy decoding of this prompt produces no stop token for thousands of tokens.
    return {"prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "stream": stream}


def test_stream_disconnect_cancels_generation(long_context_server):
    server, engine = long_context_server
    before = engine.stats()

    with httpx.stream("POST", f"{server.url}/v1/completions", json=long_request_body(True), timeout=30) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(3)]

    after = wait_until_idle(engine)
    assert received[0].startswith("data: ")
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1
    assert after["completed_requests"] == before["completed_requests"]
    assert after["generated_tokens"] - before["generated_tokens"] < 4000


def test_non_stream_disconnect_cancels_generation(long_context_server):
    server, engine = long_context_server
    before = engine.stats()

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=long_request_body(False), timeout=httpx.Timeout(30, read=0.5))

    after = wait_until_idle(engine)
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1
    assert after["completed_requests"] == before["completed_requests"]
    assert after["generated_tokens"] - before["generated_tokens"] < 4000
