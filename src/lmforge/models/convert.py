"""`lmforge convert SRC DST`: write an lmforge model directory from a HF directory or a GGUF file.

Steps, in order:

1. load the source in float32: a Hugging Face model directory through
   `AutoModelForCausalLM`, or a GGUF file dequantised by transformers' GGUF loader;
2. take the reference outputs (see `lmforge.models.checks`);
3. register chat tokens (`--add-tokens`), grow and initialise the embeddings;
4. set the chat template, the bos/eos/pad ids in config.json and
   generation_config.json, and the max positions;
5. save into a temporary directory beside DST, reload it and compare with the
   reference; only a directory that passes the check is renamed to DST.

An interrupted or failed convert removes its temporary directory, so DST is either
absent, the old contents (without `--force`) or complete. A killed process (SIGKILL)
can leave a hidden `.DST.tmp-*` directory beside DST, never a partial DST.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.models.chat_tokens import (
    CHATML_TOKENS,
    NEW_TOKEN_INIT_METHODS,
    apply_token_plan,
    load_token_plan,
    resize_for_new_tokens,
)
from lmforge.models.checks import LOSS_TOLERANCE, CheckResult, compare_with_reference, take_reference
from lmforge.models.model_dir import check_architecture, check_model_dir, read_model_config, resolve_dtype
from lmforge.models.stop_tokens import stop_token_ids

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
PROVENANCE_FILE = "lmforge_convert.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"


@dataclass
class ConvertOptions:
    """Settings of one conversion; the CLI flags map onto these fields one to one."""

    add_tokens: str | None = None
    """`chatml`, the path of a YAML token file, or None to add no tokens."""
    new_token_init: str = "mean"
    """Initialisation of the added tokens' embedding rows: `mean`, `mean_noise` or `random`."""
    chat_template: str | None = None
    """A Jinja file, `source` to keep the source's template, or None: ChatML when its tokens exist, else the source's."""
    dtype: str = "auto"
    """Weights dtype of DST: `auto` keeps the source's (float32 for GGUF), or float32/bfloat16/float16."""
    max_length: int | None = None
    """New max_position_embeddings (and tokenizer model_max_length); None keeps the source's."""
    force: bool = False
    """Replace a non-empty DST."""
    seed: int = 0
    """Seed of the noise for `mean_noise` and `random` rows."""
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
    """Largest safetensors shard; bigger models get several shards and an index file."""
    loss_tolerance: float = LOSS_TOLERANCE
    """Largest allowed change of the check text's loss; see `lmforge.models.checks`."""


@dataclass
class ConvertReport:
    """Summary of one conversion, as printed by the CLI and stored in DST/lmforge_convert.json."""

    source: str
    source_kind: str
    destination: str
    dtype: str
    vocab_size_before: int
    vocab_size_after: int
    source_path: str | None = None
    """Absolute path of SRC, which `lmforge model check` compares with while it exists."""
    tokens: list[dict[str, Any]] = field(default_factory=list)
    embeddings: dict[str, Any] = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    max_position_embeddings: int | None = None
    source_sha256: str | None = None
    source_size: int | None = None
    check: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def is_gguf_file(path: Path) -> bool:
    """Return True if `path` is a file that starts with the GGUF magic bytes."""
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def chatml_template_text() -> str:
    """Return the ChatML template from the repository's chat_templates/, or the built-in copy."""
    from lmforge.models.tiny import CHATML_TEMPLATE, CHATML_TEMPLATE_PATH

    if CHATML_TEMPLATE_PATH.is_file():
        return CHATML_TEMPLATE_PATH.read_text()
    return CHATML_TEMPLATE


def _gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]


def _gguf_error(path: Path, exc: Exception) -> LmforgeError:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "architecture" in message.lower():
        return LmforgeError(
            f"unsupported architecture in GGUF file {path}: {message}",
            hint=f"transformers' GGUF loader reads these architectures: {', '.join(_gguf_architectures())}",
        )
    return LmforgeError(f"failed to read GGUF file {path}: {message}", hint="check that the file is complete")


def load_gguf_source(path: Path):
    """Load (model, tokenizer) from a GGUF file, dequantised to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("reading GGUF file %s (%.1f MB); dequantising to float32", path, path.stat().st_size / 1e6)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, NotImplementedError) as exc:
        raise _gguf_error(path, exc) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, NotImplementedError) as exc:
        raise _gguf_error(path, exc) from exc
    check_architecture(model.config.to_dict(), path)

    # The weights are now plain float32 tensors; without this the saved config.json
    # would claim a GGUF quantisation and loaders would look for a .gguf file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def load_hf_source(path: Path):
    """Load (model, tokenizer, dtype name) from a Hugging Face model directory, in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.models.model_dir import load_tokenizer

    check_model_dir(path, need_tokenizer=True)
    config = read_model_config(path)
    stored_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    logger.info("reading model directory %s (stored dtype %s)", path, stored_dtype)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer, str(stored_dtype)


def load_source(src: Path):
    """Load the conversion source; return (model, tokenizer, kind, stored dtype name)."""
    if not src.exists():
        raise LmforgeError(f"source not found: {src}", hint="pass a Hugging Face model directory or a .gguf file")
    if src.is_file():
        if not is_gguf_file(src):
            raise LmforgeError(
                f"not a model: {src} is a file without the GGUF header",
                hint="pass a Hugging Face model directory (config.json, model.safetensors, tokenizer) or a .gguf file",
            )
        model, tokenizer = load_gguf_source(src)
        return model, tokenizer, "gguf", "float32"
    model, tokenizer, stored_dtype = load_hf_source(src)
    return model, tokenizer, "hf", stored_dtype


def check_destination(dst: Path, force: bool, src: Path | None = None) -> None:
    """Raise unless DST can be written: absent, an empty directory, or any directory with `force`.

    With `force`, a `src` inside DST is rejected because replacing DST would delete it.
    """
    if dst.exists() and not dst.is_dir():
        raise LmforgeError(f"destination exists and is a file: {dst}", hint="choose a directory path for DST")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise LmforgeError(
            f"destination exists and is not empty: {dst}",
            hint="choose another DST or pass --force to replace it",
        )
    if src is None:
        return
    src_resolved, dst_resolved = src.resolve(), dst.resolve()
    if force and (src_resolved == dst_resolved or dst_resolved in src_resolved.parents):
        raise LmforgeError(
            f"source {src} is inside destination {dst}; --force would delete it",
            hint="write the converted model to another directory",
        )


def resolve_chat_template(option: str | None, tokenizer) -> tuple[str | None, str | None]:
    """Return (template text, description) for the `--chat-template` option value."""
    if option == "source":
        return tokenizer.chat_template, "source"
    if option is None:
        vocab = tokenizer.get_vocab()
        if all(token in vocab for token in CHATML_TOKENS):
            return chatml_template_text(), "chatml (default)"
        return tokenizer.chat_template, "source"

    path = Path(option)
    if not path.is_file():
        raise LmforgeError(f"chat template file not found: {path}", hint="pass a Jinja file or 'source'")
    text = path.read_text()

    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise LmforgeError(f"invalid chat template {path}:{exc.lineno}: {exc.message}") from exc
    return text, str(path)


def check_template_renders(tokenizer, description: str) -> None:
    """Render a two-message conversation with the tokenizer's chat template, raising LmforgeError on failure."""
    if not tokenizer.chat_template:
        return
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    try:
        tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # any Jinja or template error is a bad template
        raise LmforgeError(f"chat template {description} failed to render a conversation: {exc}") from exc


def set_special_ids(model, tokenizer, source_generation_config) -> list[int]:
    """Write bos/eos/pad ids into config and generation config; return the stop token ids."""
    from transformers import GenerationConfig

    stop_ids = stop_token_ids(tokenizer, source_generation_config)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id

    generation_config = model.generation_config if model.generation_config is not None else GenerationConfig()
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = stop_ids if len(stop_ids) != 1 else stop_ids[0]
    generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation_config
    return stop_ids


def set_max_length(model, tokenizer, max_length: int) -> None:
    """Set max_position_embeddings and the tokenizer's model_max_length."""
    if max_length <= 0:
        raise LmforgeError(f"invalid --max-length {max_length}: expected a positive number of positions")
    current = getattr(model.config, "max_position_embeddings", None)
    if current is not None and max_length > current:
        logger.warning(
            "--max-length %d exceeds the source's max_position_embeddings %d; the model was not trained on "
            "positions beyond %d",
            max_length,
            current,
            current,
        )
    model.config.max_position_embeddings = max_length
    tokenizer.model_max_length = max_length


def round_to_dtype(model, dtype) -> None:
    """Round every float parameter to `dtype` and back, in place, keeping float32 storage.

    Buffers stay as they are: non-persistent ones such as the rotary `inv_freq` are
    not saved and get recomputed in float32 on load.
    """
    import torch

    if dtype == torch.float32:
        return
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))


def commit_directory(tmp_dir: Path, dst: Path) -> None:
    """Move the finished `tmp_dir` to `dst`, replacing an existing `dst` only after the new one is complete."""
    old_dir = None
    if dst.exists():
        old_dir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, old_dir / "contents")
    os.rename(tmp_dir, dst)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def check_options(options: ConvertOptions) -> None:
    """Raise LmforgeError for an invalid option before the slow model loading starts."""
    if options.new_token_init not in NEW_TOKEN_INIT_METHODS:
        raise LmforgeError(
            f"invalid --new-token-init {options.new_token_init!r}",
            hint=f"use one of: {', '.join(NEW_TOKEN_INIT_METHODS)}",
        )
    if options.dtype != "auto":
        resolve_dtype(options.dtype)
    if options.max_length is not None and options.max_length <= 0:
        raise LmforgeError(f"invalid --max-length {options.max_length}: expected a positive number of positions")
    if options.chat_template not in (None, "source") and not Path(options.chat_template).is_file():
        raise LmforgeError(
            f"chat template file not found: {options.chat_template}", hint="pass a Jinja file or 'source'"
        )
    if not options.loss_tolerance >= 0:
        raise LmforgeError(f"invalid --loss-tolerance {options.loss_tolerance}: expected a number >= 0")


def convert_model(
    src: str | Path, dst: str | Path, options: ConvertOptions | None = None, source_label: str | None = None
) -> ConvertReport:
    """Convert SRC (HF directory or GGUF file) into the lmforge model directory DST and check it.

    `source_label` replaces the source path in the report, for a SRC in a temporary directory.
    """
    from lmforge.models.model_dir import load_model_dir

    options = options or ConvertOptions()
    src, dst = Path(src), Path(dst)
    started = time.monotonic()
    check_destination(dst, options.force, src)
    check_options(options)
    plan = load_token_plan(options.add_tokens) if options.add_tokens else None

    model, tokenizer, kind, stored_dtype = load_source(src)
    target_dtype = resolve_dtype(stored_dtype if options.dtype == "auto" else options.dtype)
    if target_dtype == "auto":
        raise LmforgeError(f"invalid --dtype {options.dtype!r}")
    round_to_dtype(model, target_dtype)

    logger.info("computing reference logits and loss of the source model")
    reference = take_reference(model, tokenizer)
    vocab_size_before = len(tokenizer)
    source_generation_config = model.generation_config

    changes = []
    embeddings: dict[str, Any] = {}
    if plan is not None:
        changes = apply_token_plan(tokenizer, plan, eos_ids=_eos_list(source_generation_config))
        new_ids = sorted({change.token_id for change in changes if change.added})
        embeddings = resize_for_new_tokens(
            model, len(tokenizer), new_ids, vocab_size_before, options.new_token_init, options.seed
        )
        for change in changes:
            logger.info(
                "token %s id %d %s", change.token, change.token_id, "added" if change.added else "already present"
            )

    template_text, template_description = resolve_chat_template(options.chat_template, tokenizer)
    tokenizer.chat_template = template_text
    check_template_renders(tokenizer, template_description or "source")
    if options.max_length is not None:
        set_max_length(model, tokenizer, options.max_length)
    stop_ids = set_special_ids(model, tokenizer, source_generation_config)

    report = ConvertReport(
        source=source_label or str(src),
        source_kind=kind,
        source_path=None if source_label else str(src.resolve()),
        destination=str(dst),
        dtype=str(target_dtype).replace("torch.", ""),
        vocab_size_before=vocab_size_before,
        vocab_size_after=len(tokenizer),
        tokens=[asdict(change) for change in changes],
        embeddings=embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        stop_token_ids=stop_ids,
        chat_template=template_description if template_text else None,
        max_position_embeddings=getattr(model.config, "max_position_embeddings", None),
    )
    if kind == "gguf":
        report.source_size = src.stat().st_size
        report.source_sha256 = sha256_file(src)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    _apply_umask(tmp_dir)
    try:
        logger.info("writing %s weights to %s", report.dtype, tmp_dir)
        model.to(target_dtype)
        model.save_pretrained(tmp_dir, max_shard_size=options.max_shard_size)
        tokenizer.save_pretrained(tmp_dir)
        del model

        logger.info("reloading the written directory and comparing with the source")
        reloaded, reloaded_tokenizer = load_model_dir(tmp_dir, dtype="float32")
        result = compare_with_reference(reloaded, reloaded_tokenizer, reference, options.loss_tolerance)
        report.check = check_summary(result)
        if not result.ok:
            raise LmforgeError(
                f"converted model failed the check: {'; '.join(result.problems)}",
                hint=f"nothing was written to {dst}",
            )
        report.seconds = round(time.monotonic() - started, 1)
        (tmp_dir / PROVENANCE_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
        for path in tmp_dir.iterdir():
            _apply_umask(path)
        commit_directory(tmp_dir, dst)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %s in %.1f s", dst, report.seconds)
    return report


def _apply_umask(path: Path) -> None:
    """Give `path` the usual permissions: mkdtemp creates 0700 directories and some writers 0600 files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def check_summary(result: CheckResult) -> dict[str, Any]:
    """Return the check numbers as a JSON-ready dict."""
    return {
        "max_abs_logit_diff": result.max_abs_diff,
        "loss_before": result.loss_before,
        "loss_after": result.loss_after,
        "loss_after_source_vocab": result.loss_after_source_vocab,
        "passed": result.ok,
        "problems": result.problems,
    }


def _eos_list(generation_config) -> list[int]:
    value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(item) for item in value]
