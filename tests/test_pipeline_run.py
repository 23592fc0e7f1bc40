"""Pipelines run for real: kernels from the pool, papermill, DVC versioning, the MLflow store."""

from __future__ import annotations

import json
import os
import signal
import socket
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


def test_a_signal_that_lands_on_a_worker_thread_still_cancels_at_once(demo: Project) -> None:
    """The OS gives a process-directed SIGINT/SIGTERM to any thread. Python runs the handler in the
    main thread only, when it next runs: a main thread waiting on the steps without a timeout ran it
    only when a step ended (Ctrl-C and `pipeline cancel` hung while a step ran, CI saw it)."""
    make_notebook(demo.root / "use.ipynb", ["import time\ntime.sleep(120)"], "k = 1")
    signalled = threading.Event()

    def listener(result: Any, step: Any) -> None:  # called in the step's worker thread
        if step.name.startswith("use") and step.cell is not None and not signalled.is_set():
            signalled.set()
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this thread, not the main one

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(demo.root / "pipeline.yaml", config=demo.config(), listener=listener)
    assert signalled.is_set()
    row = open_store(demo.config().resolved_pipeline_state_url).query(
        "SELECT id, status FROM pipeline_runs ORDER BY started DESC LIMIT 1")[0]
    steps = open_store(demo.config().resolved_pipeline_state_url).query(
        "SELECT step, status FROM step_runs WHERE run_id = ?", (row["id"],))
    # the sleepers were stopped, not waited for
    assert row["status"] == "cancelled" and {r["step"]: r["status"] for r in steps if r["step"].startswith("use")} == {
        "use[k=1]": "cancelled", "use[k=2]": "cancelled"}


def test_cli_run_status_list_and_errors(demo: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["pipeline", "run", "pipeline.yaml", "--no-progress", "-p", "make.n=2"]) == 0
    out = capsys.readouterr().out
    assert "pipeline demo succeeded" in out and "4 succeeded" in out
    assert cli(["pipeline", "run", "pipeline.yaml", "--no-progress", "-p", "make.n=2"]) == 0
    assert "4 cached" in capsys.readouterr().out
    assert cli(["pipeline", "status"]) == 0
    status = capsys.readouterr().out
    assert "cached from" in status and "join" in status
    assert "  succeeded, all cached  " in status.splitlines()[0]  # it computed nothing, and says so
    assert cli(["pipeline", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert "all cached" in listing[1] and "4 cached" in listing[1]
    assert "succeeded" in listing[2] and "4 succeeded" in listing[2]
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


# -- the run lifecycle: dead runners, one run per pipeline, cancel ------------------------------------

OLD_RUNS_TABLE = """CREATE TABLE pipeline_runs (id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, file TEXT NOT NULL,
    status TEXT NOT NULL, started DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION, parameters TEXT NOT NULL,
    options TEXT NOT NULL, resumed_from TEXT, schedule_id TEXT, spool_id TEXT, host TEXT, pid INTEGER)"""


def _open_old_store(url: str) -> Any:
    """A store whose pipeline_runs table was created by an earlier release (no heartbeat etc.)."""
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url[len("sqlite:///"):])
        conn.execute(OLD_RUNS_TABLE)
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(OLD_RUNS_TABLE)
    from jupyter_mlops.pipelines.state import StateStore

    return StateStore(url)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_an_old_database_gains_the_new_columns(backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path}/old.db" if backend == "sqlite" else request.getfixturevalue("mlops_postgres_uri")
    store = _open_old_store(url)
    try:
        row = ("r1", "p", "/p.yaml", "running", time.time(), "{}", "{}", "elsewhere", 1, 0.0)
        with store.transaction() as tx:
            tx.execute("INSERT INTO pipeline_runs (id, pipeline, file, status, started, parameters, options, host, "
                       "pid, heartbeat) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        assert store.query("SELECT heartbeat, pid_start, cancel_requested FROM pipeline_runs") == [
            {"heartbeat": 0.0, "pid_start": None, "cancel_requested": None}]
    finally:
        store.close()
    from jupyter_mlops.pipelines.state import StateStore

    StateStore(url).close()  # opening it again finds nothing to add


def test_a_runner_is_dead_when_its_pid_was_reused_or_its_remote_heartbeat_stopped(demo: Project) -> None:
    import os

    from jupyter_mlops.pipelines.history import RunHistory
    from jupyter_mlops.pipelines.liveness import process_start, this_host

    history = RunHistory(open_store(demo.config().resolved_pipeline_state_url))
    now = time.time()
    runs = {  # id: (host, pid, pid start, heartbeat) -> alive?
        "me": ((this_host(), os.getpid(), process_start(os.getpid()), None), True),
        "reused": ((this_host(), os.getpid(), "1", None), False),  # our pid, another process's start
        "far-fresh": (("another-host", 1, None, now), True),
        "far-stale": (("another-host", 1, None, now - 3600), False),
    }
    with history.store.transaction() as tx:
        for run_id, ((host, pid, start, beat), _) in runs.items():
            tx.execute("INSERT INTO pipeline_runs (id, pipeline, file, status, started, parameters, options, host, "
                       "pid, pid_start, heartbeat) VALUES (?, 'demo', 'f', 'running', ?, '{}', '{}', ?, ?, ?, ?)",
                       (run_id, now - 7200, host, pid, start, beat))
            tx.execute("INSERT INTO step_runs (run_id, step, status) VALUES (?, 'a', 'running')", (run_id,))
    settled = {r["id"]: r["status"] for r in history.recent()}
    assert settled == {run_id: "running" if alive else "crashed" for run_id, (_, alive) in runs.items()}
    assert history.steps("reused")[0]["status"] == "crashed"


#: use[k] waits for the file `go`: the run stays in that step until the test lets it go
BLOCKING_USE = ["import pathlib, time\nwhile not pathlib.Path('go').exists():\n    time.sleep(0.05)", *USE]


def _start_cli_run(project: Project, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "jupyter_mlops", "pipeline", "run",
                             "pipeline.yaml", "--no-progress", *extra],
                            cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_running_use_steps(project: Project, proc: subprocess.Popen[str] | None = None,
                                thread: threading.Thread | None = None) -> str:
    """The run id, once both use[k] steps are running (in their blocking cell)."""
    store = open_store(project.config().resolved_pipeline_state_url)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        rows = store.query("SELECT run_id FROM step_runs WHERE step LIKE 'use%' AND status = 'running'")
        if len(rows) == 2:
            return str(rows[0]["run_id"])
        if proc is not None:
            assert proc.poll() is None, proc.communicate()[0]
        if thread is not None:
            assert thread.is_alive()
        time.sleep(0.1)
    pytest.fail("the use steps never ran")


@pytest.mark.slow
def test_a_killed_runner_reads_as_crashed_and_resumes(demo: Project, capsys: pytest.CaptureFixture[str]) -> None:
    import psutil

    make_notebook(demo.root / "use.ipynb", BLOCKING_USE, "k = 1")
    proc = _start_cli_run(demo)
    run_id = _wait_for_running_use_steps(demo, proc)
    kernels = _kernels_of(proc.pid)
    proc.kill()  # SIGKILL: the runner cannot record anything
    proc.communicate()
    for kernel in kernels:  # orphans of the dead runner
        kernel.kill()
    psutil.wait_procs(kernels, timeout=30)

    assert cli(["pipeline", "status", run_id]) == 0
    status = capsys.readouterr().out
    assert f"run {run_id}  crashed" in status
    assert status.count("crashed") >= 4  # the run, both use steps and join, pending when it died
    assert cli(["pipeline", "list"]) == 0
    assert "crashed" in capsys.readouterr().out

    (demo.root / "go").write_text("")
    resumed = resume_pipeline(run_id, config=demo.config(), retry_backoff=0.01)
    assert resumed.ok, {n: s.error for n, s in resumed.steps.items()}
    assert statuses(resumed) == {"make": "kept", "use[k=1]": "succeeded", "use[k=2]": "succeeded",
                                 "join": "succeeded"}
    assert (demo.root / "final.txt").read_text() == "333" + "333333"


@pytest.mark.slow
def test_a_second_run_of_one_pipeline_waits_for_the_first_or_refuses(demo: Project,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    make_notebook(demo.root / "use.ipynb", BLOCKING_USE, "k = 1")
    first = _start_cli_run(demo)
    first_id = _wait_for_running_use_steps(demo, first)

    assert cli(["pipeline", "run", "pipeline.yaml", "--no-progress", "--no-wait"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run {first_id} (pid {first.pid} on " in err and "pipeline cancel" in err

    waiting = threading.Event()
    messages: list[str] = []
    second: list[Any] = []

    def on_wait(message: str) -> None:
        messages.append(message)
        waiting.set()

    thread = threading.Thread(target=lambda: second.append(run(demo, force=True, on_wait=on_wait)))
    thread.start()
    assert waiting.wait(120), "the second run never said it waits"
    assert messages == [f"waiting for run {first_id} (pid {first.pid} on {socket.gethostname()}) of this pipeline "
                        "to finish; --no-wait refuses"]
    (demo.root / "go").write_text("")
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    thread.join(300)
    (result,) = second
    assert result.ok
    store = open_store(demo.config().resolved_pipeline_state_url)
    ended = store.query("SELECT ended FROM pipeline_runs WHERE id = ?", (first_id,))[0]["ended"]
    assert all(step.started >= ended for step in result.steps.values()), "the two runs overlapped"


@pytest.mark.slow
def test_cancel_stops_a_run_from_another_process(demo: Project, capsys: pytest.CaptureFixture[str]) -> None:
    make_notebook(demo.root / "use.ipynb", BLOCKING_USE, "k = 1")
    store = open_store(demo.config().resolved_pipeline_state_url)

    # a CLI run on this host: the cancel request, and SIGTERM as the fast path
    proc = _start_cli_run(demo)
    run_id = _wait_for_running_use_steps(demo, proc)
    assert cli(["pipeline", "cancel", run_id]) == 0
    assert f"run {run_id} cancelled" in capsys.readouterr().out
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    steps = {r["step"]: r["status"] for r in store.query("SELECT step, status FROM step_runs WHERE run_id = ?", (run_id,))}
    assert steps == {"make": "succeeded", "use[k=1]": "cancelled", "use[k=2]": "cancelled", "join": "cancelled"}

    # a run in a process that takes no SIGTERM (here: this one), cancelled by another process, as from
    # another host: only the request in the store reaches it
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(run(demo)))
    thread.start()
    run_id = _wait_for_running_use_steps(demo, thread=thread)
    done = subprocess.run([sys.executable, "-m", "jupyter_mlops", "pipeline", "cancel", run_id], cwd=demo.root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    thread.join(120)
    (result,) = results
    assert result.status == "cancelled"
    assert statuses(result) == {"make": "cached", "use[k=1]": "cancelled", "use[k=2]": "cancelled", "join": "cancelled"}
    assert cli(["pipeline", "cancel", run_id]) == 1
    assert "is not running (status: cancelled)" in capsys.readouterr().err

    # a run that others judged dead (its heartbeat late, seen from a host whose clock is ahead) has
    # lost its pipeline to whoever took it: it stops rather than go on beside them
    results.clear()
    thread = threading.Thread(target=lambda: results.append(run(demo)))
    thread.start()
    run_id = _wait_for_running_use_steps(demo, thread=thread)
    with store.transaction() as tx:
        tx.execute("UPDATE pipeline_runs SET status = 'crashed' WHERE id = ?", (run_id,))
    thread.join(120)
    (result,) = results
    assert result.status == "cancelled" and statuses(result)["use[k=1]"] == "cancelled"


def test_resume_reruns_a_kept_step_whose_outputs_changed_since(demo: Project) -> None:
    make_notebook(demo.root / "use.ipynb", FLAKY, "k = 1")
    failed = run(demo)
    assert statuses(failed)["make"] == "succeeded" and failed.status == "failed"
    (demo.root / "data" / "x.txt").write_text("edited by hand")  # make's output, after that run
    (demo.root / "fixed").write_text("")
    make_notebook(demo.root / "use.ipynb", USE, "k = 1")
    resumed = resume_pipeline(failed.run_id, config=demo.config(), retry_backoff=0.01)
    assert resumed.ok
    assert statuses(resumed) == dict.fromkeys(["make", "use[k=1]", "use[k=2]", "join"], "succeeded")
    assert (demo.root / "data" / "x.txt").read_text() == "333"  # made again, not trusted as it was
    assert (demo.root / "final.txt").read_text() == "333" + "333333"


def test_a_lock_held_by_a_dead_run_is_taken_over_and_a_live_one_refuses(demo: Project) -> None:
    import os

    from jupyter_mlops.errors import PipelineBusyError
    from jupyter_mlops.pipelines.history import RunHistory
    from jupyter_mlops.pipelines.liveness import process_start, this_host
    from jupyter_mlops.pipelines.results import PipelineResult
    from jupyter_mlops.pipelines.runlock import start_run

    history = RunHistory(open_store(demo.config().resolved_pipeline_state_url))
    file = str(demo.root / "pipeline.yaml")
    row = {"parameters": {}, "options": {}, "resumed_from": None, "schedule_id": None, "cancel_signal": False}

    def holder(run_id: str, start: str | None) -> None:
        with history.store.transaction() as tx:
            tx.execute("INSERT INTO pipeline_runs (id, pipeline, file, status, started, parameters, options, host, "
                       "pid, pid_start) VALUES (?, 'demo', ?, 'running', ?, '{}', '{}', ?, ?, ?)",
                       (run_id, file, time.time(), this_host(), os.getpid(), start))
            tx.execute("INSERT INTO pipeline_locks (pipeline_file, run_id, taken) VALUES (?, ?, ?)",
                       (file, run_id, time.time()))

    holder("dead", "1")  # our pid, but another process's start time: its runner is gone
    mine = PipelineResult("mine", "demo", file)
    start_run(history, mine, wait=False, on_wait=print, cancel=threading.Event(), **row)
    assert history.run("dead")["status"] == "crashed"
    assert history.store.query("SELECT run_id FROM pipeline_locks") == [{"run_id": "mine"}]

    history.finish("mine", "succeeded", time.time())
    holder("alive", process_start(os.getpid()))
    with pytest.raises(PipelineBusyError, match=f"run alive \\(pid {os.getpid()} on {this_host()}\\)"):
        start_run(history, PipelineResult("other", "demo", file), wait=False, on_wait=print,
                  cancel=threading.Event(), **row)
    assert history.run("other") is None and history.run("alive")["status"] == "running"


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


def test_a_dvc_subproject_stays_in_its_repositorys_project_run_after_run(mlops_project: Project,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/iris: a `dvc init --subdir` folder in a git repository. Its first versioned output
    leaves the data index in sub/.mlops/data; the second run took that for a project of its own
    (another store, no step cache: everything ran again)."""
    root = mlops_project.root
    sub = root / "sub"
    sub.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--subdir", "-q"], cwd=sub, check=True)
    make_notebook(sub / "nb.ipynb", ["import pathlib\npathlib.Path('out.txt').write_text(str(k))"], "k = 1")
    (sub / "pipeline.yaml").write_text("steps:\n  one: {notebook: nb.ipynb, outputs: [out.txt]}\n")
    for name in ("MLOPS_PROJECT_ROOT", "MLFLOW_TRACKING_URI"):  # the pipeline file says where the project is
        monkeypatch.delenv(name)
    first = run_pipeline(sub / "pipeline.yaml", retry_backoff=0.01)
    assert first.ok, {n: s.error for n, s in first.steps.items()}
    assert (sub / ".mlops" / "data").is_dir()  # the data layer's index, at the DVC root
    second = run_pipeline(sub / "pipeline.yaml", retry_backoff=0.01)
    assert {n: s.status for n, s in second.steps.items()} == {"one": "cached"}
    assert Path(first.steps["one"].output_notebook).is_relative_to(root / ".mlops")
    assert sorted(p.name for p in (sub / ".mlops").iterdir()) == ["data"]


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
