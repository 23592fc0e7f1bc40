"""%mlops in real kernels executing real notebooks; runs read back through MLflow's client."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Project, cell_text, execute_notebook, find_run, git, make_notebook


def test_a_tracked_notebook_records_everything(mlops_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = make_notebook(
        mlops_project.root / "train.ipynb",
        [
            "%load_ext jupyter_mlops\n%mlops track --experiment magic --name first",
            "for i in range(5):\n    %mlops log loss={1/(i+1)} --step {i}",
            "%mlops params lr=0.1 model=rf\n%mlops tag stage=dev",
            "open('out.txt', 'w').write('result')\n%mlops artifact out.txt --path results",
            "%mlops status",
            "%mlops end",
            "%mlops flush",
        ],
    )
    git(mlops_project.root, "add", "train.ipynb")
    git(mlops_project.root, "commit", "-qm", "notebook")
    monkeypatch.setenv("MLOPS_NOTEBOOK_PATH", str(nb))
    executed = execute_notebook(nb)
    assert "Tracking" in cell_text(executed, 0) and "magic" in cell_text(executed, 0)
    status = cell_text(executed, 4)
    assert "experiment: magic" in status and "tracking:" in status
    assert "up to date" in cell_text(executed, 6)

    run = find_run(mlops_project, "magic")
    client = mlops_project.client()
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params == {"lr": "0.1", "model": "rf"}
    assert run.data.tags["stage"] == "dev"
    assert run.data.tags["mlflow.source.name"] == str(nb)
    assert run.data.tags["mlflow.source.git.commit"] == git(mlops_project.root, "rev-parse", "HEAD").strip()
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)] == [0, 1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results", "notebook", "environment"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notebook")] == ["notebook/executed.ipynb", "notebook/train.ipynb"]


def test_usage_errors_are_one_line_without_traceback(mlops_project: Project) -> None:
    nb = make_notebook(
        mlops_project.root / "bad.ipynb",
        [
            "%load_ext jupyter_mlops",
            "%mlops log acc=1",
            "%mlops track --bogus",
            "%mlops frobnicate",
            "%mlops track --experiment bad",
            "%mlops log acc=high",
            "%mlops log acc",
            "%mlops params lr=1\n%mlops params lr=2",
            "%mlops artifact missing.bin",
            "%mlops --help",
            "%mlops end --status WHATEVER",
        ],
    )
    executed = execute_notebook(nb, allow_errors=True)
    expected = {
        1: "no run is active",
        2: "unrecognized arguments: --bogus",
        3: "invalid choice: 'frobnicate'",
        5: "needs a number, got 'high'",
        6: "expected KEY=VALUE",
        7: "already logged as '1'",
        8: "no such file",
        10: "invalid choice: 'WHATEVER'",
    }
    for index, fragment in expected.items():
        text = cell_text(executed, index)
        assert fragment in text, (index, text)
        assert "UsageError" in text and "Traceback" not in text and "---------" not in text, (index, text)
    help_text = cell_text(executed, 9)
    assert "track" in help_text and "artifact" in help_text and "Error" not in help_text


def test_a_cell_that_raises_at_the_end_fails_the_run(mlops_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = make_notebook(
        mlops_project.root / "fails.ipynb",
        ["%load_ext jupyter_mlops\n%mlops track --experiment failing", "%mlops log x=1", "raise ValueError('bad data')"],
    )
    monkeypatch.setenv("MLOPS_NOTEBOOK_PATH", str(nb))
    execute_notebook(nb, allow_errors=True)  # the kernel shuts down after the failing cell
    from jupyter_mlops.tracking.flusher import sync

    sync(mlops_project.spool)
    run = find_run(mlops_project, "failing")
    assert run.info.status == "FAILED"
    assert run.data.tags["mlops.error"] == "ValueError: bad data"
    assert run.data.metrics == {"x": 1.0}
    assert "notebook" in {a.path for a in mlops_project.client().list_artifacts(run.info.run_id)}


def test_tracking_again_ends_the_previous_run(mlops_project: Project) -> None:
    nb = make_notebook(
        mlops_project.root / "twice.ipynb",
        ["%load_ext jupyter_mlops\n%mlops track --experiment twice", "%mlops track --experiment twice", "%mlops end\n%mlops flush"],
    )
    executed = execute_notebook(nb)
    assert "Ended the previous run" in cell_text(executed, 1)
    client = mlops_project.client()
    runs = client.search_runs([client.get_experiment_by_name("twice").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def test_an_unwritable_spool_is_one_clear_line(mlops_project: Project, mlops_readonly_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_SPOOL_DIR", str(mlops_readonly_dir / "spool"))
    nb = make_notebook(mlops_project.root / "ro.ipynb", ["%load_ext jupyter_mlops\n%mlops track"])
    text = cell_text(execute_notebook(nb, allow_errors=True), 0)
    assert "cannot write the tracking spool" in text and "MLOPS_SPOOL_DIR" in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_autolog_records_into_the_same_run(mlops_project: Project) -> None:
    nb = make_notebook(
        mlops_project.root / "auto.ipynb",
        [
            "%load_ext jupyter_mlops\n%mlops track --experiment auto --autolog",
            "from sklearn.datasets import load_iris\nfrom sklearn.linear_model import LogisticRegression\n"
            "X, y = load_iris(return_X_y=True)\nLogisticRegression(C=0.5, max_iter=300).fit(X, y)",
            "%mlops end\n%mlops flush",
        ],
    )
    executed = execute_notebook(nb, timeout=300)
    assert "autolog() is on" in cell_text(executed, 0)
    client = mlops_project.client()
    runs = client.search_runs([client.get_experiment_by_name("auto").experiment_id])
    assert len(runs) == 1  # autolog wrote into our run, not a run of its own
    run = runs[0]
    assert run.data.params["C"] == "0.5"
    assert "training_score" in run.data.metrics
    assert run.data.tags["mlops.autolog"] == "true" and run.info.status == "FINISHED"


def test_the_papermill_command_gives_the_run_its_paths_and_parameters(mlops_project: Project) -> None:
    import subprocess
    import sys

    make_notebook(
        mlops_project.root / "pm.ipynb",
        ["%load_ext jupyter_mlops\n%mlops track --experiment pm", "%mlops log y={x * 2}"],
        parameters="x = 1\nname = 'a'",
    )
    papermill = Path(sys.executable).parent / "papermill"
    done = subprocess.run([str(papermill), "pm.ipynb", "pm-out.ipynb", "-p", "x", "3", "--no-progress-bar"],
                          cwd=mlops_project.root, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    from jupyter_mlops.tracking.flusher import sync

    sync(mlops_project.spool)
    run = find_run(mlops_project, "pm")
    assert run.data.tags["mlflow.source.name"] == str(mlops_project.root / "pm.ipynb")
    assert run.data.params == {"x": "3", "name": "a"}
    assert run.data.tags["mlops.papermill.injected"] == '{"x": "3"}'
    assert run.data.metrics == {"y": 6.0}
    logged = [a.path for a in mlops_project.client().list_artifacts(run.info.run_id, "notebook")]
    assert logged == ["notebook/pm-out.ipynb"]


def test_a_usage_error_does_not_fail_the_run(mlops_project: Project) -> None:
    nb = make_notebook(
        mlops_project.root / "usage.ipynb",
        [
            "%load_ext jupyter_mlops\n%mlops track --experiment usage",
            "%mlops params lr=0.1",
            "%mlops params lr=0.2",
            "%mlops end\n%mlops flush",
        ],
    )
    executed = execute_notebook(nb, allow_errors=True)
    assert "already logged as '0.1'" in cell_text(executed, 2)
    assert "ended: FINISHED" in cell_text(executed, 3)
    run = find_run(mlops_project, "usage")
    assert run.info.status == "FINISHED" and "mlops.error" not in run.data.tags


def test_an_explicit_end_finishes_and_only_user_code_fails_at_exit(mlops_project: Project) -> None:
    from jupyter_mlops.tracking.flusher import sync

    nb = make_notebook(
        mlops_project.root / "explicit.ipynb",
        ["%load_ext jupyter_mlops\n%mlops track --experiment explicit", "raise ValueError('handled by hand')",
         "%mlops end", "%mlops track --experiment at-exit", "%mlops log acc"],
    )
    executed = execute_notebook(nb, allow_errors=True)  # the kernel exits after the usage error
    assert "ended: FINISHED" in cell_text(executed, 2) and "expected KEY=VALUE" in cell_text(executed, 4)
    sync(mlops_project.spool)
    assert find_run(mlops_project, "explicit").info.status == "FINISHED"
    assert find_run(mlops_project, "at-exit").info.status == "FINISHED"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("log loss=0.3 --step 3", [("loss", "0.3", "3")]),
        ("log --step 4 a=1 b=1e3", [("a", "1.0", "4"), ("b", "1000.0", "4")]),
        ("log a=nan  b=-inf", [("a", "nan", "0"), ("b", "-inf", "0")]),
        ("log 'a=2' --step=5", [("a", "2.0", "5")]),  # quotes and --step=N: argparse's path
        ("log a=1 --step -2", [("a", "1.0", "-2")]),
    ],
)
def test_log_lines_parse_the_same_on_the_fast_path_and_argparse(mlops_project: Project, line: str, expected: list) -> None:
    from jupyter_mlops import tracking
    from jupyter_mlops.magics import mlops_magic
    from jupyter_mlops.tracking.spool import read_records

    run = tracking.start_run(experiment="fast", capture_context=False, config=mlops_project.config(flusher_autostart=False))
    mlops_magic(line)
    got = [r.fields for r in read_records(run.spool_dir / run.spool_id, 0)]
    assert [(f[0], f[1], f[3]) for f in got] == expected
    assert len({f[2] for f in got}) == 1  # one line, one timestamp


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("log a=1 b=high", "metric 'b': needs a number, got 'high'"),
        ("log a=1 b", "expected KEY=VALUE, got 'b'"),
        ("log a=1 --step x", "argument --step: invalid int value: 'x'"),
        ("log a=1 --stp 3", "unrecognized arguments: --stp"),
        ("log bad\u00a0key=1", "names may hold"),
        ("log --step 3", "the following arguments are required"),
    ],
)
def test_a_bad_log_line_records_nothing_and_says_why(mlops_project: Project, line: str, fragment: str) -> None:
    from IPython.core.error import UsageError

    from jupyter_mlops import tracking
    from jupyter_mlops.magics import mlops_magic
    from jupyter_mlops.tracking.spool import read_records

    run = tracking.start_run(experiment="fast", capture_context=False, config=mlops_project.config(flusher_autostart=False))
    with pytest.raises(UsageError, match=fragment):
        mlops_magic(line)
    assert read_records(run.spool_dir / run.spool_id, 0) == []


def test_flush_and_status_say_what_the_server_refused(mlops_project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    from jupyter_mlops.magics import mlops_magic

    mlops_magic("track --experiment refusing")
    mlops_magic("log x=1")
    mlops_magic("flush --timeout 120")
    assert "up to date" in capsys.readouterr().out
    client = mlops_project.client()
    client.delete_experiment(client.get_experiment_by_name("refusing").experiment_id)
    mlops_magic("log x=2")
    mlops_magic("flush --timeout 120")  # the background flusher meets the refusal
    out = capsys.readouterr().out
    assert "refused by the tracking server: experiment 'refusing' was deleted" in out, out
    assert "mlflow experiments restore" in out and "jupyter mlops sync" in out and "up to date" not in out
    mlops_magic("status")
    status = capsys.readouterr().out
    assert "status:     REFUSED" in status and "refused:    refused by the tracking server" in status


def test_the_notebook_logged_is_what_the_kernel_ran_with_its_outputs(mlops_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import nbformat

    saved = make_notebook(mlops_project.root / "saved.ipynb", ["print('only this cell was saved')"],
                          parameters="lr = 0.1\nepochs = 3")
    monkeypatch.setenv("MLOPS_NOTEBOOK_PATH", str(saved))  # the file the user has open, last saved long ago
    ran = make_notebook(
        mlops_project.root / "ran.ipynb",
        [
            "%load_ext jupyter_mlops",
            "x = 41",
            "%mlops track --experiment executed",
            "print('hello')\nx + 1",
            "from IPython.display import HTML, display\ndisplay(HTML('<b>shown</b>'))",
            "import sys\nprint('to stderr', file=sys.stderr)\nfor i in range(3):\n    %mlops log i={i} --step {i}",
            "%mlops end",
        ],
    )
    execute_notebook(ran)
    from jupyter_mlops.tracking.flusher import sync

    sync(mlops_project.spool)
    run = find_run(mlops_project, "executed")
    assert run.data.params == {"lr": "0.1", "epochs": "3"}  # the saved notebook's parameters cell
    client = mlops_project.client()
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "notebook")) == [
        "notebook/executed.ipynb", "notebook/saved.ipynb"]
    local = client.download_artifacts(run.info.run_id, "notebook/executed.ipynb", str(mlops_project.root))
    executed = nbformat.reads(Path(local).read_text(), as_version=4)
    nbformat.validate(executed)
    assert [c.source for c in executed.cells] == [c.source for c in nbformat.read(ran, as_version=4).cells]
    assert [c.execution_count for c in executed.cells] == [1, 2, 3, 4, 5, 6, 7]
    by_source = {c.source.splitlines()[0]: c.outputs for c in executed.cells}
    assert "Tracking" in by_source["%mlops track --experiment executed"][0]["text"]
    hello = by_source["print('hello')"]
    assert hello[0]["text"] == "hello\n" and hello[1]["output_type"] == "execute_result"
    assert hello[1]["data"]["text/plain"] == "42" and hello[1]["execution_count"] == 4
    assert by_source["from IPython.display import HTML, display"][0]["data"]["text/html"] == "<b>shown</b>"
    assert by_source["import sys"] == [{"output_type": "stream", "name": "stderr", "text": "to stderr\n"}]
    assert json.loads(json.dumps(executed.metadata))["mlops"]["dropped_outputs"] == 0


def test_the_magic_expands_variables_as_ipython_does(mlops_project: Project) -> None:
    nb = make_notebook(
        mlops_project.root / "expand.ipynb",
        [
            "%load_ext jupyter_mlops\n%mlops track --experiment expand",
            "def f(k):\n    %mlops log inner={k * 2} --step {k}\nf(3)",
            "name = 'dollar'\n%mlops tag via=$name\n%mlops tag braces={{x}} d={dict(a=1)['a']} n={len(name)!s}",
            "%mlops tag failed={undefined_name}",
            "%mlops end\n%mlops flush",
        ],
    )
    execute_notebook(nb)
    run = find_run(mlops_project, "expand")
    assert run.data.metrics == {"inner": 6.0}
    assert mlops_project.client().get_metric_history(run.info.run_id, "inner")[0].step == 3
    tags = run.data.tags
    assert (tags["via"], tags["braces"], tags["d"], tags["n"]) == ("dollar", "{x}", "1", "6")
    assert tags["failed"] == "{undefined_name}"  # as IPython leaves a line whose expression fails
