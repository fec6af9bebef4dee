"""The `ns` namespace that templates share, with command-line overrides that later sets cannot change."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from jinja2.utils import Namespace

from lmforge.errors import LmforgeError

_KEY_RE = re.compile(r"^ns\.([A-Za-z_][A-Za-z0-9_]*)$")


class PinnedNamespace(Namespace):
    """A Jinja namespace whose pinned keys keep their value when a template assigns them.

    Command-line overrides are pinned before rendering, so `--set ns.lr=...` beats every
    template assignment. Between templates, the later assignment wins: a child block that
    calls `super()` and then sets a key replaces the parent's value. So parents compute
    derived values in a block that runs after the blocks children override. The namespace
    records every key a template reads or assigns, so the loader can reject an override key
    that no template uses.
    """

    def __init__(self, pinned: Mapping[str, Any] | None = None):
        super().__init__(dict(pinned or {}))
        object.__setattr__(self, "_pinned_keys", frozenset(pinned or {}))
        object.__setattr__(self, "_used_keys", set())

    def __getattribute__(self, name: str) -> Any:
        if name in {"_pinned_keys", "_used_keys"}:
            return object.__getattribute__(self, name)
        if not name.startswith("__") and name != "_Namespace__attrs":
            object.__getattribute__(self, "_used_keys").add(name)
        return super().__getattribute__(name)

    def __setitem__(self, name: str, value: Any) -> None:
        object.__getattribute__(self, "_used_keys").add(name)
        if name in object.__getattribute__(self, "_pinned_keys"):
            return
        super().__setitem__(name, value)

    def to_dict(self) -> dict[str, Any]:
        """Return the final values as a plain dict."""
        return dict(object.__getattribute__(self, "_Namespace__attrs"))

    def used_keys(self) -> set[str]:
        """Return the keys that templates read or assigned."""
        return set(object.__getattribute__(self, "_used_keys"))


# Jinja looks up `ns.to_dict` through __getattribute__, so the helpers are reached through the class.
def namespace_values(namespace: PinnedNamespace) -> dict[str, Any]:
    """Return the namespace's final values."""
    return PinnedNamespace.to_dict(namespace)


def namespace_used_keys(namespace: PinnedNamespace) -> set[str]:
    """Return the keys that templates read or assigned."""
    return PinnedNamespace.used_keys(namespace)


def parse_scalar(text: str) -> Any:
    """Parse an override value as a YAML scalar; `1e6` becomes the int 1000000 and `1E-4` a float.

    `[...]` and `{...}` give a list or dict. Any other text that YAML would read as a mapping
    or cut at a ` #` comment (a path like `data: x`, `a #1`) stays the text as written.
    """
    stripped = text.strip()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (list, dict)) and not stripped.startswith(("[", "{")):
        return text
    if isinstance(value, str) and not stripped.startswith(("'", '"')) and value != stripped:
        return text
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number) and value.strip().lower() not in {"nan", "inf", "-inf", "+inf", "infinity"}:
            # `1e9` (an exponent, no dot, a whole number) is a count such as a token budget: an int.
            return int(number) if number.is_integer() and "." not in value else number
    return value


def parse_overrides(sets: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Turn `["ns.key=value", ...]` or `{"ns.key": value}` into `{key: value}` for the namespace."""
    if isinstance(sets, Mapping):
        items = [(str(key), value, False) for key, value in sets.items()]
    else:
        items = []
        for entry in sets:
            if "=" not in entry:
                raise LmforgeError(
                    f"invalid override {entry!r}: expected KEY=VALUE",
                    hint="write it as --set ns.total_tokens=1000000",
                )
            key, _, text = entry.partition("=")
            items.append((key.strip(), text, True))

    overrides: dict[str, Any] = {}
    for key, value, is_text in items:
        match = _KEY_RE.match(key)
        if match is None:
            raise LmforgeError(
                f"invalid override key {key!r}: override keys have the form ns.NAME",
                hint=f"write --set ns.{key.removeprefix('ns.') or 'NAME'}=VALUE",
            )
        overrides[match.group(1)] = parse_scalar(value) if is_text else value
    return overrides


def check_override_keys(overrides: Mapping[str, Any], used: set[str], config_name: str) -> None:
    """Raise LmforgeError for an override key that no template reads or assigns, naming the closest keys."""
    for key in overrides:
        if key in used:
            continue
        close = difflib.get_close_matches(key, sorted(used), n=3, cutoff=0.6)
        if close:
            hint = "did you mean " + ", ".join(f"ns.{name}" for name in close) + "?"
        else:
            known = ", ".join(f"ns.{name}" for name in sorted(used)) or "(none)"
            hint = f"keys this config uses: {known}"
        raise LmforgeError(f"override key ns.{key} is not used by config {config_name}", hint=hint)
