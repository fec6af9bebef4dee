"""Read the examples of docs/templates.md so a test can render each one and compare the output.

A fenced block whose info string has `example=NAME file=PATH` adds a file to example NAME,
and the first `configs/...` file is the config to load. A block with `example=NAME output`
contains the expected preprocessed YAML, one with `example=NAME construct=TARGET` the expected
`pprint.pformat` of that target, and one with `example=NAME error` text that the load error
must contain. `set=KEY=VALUE,...`
on an output or error block gives the overrides to load with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_FENCE_RE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


@dataclass
class DocExample:
    name: str
    files: dict[str, str] = field(default_factory=dict)
    output: str | None = None
    constructs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    output_sets: list[str] = field(default_factory=list)
    """Overrides to load with when checking `output`, from `set=ns.a=1,ns.b=2` in its info string."""
    error_sets: list[str] = field(default_factory=list)

    @property
    def config(self) -> str:
        return next(path for path in self.files if path.startswith("configs/")).removeprefix("configs/")


def read_examples(markdown: str) -> dict[str, DocExample]:
    examples: dict[str, DocExample] = {}
    for match in _FENCE_RE.finditer(markdown):
        words = match.group("info").split()
        options = dict(word.split("=", 1) if "=" in word else (word, "") for word in words[1:])
        if "example" not in options:
            continue
        example = examples.setdefault(options["example"], DocExample(options["example"]))
        body = match.group("body")
        sets = options["set"].split(",") if options.get("set") else []
        if "file" in options:
            example.files[options["file"]] = body
        elif "output" in options:
            example.output = body
            example.output_sets = sets
        elif "construct" in options:
            example.constructs[options["construct"]] = body
        elif "error" in options:
            example.error = body.strip()
            example.error_sets = sets
    return examples


def write_example(example: DocExample, root: Path) -> Path:
    """Write the example's files into a fresh project under ROOT and return the project directory."""
    project = root / example.name
    project.mkdir(parents=True)
    (project / "meta.yaml").write_text(f"name: {example.name}\n")
    for relative, text in example.files.items():
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return project
