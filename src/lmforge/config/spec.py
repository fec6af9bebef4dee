"""Resolve a `!call` SPEC (`module.path:attr.attr`, a builtin name, or `path/to/file.py:attr`) to a Python object."""

from __future__ import annotations

import builtins
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

# A file imported by path gets a module name made of this prefix, its stem and a hash of its
# absolute path, so two files with the same stem (two `utils.py`) never replace each other.
_PATH_MODULE_PREFIX = "lmforge_config_file"


def resolve_spec(spec: str, base_dir: Path | None = None) -> Any:
    """Import and return the object SPEC names; raise LmforgeError with the fix if that fails."""
    if ":" not in spec:
        if hasattr(builtins, spec):
            return getattr(builtins, spec)
        raise LmforgeError(
            f"{spec!r} is not a builtin name",
            hint="write module.path:attr (e.g. torch.nn:Linear) or path/to/file.py:attr",
        )
    module_part, _, attr_path = spec.rpartition(":")
    if not attr_path or not module_part:
        raise LmforgeError(f"invalid import spec {spec!r}", hint="write module.path:attr or path/to/file.py:attr")
    if module_part.endswith(".py") or "/" in module_part:
        module = import_file(module_part, base_dir)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            raise LmforgeError(
                f"cannot import {spec!r}: module {exc.name!r} not found",
                hint="check the module path, or install the package that provides it",
            ) from exc
    target: Any = module
    walked = []
    for attr in attr_path.split("."):
        walked.append(attr)
        try:
            target = getattr(target, attr)
        except AttributeError as exc:
            raise LmforgeError(
                f"cannot import {spec!r}: {module_part} has no attribute {'.'.join(walked)!r}",
                hint=_attribute_hint(target, attr),
            ) from exc
    return target


def _attribute_hint(owner: Any, attr: str) -> str | None:
    import difflib

    names = [name for name in dir(owner) if not name.startswith("_")]
    close = difflib.get_close_matches(attr, names, n=3)
    return f"did you mean {', '.join(close)}?" if close else None


def import_file(path_text: str, base_dir: Path | None = None) -> Any:
    """Import a Python file by path under a module name derived from its absolute path."""
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    path = path.resolve()
    if not path.is_file():
        raise LmforgeError(
            f"cannot import {path_text!r}: file {path} not found",
            hint="relative file specs are resolved from the project directory; use an absolute path or joinpath()",
        )
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"{_PATH_MODULE_PREFIX}_{path.stem}_{digest}"
    module = sys.modules.get(module_name)
    if module is not None and getattr(module, "__file__", None) == str(path):
        return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise LmforgeError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
