"""``pipeline.yaml``: what it may say, and the checks that make a bad one fail before anything runs.

```yaml
name: iris                      # optional; default: the file's folder name
parameters: {seed: 0}           # pipeline parameters: reach every step whose notebook declares them
schedule: "0 3 * * 1"           # optional cron
workers: 2                      # steps run at once (default 2)
steps:
  features:
    notebook: features.ipynb    # relative to this file
    parameters: {test_size: 0.3}
    outputs: [data/train.csv]
  train:
    notebook: train.ipynb
    matrix: {model: [random_forest, gradient_boosting]}   # one step per value: train[model=...]
    inputs: [data/train.csv]
    outputs: ["models/{model}.pkl"]                         # {name} takes the matrix value
    retries: 1
    timeout: 600                # seconds
```
A parameter's value, from weakest to strongest: the notebook's ``parameters`` cell, the pipeline's
``parameters``, the step's ``parameters``, the matrix value, then ``-p name=value`` on the command
line (``-p step.name=value`` for one step). Every name must be one the notebook's parameters cell
declares, with a value of the same kind as its default.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import PipelineSpecError

__all__ = ["PipelineSpec", "StepSpec", "load_pipeline"]

PIPELINE_KEYS = {"name", "parameters", "schedule", "workers", "steps"}
STEP_KEYS = {"notebook", "parameters", "inputs", "outputs", "needs", "environment", "profile",
             "retries", "timeout", "matrix", "cache"}


@dataclass
class StepSpec:
    name: str  # "train[model=rf]" for a matrix expansion
    base: str  # "train"
    notebook: Path
    parameters: dict[str, Any]
    inputs: list[str]
    outputs: list[str]
    needs: list[str]  # base names, as written
    environment: str | None = None
    profile: str | None = None
    retries: int = 0
    timeout: float | None = None
    line: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # the notebook's parameters cell
    cache: bool = True  # false: runs every time (it reads what its inputs cannot show: a database, an API)


@dataclass
class PipelineSpec:
    file: Path
    name: str
    parameters: dict[str, Any]
    schedule: str | None
    workers: int
    steps: dict[str, StepSpec]

    def step_names(self, base: str) -> list[str]:
        return [name for name, step in self.steps.items() if step.base == base]


# -- YAML with line numbers ---------------------------------------------------------------------------


from .. import _yaml
from .._yaml import Node as _Node
from .._yaml import kind as _kind
from .._yaml import plain as _plain


def _compose(text: str, file: str) -> _Node:
    return _yaml.compose(text, file, PipelineSpecError, "a pipeline needs at least `steps:`")


def _unknown_keys(mapping: dict[str, _Node], known: set[str], where: str, file: str) -> None:
    _yaml.unknown_keys(mapping, known, where, file, PipelineSpecError)


def _expect(node: _Node, kinds: tuple[type, ...], what: str, file: str) -> Any:
    return _yaml.expect(node, kinds, what, file, PipelineSpecError)


def _paths(node: _Node | None, what: str, file: str) -> list[str]:
    if node is None:
        return []
    if isinstance(node.value, str):
        return [node.value]
    items = _expect(node, (list,), what, file)
    return [str(_expect(item, (str,), what, file)) for item in items]


def _same_kind(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return not (isinstance(default, int) and isinstance(value, float) and not value.is_integer())
    return type(default) is type(value) or (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)))


def _notebook_defaults(path: Path, file: str, line: int) -> dict[str, Any]:
    """The notebook's parameters cell as Python values (literals only).

    Reads the JSON directly (nbformat costs 0.1 s to import, a third of a no-op re-run).
    """
    import ast
    import json

    try:
        with open(path, encoding="utf-8") as f:
            nb = json.load(f)
        cells = nb["cells"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineSpecError(file, line, f"notebook {path} cannot be read ({type(e).__name__}); is it a .ipynb file?") from e
    for cell in cells:
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else str(source)
            values: dict[str, Any] = {}
            try:
                body = ast.parse(source).body
            except SyntaxError as e:
                raise PipelineSpecError(file, line, f"{path.name}: the parameters cell is not valid Python "
                                        f"(line {e.lineno}: {e.msg})") from None
            for node in body:
                target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
                value = getattr(node, "value", None)
                if isinstance(target, ast.Name) and value is not None:
                    try:
                        values[target.id] = ast.literal_eval(value)
                    except (ValueError, TypeError, SyntaxError):
                        values[target.id] = None  # not a literal: any kind accepted
            return values
    return {}


def _check_parameters(step: StepSpec, given: Mapping[str, Any], source: str, file: str, line: int | None) -> None:
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


# -- loading ------------------------------------------------------------------------------------------


def load_pipeline(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineSpec:
    """Read and check a pipeline file; ``overrides`` are ``-p`` values (``name`` or ``step.name``).

    Raises :class:`PipelineSpecError` naming the file, the line and the fix.
    """
    file = Path(path)
    shown = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineSpecError(shown, None, "no such file; check the path") from None
    except OSError as e:
        raise PipelineSpecError(shown, None, f"cannot be read ({e.strerror})") from e
    root = _compose(text, shown)
    top = _expect(root, (dict,), "the pipeline", shown)
    _unknown_keys(top, PIPELINE_KEYS, "pipeline", shown)
    if "steps" not in top:
        raise PipelineSpecError(shown, root.line, "no `steps:`; a pipeline needs at least one step")
    steps_node = top["steps"]
    steps = _expect(steps_node, (dict,), "steps", shown)
    if not steps:
        raise PipelineSpecError(shown, steps_node.line, "`steps:` is empty; add at least one step")
    pipeline_params = _plain(top["parameters"]) if "parameters" in top else {}
    if not isinstance(pipeline_params, dict):
        raise PipelineSpecError(shown, top["parameters"].line, "parameters must be a mapping of name: value")
    workers = _expect(top["workers"], (int,), "workers", shown) if "workers" in top else 2
    if workers < 1:
        raise PipelineSpecError(shown, top["workers"].line, "workers must be at least 1")
    schedule = _expect(top["schedule"], (str,), "schedule", shown) if "schedule" in top else None
    if schedule is not None:
        from .cron import CronError, parse

        try:
            parse(schedule)
        except CronError as e:
            raise PipelineSpecError(shown, top["schedule"].line, f"schedule: {e.problem}") from e
    overrides = dict(overrides or {})
    spec = PipelineSpec(file.resolve(), str(_plain(top["name"])) if "name" in top else file.resolve().parent.name,
                        pipeline_params, schedule, workers, {})
    for base, node in steps.items():
        for step in _expand(base, node, file, shown):
            spec.steps[step.name] = step
    _resolve_parameters(spec, overrides, shown, top)
    _check_outputs(spec, shown)
    _check_needs(spec, shown)
    return spec


def _expand(base: str, node: _Node, file: Path, shown: str) -> list[StepSpec]:
    body = _expect(node, (dict,), f"step {base}", shown)
    line = node.key_line
    _unknown_keys(body, STEP_KEYS, f"step {base}", shown)
    if "notebook" not in body:
        raise PipelineSpecError(shown, line, f"step {base}: no `notebook:`; name the .ipynb it runs")
    notebook = (file.parent / _expect(body["notebook"], (str,), f"step {base}: notebook", shown)).resolve()
    if not notebook.is_file():
        raise PipelineSpecError(shown, body["notebook"].line, f"step {base}: notebook {notebook} does not exist")
    params = _plain(body["parameters"]) if "parameters" in body else {}
    if not isinstance(params, dict):
        raise PipelineSpecError(shown, body["parameters"].line, f"step {base}: parameters must be a mapping")
    retries = _expect(body["retries"], (int,), f"step {base}: retries", shown) if "retries" in body else 0
    timeout = _expect(body["timeout"], (int, float), f"step {base}: timeout (seconds)", shown) if "timeout" in body else None
    cache = _expect(body["cache"], (bool,), f"step {base}: cache (true or false)", shown) if "cache" in body else True
    if retries < 0 or (timeout is not None and timeout <= 0):
        raise PipelineSpecError(shown, line, f"step {base}: retries must be >= 0 and timeout > 0")
    matrix: dict[str, list[Any]] = {}
    if "matrix" in body:
        for key, values in _expect(body["matrix"], (dict,), f"step {base}: matrix", shown).items():
            items = _expect(values, (list,), f"step {base}: matrix {key}", shown)
            if not items:
                raise PipelineSpecError(shown, values.line, f"step {base}: matrix {key} has no values")
            matrix[key] = [_plain(v) for v in items]
    defaults = _notebook_defaults(notebook, shown, body["notebook"].line)
    combos = [dict(zip(matrix, values)) for values in itertools.product(*matrix.values())] or [{}]
    steps = []
    for combo in combos:
        suffix = ",".join(f"{k}={v}" for k, v in combo.items())
        name = f"{base}[{suffix}]" if suffix else base

        def fill(text: str, combo: dict[str, Any] = combo) -> str:
            try:
                return text.format(**combo)
            except (KeyError, IndexError) as e:
                raise PipelineSpecError(shown, line, f"step {base}: {text!r} uses {e} which is not a matrix key") from None

        step = StepSpec(
            name=name, base=base, notebook=notebook, parameters={**params, **combo},
            inputs=[fill(p) for p in _paths(body.get("inputs"), f"step {base}: inputs", shown)],
            outputs=[fill(p) for p in _paths(body.get("outputs"), f"step {base}: outputs", shown)],
            needs=_paths(body.get("needs"), f"step {base}: needs", shown),
            environment=_plain(body["environment"]) if "environment" in body else None,
            profile=_plain(body["profile"]) if "profile" in body else None,
            retries=retries, timeout=float(timeout) if timeout is not None else None,
            line=line, defaults=defaults, cache=cache,
        )
        _check_parameters(step, params, "its", shown, body["parameters"].line if "parameters" in body else line)
        _check_parameters(step, combo, "matrix", shown, body["matrix"].line if "matrix" in body else line)
        steps.append(step)
    return steps


def _resolve_parameters(spec: PipelineSpec, overrides: dict[str, Any], shown: str, top: dict[str, _Node]) -> None:
    for name in overrides:
        step_part, _, param = name.rpartition(".")
        if step_part and not spec.step_names(step_part) and step_part not in spec.steps:
            raise PipelineSpecError(shown, None, f"-p {name}: no step {step_part!r} (steps: {', '.join(sorted({s.base for s in spec.steps.values()}))})")
        declared = any(param in s.defaults for s in spec.steps.values())
        if not declared:
            raise PipelineSpecError(shown, None, f"-p {name}: no step's notebook declares {param!r} in its parameters cell")
    for step in spec.steps.values():
        from_pipeline = {k: v for k, v in spec.parameters.items() if k in step.defaults}
        _check_parameters(step, from_pipeline, "pipeline", shown, top["parameters"].line if "parameters" in top else None)
        from_cli = {}
        for name, value in overrides.items():
            step_part, _, param = name.rpartition(".")
            if param in step.defaults and step_part in ("", step.base, step.name):
                from_cli[param] = value
        _check_parameters(step, from_cli, "-p", shown, None)
        step.parameters = {**step.defaults, **from_pipeline, **step.parameters, **from_cli}
    unused = [k for k in spec.parameters if not any(k in s.defaults for s in spec.steps.values())]
    if unused:
        raise PipelineSpecError(shown, top["parameters"].line, f"pipeline parameter {unused[0]!r} is declared by no step's notebook")


def _check_outputs(spec: PipelineSpec, shown: str) -> None:
    writers: dict[str, str] = {}
    for step in spec.steps.values():
        for out in step.outputs:
            if out in writers:
                raise PipelineSpecError(shown, step.line, f"steps {writers[out]} and {step.name} both write {out!r}; "
                                        "each output needs one producer (use a matrix key in the path)")
            writers[out] = step.name


def _check_needs(spec: PipelineSpec, shown: str) -> None:
    bases = {s.base for s in spec.steps.values()}
    for step in spec.steps.values():
        for need in step.needs:
            if need not in bases and need not in spec.steps:
                raise PipelineSpecError(shown, step.line, f"step {step.name} needs {need!r}, which is no step here "
                                        f"(steps: {', '.join(sorted(bases))})")

