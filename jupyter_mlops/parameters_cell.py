"""The notebook's cell tagged ``parameters``: found and parsed in one place, for every reader.

The pipeline loader checks ``-p`` values against it, the runner tells the step's kernel its
defaults, and ``%mlops track`` records them. One parser, so the three never disagree about which
names a notebook declares or what their defaults are.

A default is either a Python literal (``lr = 0.1``, ``layers = [64, 64]``) or an expression that
only the kernel can evaluate (``k = 2 * 3``, ``home = os.path.join("a", "b")``). The second kind
is :data:`NOT_LITERAL` here: its value is unknown until the cell runs, so it is never injected
(papermill's rule: inject only what the caller set) and a caller's value of any kind may replace it.

Standard library only, and no nbformat (a tenth of a second to import): the kernel side imports
this module, and a no-op pipeline re-run reads every step's notebook.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["NOT_LITERAL", "Parameter", "parse_assignments", "parameters_source", "read_notebook",
           "notebook_parameters"]

TAG = "parameters"


class _NotLiteral:
    """The value of a default only the kernel can compute."""

    _instance: _NotLiteral | None = None

    def __new__(cls) -> _NotLiteral:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_LITERAL"

    def __reduce__(self) -> str:
        return "NOT_LITERAL"


#: The value of a default that is an expression, not a literal.
NOT_LITERAL: Any = _NotLiteral()


@dataclass(frozen=True)
class Parameter:
    """One assignment of a parameters cell: its value (or :data:`NOT_LITERAL`) and its source text."""

    value: Any
    source: str

    @property
    def literal(self) -> bool:
        return self.value is not NOT_LITERAL

    @property
    def text(self) -> str:
        """As a run records it: a literal as MLflow stringifies it (text as is), else the expression."""
        if not self.literal:
            return self.source
        return self.value if isinstance(self.value, str) else str(self.value)


def parse_assignments(source: str, *, only_assignments: bool = False) -> dict[str, Parameter] | None:
    """``name -> Parameter`` for each ``name = ...`` / ``name: T = ...`` at the top of ``source``.

    Other statements (imports, tuple targets) are skipped, or make the result None when
    ``only_assignments`` (how a cell of a kernel's history is recognised as a parameters cell).
    Raises ``SyntaxError`` when ``source`` is not valid Python.
    """
    tree = ast.parse(source)
    found: dict[str, Parameter] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            targets, value = node.targets, node.value
        elif only_assignments:
            return None
        else:
            continue
        text = ast.get_source_segment(source, value) or ""
        try:
            parsed = Parameter(ast.literal_eval(value), text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            parsed = Parameter(NOT_LITERAL, text)
        for target in targets:
            found[target.id] = parsed  # type: ignore[attr-defined]
    return found


def parameters_source(notebook: Mapping[str, Any]) -> str | None:
    """The source of the first code cell tagged ``parameters`` (a notebook as a JSON dict), or None."""
    for cell in notebook.get("cells") or []:
        if not isinstance(cell, Mapping) or cell.get("cell_type") != "code":
            continue
        tags = (cell.get("metadata") or {}).get("tags") or []
        if TAG in tags:
            source = cell.get("source", "")
            return "".join(source) if isinstance(source, list) else str(source)
    return None


def read_notebook(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A notebook file as its JSON dict. Raises ``OSError``, or ``ValueError`` when it is not a
    notebook (not JSON, or no list of cells)."""
    with open(path, encoding="utf-8") as f:
        notebook = json.load(f)
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        raise ValueError("no list of cells: not a .ipynb notebook")
    return notebook


def notebook_parameters(notebook: Mapping[str, Any]) -> dict[str, Parameter]:
    """The parameters cell of ``notebook`` parsed; empty when it has none.
    Raises ``SyntaxError`` when the cell is not valid Python."""
    source = parameters_source(notebook)
    if source is None:
        return {}
    return parse_assignments(source) or {}
