"""`jupyter mlops ...` as users run it: a subprocess, its exit status and what it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Project, find_run, free_port, make_notebook


def cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jupyter_mlops.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_run_a_notebook_and_say_where_the_run_is(mlops_project: Project) -> None:
    make_notebook(mlops_project.root / "nb.ipynb", ["%load_ext jupyter_mlops\n%mlops track --experiment cli", "%mlops log n={n}"], parameters="n = 1")
    done = cli("run", "nb.ipynb", "-p", "n=5", "--no-progress", cwd=mlops_project.root)
    assert done.returncode == 0, done.stderr
    run = find_run(mlops_project, "cli")
    assert f"Run {run.info.run_id} (FINISHED) recorded in experiment 'cli'" in done.stdout
    assert mlops_project.tracking_uri in done.stdout and "jupyter mlops ui" in done.stdout
    assert run.data.metrics == {"n": 5.0}
    assert (mlops_project.root / ".mlops" / "outputs" / "nb.out.ipynb").is_file()


def test_a_failing_notebook_fails_its_run_and_keeps_the_partial_output(mlops_project: Project) -> None:
    make_notebook(mlops_project.root / "bad.ipynb", ["%load_ext jupyter_mlops\n%mlops track --experiment broken", "1/0", "print('never')"])
    done = cli("run", "bad.ipynb", "--no-progress", cwd=mlops_project.root)
    assert done.returncode == 1
    assert "code cell 2 of 3 raised ZeroDivisionError: division by zero" in done.stderr
    assert "Traceback" not in done.stderr
    assert find_run(mlops_project, "broken").info.status == "FAILED"
    assert (mlops_project.root / ".mlops" / "outputs" / "bad.out.ipynb").is_file()


def test_a_missing_notebook_is_one_line(mlops_project: Project) -> None:
    done = cli("run", "nope.ipynb", cwd=mlops_project.root)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: no notebook at nope.ipynb: check the path"


def test_an_unreachable_server_keeps_the_run_and_says_so(mlops_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    make_notebook(mlops_project.root / "nb.ipynb", ["%load_ext jupyter_mlops\n%mlops track --experiment down", "%mlops log x=1"])
    done = cli("run", "nb.ipynb", "--no-progress", cwd=mlops_project.root)
    assert done.returncode == 1
    assert "kept in the local spool" in done.stdout and "not answering" in done.stdout
    assert "jupyter mlops sync" in done.stdout
    listing = cli("runs", cwd=mlops_project.root)
    assert "FINISHED" in listing.stdout and "down" in listing.stdout


def test_sync_with_nothing_spooled(mlops_project: Project) -> None:
    done = cli("sync", cwd=mlops_project.root)
    assert done.returncode == 0 and "Nothing to upload" in done.stdout


def test_bad_usage_exits_2(mlops_project: Project) -> None:
    done = cli("run", "nb.ipynb", "-p", "novalue", cwd=mlops_project.root)
    assert done.returncode == 2 and "expected KEY=VALUE" in done.stderr
    assert cli(cwd=mlops_project.root).returncode == 2


def test_runs_columns_line_up_and_sync_says_what_was_refused(mlops_project: Project) -> None:
    from jupyter_mlops import tracking

    config = mlops_project.config(flusher_autostart=False)
    run = tracking.start_run(experiment="cols", capture_context=False, config=config)
    run.log_param("lr", 0.1)
    import os

    os.write(run._fd, b'p\tlr\t"0.2"\n')  # a changed param: only a foreign writer gets it past the call
    run.end(log_notebook=False)
    other = tracking.start_run(experiment="a-much-longer-experiment-name", capture_context=False, config=config)
    other.end(log_notebook=False)
    done = cli("sync", cwd=mlops_project.root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{run.spool_id}: uploaded (FINISHED, 1 refused)" in done.stdout
    assert "1 record(s) refused: " in done.stdout and "Changing param values is not allowed" in done.stdout
    assert f"done/{run.spool_id}.rejected.log" in done.stdout
    listing = cli("runs", "--all", cwd=mlops_project.root).stdout.splitlines()
    header, rows = listing[0], listing[1:3]
    for column in ("MLFLOW RUN", "STATUS", "WAITING", "EXPERIMENT"):
        start = header.index(column)
        for row in rows:
            assert row[start - 2:start] == "  " and row[start] != " " or column == "WAITING", (column, row)
    assert "FINISHED, 1 refused" in rows[0] and f"{run.spool_id}: 1 record(s) refused" in listing[3]


def test_sync_shows_its_progress_per_run(mlops_project: Project) -> None:
    import io

    from jupyter_mlops import tracking
    from jupyter_mlops.cli import _UploadProgress
    from jupyter_mlops.tracking.flusher import sync

    run = tracking.start_run(experiment="progress", capture_context=False, config=mlops_project.config(flusher_autostart=False))
    for step in range(2500):
        run.log_metric("loss", step, step=step)
    run.end(log_notebook=False)
    out = io.StringIO()
    display = _UploadProgress(out, interval=0)
    sync(mlops_project.spool, on_progress=display.update)
    display.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3  # one per request: 3 batches of metrics, then the end record
    assert all(line.startswith(f"  {run.spool_id}: ") for line in lines)
    assert "(100%), 2,501 records" in lines[-1] and "1,000 records" in lines[0]
