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
    cache: false                # run every time (it reads a database, an API): default true
    kernel: ir                  # optional: a kernel spec other than the notebook's own
```
A parameter's value, from weakest to strongest: the notebook's ``parameters`` cell, the pipeline's
``parameters``, the step's ``parameters``, the matrix value, then ``-p name=value`` on the command
line (``-p step.name=value`` for one step). Every name must be one the notebook's parameters cell
declares, with a value of the same kind as its default (any kind where the default is an
expression, ``k = 2 * 3``). Only the values set here are injected, as papermill does: the cell's
own defaults stay the cell's, computed by the kernel (``step.parameters`` holds what is set).

A step runs on, in order: the ``mlops`` provisioner's spec when it names an ``environment`` or a
``profile``; else its ``kernel:``; else the run's ``--kernel``; else the notebook's own kernelspec
(``metadata.kernelspec.name``, as papermill does); else ``python3``. An unknown kernel spec is an
error here, before anything runs.

Checked at load, each with the file, the line and the fix: unknown keys, step names (a matrix
expansion may not collide with another step, two steps may not share an output notebook file),
duplicate matrix values, the number of steps (``c.MlopsConfig.pipeline_max_steps``), and paths
(see :mod:`.paths`: one spelling, inside the project, one producer).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import PipelineSpecError
from ..parameters_cell import notebook_parameters, read_notebook
from .parameters import check_parameters, resolve_parameters
from .paths import OutputClash, OutputIndex, normalise, notebook_file

__all__ = ["PipelineSpec", "StepSpec", "load_pipeline"]

PIPELINE_KEYS = {"name", "parameters", "schedule", "workers", "steps"}
STEP_KEYS = {"notebook", "parameters", "inputs", "outputs", "needs", "environment", "profile",
             "retries", "timeout", "matrix", "cache", "kernel"}
#: A notebook that names no kernelspec runs on this one.
FALLBACK_KERNEL = "python3"


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
    #: the notebook's parameters cell: name -> literal default, or NOT_LITERAL for an expression
    defaults: dict[str, Any] = field(default_factory=dict)
    #: the kernel spec it runs on; None when it names an environment or profile (the mlops spec)
    kernel: str | None = None
    #: False: never skipped as unchanged (it reads something outside the pipeline)
    cache: bool = True


@dataclass
class PipelineSpec:
    file: Path
    name: str
    parameters: dict[str, Any]
    schedule: str | None
    workers: int
    steps: dict[str, StepSpec]
    root: Path | None = None  # the project: the git/DVC root holding the file
    _bases: dict[str, list[str]] = field(default_factory=dict, repr=False)
    #: the outputs' index, made by load_pipeline (which checks them) for build_dag to reuse
    outputs_index: OutputIndex | None = field(default=None, repr=False, compare=False)

    def step_names(self, base: str) -> list[str]:
        """The steps a base name expanded to (in file order); [] for no such base."""
        if not self._bases and self.steps:
            for name, step in self.steps.items():
                self._bases.setdefault(step.base, []).append(name)
        return list(self._bases.get(base, ()))


# -- YAML with line numbers ---------------------------------------------------------------------------


from .. import _yaml
from .._yaml import Node as _Node
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


def _read_notebook(path: Path, file: str, line: int) -> tuple[dict[str, Any], str | None]:
    """The notebook's parameters cell (``name -> literal`` or :data:`NOT_LITERAL`) and its kernelspec name.

    Reads the JSON directly (nbformat costs 0.1 s to import, a third of a no-op re-run).
    """
    try:
        nb = read_notebook(path)
    except (OSError, ValueError) as e:
        raise PipelineSpecError(file, line, f"notebook {path} cannot be read ({type(e).__name__}); is it a .ipynb file?") from e
    try:
        parameters = notebook_parameters(nb)
    except SyntaxError as e:
        raise PipelineSpecError(file, line, f"{path.name}: the parameters cell is not valid Python "
                                f"(line {e.lineno}: {e.msg})") from None
    kernelspec = (nb.get("metadata") or {}).get("kernelspec") or {}
    name = kernelspec.get("name") if isinstance(kernelspec, dict) else None
    return {k: p.value for k, p in parameters.items()}, name if isinstance(name, str) and name else None


def _default_max_steps() -> int:
    from ..config import load_config

    return int(load_config().pipeline_max_steps)


# -- loading ------------------------------------------------------------------------------------------


def load_pipeline(path: str | Path, overrides: Mapping[str, Any] | None = None, *, kernel: str | None = None,
                  max_steps: int | None = None) -> PipelineSpec:
    """Read and check a pipeline file; ``overrides`` are ``-p`` values (``name`` or ``step.name``);
    ``kernel``: the run's ``--kernel``; ``max_steps``: the cap on steps (default:
    ``c.MlopsConfig.pipeline_max_steps``).

    Raises :class:`PipelineSpecError` naming the file, the line and the fix.
    """
    from ..config import find_project_root

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
    resolved = file.resolve()
    spec = PipelineSpec(resolved, str(_plain(top["name"])) if "name" in top else resolved.parent.name,
                        pipeline_params, schedule, workers, {}, root=find_project_root(resolved.parent))
    loader = _Loader(spec, shown, kernel, _default_max_steps() if max_steps is None else max_steps)
    for base, node in steps.items():
        loader.add(base, node)
    loader.check_kernels()
    resolve_parameters(spec, overrides, shown, top)
    try:
        spec.outputs_index = OutputIndex((s.name, s.outputs) for s in spec.steps.values())
    except OutputClash as e:
        raise PipelineSpecError(shown, spec.steps[e.step].line, str(e)) from None
    _check_needs(spec, shown)
    spec._bases.clear()  # step_names' index: made from the steps as loaded
    return spec


class _Loader:
    """Expands the steps one by one, checking their names, paths and kernels as they come."""

    def __init__(self, spec: PipelineSpec, shown: str, kernel: str | None, max_steps: int) -> None:
        self.spec = spec
        self.shown = shown
        self.kernel = kernel
        self.max_steps = max_steps
        self.files: dict[str, str] = {}  # output notebook file -> step name
        self.kernels: dict[str, tuple[str, int | None, str]] = {}  # kernel -> (first step, line, where named)

    def add(self, base: str, node: _Node) -> None:
        steps, named, own = _expand(base, node, self.spec, self.shown, self.max_steps)
        for step in steps:
            where = self.shown
            other = self.spec.steps.get(step.name)
            if other is not None:
                raise PipelineSpecError(where, step.line, f"step {step.name} is also a step of {other.base!r} "
                                        f"(line {other.line}); rename one of them")
            file = notebook_file(step.name)
            if file in self.files:
                raise PipelineSpecError(where, step.line, f"steps {self.files[file]!r} and {step.name!r} would both "
                                        f"write the output notebook {file}.ipynb; rename one of them")
            self.files[file] = step.name
            self.spec.steps[step.name] = step
            self._kernel(step, named, own)

    def _kernel(self, step: StepSpec, named: str | None, own: str | None) -> None:
        """Which kernel spec ``step`` runs on (see the module's docstring for the order)."""
        if step.environment or step.profile:
            step.kernel = None  # the mlops provisioner's spec, made for the environment and profile
            return
        if named:
            step.kernel, where = named, "its `kernel:`"
        elif self.kernel:
            step.kernel, where = self.kernel, "--kernel"
        elif own:
            step.kernel, where = own, f"{step.notebook.name}'s kernelspec"
        else:
            step.kernel, where = FALLBACK_KERNEL, "the default"
        self.kernels.setdefault(step.kernel, (step.name, step.line, where))

    def check_kernels(self) -> None:
        if not self.kernels:
            return
        from .kernel_env import find_kernelspecs

        known = find_kernelspecs()
        for name, (step, line, where) in self.kernels.items():
            if name.lower() not in known:
                raise PipelineSpecError(self.shown, line, f"step {step}: kernel {name!r} ({where}) is not installed "
                                        f"here (known: {', '.join(sorted(known)) or 'none'}); install it, or name "
                                        "another with `kernel:` or --kernel")


def _expand(base: str, node: _Node, spec: PipelineSpec, shown: str,
            limit: int) -> tuple[list[StepSpec], str | None, str | None]:
    """The steps of one ``steps:`` entry, with the kernel it names and its notebook's kernelspec."""
    file = spec.file
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
    if retries < 0 or (timeout is not None and timeout <= 0):
        raise PipelineSpecError(shown, line, f"step {base}: retries must be >= 0 and timeout > 0")
    cache = _expect(body["cache"], (bool,), f"step {base}: cache (true or false)", shown) if "cache" in body else True
    kernel = _expect(body["kernel"], (str,), f"step {base}: kernel (a kernel spec name)", shown) if "kernel" in body else None
    matrix = _matrix(base, body, shown)
    combos = 1
    for values in matrix.values():
        combos *= len(values)
    if len(spec.steps) + combos > limit:
        raise PipelineSpecError(shown, body["matrix"].line if "matrix" in body else line,
                                f"step {base}: its {combos:,} step(s) take the pipeline past {limit:,} steps, the most one "
                                "run may have; split the matrix, or raise c.MlopsConfig.pipeline_max_steps")
    defaults, notebook_kernel = _read_notebook(notebook, shown, body["notebook"].line)
    paths = {key: _paths(body.get(key), f"step {base}: {key}", shown) for key in ("inputs", "outputs")}
    base_dir, root = file.parent.as_posix(), (spec.root or file.parent).as_posix()
    shared = dict(needs=_paths(body.get("needs"), f"step {base}: needs", shown),
                  environment=_plain(body["environment"]) if "environment" in body else None,
                  profile=_plain(body["profile"]) if "profile" in body else None,
                  retries=retries, timeout=float(timeout) if timeout is not None else None,
                  line=line, defaults=defaults, cache=cache)
    params_line = body["parameters"].line if "parameters" in body else line
    matrix_line = body["matrix"].line if "matrix" in body else line
    normalised: dict[tuple[str, str], str] = {}  # a path without {key} is the same in every expansion
    probe = StepSpec(base, base, notebook, {}, [], [], [], defaults=defaults)  # each value checked once
    check_parameters(probe, params, "its", shown, params_line)
    for key, values in matrix.items():
        for value in values:
            check_parameters(probe, {key: value}, "matrix", shown, matrix_line)

    def fill(text: str, key: str, combo: dict[str, Any]) -> str:
        try:
            filled = text.format(**combo) if "{" in text else text
        except (KeyError, IndexError) as e:
            raise PipelineSpecError(shown, line, f"step {base}: {text!r} uses {e} which is not a matrix key") from None
        done = normalised.get((key, filled))
        if done is None:
            try:
                done = normalise(filled, base_dir, root)
            except ValueError as e:
                raise PipelineSpecError(shown, body[key].line, f"step {base}: {key[:-1]} {filled!r} {e}") from None
            if filled == text:
                normalised[(key, filled)] = done
        return done

    steps = []
    for values in itertools.product(*matrix.values()):
        combo = dict(zip(matrix, values))
        suffix = ",".join(f"{k}={v}" for k, v in combo.items())
        step = StepSpec(
            name=f"{base}[{suffix}]" if suffix else base, base=base, notebook=notebook,
            parameters={**params, **combo},
            inputs=[fill(p, "inputs", combo) for p in paths["inputs"]],
            outputs=[fill(p, "outputs", combo) for p in paths["outputs"]],
            **shared,  # type: ignore[arg-type]
        )
        step.needs = list(step.needs)
        steps.append(step)
    return steps, kernel, notebook_kernel


def _matrix(base: str, body: dict[str, _Node], shown: str) -> dict[str, list[Any]]:
    matrix: dict[str, list[Any]] = {}
    if "matrix" not in body:
        return matrix
    for key, values in _expect(body["matrix"], (dict,), f"step {base}: matrix", shown).items():
        items = _expect(values, (list,), f"step {base}: matrix {key}", shown)
        if not items:
            raise PipelineSpecError(shown, values.line, f"step {base}: matrix {key} has no values")
        seen: set[Any] = set()
        matrix[key] = []
        for item in items:
            value = _plain(item)
            ident = _ident(value)
            if ident in seen:
                raise PipelineSpecError(shown, item.line, f"step {base}: matrix {key} lists {value!r} twice; "
                                        "remove the second")
            seen.add(ident)
            matrix[key].append(value)
    return matrix


def _ident(value: Any) -> Any:
    """A hashable identity of a YAML value (True and 1 apart, as are 1 and 1.0)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return (type(value).__name__, value)
    return json.dumps(value, sort_keys=True, default=repr)


def _check_needs(spec: PipelineSpec, shown: str) -> None:
    bases = {s.base for s in spec.steps.values()}
    for step in spec.steps.values():
        for need in step.needs:
            if need not in bases and need not in spec.steps:
                raise PipelineSpecError(shown, step.line, f"step {step.name} needs {need!r}, which is no step here "
                                        f"(steps: {', '.join(sorted(bases))})")
