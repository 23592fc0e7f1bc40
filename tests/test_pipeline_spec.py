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
    # only what the pipeline, step, matrix or -p set is injected; test_size stays the cell's own
    assert spec.steps["features"].parameters == {"seed": 7}
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
        # names: a matrix expansion beside a step of that name; two names, one output notebook file
        ("steps:\n  t[depth=1]:\n    notebook: train.ipynb\n  t:\n    notebook: train.ipynb\n"
         "    matrix: {depth: [1, 2]}\n", 4, "step t[depth=1] is also a step of 't[depth=1]' (line 2); rename one"),
        ("steps:\n  a b:\n    notebook: features.ipynb\n  a_b:\n    notebook: features.ipynb\n", 4,
         "steps 'a b' and 'a_b' would both write the output notebook a_b.ipynb"),
        ("steps:\n  t:\n    notebook: train.ipynb\n    matrix:\n      depth: [1, 2, 1]\n", 5,
         "matrix depth lists 1 twice"),
        # paths: outside the project, absolute, two spellings of one, a folder holding another's file
        ("steps:\n  a:\n    notebook: features.ipynb\n    outputs: [../x]\n", 4, "output '../x' is outside the project"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    inputs: [/etc/hosts]\n", 4, "input '/etc/hosts' is absolute"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    outputs: [out/..]\n", 4, "output 'out/..' is the pipeline file's own folder"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    outputs: [out/x]\n  b:\n    notebook: select.ipynb\n"
         "    outputs: [./out/x]\n", 5, "steps a and b both write 'out/x'"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    outputs: [out]\n  b:\n    notebook: select.ipynb\n"
         "    outputs: [out/x.csv]\n", 5, "step a writes the folder 'out', which holds 'out/x.csv' written by step b"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    cache: sometimes\n", 4, "cache (true or false)"),
        ("steps:\n  a:\n    notebook: features.ipynb\n    kernel: no-such-kernel\n", 2,
         "kernel 'no-such-kernel' (its `kernel:`) is not installed here (known: "),
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


def test_non_literal_defaults_take_any_kind_and_are_never_injected(tmp_path: Path) -> None:
    make_notebook(tmp_path / "a.ipynb", ["pass"], parameters="import os\nk = 2 * 3\nhome = os.path.join('a', 'b')\nn = 1")
    path = write(tmp_path, "steps:\n  a:\n    notebook: a.ipynb\n    parameters: {n: 5}\n")
    assert load_pipeline(path).steps["a"].parameters == {"n": 5}
    assert load_pipeline(path, {"k": "seven", "home": 3}).steps["a"].parameters == {"n": 5, "k": "seven", "home": 3}


def test_cache_false_is_read_and_true_by_default(mlops_pipeline_dir: Path) -> None:
    path = write(mlops_pipeline_dir, "steps:\n  a:\n    notebook: features.ipynb\n    cache: false\n"
                                     "  b:\n    notebook: select.ipynb\n")
    steps = load_pipeline(path).steps
    assert steps["a"].cache is False and steps["b"].cache is True


def test_a_step_runs_on_its_notebooks_kernelspec_unless_told(tmp_path: Path) -> None:
    import json

    make_notebook(tmp_path / "py.ipynb", ["pass"])
    make_notebook(tmp_path / "r.ipynb", ["x <- 1"])
    nb = json.loads((tmp_path / "r.ipynb").read_text())
    nb["metadata"]["kernelspec"] = {"name": "ir", "display_name": "R", "language": "R"}
    (tmp_path / "r.ipynb").write_text(json.dumps(nb))
    path = write(tmp_path, "steps:\n  py:\n    notebook: py.ipynb\n  r:\n    notebook: r.ipynb\n"
                           "  env:\n    notebook: r.ipynb\n    profile: small\n")
    with pytest.raises(PipelineSpecError) as info:
        load_pipeline(path)  # no R kernel here: said at load, not by running R code on Python
    assert f"{path}:4: step r: kernel 'ir' (r.ipynb's kernelspec) is not installed here (known: " in str(info.value)
    assert "python3" in str(info.value)
    steps = load_pipeline(path, kernel="python3").steps  # the run names one: every plain step runs on it
    assert (steps["py"].kernel, steps["r"].kernel, steps["env"].kernel) == ("python3", "python3", None)


def test_kernelspecs_are_found_as_jupyter_client_finds_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    from jupyter_mlops.pipelines.kernel_env import find_kernelspecs

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path))
    (tmp_path / "kernels" / "Other").mkdir(parents=True)
    (tmp_path / "kernels" / "Other" / "kernel.json").write_text('{"argv": ["x"], "display_name": "x"}')
    (tmp_path / "kernels" / "empty").mkdir()
    assert set(find_kernelspecs()) == set(KernelSpecManager().find_kernel_specs())
    assert "other" in find_kernelspecs()


def test_too_many_steps_are_refused_at_load(mlops_pipeline_dir: Path) -> None:
    path = write(mlops_pipeline_dir, "steps:\n  f:\n    notebook: features.ipynb\n  t:\n    notebook: train.ipynb\n"
                                     "    matrix: {depth: [1, 2, 3]}\n")
    assert len(load_pipeline(path, max_steps=4).steps) == 4
    with pytest.raises(PipelineSpecError, match=r"pipeline.yaml:6: step t: its 3 step\(s\) take the pipeline past 3 "
                                                r"steps, the most one run may have; .* c.MlopsConfig.pipeline_max_steps"):
        load_pipeline(path, max_steps=3)


def test_a_large_matrix_builds_the_same_edges(mlops_pipeline_dir: Path) -> None:
    values = list(range(2000))
    path = write(mlops_pipeline_dir, f"""
        steps:
          make:
            notebook: train.ipynb
            matrix: {{depth: {values}}}
            outputs: ["parts/{{depth}}"]
          use:
            notebook: train.ipynb
            matrix: {{depth: {values}}}
            inputs: ["parts/{{depth}}/data.csv"]
            outputs: ["used/{{depth}}.csv"]
          join:
            notebook: select.ipynb
            inputs: [used]
    """)
    dag = build_dag(load_pipeline(path))
    assert dag.parents["use[depth=7]"] == {"make[depth=7]"}
