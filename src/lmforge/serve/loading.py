"""Choose the model directory or checkpoint to serve, load it and build the engine."""

from __future__ import annotations

import logging
from pathlib import Path

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

# Used when neither config.max_position_embeddings nor a sane tokenizer.model_max_length exists.
FALLBACK_CONTEXT_LENGTH = 2048


def resolve_model_path(model_dir: str | Path, checkpoint: str | None = None, use_checkpoint: bool = False) -> Path:
    """Return the directory to load: MODEL_DIR itself, or one of its checkpoints.

    With `use_checkpoint` and no `checkpoint`, returns the newest complete
    `MODEL_DIR/checkpoints/checkpoint-STEP` (complete means it contains the
    `COMPLETE` marker). `checkpoint` may be a directory name (`checkpoint-500`), a
    step number (`500`) or a path; a named checkpoint must be complete too.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LmforgeError(f"model directory not found: {model_dir}", hint="pass the training output directory or a converted model directory to -m")
    if checkpoint is None and not use_checkpoint:
        return model_dir

    from lmforge.train.checkpoints import COMPLETE_MARKER, checkpoints_root, is_complete, list_checkpoints

    root = checkpoints_root(model_dir)
    if checkpoint is None:
        complete = list_checkpoints(model_dir, warn_incomplete=True)
        if not complete:
            raise LmforgeError(
                f"no complete checkpoint under {root}",
                hint=f"train until a checkpoint is saved, or drop -c to serve {model_dir} itself",
            )
        return complete[-1]

    candidates = [Path(checkpoint), root / checkpoint]
    if checkpoint.isdigit():
        candidates.append(root / f"checkpoint-{int(checkpoint)}")
    path = next((candidate for candidate in candidates if candidate.is_dir()), None)
    if path is None:
        available = [item.name for item in list_checkpoints(model_dir)]
        raise LmforgeError(
            f"checkpoint {checkpoint!r} not found under {root}",
            hint=f"complete checkpoints: {', '.join(available) if available else 'none'}; pass -c alone for the newest",
        )
    if not is_complete(path):
        raise LmforgeError(
            f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker; it was interrupted while saving)",
            hint="serve an older checkpoint, or pass -c alone for the newest complete one",
        )
    return path


def resolve_device(device: str) -> str:
    """Return "cuda" or "cpu" for `device` in {"auto", "cpu", "cuda", "cuda:N"}.

    NOTE: the test suite runs on CPU only, so serving on CUDA (bfloat16 weights, a
    CUDA `torch.Generator`) has not been run by it.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"--device {device} requested but CUDA is not available", hint="use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise LmforgeError(f"invalid --device {device!r}", hint="use auto, cpu, cuda or cuda:N")
    return device


def resolve_serving_dtype(dtype: str, device: str) -> str:
    """Return the dtype name to load with: "auto" means float32 on CPU and bfloat16 (or float16) on CUDA."""
    import torch

    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def context_length_of(model, tokenizer) -> int:
    """Return the maximum number of positions (prompt plus completion) the model accepts."""
    length = getattr(model.config, "max_position_embeddings", None)
    if isinstance(length, int) and length > 0:
        return length
    tokenizer_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_length, int) and 0 < tokenizer_length < 10_000_000:
        return tokenizer_length
    logger.warning("Model config has no max_position_embeddings; assuming a context length of %d", FALLBACK_CONTEXT_LENGTH)
    return FALLBACK_CONTEXT_LENGTH


def engine_for_model(model, tokenizer, model_name: str):
    """Return an unstarted `GenerationEngine` for an already loaded model and tokenizer."""
    from lmforge.models.stop_tokens import stop_token_ids
    from lmforge.serve.engine import GenerationEngine

    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    return GenerationEngine(model, tokenizer, stop_ids, model_name=model_name, context_length=context_length_of(model, tokenizer))


def build_engine(
    model_dir: str | Path,
    *,
    checkpoint: str | None = None,
    use_checkpoint: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    chat_template: str | Path | None = None,
    model_name: str | None = None,
    threads: int | None = None,
):
    """Load the model to serve and return an unstarted `GenerationEngine`.

    Logs the loaded path, device, dtype, context length and the stop token ids.
    `chat_template` is a Jinja file that replaces the tokenizer's chat template.
    `model_name` is the id in /v1/models; it defaults to the model directory's
    name, with `/checkpoint-STEP` appended when a checkpoint is served. `threads`
    sets torch's intra-op CPU thread count (None keeps torch's default).
    """
    model_dir = Path(model_dir)
    path = resolve_model_path(model_dir, checkpoint, use_checkpoint)

    import torch

    from lmforge.models.model_dir import load_model_dir

    device = resolve_device(device)
    dtype_name = resolve_serving_dtype(dtype, device)
    if threads is not None:
        if threads < 1:
            raise LmforgeError(f"invalid --threads {threads}", hint="use 1 or more CPU threads")
        torch.set_num_threads(threads)

    logger.info("Loading model from %s on %s (%s)", path, device, dtype_name)
    model, tokenizer = load_model_dir(path, dtype=dtype_name, device=device)

    if chat_template is not None:
        template_path = Path(chat_template)
        if not template_path.is_file():
            raise LmforgeError(f"chat template file not found: {template_path}", hint="pass a Jinja file such as chat_templates/chatml.jinja")
        tokenizer.chat_template = template_path.read_text()

    if model_name is None:
        model_name = model_dir.resolve().name if path == model_dir else f"{model_dir.resolve().name}/{path.name}"
    engine = engine_for_model(model, tokenizer, model_name)
    stop_tokens = [tokenizer.convert_ids_to_tokens(token_id) for token_id in engine.stop_token_ids]

    logger.info(
        "Model %s: %s, %.1fM parameters, device %s, dtype %s, context length %d, %d CPU threads",
        model_name,
        type(model).__name__,
        sum(parameter.numel() for parameter in model.parameters()) / 1e6,
        device,
        str(next(model.parameters()).dtype).removeprefix("torch."),
        engine.context_length,
        torch.get_num_threads(),
    )
    logger.info("Stop token IDs: %s (%s)", engine.stop_token_ids, ", ".join(stop_tokens))
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("The tokenizer has no chat template: /v1/chat/completions will return 400; pass --chat-template FILE")

    return engine
