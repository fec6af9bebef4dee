"""`lmforge inf server|client|eval`: serve a model over an OpenAI-compatible API and talk to it.

The work happens in `lmforge.serve`; these commands parse options and print.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from lmforge.errors import LmforgeError

inf_app = typer.Typer(
    help="Serve a model over an OpenAI-compatible HTTP API, and query it.",
    no_args_is_help=True,
)

URL_HELP = "Server URL, with or without /v1."
API_KEY_HELP = "Bearer key for a server started with --api-key (default: $LMFORGE_API_KEY)."


@inf_app.command("server")
def server(
    model_dir: Path = typer.Option(..., "-m", "--model-dir", help="Model directory, or a training output directory with -c."),
    use_checkpoint: bool = typer.Option(
        False,
        "-c",
        "--checkpoint",
        help="Serve a checkpoint from MODEL_DIR/checkpoints/: CHECKPOINT if given, else the newest complete one.",
    ),
    checkpoint: Optional[str] = typer.Argument(
        None, help="Checkpoint to serve with -c: a name (checkpoint-500), a step (500) or a path."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; other than loopback exposes the model to the network."),
    port: int = typer.Option(8000, "--port", help="TCP port; 0 picks a free one (the log shows it)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="LMFORGE_API_KEY", show_envvar=False, help="Require 'Authorization: Bearer KEY' on /v1 routes (default: $LMFORGE_API_KEY)."
    ),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id in /v1/models (default: the directory name)."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="Jinja chat template file replacing the tokenizer's."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice, usually the core count)."),
) -> None:
    """Serve a model directory or checkpoint at /v1/completions and /v1/chat/completions."""
    from lmforge.serve.app import create_app
    from lmforge.serve.loading import build_engine
    from lmforge.serve.server import run_server

    if checkpoint is not None and not use_checkpoint:
        raise LmforgeError(f"unexpected argument {checkpoint!r}", hint=f"to serve a checkpoint, pass -c {checkpoint}")
    if not 0 <= port <= 65535:
        raise LmforgeError(f"invalid --port {port}", hint="use 0-65535 (0 picks a free port)")
    engine = build_engine(
        model_dir,
        checkpoint=checkpoint,
        use_checkpoint=use_checkpoint,
        device=device,
        dtype=dtype,
        chat_template=chat_template,
        model_name=model_name,
        threads=threads,
    )
    run_server(create_app(engine, api_key=api_key), host=host, port=port, api_key=api_key)


@inf_app.command("client")
def client(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help=URL_HELP),
    message: Optional[str] = typer.Option(None, "--message", help="User message to send to /v1/chat/completions."),
    system: Optional[str] = typer.Option(None, "--system", help="System message placed before the conversation."),
    completion: Optional[str] = typer.Option(None, "--completion", help="Raw prompt to send verbatim to /v1/completions."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Maximum tokens to generate (default: the server's)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature; 0 is greedy (default: the server's, 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default: the server's, 1.0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed, for reproducible responses."),
    stop: list[str] = typer.Option(
        [], "--stop", help=r"Stop string; repeatable. Escapes \n, \t, \r and \\ are interpreted."
    ),
    stream: bool = typer.Option(False, "--stream", help="Print the response as it is generated."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Chat in a loop, keeping the conversation history."),
    model: Optional[str] = typer.Option(None, "--model", help="Model id (default: the first from /v1/models)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMFORGE_API_KEY", show_envvar=False, help=API_KEY_HELP),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for one response."),
) -> None:
    """Send a chat message or a raw completion prompt to a server and print the response."""
    from lmforge.serve.client import InferenceClient, interpret_escapes

    _quiet_http_logs()
    if completion is not None and (message is not None or interactive or system is not None):
        raise LmforgeError("--completion cannot be combined with --message, --system or --interactive", hint="send a raw prompt or chat, not both")
    if completion is None and message is None and not interactive:
        raise LmforgeError("nothing to send", hint="pass --message TEXT, --completion TEXT or --interactive")

    params = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": [interpret_escapes(item) for item in stop] or None,
    }
    with InferenceClient(url, api_key=api_key, model=model, timeout=timeout) as session:
        if completion is not None:
            _print_reply(session.complete(interpret_escapes(completion), on_delta=_echo if stream else None, **params), stream)
            return

        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        if message is not None:
            _chat_turn(session, history, message, stream, params)
        if interactive:
            _interactive_loop(session, history, stream, params)


def _quiet_http_logs() -> None:
    """Hide httpx's per-request INFO lines, which would interleave with the responses."""
    import logging

    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _echo(delta: str) -> None:
    sys.stdout.write(delta)
    sys.stdout.flush()


def _print_reply(reply, streamed: bool) -> None:
    if streamed:
        typer.echo("")
    else:
        typer.echo(reply.text)
    details = f"finish_reason: {reply.finish_reason}"
    if reply.usage:
        details += f", {reply.usage.get('prompt_tokens')} prompt + {reply.usage.get('completion_tokens')} completion tokens"
    typer.echo(f"[{details}]", err=True)


def _chat_turn(session, history: list[dict[str, str]], text: str, stream: bool, params: dict) -> None:
    history.append({"role": "user", "content": text})
    try:
        reply = session.chat(history, on_delta=_echo if stream else None, **params)
    except LmforgeError:
        history.pop()
        raise
    history.append({"role": "assistant", "content": reply.text})
    _print_reply(reply, stream)


def _interactive_loop(session, history: list[dict[str, str]], stream: bool, params: dict) -> None:
    typer.echo(f"Chatting with {session.model} at {session.base_url}. /reset clears the history, /exit or Ctrl-D quits.", err=True)
    system_turns = [turn for turn in history if turn["role"] == "system"]
    while True:
        try:
            text = input("> ")
        except EOFError:
            typer.echo("", err=True)
            return
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history[:] = list(system_turns)
            typer.echo("(history cleared)", err=True)
            continue
        try:
            _chat_turn(session, history, text, stream, params)
        except LmforgeError as exc:
            # Keep the session alive: the user can retry or quit.
            typer.echo(f"error: {exc}", err=True)


@inf_app.command("eval")
def eval_prompts(
    prompts_file: Path = typer.Argument(..., help="YAML prompts file: a list of rendered prompts, or a `prompts:` mapping."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help=URL_HELP),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Maximum tokens per response."),
    temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature; 0 (default) is greedy."),
    stop: str = typer.Option("<|im_end|>", "--stop", help=r"Stop string: the turn-closing token. Escapes \n, \t are interpreted."),
    model: Optional[str] = typer.Option(None, "--model", help="Model id (default: the first from /v1/models)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMFORGE_API_KEY", show_envvar=False, help=API_KEY_HELP),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for one response."),
) -> None:
    """Run every prompt of a prompts file through /v1/completions and count responses that ended with stop."""
    from lmforge.serve.client import InferenceClient, interpret_escapes, load_eval_prompts

    _quiet_http_logs()
    prompts = load_eval_prompts(prompts_file)
    stopped = 0
    with InferenceClient(url, api_key=api_key, model=model, timeout=timeout) as session:
        for number, (name, prompt) in enumerate(prompts, 1):
            reply = session.complete(prompt, max_tokens=max_tokens, temperature=temperature, stop=[interpret_escapes(stop)])
            if reply.finish_reason == "stop":
                stopped += 1
            tokens = reply.usage.get("completion_tokens") if reply.usage else "?"
            typer.echo(f"=== [{number}/{len(prompts)}] {name}: finish_reason {reply.finish_reason}, {tokens} tokens")
            typer.echo(reply.text)
    typer.echo(f"{stopped}/{len(prompts)} responses ended with stop ({len(prompts) - stopped} did not)")


def register(app: typer.Typer) -> None:
    app.add_typer(inf_app, name="inf")
