"""A YAML loader whose tags build graph nodes (see graph.py) instead of Python objects.

    !call:SPEC[@name]      alias !singleton:SPEC; one object per construct call, however often referenced
    !factory:SPEC[@name]   a new object at each reference
    !partial:SPEC[@name]   functools.partial(SPEC, *args, **kwargs)
    !var NAME | !var {name: NAME, default: VALUE}
    !dict, !list, !tuple, !dlist (each also with an optional @name suffix)

Arguments of `!call`/`!factory`/`!partial` are a sequence (positional), a mapping (keyword),
a non-empty scalar (one positional argument) or nothing. In a mapping, an `args:` entry with
a plain sequence adds positional arguments, a `kwargs:` entry with a plain mapping adds
keyword arguments, and `argN` keys are positional arguments sorted by N.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from lmforge.config.graph import CallNode, ContainerNode, VarNode
from lmforge.errors import LmforgeError

_ARG_KEY_RE = re.compile(r"^arg(\d+)$")
_CALL_MODES = {"call": "call", "singleton": "call", "factory": "factory", "partial": "partial"}


class GraphLoader(yaml.SafeLoader):
    """SafeLoader plus the lmforge tags."""


class TagError(LmforgeError):
    """An invalid use of an lmforge tag, at `line` of the preprocessed YAML."""

    def __init__(self, message: str, line: int, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.line = line


TAG_NAMES = ["!call:SPEC", "!singleton:SPEC", "!factory:SPEC", "!partial:SPEC", "!var", "!dict", "!list",
             "!tuple", "!dlist"]


def _split_name(suffix: str) -> tuple[str, str | None]:
    if "@" in suffix:
        spec, _, name = suffix.rpartition("@")
        return spec, name or None
    return suffix, None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _tag_error(node: yaml.Node, message: str, hint: str | None = None) -> TagError:
    return TagError(f"line {_line(node)} of the preprocessed YAML: {message}", _line(node), hint=hint)


def _call_constructor(mode: str):
    def construct(loader: GraphLoader, suffix: str, node: yaml.Node) -> CallNode:
        spec, name = _split_name(suffix)
        tag = f"!{mode}:{suffix}"
        if not spec:
            raise _tag_error(node, f"{tag} has no import spec", hint=f"write !{mode}:module.path:attr")
        args, kwargs = _arguments(loader, node, tag)
        return CallNode(spec=spec, mode=_CALL_MODES[mode], args=args, kwargs=kwargs, name=name, line=_line(node))

    return construct


def _arguments(loader: GraphLoader, node: yaml.Node, tag: str) -> tuple[list[Any], dict[str, Any]]:
    if isinstance(node, yaml.SequenceNode):
        return list(loader.construct_sequence(node, deep=True)), {}
    if isinstance(node, yaml.ScalarNode):
        if node.value == "":
            return [], {}
        return [loader.construct_object(yaml.ScalarNode(_resolve_plain(loader, node), node.value,
                                                         node.start_mark, node.end_mark, node.style), deep=True)], {}
    mapping = _ordered_pairs(loader, node)
    args: list[Any] = []
    numbered: list[tuple[int, Any]] = []
    kwargs: dict[str, Any] = {}
    for key, value in mapping:
        # `args:` and `kwargs:` hold argument lists only when the value is a plain sequence or
        # mapping. With any other value (e.g. a tagged node) they are keyword arguments.
        if key == "args" and type(value) is list:
            args.extend(value)
        elif key == "kwargs" and type(value) is dict:
            kwargs.update(value)
        elif isinstance(key, str) and _ARG_KEY_RE.match(key):
            numbered.append((int(_ARG_KEY_RE.match(key).group(1)), value))
        else:
            if not isinstance(key, str):
                raise _tag_error(node, f"{tag}: keyword argument names must be strings, got {key!r}")
            kwargs[key] = value
    args.extend(value for _, value in sorted(numbered, key=lambda item: item[0]))
    return args, kwargs


def _resolve_plain(loader: GraphLoader, node: yaml.ScalarNode) -> str:
    """Return the implicit tag a scalar would have without the explicit tag (int, float, bool, str...)."""
    if node.style:
        return "tag:yaml.org,2002:str"
    return loader.resolve(yaml.ScalarNode, node.value, (True, False))


def _ordered_pairs(loader: GraphLoader, node: yaml.MappingNode) -> list[tuple[Any, Any]]:
    loader.flatten_mapping(node)
    return [
        (loader.construct_object(key_node, deep=True), loader.construct_object(value_node, deep=True))
        for key_node, value_node in node.value
    ]


def _var_constructor(loader: GraphLoader, node: yaml.Node) -> VarNode:
    if isinstance(node, yaml.ScalarNode):
        if not node.value:
            raise _tag_error(node, "!var has no variable name", hint="write !var NAME or !var {name: NAME, default: VALUE}")
        return VarNode(var_name=node.value, line=_line(node))
    if isinstance(node, yaml.MappingNode):
        fields = dict(_ordered_pairs(loader, node))
        unknown = set(fields) - {"name", "default"}
        if "name" not in fields or unknown:
            raise _tag_error(
                node,
                f"invalid !var mapping with keys {sorted(map(str, fields))}",
                hint="write !var {name: NAME} or !var {name: NAME, default: VALUE}",
            )
        return VarNode(var_name=str(fields["name"]), default=fields.get("default"),
                       has_default="default" in fields, line=_line(node))
    raise _tag_error(node, "!var takes a name or a mapping, not a sequence")


def _container_constructor(kind: str):
    def construct(loader: GraphLoader, suffix: str, node: yaml.Node) -> ContainerNode:
        name = suffix[1:] if suffix.startswith("@") else None
        if suffix and name is None:
            raise _tag_error(node, f"unknown tag !{kind}{suffix}", hint=f"write !{kind} or !{kind}@NAME")
        if kind in ("list", "tuple"):
            if not isinstance(node, yaml.SequenceNode):
                raise _tag_error(node, f"!{kind} takes a sequence")
            items: Any = list(loader.construct_sequence(node, deep=True))
        else:
            if not isinstance(node, yaml.MappingNode):
                raise _tag_error(node, f"!{kind} takes a mapping")
            items = {}
            for key, value in _ordered_pairs(loader, node):
                if kind == "dlist" and value is None:
                    # `key: ~` deletes an item that an earlier (parent) entry declared.
                    items.pop(key, None)
                else:
                    items[key] = value
        return ContainerNode(kind=kind, items=items, name=name, line=_line(node))

    return construct


for _mode in _CALL_MODES:
    GraphLoader.add_multi_constructor(f"!{_mode}:", _call_constructor(_mode))
for _kind in ("dict", "list", "tuple", "dlist"):
    GraphLoader.add_multi_constructor(f"!{_kind}", _container_constructor(_kind))
GraphLoader.add_constructor("!var", _var_constructor)


def parse_graph(text: str) -> Any:
    """Parse preprocessed YAML into plain data and graph nodes."""
    return yaml.load(text, Loader=GraphLoader)  # noqa: S506 - GraphLoader is a SafeLoader subclass
