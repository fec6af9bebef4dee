"""The real SmolLM2-135M-Instruct behind the server: chat replies end at the turn end.

A reply that runs past `<|im_end|>` ends with `finish_reason` "length" and contains
template text such as `<|im_start|>user`. The tests check both, for streaming and
non-streaming requests.
"""

from __future__ import annotations

import logging

import openai
import pytest
import yaml

pytestmark = pytest.mark.slow

TEMPLATE_TEXT = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>", "\nuser\n", "\nassistant\n")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir, caplog_module):
    from lmforge.serve.app import create_app
    from lmforge.serve.loading import build_engine
    from lmforge.serve.server import BackgroundServer

    engine = build_engine(smollm2_dir, device="cpu")
    with BackgroundServer(create_app(engine)) as server:
        yield server, engine


@pytest.fixture(scope="module")
def caplog_module():
    """Collect the lmforge.serve log records of the module's server startup."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = records.append
    serve_logger = logging.getLogger("lmforge.serve")
    previous_level = serve_logger.level
    serve_logger.addHandler(handler)
    serve_logger.setLevel(logging.INFO)
    yield records
    serve_logger.removeHandler(handler)
    serve_logger.setLevel(previous_level)


def test_startup_logs_stop_token_ids(smollm2_server, caplog_module):
    _, engine = smollm2_server
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [record.getMessage() for record in caplog_module]

    assert im_end in engine.stop_token_ids
    assert any(message.startswith(f"Stop token IDs: {engine.stop_token_ids}") for message in messages)


def test_chat_reply_stops_at_turn_end(smollm2_server):
    server, _ = smollm2_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    request = dict(model=client.models.list().data[0].id, messages=QUESTION, max_tokens=200, temperature=0)

    response = client.chat.completions.create(**request)
    parts, finish_reasons = [], []
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
    content = response.choices[0].message.content

    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 200
    assert "Paris" in content
    for text in TEMPLATE_TEXT:
        assert text not in content
    assert content == content.strip()
    assert "".join(parts) == content
    assert finish_reasons == ["stop"]


def test_eval_command_counts_stop(smollm2_server, run_lmforge, tmp_path):
    server, engine = smollm2_server
    prompt = engine.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompts_file = tmp_path / "prompts.yaml"
    prompts_file.write_text(yaml.safe_dump([prompt]))

    proc = run_lmforge("inf", "eval", str(prompts_file), "--url", server.url, "--max-tokens", "200")

    assert proc.returncode == 0, proc.stderr
    assert "finish_reason stop" in proc.stdout
    assert "Paris" in proc.stdout
    assert "1/1 responses ended with stop (0 did not)" in proc.stdout
