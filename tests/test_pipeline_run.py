"""Pipelines run for real: kernels from the pool, papermill, DVC versioning, the MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from jupyter_mlops.cli import main as cli
from jupyter_mlops.data.project import init_project
from jupyter_mlops.errors import MlopsError, PipelineSpecError
from jupyter_mlops.pipelines import cache
from jupyter_mlops.pipelines.runner import resume_pipeline, run_pipeline
from jupyter_mlops.pipelines.state import open_store

from .conftest import Project, make_notebook

MAKE = ["import pathlib\npathlib.Path('data').mkdir(exist_ok=True)\npathlib.Path('data/x.txt').write_text(str(n) * n)"]
USE = [
    "%load_ext jupyter_mlops\n%mlops track",
    "t = open('data/x.txt').read()\n%mlops log length={len(t) * k}",
    "import pathlib\npathlib.Path('out').mkdir(exist_ok=True)\npathlib.Path(f'out/r{k}.txt').write_text(t * k)",
]
JOIN = ["import pathlib\npathlib.Path('final.txt').write_text(open('out/r1.txt').read() + open('out/r2.txt').read())"]

PIPELINE = """\
name: demo
steps:
  make:
    notebook: make.ipynb
    parameters: {n: 3}
    outputs: [data/x.txt]
  use:
    notebook: use.ipynb
    matrix: {k: [1, 2]}
    inputs: [data/x.txt]
    outputs: ["out/r{k}.txt"]
  join:
    notebook: join.ipynb
    inputs: [out/r1.txt, out/r2.txt]
    outputs: [final.txt]
"""


@pytest.fixture
def demo(mlops_project: Project) -> Project:
    """A git + DVC project holding a fan-out / fan-in pipeline of three notebooks."""
    init_project(mlops_project.root)
    root = mlops_project.root
    make_notebook(root / "make.ipynb", MAKE, "n = 1")
    make_notebook(root / "use.ipynb", USE, "k = 1")
    make_notebook(root / "join.ipynb", JOIN, "")
    (root / "pipeline.yaml").write_text(PIPELINE)
    return mlops_project


def statuses(result: Any) -> dict[str, str]:
    return {name: step.status for name, step in result.steps.items()}


def run(project: Project, **kwargs: Any) -> Any:
    kwargs.setdefault("retry_backoff", 0.01)
    return run_pipeline(project.root / "pipeline.yaml", config=project.config(), **kwargs)


def uploaded(project: Project) -> None:
    assert cli(["sync"]) == 0


def test_fan_out_fan_in_tracked_versioned_then_all_cached(demo: Project) -> None:
    events: list[tuple[str, str]] = []
    first = run(demo, listener=lambda result, step: events.append((step.name, step.status)))
    assert first.ok, {n: s.error for n, s in first.steps.items()}
    assert statuses(first) == dict.fromkeys(["make", "use[k=1]", "use[k=2]", "join"], "succeeded")
    assert (demo.root / "final.txt").read_text() == "333" + "333333"
    # the DAG's order held: nobody started before what it reads had succeeded
    order = [name for name, status in events if status == "running"]
    assert order[0] == "make" and order[-1] == "join"
    for rel in ("data/x.txt", "out/r1.txt", "out/r2.txt", "final.txt"):
        assert (demo.root / (rel + ".dvc")).is_file(), f"{rel} was not versioned with DVC"

    second = run(demo)
    assert statuses(second) == dict.fromkeys(first.steps, "cached")
    assert all(step.attempts == 0 and step.cached_from == first.run_id for step in second.steps.values())
    assert second.spool_id is None  # nothing ran: no MLflow run for a no-op

    uploaded(demo)
    client = demo.client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.data.tags.get("mlops.pipeline.run_id") == first.run_id and "mlops.step" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.data.tags["mlops.step"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert set(children) == set(first.steps)
    use1 = children["use[k=1]"]
    assert use1.data.params["k"] == "1" and use1.info.status == "FINISHED"
    assert use1.data.metrics["length"] == 3.0  # %mlops track attached to the step's run...
    assert len(runs) == 5  # ...instead of starting a sixth
    roles = {(d.dataset.name, d.tags[0].value) for d in use1.inputs.dataset_inputs}
    assert roles == {("data/x.txt", "input"), ("out/r1.txt", "output")}
    assert [a.path for a in client.list_artifacts(use1.info.run_id, "notebook")] == ["notebook/use_k_1_.ipynb"]


def test_cache_misses_on_each_cause_and_only_there(demo: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(demo).ok

    # not code: a markdown cell and outputs do not count
    import nbformat

    nb = nbformat.read(demo.root / "join.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("# notes"))
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="old output\n")]
    nbformat.write(nb, demo.root / "join.ipynb")
    assert set(statuses(run(demo)).values()) == {"cached"}

    # code of one step: that step only (its outputs come out the same, so nothing downstream)
    nb.cells[0].source += "\nprint('changed')"
    nbformat.write(nb, demo.root / "join.ipynb")
    assert statuses(run(demo))["join"] == "succeeded"
    assert set(statuses(run(demo)).values()) == {"cached"}

    # a parameter: the step and what reads its (now different) output
    result = run(demo, parameters={"make.n": 4})
    assert statuses(result) == dict.fromkeys(result.steps, "succeeded")

    # an input's version: a step whose input changed on disk re-runs, its upstream does not
    (demo.root / "out" / "r2.txt").write_text("edited by hand")
    result = run(demo, parameters={"make.n": 4})
    assert statuses(result) == {"make": "cached", "use[k=1]": "cached", "use[k=2]": "succeeded", "join": "cached"}

    # an output changed or deleted since: re-made
    (demo.root / "final.txt").unlink()
    assert statuses(run(demo, parameters={"make.n": 4}))["join"] == "succeeded"

    # the kernel's environment, not the runner's: a package installed where only this process looks
    # re-runs nothing; one installed where the kernel's interpreter looks re-runs every step
    monkeypatch.setattr(cache, "_env_digest", None, raising=False)  # the old runner cached it per process
    runner_only = demo.root.parent / "runner-only"
    (runner_only / "unrelated_pkg-1.0.dist-info").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(runner_only))
    assert set(statuses(run(demo, parameters={"make.n": 4})).values()) == {"cached"}
    seen = demo.root.parent / "kernel-site"
    seen.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(seen), *filter(None, [os.environ.get("PYTHONPATH")])]))
    assert set(statuses(run(demo, parameters={"make.n": 4})).values()) == {"cached"}  # a folder, no package
    (seen / "newpkg-2.0.dist-info").mkdir()
    assert set(statuses(run(demo, parameters={"make.n": 4})).values()) == {"succeeded"}

    # --force runs all; --only runs one
    assert set(statuses(run(demo, parameters={"make.n": 4}, force=True)).values()) == {"succeeded"}
    only = run(demo, parameters={"make.n": 4}, only=["use"], force=True)
    assert statuses(only) == {"use[k=1]": "succeeded", "use[k=2]": "succeeded"}


FLAKY = [
    "import pathlib\nif not pathlib.Path('fixed').exists():\n    raise RuntimeError('not fixed yet')",
    "pathlib.Path('out').mkdir(exist_ok=True)\npathlib.Path(f'out/r{k}.txt').write_text('ok')",
]


def test_failure_retries_keeps_partial_notebook_and_resume_reruns_only_what_failed(demo: Project) -> None:
    make_notebook(demo.root / "use.ipynb", FLAKY, "k = 1")
    (demo.root / "pipeline.yaml").write_text(PIPELINE.replace("    outputs: [\"out/r{k}.txt\"]",
                                                              "    outputs: [\"out/r{k}.txt\"]\n    retries: 1"))
    failed = run(demo)
    assert failed.status == "failed"
    assert statuses(failed) == {"make": "succeeded", "use[k=1]": "failed", "use[k=2]": "failed", "join": "blocked"}
    step = failed.steps["use[k=1]"]
    assert step.attempts == 2
    assert "code cell 2 of 3 raised RuntimeError: not fixed yet" in (step.error or "")
    import nbformat

    partial = nbformat.read(step.output_notebook, as_version=4)
    errors = [o for c in partial.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors and errors[0].evalue == "not fixed yet"
    rows = open_store(demo.config().resolved_pipeline_state_url).query(
        "SELECT status FROM pipeline_runs WHERE id = ?", (failed.run_id,))
    assert rows == [{"status": "failed"}]

    (demo.root / "fixed").write_text("")
    resumed = resume_pipeline(failed.run_id, config=demo.config(), retry_backoff=0.01)
    assert resumed.ok
    assert statuses(resumed) == {"make": "kept", "use[k=1]": "succeeded", "use[k=2]": "succeeded", "join": "succeeded"}
    with pytest.raises(MlopsError, match="nothing to resume"):
        resume_pipeline(resumed.run_id, config=demo.config())
    with pytest.raises(MlopsError, match="no pipeline run 'nope'"):
        resume_pipeline("nope", config=demo.config())


def test_missing_input_and_undeclared_output_fail_the_step_with_the_reason(demo: Project) -> None:
    make_notebook(demo.root / "make.ipynb", ["x = n"], "n = 1")  # writes nothing
    result = run(demo)
    assert statuses(result)["make"] == "failed"
    assert "did not write its declared output(s) data/x.txt" in (result.steps["make"].error or "")
    assert set(statuses(result).values()) == {"failed", "blocked"}
    # --only a step whose input nobody made: says which input and what to do
    result = run(demo, only=["join"])
    assert "input out/r1.txt does not exist" in (result.steps["join"].error or "")
    with pytest.raises(PipelineSpecError, match="--only nope: no such step"):
        run(demo, only=["nope"])


def test_step_timeout(demo: Project) -> None:
    make_notebook(demo.root / "make.ipynb", ["import time\ntime.sleep(120)"], "n = 1")
    (demo.root / "pipeline.yaml").write_text(PIPELINE.replace("    outputs: [data/x.txt]", "    outputs: [data/x.txt]\n    timeout: 1"))
    result = run(demo, only=["make"])
    assert statuses(result) == {"make": "failed"}
    assert "timed out after 1 s" in (result.steps["make"].error or "")


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_failure_webhook_gets_the_failed_steps_and_a_dead_webhook_changes_nothing(demo: Project) -> None:
    make_notebook(demo.root / "make.ipynb", ["raise ValueError('bad data')"], "n = 1")
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        result = run_pipeline(demo.root / "pipeline.yaml", config=demo.config(pipeline_webhook_url=url), only=["make"])
    finally:
        server.shutdown()
        server.server_close()
    assert result.status == "failed"
    (payload,) = _Hook.received
    assert payload["run_id"] == result.run_id
    assert "ValueError: bad data" in payload["failed_steps"]["make"]
    assert payload["resume"] == f"jupyter mlops pipeline resume {result.run_id}"
    # nobody listens there now: the pipeline still ends, failed, with its own reason
    again = run_pipeline(demo.root / "pipeline.yaml", config=demo.config(pipeline_webhook_url=url), only=["make"])
    assert again.status == "failed"


def _kernels_of(pid: int) -> list[Any]:
    import psutil

    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_ctrl_c_cancels_cleanly_and_leaves_no_kernel(demo: Project) -> None:
    import psutil

    make_notebook(demo.root / "use.ipynb", ["import time\ntime.sleep(300)"], "k = 1")
    # -X faulthandler: should the run hang after Ctrl-C, SIGABRT below prints where every thread is
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "jupyter_mlops", "pipeline", "run",
                             "pipeline.yaml", "--no-progress"],
                            cwd=demo.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = open_store(demo.config().resolved_pipeline_state_url)
    deadline = time.monotonic() + 120
    kernels: list[Any] = []
    while time.monotonic() < deadline:  # wait for the state the test needs: both sleepers running
        rows = store.query("SELECT status FROM step_runs WHERE step LIKE 'use%' AND status = 'running'")
        kernels = _kernels_of(proc.pid)
        if len(rows) == 2 and len(kernels) >= 2:
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    else:
        pytest.fail("the two steps never ran")
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        pytest.fail(f"the run did not end 120 s after Ctrl-C; its threads:\n{proc.communicate()[0][-6000:]}")
    assert proc.returncode == 130, out
    assert "cancelled" in out
    gone, alive = psutil.wait_procs(kernels, timeout=10)
    assert not alive, f"kernels left behind: {[p.pid for p in alive]}"
    run_row = store.query("SELECT id, status FROM pipeline_runs ORDER BY started DESC LIMIT 1")[0]
    assert run_row["status"] == "cancelled"
    steps = {r["step"]: r["status"] for r in store.query("SELECT step, status FROM step_runs WHERE run_id = ?", (run_row["id"],))}
    assert steps == {"make": "succeeded", "use[k=1]": "cancelled", "use[k=2]": "cancelled", "join": "cancelled"}


def test_cli_run_status_list_and_errors(demo: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["pipeline", "run", "pipeline.yaml", "--no-progress", "-p", "make.n=2"]) == 0
    out = capsys.readouterr().out
    assert "pipeline demo succeeded" in out and "4 succeeded" in out
    assert cli(["pipeline", "run", "pipeline.yaml", "--no-progress", "-p", "make.n=2"]) == 0
    assert "4 cached" in capsys.readouterr().out
    assert cli(["pipeline", "status"]) == 0
    status = capsys.readouterr().out
    assert "cached from" in status and "join" in status
    assert cli(["pipeline", "list"]) == 0
    listing = capsys.readouterr().out
    assert "4 cached" in listing and "4 succeeded" in listing
    assert cli(["pipeline", "status", "nope"]) == 1
    assert "no pipeline run 'nope'" in capsys.readouterr().err
    assert cli(["pipeline", "run", "pipeline.yaml", "-p", "nothere=1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no step's notebook declares 'nothere'" in err
    (demo.root / "bad.yaml").write_text("steps:\n  a: {notebook: make.ipynb, needs: [a]}\n")
    assert cli(["pipeline", "run", "bad.yaml"]) == 1
    assert "cycle" in capsys.readouterr().err


@pytest.mark.postgres
def test_state_in_postgresql(demo: Project, mlops_postgres_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_PIPELINE_STATE_URL", mlops_postgres_uri)
    first = run(demo, only=["make"])
    assert first.ok
    again = run(demo, only=["make"])
    assert statuses(again) == {"make": "cached"}
    store = open_store(mlops_postgres_uri)
    assert store.query("SELECT status FROM pipeline_runs WHERE id = ?", (again.run_id,)) == [{"status": "succeeded"}]
    assert not (demo.root / ".mlops" / "pipelines.db").exists()


def test_outputs_outside_a_dvc_project_fail_before_anything_runs(mlops_project: Project,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    make_notebook(mlops_project.root / "make.ipynb", MAKE, "n = 1")
    (mlops_project.root / "pipeline.yaml").write_text("steps:\n  make: {notebook: make.ipynb, outputs: [data/x.txt]}\n")
    assert cli(["pipeline", "run", "pipeline.yaml"]) == 1
    assert "is not in a DVC project" in capsys.readouterr().err
    assert not (mlops_project.root / "data").exists()  # the notebook never ran


def test_the_project_is_the_pipeline_files_not_the_working_directorys(mlops_project: Project, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = mlops_project.root
    make_notebook(root / "nb.ipynb", ["import os\nprint(os.getcwd())"], "k = 1")
    (root / "pipeline.yaml").write_text("steps:\n  one: {notebook: nb.ipynb, parameters: {k: 2}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in ("MLOPS_PROJECT_ROOT", "MLFLOW_TRACKING_URI"):  # nothing says where the project is
        monkeypatch.delenv(name)
    result = run_pipeline(root / "pipeline.yaml", retry_backoff=0.01)
    assert result.ok, {n: s.error for n, s in result.steps.items()}
    assert not (elsewhere / ".mlops").exists()
    store = open_store("sqlite:///" + str(root / ".mlops" / "pipelines.db"))
    assert store.query("SELECT status FROM pipeline_runs WHERE id = ?", (result.run_id,)) == [{"status": "succeeded"}]
    assert Path(result.steps["one"].output_notebook).is_relative_to(root / ".mlops")


NOT_LITERAL = "import os\nk = 2 * 3\nhome = os.path.join('a', 'b')\nn = 1\nseed = 0"
COMPUTE = ["%load_ext jupyter_mlops\n%mlops track",
           "import json\njson.dump({'k': k, 'home': home, 'n': n, 'seed': seed}, open('computed.json', 'w'))"]


def test_what_the_cell_computes_stays_and_the_parent_records_effective_values(mlops_project: Project) -> None:
    root = mlops_project.root
    make_notebook(root / "calc.ipynb", COMPUTE, NOT_LITERAL)
    make_notebook(root / "quiet.ipynb", ["pass"], NOT_LITERAL)  # no %mlops track: the runner's record only
    (root / "pipeline.yaml").write_text("parameters: {seed: 0}\nsteps:\n  calc: {notebook: calc.ipynb, parameters: {n: 5}}\n"
                                        "  quiet: {notebook: quiet.ipynb, parameters: {n: 7}}\n")
    result = run(mlops_project, parameters={"seed": 1})
    assert result.ok, {n: s.error for n, s in result.steps.items()}
    # only n (the step's) and seed (-p over the pipeline's) were injected: k and home are the cell's
    assert json.loads((root / "computed.json").read_text()) == {"k": 6, "home": "a/b", "n": 5, "seed": 1}
    uploaded(mlops_project)
    client = mlops_project.client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if "mlops.step" not in r.data.tags)
    assert parent.data.params == {"seed": "1"}  # once, effective: not seed 0 beside "-p seed" 1
    steps = {r.data.tags.get("mlops.step"): r.data.params for r in runs if "mlops.step" in r.data.tags}
    assert steps["calc"] == {"k": "2 * 3", "home": "os.path.join('a', 'b')", "n": "5", "seed": "1"}
    assert steps["quiet"] == {**steps["calc"], "n": "7"}


def test_progress_and_errors_number_the_authors_code_cells(mlops_project: Project) -> None:
    import nbformat

    root = mlops_project.root
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("k = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), params, nbformat.v4.new_markdown_cell("Next: x"),
                nbformat.v4.new_code_cell("x = k"), nbformat.v4.new_markdown_cell("It fails here"),
                nbformat.v4.new_code_cell("raise ValueError('bad')"), nbformat.v4.new_code_cell("print('never')")]
    nbformat.write(nb, root / "cells.ipynb")
    (root / "pipeline.yaml").write_text("steps:\n  cells: {notebook: cells.ipynb, parameters: {k: 2}}\n")
    seen: list[tuple[int, int]] = []
    result = run(mlops_project, listener=lambda r, step: step.cell and seen.append(step.cell))
    step = result.steps["cells"]
    # in Jupyter the failing cell is the author's third code cell of four (markdown and papermill's
    # injected parameters not counted); progress showed it as cell 3/4 too
    assert (step.error or "").startswith("code cell 3 of 4 raised ValueError: bad"), step.error
    assert sorted(set(seen)) == [(1, 4), (2, 4), (3, 4)]
