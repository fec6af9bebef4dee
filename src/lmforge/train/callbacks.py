"""Trainer callbacks: the `trainer_logs.json` writer, TensorBoard events, eval text generation.

The trainer calls every callback on every rank; the built-in ones write only on the
main process. A config adds its own through `Trainer(callbacks=[...])` by
subclassing `TrainerCallback` and overriding the hooks it needs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from lmforge.train.trainer import Trainer

logger = logging.getLogger(__name__)


class TrainerCallback:
    """Hooks that the trainer calls on every rank; all default to doing nothing."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", loss: float) -> None:
        """Called after each optimizer step; `trainer.global_step` is the step just completed."""

    def on_log(self, trainer: "Trainer", record: dict) -> None: ...

    def on_evaluate(self, trainer: "Trainer", eval_loss: float) -> None: ...

    def on_save(self, trainer: "Trainer", checkpoint: Path) -> None: ...

    def on_train_end(self, trainer: "Trainer", record: dict) -> None: ...


class JsonLogWriter:
    """Writes `trainer_logs.json`: a JSON array that is valid after every close and readable while open.

    The file is `[\\n`, then records separated by `,\\n`, then `\\n]` at close. While a
    run is alive the closing bracket is missing; readers (and `read_json_log`) add it.

    Resume behaviour: `open(resume_step=S)` reads the existing file. It tolerates a
    missing closing bracket and a half-written last record, which a crash leaves, and
    keeps the original as `trainer_logs.json.bak` when it had to repair it. It then
    drops every record whose `global_step` is above S, rewrites the rest and
    continues appending. The writer holds no state beyond the open file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None
        self._count = 0

    def open(self, resume_step: Optional[int] = None) -> None:
        kept: list[dict] = []
        if resume_step is not None and self.path.exists():
            records, repaired = read_json_log(self.path, with_status=True)
            if repaired:
                backup = self.path.with_name(self.path.name + ".bak")
                backup.write_bytes(self.path.read_bytes())
                logger.warning("Repaired %s after an unclean exit; the original is kept as %s", self.path, backup)
            kept = [record for record in records if record.get("global_step", 0) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as out:
            out.write("[\n" + ",\n".join(json.dumps(record) for record in kept))
        tmp.replace(self.path)
        self._file = open(self.path, "a")
        self._count = len(kept)

    def write(self, record: dict) -> None:
        separator = ",\n" if self._count else ""
        self._file.write(separator + json.dumps(_json_safe(record)))
        self._file.flush()
        self._count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.write("\n]\n")
            self._file.close()
            self._file = None


def _json_safe(record: dict) -> dict:
    """Replace NaN and infinities (not valid JSON) by their string names."""
    return {key: (str(value) if isinstance(value, float) and not math.isfinite(value) else value) for key, value in record.items()}


def read_json_log(path: str | Path, with_status: bool = False):
    """Return the records of a `trainer_logs.json`, complete or cut off by a crash.

    With `with_status=True`, returns (records, repaired) where `repaired` is True
    when the file lacked its closing bracket or ended in a half-written record.
    """
    text = Path(path).read_text()
    try:
        records = json.loads(text)
        return (records, False) if with_status else records
    except json.JSONDecodeError:
        pass
    body = text.strip()
    if body.startswith("["):
        body = body[1:]
    if body.endswith("]"):
        body = body[:-1]
    records = []
    decoder = json.JSONDecoder()
    index = 0
    while index < len(body):
        while index < len(body) and body[index] in " \n\r\t,":
            index += 1
        if index >= len(body):
            break
        try:
            record, index = decoder.raw_decode(body, index)
        except json.JSONDecodeError:
            break  # half-written last record
        records.append(record)
    return (records, True) if with_status else records


class TensorBoardLogger:
    """Writes scalars and text to TensorBoard event files in the run directory (main process only).

    On resume, events after the checkpoint's step are discarded (`purge_step`).
    """

    def __init__(self, log_dir: str | Path, resume_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        purge_step = resume_step + 1 if resume_step else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        # TensorBoard renders text as Markdown; indenting by 4 spaces shows it verbatim.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def load_prompts(path: str | Path) -> tuple[str, list[dict]]:
    """Read a prompts YAML file and return (format, prompts).

    Format `chatml`: each prompt has `name`, optional `system`, and `user`; it is
    rendered with the tokenizer's chat template. Format `raw`: each prompt has
    `name` and `text`, continued as plain text.
    """
    import yaml

    from lmforge.errors import LmforgeError

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"eval prompts file {path} not found", hint="set ns.eval_prompts_file to a prompts YAML file, or to null to skip generation (--set ns.eval_prompts_file=null)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list):
        raise LmforgeError(f"eval prompts file {path} has no `prompts:` list", hint="see prompts/open_orca_eval.yaml for the format")
    prompt_format = data.get("format", "chatml")
    if prompt_format not in ("chatml", "raw"):
        raise LmforgeError(f"eval prompts file {path}: format {prompt_format!r} is invalid", hint="use `format: chatml` or `format: raw`")
    key = "user" if prompt_format == "chatml" else "text"
    for number, prompt in enumerate(data["prompts"], 1):
        if not isinstance(prompt, dict) or key not in prompt:
            raise LmforgeError(f"eval prompts file {path}: prompt {number} has no `{key}:` field")
    return prompt_format, data["prompts"]


class TextGenerationCallback(TrainerCallback):
    """At each evaluation, generates a response to every prompt and logs it.

    Decoding is greedy, so responses are comparable across evals and the RNG state
    is untouched. Generation stops at the tokenizer's EOS or turn-closing token
    (`<|im_end|>`) or after `max_new_tokens`. Responses go to TensorBoard (text,
    tag `eval_generations/NAME`) and to `eval_generations.jsonl` in the run
    directory. State: none; the prompts come from the constructor.
    """

    def __init__(self, prompts_file: str | Path, max_new_tokens: int = 128):
        self.prompts_file = Path(prompts_file)
        self.max_new_tokens = max_new_tokens
        self.prompt_format, self.prompts = load_prompts(self.prompts_file)

    def _encode(self, tokenizer, prompt: dict):
        if self.prompt_format == "raw":
            return tokenizer(prompt["text"], return_tensors="pt")["input_ids"]
        messages = []
        if prompt.get("system"):
            messages.append({"role": "system", "content": prompt["system"]})
        messages.append({"role": "user", "content": prompt["user"]})
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return encoded["input_ids"]

    def on_evaluate(self, trainer: "Trainer", eval_loss: float) -> None:
        model = trainer.backend.generation_model()
        if not trainer.is_main_process or model is None:
            return
        import torch

        from lmforge.models.stop_tokens import stop_token_ids

        stop_ids = stop_token_ids(trainer.tokenizer, getattr(model, "generation_config", None))
        pad_id = trainer.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = stop_ids[0] if stop_ids else 0
        was_training = model.training
        model.eval()
        out_path = trainer.run_dir / "eval_generations.jsonl"
        started = time.time()
        logger.info(
            "Step %d: generating %d eval responses (at most %d tokens each); set ns.eval_prompts_file=null to skip",
            trainer.global_step, len(self.prompts), self.max_new_tokens,
        )
        try:
            with open(out_path, "a") as out, torch.no_grad(), trainer.backend.autocast():
                for number, prompt in enumerate(self.prompts):
                    input_ids = self._encode(trainer.tokenizer, prompt).to(trainer.backend.device)
                    output = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        eos_token_id=stop_ids,
                        pad_token_id=pad_id,
                    )
                    new_tokens = output[0, input_ids.shape[1]:].tolist()
                    stopped = bool(new_tokens) and new_tokens[-1] in stop_ids
                    response = trainer.tokenizer.decode(new_tokens, skip_special_tokens=True)
                    name = prompt.get("name", f"prompt_{number}")
                    record = {
                        "global_step": trainer.global_step,
                        "name": name,
                        "response": response,
                        "num_tokens": len(new_tokens),
                        "stopped": stopped,
                    }
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    if trainer.tensorboard is not None:
                        trainer.tensorboard.log_text(f"eval_generations/{name}", response, trainer.global_step)
                    logger.info(
                        "Eval response %d/%d (%s): %d tokens, %s, %.1f s so far",
                        number + 1, len(self.prompts), name, len(new_tokens),
                        "stopped at a stop token" if stopped else "hit max_new_tokens", time.time() - started,
                    )
        finally:
            model.train(was_training)
        logger.info(
            "Generated %d eval responses at step %d in %.1f s; written to %s",
            len(self.prompts), trainer.global_step, time.time() - started, out_path,
        )
