"""Model directories in Hugging Face layout: detection, checks and loading.

An lmforge model directory is exactly what `save_pretrained` writes: `config.json`,
`model.safetensors` (or shards with `model.safetensors.index.json`), the tokenizer
files, the chat template and `generation_config.json`. Every Hugging Face tool can
load it, and loading never runs remote code: a `config.json` with an `auto_map`
entry is rejected.

Checks raise `LmforgeError` with one line that names the path and the fix, because
training, serving and conversion all start from a path the user typed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Any one of these lets AutoTokenizer build a tokenizer; tokenizer_config.json alone does not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def is_model_dir(path: str | Path) -> bool:
    """Return True if `path` is a directory with `config.json` and model weights."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    return any((path / name).is_file() for name in WEIGHT_FILES)


def has_tokenizer(path: str | Path) -> bool:
    """Return True if `path` contains tokenizer files that AutoTokenizer can load."""
    path = Path(path)
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """Read and check `path/config.json`, raising LmforgeError when it is missing or invalid."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise LmforgeError(
            f"not a model directory: {path} has no config.json",
            hint="expected Hugging Face layout (config.json, model.safetensors, tokenizer files); "
            "create one with `lmforge convert SRC DST`",
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise LmforgeError(
            f"invalid JSON in {config_path} at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            hint="fix the file or convert the model again",
        ) from exc
    if not isinstance(config, dict):
        raise LmforgeError(f"invalid model config {config_path}: expected a JSON object")
    return config


def check_architecture(config: dict[str, Any], source: str | Path) -> str:
    """Return the config's `model_type` if AutoModelForCausalLM supports it without remote code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if "auto_map" in config:
        raise LmforgeError(
            f"unsupported architecture in {source}: config.json has an auto_map entry, "
            "so loading it would run the model's own Python code",
            hint="lmforge never sets trust_remote_code; use a model whose architecture is built into transformers",
        )
    if not model_type:
        raise LmforgeError(
            f"unsupported architecture in {source}: config.json has no model_type",
            hint="use a Hugging Face causal LM directory, e.g. one with model_type 'llama'",
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LmforgeError(
            f"unsupported architecture in {source}: model_type {model_type!r} is not a causal "
            "language model that transformers can load",
            hint="lmforge fine-tunes causal LMs such as 'llama'; check the source model",
        )
    return model_type


def check_model_dir(path: str | Path, need_tokenizer: bool = True) -> Path:
    """Check that `path` is a loadable model directory and return it as a Path.

    Raises LmforgeError for a missing path, a GGUF or other file, a directory without
    config.json or weights, an unsupported architecture and, when `need_tokenizer`,
    missing tokenizer files.
    """
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"model directory not found: {path}", hint="check the path")
    if path.is_file():
        if path.suffix == ".gguf":
            raise LmforgeError(
                f"{path} is a GGUF file, not a model directory",
                hint=f"convert it first: lmforge convert {path} DST",
            )
        raise LmforgeError(f"not a model directory: {path} is a file", hint="pass the directory that contains config.json")

    gguf_files = sorted(path.glob("*.gguf"))
    if gguf_files and not (path / "config.json").is_file():
        raise LmforgeError(
            f"not a model directory: {path} has no config.json but contains {gguf_files[0].name}",
            hint=f"pass the GGUF file itself: lmforge convert {gguf_files[0]} DST",
        )
    config = read_model_config(path)
    check_architecture(config, path)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise LmforgeError(
            f"not a model directory: {path} has config.json but no weights "
            f"({', '.join(WEIGHT_FILES)})",
            hint="copy the weight files beside config.json or convert the model again",
        )
    if need_tokenizer and not has_tokenizer(path):
        raise LmforgeError(
            f"tokenizer missing in {path}: none of {', '.join(TOKENIZER_FILES)} found",
            hint="save the tokenizer beside the model (tokenizer.save_pretrained(DIR)) or convert the model again",
        )
    return path


def resolve_dtype(dtype: Any):
    """Return the torch dtype for `dtype`: None means float32, strings like "bf16" are accepted, "auto" passes through."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return "auto"
        name = DTYPE_NAMES.get(dtype.lower())
        if name is not None:
            return getattr(torch, name)
    raise LmforgeError(
        f"invalid dtype {dtype!r}",
        hint=f"use one of: {', '.join(sorted(DTYPE_NAMES))}, auto",
    )


def load_tokenizer(path: str | Path):
    """Load the tokenizer saved in model directory `path`."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not has_tokenizer(path):
        raise LmforgeError(
            f"tokenizer missing in {path}: none of {', '.join(TOKENIZER_FILES)} found",
            hint="save the tokenizer beside the model (tokenizer.save_pretrained(DIR)) or convert the model again",
        )
    return AutoTokenizer.from_pretrained(path)


def load_model_dir(path: str | Path, dtype: Any = None, device: str = "cpu"):
    """Load `(model, tokenizer)` from an lmforge (Hugging Face layout) model directory.

    `dtype` is None (float32, the training default), a torch dtype, a name such as
    "bf16", or "auto" (the dtype stored in config.json). The model is returned in
    eval mode on `device`. Raises LmforgeError when the directory is missing, is not a
    model directory, has an unsupported architecture or lacks the tokenizer.
    """
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path, need_tokenizer=True)
    torch_dtype = resolve_dtype(dtype)
    logger.debug("loading model from %s (dtype=%s, device=%s)", path, torch_dtype, device)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device)
    model.eval()
    return model, tokenizer
