"""`lmforge inf server|client|eval` run as real subprocesses, and checkpoint selection."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.serve.client import interpret_escapes, load_eval_prompts, render_chatml
from lmforge.serve.loading import resolve_model_path

SERVING_LINE = re.compile(r"Serving on (http://127\.0\.0\.1:\d+)/v1")


def make_run_dir(tiny_llama_dir: Path, root: Path) -> Path:
    """Lay out a training output directory with complete checkpoints 5 and 10 and an incomplete 15."""
    run_dir = root / "run"
    for step, complete in ((5, True), (10, True), (15, False)):
        checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
        shutil.copytree(tiny_llama_dir, checkpoint)
        if complete:
            (checkpoint / "COMPLETE").write_text("")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_run_dir(tiny_llama_dir, tmp_path_factory.mktemp("inf_cli"))


@pytest.fixture(scope="module")
def cli_server(run_dir):
    """`lmforge inf server -m RUN_DIR -c --port 0 --threads 1` in a subprocess.

    Yields (url, log lines, process, log reader thread).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "lmforge.cli.main", "inf", "server", "-m", str(run_dir), "-c", "--port", "0", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log_lines: list[str] = []
    url = None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        log_lines.append(line.rstrip())
        match = SERVING_LINE.search(line)
        if match:
            url = match.group(1)
    if url is None:
        process.kill()
        pytest.fail("lmforge inf server did not start:\n" + "\n".join(log_lines))

    # Keep reading the log so that the pipe never fills up and blocks the server.
    drain = threading.Thread(target=lambda: log_lines.extend(line.rstrip() for line in process.stdout), daemon=True)
    drain.start()
    try:
        yield url, log_lines, process, drain
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def test_server_startup_log(cli_server):
    _, log_lines, _, _ = cli_server
    log = "\n".join(log_lines)

    assert "checkpoint-10" in log
    assert "checkpoint-15" in log  # the warning about the incomplete checkpoint
    assert "Stop token IDs: [2, 0] (<|im_end|>, <|endoftext|>)" in log
    assert "device cpu, dtype float32, context length 1024, 1 CPU threads" in log


def test_client_message_and_escaped_stop(cli_server, run_lmforge, tiny_model):
    url, _, _, _ = cli_server
    _, tokenizer = tiny_model
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    plain = run_lmforge("inf", "client", "--url", url, "--message", "Hi", "--max-tokens", "6", "--temperature", "0")
    stopped = run_lmforge(
        "inf", "client", "--url", url, "--message", "Hi", "--max-tokens", "6", "--temperature", "0", "--stop", r"\n"
    )
    literal = run_lmforge(
        "inf", "client", "--url", url, "--message", "Hi", "--max-tokens", "6", "--temperature", "0", "--stop", r"\\n"
    )

    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("\n")  # greedy decoding of this random model starts with newlines
    assert f"[finish_reason: length, {prompt_tokens} prompt + 6 completion tokens]" in plain.stderr
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == "\n"  # an empty response and the line end
    assert "finish_reason: stop" in stopped.stderr
    assert "finish_reason: length" in literal.stderr


def test_client_completion_stream(cli_server, run_lmforge):
    url, _, _, _ = cli_server

    streamed = run_lmforge("inf", "client", "--url", url, "--completion", "The quick", "--max-tokens", "7", "--temperature", "0", "--stream")
    whole = run_lmforge("inf", "client", "--url", url, "--completion", "The quick", "--max-tokens", "7", "--temperature", "0")

    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == whole.stdout
    assert "7 completion tokens" in streamed.stderr


def test_client_interactive_keeps_history(cli_server, run_lmforge):
    url, _, _, _ = cli_server

    proc = run_lmforge(
        "inf", "client", "--url", url, "-i", "--max-tokens", "3", "--temperature", "0",
        input="Hello\nHello again\n/reset\nHello\n/exit\n",
    )

    assert proc.returncode == 0, proc.stderr
    prompt_tokens = [int(value) for value in re.findall(r"(\d+) prompt \+", proc.stderr)]
    assert len(prompt_tokens) == 3
    assert prompt_tokens[1] > prompt_tokens[0] + 3  # the first exchange is part of the second prompt
    assert prompt_tokens[2] == prompt_tokens[0]  # /reset dropped the history
    assert "(history cleared)" in proc.stderr


def test_eval_counts_stops(cli_server, run_lmforge, tmp_path):
    url, _, _, _ = cli_server
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(
        "- \"<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n\"\n"
        "- \"<|im_start|>user\\nName a colour.<|im_end|>\\n<|im_start|>assistant\\n\"\n"
    )

    default_stop = run_lmforge("inf", "eval", str(prompts), "--url", url, "--max-tokens", "5")
    newline_stop = run_lmforge("inf", "eval", str(prompts), "--url", url, "--max-tokens", "5", "--stop", r"\n")

    assert default_stop.returncode == 0, default_stop.stderr
    assert default_stop.stdout.count("finish_reason length") == 2
    assert "0/2 responses ended with stop (2 did not)" in default_stop.stdout
    assert newline_stop.stdout.count("finish_reason stop") == 2
    assert "2/2 responses ended with stop (0 did not)" in newline_stop.stdout


def test_server_stops_on_sigterm(cli_server):
    _, log_lines, process, drain = cli_server

    process.terminate()
    process.wait(timeout=30)
    drain.join(timeout=10)
    log = "\n".join(log_lines)

    # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
    assert process.returncode == -signal.SIGTERM
    assert "Application shutdown complete" in log
    assert "Server stopped after" in log


def test_client_without_server(run_lmforge):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = run_lmforge("inf", "client", "--url", f"http://127.0.0.1:{port}", "--message", "Hi")

    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: cannot connect to the server at http://127.0.0.1:{port}/v1")
    assert "Traceback" not in proc.stderr
    assert "hint: start it with `lmforge inf server -m MODEL_DIR`" in proc.stderr


def test_server_rejects_bad_arguments(run_lmforge, tmp_path, run_dir):
    missing = run_lmforge("inf", "server", "-m", str(tmp_path / "nothing"))
    stray_name = run_lmforge("inf", "server", "-m", str(run_dir), "checkpoint-5")

    assert missing.returncode == 2
    assert "error: model directory not found" in missing.stderr
    assert stray_name.returncode == 2
    assert "pass -c checkpoint-5" in stray_name.stderr


# ----------------------------------------------------------------- checkpoint selection


def test_resolve_checkpoint_names(run_dir):
    checkpoints = run_dir / "checkpoints"

    assert resolve_model_path(run_dir) == run_dir
    assert resolve_model_path(run_dir, use_checkpoint=True) == checkpoints / "checkpoint-10"
    assert resolve_model_path(run_dir, "checkpoint-5", use_checkpoint=True) == checkpoints / "checkpoint-5"
    assert resolve_model_path(run_dir, "5", use_checkpoint=True) == checkpoints / "checkpoint-5"
    assert resolve_model_path(run_dir, str(checkpoints / "checkpoint-5"), use_checkpoint=True) == checkpoints / "checkpoint-5"


def test_resolve_checkpoint_errors(run_dir, tmp_path):
    with pytest.raises(LmforgeError, match="incomplete"):
        resolve_model_path(run_dir, "checkpoint-15", use_checkpoint=True)
    with pytest.raises(LmforgeError, match="'7' not found") as missing:
        resolve_model_path(run_dir, "7", use_checkpoint=True)
    assert "checkpoint-5, checkpoint-10" in missing.value.hint
    with pytest.raises(LmforgeError, match="no complete checkpoint"):
        resolve_model_path(tmp_path, use_checkpoint=True)


# ----------------------------------------------------------------- helpers


def test_interpret_escapes():
    assert interpret_escapes(r"a\nb\tc") == "a\nb\tc"
    assert interpret_escapes(r"\\n") == "\\n"
    assert interpret_escapes("<|im_end|>") == "<|im_end|>"
    assert interpret_escapes(r"ü\r") == "ü\r"


def test_load_eval_prompts_layouts(tmp_path):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text('- "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"\n')
    training = tmp_path / "training.yaml"
    training.write_text("format: chatml\nprompts:\n  - name: greet\n    system: Be brief.\n    user: Hi\n")
    raw = tmp_path / "raw.yaml"
    raw.write_text("format: raw\nprompts:\n  - name: fox\n    text: The quick brown fox\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("[]\n")

    assert load_eval_prompts(rendered) == [("prompt_1", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")]
    assert load_eval_prompts(training) == [("greet", render_chatml("Hi", "Be brief."))]
    assert render_chatml("Hi", "Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert load_eval_prompts(raw) == [("fox", "The quick brown fox")]
    with pytest.raises(LmforgeError, match="contains no prompts"):
        load_eval_prompts(empty)
    with pytest.raises(LmforgeError, match="not found"):
        load_eval_prompts(tmp_path / "absent.yaml")


def test_repository_eval_prompts_load(repo_root):
    path = repo_root / "prompts" / "open_orca_eval.yaml"
    if not path.exists():
        pytest.skip("prompts/open_orca_eval.yaml is not in this checkout")

    prompts = load_eval_prompts(path)

    assert prompts
    assert all(text.endswith("<|im_start|>assistant\n") for _, text in prompts)
