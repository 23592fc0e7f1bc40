"""A step's parameters: checked against its notebook's parameters cell, and resolved.

Every name set by the pipeline, the step, the matrix or ``-p`` must be one the notebook's cell
declares, with a value of the same kind as its default (any kind where the default is an
expression). A step's ``parameters`` end up holding only what was set, strongest last: the
pipeline's, the step's and the matrix value, then ``-p``; papermill injects those and the cell
computes the rest, as it does without us.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .._yaml import Node
from .._yaml import kind as _kind
from ..errors import PipelineSpecError
from ..parameters_cell import NOT_LITERAL

if TYPE_CHECKING:
    from .spec import PipelineSpec, StepSpec

__all__ = ["check_parameters", "resolve_parameters"]


def _same_kind(default: Any, value: Any) -> bool:
    if default is None or default is NOT_LITERAL or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return not (isinstance(default, int) and isinstance(value, float) and not value.is_integer())
    return type(default) is type(value) or (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)))


def check_parameters(step: StepSpec, given: Mapping[str, Any], source: str, file: str, line: int | None) -> None:
    """Raises :class:`PipelineSpecError` at ``file:line`` for a name of ``given`` that ``step``'s
    notebook does not declare, or a value of another kind than its default; ``source`` says who
    set it (its, matrix, pipeline, -p)."""
    if not given:
        return
    defaults = step.defaults
    for name, value in given.items():
        if name not in defaults:
            declared = ", ".join(sorted(defaults)) or "none (tag a cell 'parameters')"
            raise PipelineSpecError(file, line, f"step {step.name}: {source} parameter {name!r} is not in "
                                    f"{step.notebook.name}'s parameters cell (it declares: {declared})")
        if not _same_kind(defaults[name], value):
            raise PipelineSpecError(file, line, f"step {step.name}: {source} parameter {name!r} is "
                                    f"{_kind(value)} ({value!r}), but its default is {_kind(defaults[name])} "
                                    f"({defaults[name]!r})")


def resolve_parameters(spec: PipelineSpec, overrides: dict[str, Any], shown: str, top: dict[str, Node]) -> None:
    """Set each step's ``parameters`` to the values set for it (see the module's docstring).

    Raises :class:`PipelineSpecError` for a ``-p`` naming no step or no declared parameter, a
    pipeline parameter no step declares, or a value of the wrong kind.
    """
    declared: set[str] = set()
    for step in spec.steps.values():
        declared.update(step.defaults)
    bases = {s.base for s in spec.steps.values()}
    for name in overrides:
        step_part, _, param = name.rpartition(".")
        if step_part and step_part not in bases and step_part not in spec.steps:
            raise PipelineSpecError(shown, None, f"-p {name}: no step {step_part!r} (steps: {', '.join(sorted(bases))})")
        if param not in declared:
            raise PipelineSpecError(shown, None, f"-p {name}: no step's notebook declares {param!r} in its parameters cell")
    pipeline_line = top["parameters"].line if "parameters" in top else None
    for step in spec.steps.values():
        from_pipeline = {k: v for k, v in spec.parameters.items() if k in step.defaults}
        check_parameters(step, from_pipeline, "pipeline", shown, pipeline_line)
        from_cli = {}
        for name, value in overrides.items():
            step_part, _, param = name.rpartition(".")
            if param in step.defaults and step_part in ("", step.base, step.name):
                from_cli[param] = value
        check_parameters(step, from_cli, "-p", shown, None)
        # only what is set: papermill injects these, the cell computes the rest itself
        step.parameters = {**from_pipeline, **step.parameters, **from_cli}
    unused = [k for k in spec.parameters if k not in declared]
    if unused:
        raise PipelineSpecError(shown, pipeline_line, f"pipeline parameter {unused[0]!r} is declared by no step's notebook")
