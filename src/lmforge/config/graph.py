"""The lazy object graph that YAML tags build, and its construction.

Parsing a config builds nodes only; `construct(node, variables)` walks the sub-graph of one
target and builds fresh objects on every call. Within one call, a node reached twice
(a YAML alias of an anchored node) is built once, except `!factory` nodes, which build a
new object at each reference. Nothing is cached on the nodes, so constructing the same
config twice gives two independent sets of objects.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


@dataclass(eq=False)
class Node:
    """Base class of graph nodes; `line` is the 1-based line in the preprocessed YAML."""

    line: int = field(default=0, kw_only=True)
    name: str | None = field(default=None, kw_only=True)
    """The optional `@name` given in the tag."""


@dataclass(eq=False)
class CallNode(Node):
    """`!call`/`!singleton` (mode "call"), `!factory` (mode "factory") or `!partial` (mode "partial")."""

    spec: str
    mode: str
    args: list[Any]
    kwargs: dict[str, Any]

    @property
    def tag(self) -> str:
        return f"!{self.mode}:{self.spec}" + (f"@{self.name}" if self.name else "")


@dataclass(eq=False)
class VarNode(Node):
    """`!var name` or `!var {name: x, default: y}`: a value given to `Config.construct`."""

    var_name: str
    default: Any = None
    has_default: bool = False


@dataclass(eq=False)
class ContainerNode(Node):
    """`!dict`, `!list`, `!tuple` or `!dlist` (a mapping built into the list of its values)."""

    kind: str
    items: Any


class ConstructError(LmforgeError):
    """A failure while building a node; the message names the node's path from the target."""


@dataclass
class _Builder:
    variables: dict[str, Any]
    base_dir: Path | None
    locate: Any  # callable(preprocessed line) -> str describing the source location
    memo: dict[int, Any] = field(default_factory=dict)
    """Objects built in this call, keyed by the id of their node, so a node referenced twice is built once."""

    def build(self, value: Any, path: str) -> Any:
        if isinstance(value, CallNode) and value.mode == "factory":
            return self._build_call(value, path)
        key = id(value)
        if isinstance(value, (Node, dict, list)) and key in self.memo:
            return self.memo[key]
        if isinstance(value, CallNode):
            result = self._build_call(value, path)
        elif isinstance(value, VarNode):
            result = self._build_var(value, path)
        elif isinstance(value, ContainerNode):
            result = self._build_container(value, path)
        elif isinstance(value, dict):
            result = {
                k: self.build(v, f"{path}.{k}") for k, v in value.items() if not _is_definition_key(k)
            }
        elif isinstance(value, list):
            result = [self.build(v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            return value
        self.memo[key] = result
        return result

    def _build_call(self, node: CallNode, path: str) -> Any:
        from lmforge.config.spec import resolve_spec

        try:
            target = resolve_spec(node.spec, self.base_dir)
        except LmforgeError as exc:
            raise ConstructError(
                f"{exc.message} (in {node.tag} at {path}, {self.locate(node.line)})", hint=exc.hint
            ) from exc
        args = [self.build(v, f"{path}[{i}]") for i, v in enumerate(node.args)]
        kwargs = {k: self.build(v, f"{path}.{k}") for k, v in node.kwargs.items() if not _is_definition_key(k)}
        if node.mode == "partial":
            return functools.partial(target, *args, **kwargs)
        try:
            return target(*args, **kwargs)
        except ConstructError:
            raise
        except LmforgeError as exc:
            raise ConstructError(
                f"{exc.message} (in {node.tag} at {path}, {self.locate(node.line)})", hint=exc.hint
            ) from exc
        except Exception as exc:
            raise ConstructError(
                f"constructing {node.tag} at {path} ({self.locate(node.line)}) failed: "
                f"{type(exc).__name__}: {exc}",
                hint="rerun with --debug for the traceback",
            ) from exc

    def _build_var(self, node: VarNode, path: str) -> Any:
        if node.var_name in self.variables:
            return self.variables[node.var_name]
        if node.has_default:
            return self.build(node.default, path)
        passed = ", ".join(sorted(self.variables)) or "none"
        raise ConstructError(
            f"variable {node.var_name!r} is not set (!var at {path}, {self.locate(node.line)})",
            hint=f"pass it to construct({node.var_name}=...), or give the !var a default; variables given: {passed}",
        )

    def _build_container(self, node: ContainerNode, path: str) -> Any:
        if node.kind == "dict":
            return {k: self.build(v, f"{path}.{k}") for k, v in node.items.items() if not _is_definition_key(k)}
        if node.kind == "list":
            return [self.build(v, f"{path}[{i}]") for i, v in enumerate(node.items)]
        if node.kind == "tuple":
            return tuple(self.build(v, f"{path}[{i}]") for i, v in enumerate(node.items))
        # dlist: the values of an ordered mapping whose deleted keys were already dropped at parse time
        return [self.build(v, f"{path}.{k}") for k, v in node.items.items() if not _is_definition_key(k)]


def _is_definition_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(".")


def construct(value: Any, path: str, variables: dict[str, Any], base_dir: Path | None, locate) -> Any:
    """Build the objects of one sub-graph; `path` names its root in error messages."""
    builder = _Builder(variables=dict(variables), base_dir=base_dir, locate=locate)
    return builder.build(value, path)
