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
