"""pipeline.yaml: what loads, and every way it fails with the file, the line and the fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from jupyter_mlops.errors import PipelineSpecError
from jupyter_mlops.pipelines.dag import build_dag
from jupyter_mlops.pipelines.spec import load_pipeline

from .conftest import make_notebook


@pytest.fixture
def mlops_pipeline_dir(tmp_path: Path) -> Path:
    make_notebook(tmp_path / "features.ipynb", ["pass"], parameters="test_size = 0.3\nseed = 0")
    make_notebook(tmp_path / "train.ipynb", ["pass"], parameters="model = 'rf'\nseed = 0\ndepth = 3")
    make_notebook(tmp_path / "select.ipynb", ["pass"], parameters="metric = 'accuracy'")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


GOOD = """
    name: iris
    parameters: {seed: 7}
    steps:
      features:
        notebook: features.ipynb
        outputs: [data/train.csv]
      train:
        notebook: train.ipynb
        matrix: {model: [random_forest, gradient_boosting]}
        parameters: {depth: 5}
        inputs: [data/train.csv]
        outputs: ["models/{model}"]
        retries: 2
      select:
        notebook: select.ipynb
        inputs: [models/random_forest/model.pkl, models/gradient_boosting/model.pkl]
"""


def test_a_pipeline_expands_resolves_and_orders(mlops_pipeline_dir: Path) -> None:
    spec = load_pipeline(write(mlops_pipeline_dir, GOOD), {"depth": 9, "train.seed": 1})
    assert list(spec.steps) == ["features", "train[model=random_forest]", "train[model=gradient_boosting]", "select"]
    rf = spec.steps["train[model=random_forest]"]
    assert rf.parameters == {"model": "random_forest", "seed": 1, "depth": 9}
    assert rf.outputs == ["models/random_forest"] and rf.retries == 2
    assert spec.steps["features"].parameters == {"test_size": 0.3, "seed": 7}
    dag = build_dag(spec)
    assert dag.parents["select"] == {"train[model=random_forest]", "train[model=gradient_boosting]"}
    assert dag.parents["train[model=random_forest]"] == {"features"}
    order = dag.order()
    assert order[0] == "features" and order[-1] == "select"
    assert dag.downstream({"features"}) == set(spec.steps)
    assert dag.upstream({"select"}) == set(spec.steps)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("steps:\n  a:\n    notebook: features.ipynb\n   bad: [\n", 4, "not valid YAML"),
        ("steps:\n  a:\n    notbook: features.ipynb\n", 3, "did you mean 'notebook'"),
        ("stepz: {}\n", 1, "did you mean 'steps'"),
        ("steps:\n  a:\n    notebook: nowhere.ipynb\n", 3, "does not exist"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    parameters: {lr: 1}\n", 4,
         "'lr' is not in features.ipynb's parameters cell (it declares: seed, test_size)"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    parameters: {test_size: big}\n", 4,
         "is text ('big'), but its default is a number (0.3)"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    outputs: [x]\n  b:\n    notebook: select.ipynb\n    outputs: [x]\n",
         5, "both write 'x'"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    inputs: [y]\n    outputs: [x]\n"
         "  b:\n    notebook: select.ipynb\n    inputs: [x]\n    outputs: [y]\n", 2, "cycle: "),
        ("steps:\n  a:\n    notebook: features.ipynb\n    needs: [b]\n", 2, "needs 'b', which is no step"),
        ("steps:\n  a:\n    notebook: features.ipynb\n  a:\n    notebook: select.ipynb\n", 4, "appears twice"),
        ("steps: {}\n", 1, "empty"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    retries: many\n", 4, "retries must be int"),
        ("steps:\n  a:\n    notebook: train.ipynb\n    matrix: {model: []}\n", 4, "has no values"),
        ("steps:\n  a:\n    notebook: train.ipynb\n    outputs: ['m/{arch}']\n", 2, "'m/{arch}' uses 'arch'"),
        ("parameters: {lr: 1}\nsteps:\n  a:\n    notebook: features.ipynb\n", 1, "declared by no step"),
    ],
)
def test_bad_pipelines_name_the_line_and_the_fix(mlops_pipeline_dir: Path, text: str, line: int, fragment: str) -> None:
    path = write(mlops_pipeline_dir, text)
    with pytest.raises(PipelineSpecError) as info:
        build_dag(load_pipeline(path))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message
    assert "\n" not in message


def test_bad_command_line_parameters(mlops_pipeline_dir: Path) -> None:
    path = write(mlops_pipeline_dir, GOOD)
    with pytest.raises(PipelineSpecError, match="no step's notebook declares 'lr'"):
        load_pipeline(path, {"lr": 1})
    with pytest.raises(PipelineSpecError, match="no step 'trian'"):
        load_pipeline(path, {"trian.seed": 1})
    with pytest.raises(PipelineSpecError, match="'depth' is text"):
        load_pipeline(path, {"depth": "deep"})


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PipelineSpecError, match="no such file; check the path"):
        load_pipeline(tmp_path / "nope.yaml")


def test_bad_schedule_names_the_line_and_the_field(tmp_path: Path) -> None:
    make_notebook(tmp_path / "a.ipynb", ["x = 1"], "x = 0")
    (tmp_path / "p.yaml").write_text("schedule: '0 24 * * *'\nsteps:\n  a: {notebook: a.ipynb}\n")
    with pytest.raises(PipelineSpecError, match=r"p.yaml:1: schedule: hour 24 is out of range 0-23"):
        load_pipeline(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text("schedule: '0 3 * * MON'\nsteps:\n  a: {notebook: a.ipynb}\n")
    assert load_pipeline(tmp_path / "p.yaml").schedule == "0 3 * * MON"
