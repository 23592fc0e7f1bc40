"""YAML read with the line of every value, for files whose errors must name file:line and the fix
(``pipeline.yaml``, ``environment.yml``). PyYAML's ``compose`` keeps each node's position."""

from __future__ import annotations

import difflib
from typing import Any, Callable

__all__ = ["Node", "compose", "plain", "unknown_keys", "expect", "kind"]

#: builds the error to raise: (file, line or None, message) -> an MlopsError
ErrorFactory = Callable[[str, "int | None", str], Exception]


class Node:
    """A YAML value with the line it starts on (1-based)."""

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line
        self.key_line = line  # for a mapping's value: the line of its key (a step's name)


def compose(text: str, file: str, error: ErrorFactory, empty: str) -> Node:
    import yaml

    try:
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise error(file, mark.line + 1 if mark else None,
                    f"not valid YAML ({problem}); check the indentation and quoting there") from e
    if node is None:
        raise error(file, None, f"the file is empty; {empty}")
    return _convert(node, file, yaml.SafeLoader(""), error)


def _convert(node: Any, file: str, loader: Any, error: ErrorFactory) -> Node:
    import yaml

    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in out:
                raise error(file, key_node.start_mark.line + 1,
                            f"{key!r} appears twice in the same mapping; keep one")
            out[key] = _convert(value_node, file, loader, error)
            out[key].key_line = key_node.start_mark.line + 1
        return Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(v, file, loader, error) for v in node.value], line)
    return Node(loader.construct_object(node, deep=True), line)


def plain(node: Node) -> Any:
    if isinstance(node.value, dict):
        return {k: plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [plain(v) for v in node.value]
    return node.value


# -- checks -------------------------------------------------------------------------------------------


def unknown_keys(mapping: dict[str, Node], known: set[str], where: str, file: str, error: ErrorFactory) -> None:
    for key, value in mapping.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise error(file, value.line, f"{where}: unknown key {key!r}; {hint}")


def expect(node: Node, kinds: tuple[type, ...], what: str, file: str, error: ErrorFactory) -> Any:
    value = node.value
    if isinstance(value, bool) and bool not in kinds:
        value = None
    if not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("dict", "mapping").replace("str", "text") for k in kinds)
        raise error(file, node.line, f"{what} must be {names}, not {kind(node.value)}")
    return value


def kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false", int: "a number",
            float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)
