"""The kernel-side API: what reaches the spool, and what is refused at the call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from jupyter_mlops import tracking
from jupyter_mlops.errors import InvalidValueError, NoActiveRunError, ParamChangedError, TrackingError
from jupyter_mlops.tracking.spool import read_records

from .conftest import Project


@pytest.fixture
def mlops_run(mlops_project: Project) -> Iterator[tracking.Run]:
    run = tracking.start_run(experiment="unit", capture_context=False, config=mlops_project.config(flusher_autostart=False))
    yield run
    if not run.ended:
        run.end(log_notebook=False)


def records(run: tracking.Run) -> list[tuple[str, tuple[str, ...]]]:
    return [(r.kind, r.fields) for r in read_records(run.spool_dir / run.spool_id, 0)]


def test_calls_append_records_in_order(mlops_run: tracking.Run) -> None:
    tracking.log_metric("loss", 0.5, step=3, timestamp=1000)
    tracking.log_metrics({"acc": 1, "f1": 0.25}, step=4)
    tracking.log_param("model", "rf")
    tracking.log_params({"lr": 0.1, "flag": True})
    tracking.set_tag("note", "tab\tand\nnewline")
    got = records(mlops_run)
    assert got[0] == ("m", ("loss", "0.5", "1000", "3"))
    assert [g[1][0] for g in got[1:3]] == ["acc", "f1"] and got[1][1][1] == "1.0" and got[1][1][3] == "4"
    assert got[1][1][2] == got[2][1][2]  # one timestamp for one log_metrics call
    assert got[3:6] == [("p", ("model", '"rf"')), ("p", ("lr", '"0.1"')), ("p", ("flag", '"True"'))]
    assert got[6] == ("t", ("note", json.dumps("tab\tand\nnewline")))


def test_nan_and_infinity_are_metrics_too(mlops_run: tracking.Run) -> None:
    tracking.log_metric("a", float("nan"))
    tracking.log_metric("b", float("-inf"))
    assert [r[1][1] for r in records(mlops_run)] == ["nan", "-inf"]


def test_metric_values_are_what_mlflows_client_makes_of_them(mlops_run: tracking.Run) -> None:
    """MLflow's client sends float(value) (MLflow 3.17: '1e3', 'nan' and True are accepted, by a
    SQLite store and by `mlflow server`): the same values reach the spool, no more, no fewer."""
    for value in ("1e3", " nan ", True, 2**62):
        tracking.log_metric("a", value)
    assert [r[1][1] for r in records(mlops_run)] == ["1000.0", "nan", "1.0", "4.611686018427388e+18"]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: tracking.log_metric("acc", "high"), "needs a number, got 'high'"),
        (lambda: tracking.log_metric("acc", None), "needs a number"),
        (lambda: tracking.log_metric("bad\tkey", 1), "names may hold"),
        (lambda: tracking.log_metric("../up", 1), "resolves elsewhere"),
        (lambda: tracking.log_metric("", 1), "non-empty"),
        (lambda: tracking.log_metric("k" * 300, 1), "longer than 250"),
        (lambda: tracking.log_metric("acc", 1, step="x"), "step must be an integer"),
        (lambda: tracking.log_param("p", "x" * 6001), "longer than 6000"),
        (lambda: tracking.set_tag("t", "x" * 8001), "longer than 8000"),
        (lambda: tracking.log_metric("loss\n", 1), "names may hold"),
        (lambda: tracking.log_metric("acc", 1, step=1.9), "step must be an integer"),
        (lambda: tracking.log_metric("acc", 1, step=2**63), "out of range"),
        (lambda: tracking.log_metric("acc", 1, timestamp=1.7e12 + 0.5), "timestamp must be an integer"),
        (lambda: tracking.set_tag("t", "bad \ud800 text"), "lone surrogate"),
        (lambda: tracking.log_metric("acc", 10**400), "too large for a 64-bit float"),
        (lambda: tracking.log_metric("acc", "1e3x"), "needs a number, got '1e3x'"),
    ],
)
def test_bad_values_fail_at_the_call_and_record_nothing(mlops_run: tracking.Run, call, match: str) -> None:
    with pytest.raises(InvalidValueError, match=match):
        call()
    assert records(mlops_run) == []


def test_a_param_cannot_change_but_may_repeat(mlops_run: tracking.Run) -> None:
    tracking.log_param("lr", 0.1)
    tracking.log_param("lr", 0.1)
    with pytest.raises(ParamChangedError, match="already logged as '0.1'"):
        tracking.log_param("lr", 0.2)
    assert records(mlops_run) == [("p", ("lr", '"0.1"'))]


def test_artifacts_are_copied_at_the_call(mlops_run: tracking.Run, tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(b"v1")
    tracking.log_artifact(src, "model")
    src.write_bytes(b"v2")
    kind, fields = records(mlops_run)[0]
    spec = json.loads(fields[0])
    assert kind == "a" and spec["path"] == "model"
    assert (mlops_run.spool_dir / mlops_run.spool_id / "files" / spec["src"]).read_bytes() == b"v1"
    with pytest.raises(TrackingError, match="no such file"):
        tracking.log_artifact(tmp_path / "missing.bin")


def test_end_status_follows_the_last_cell(mlops_run: tracking.Run) -> None:
    mlops_run.note_cell("ValueError: boom")
    assert tracking.end_run() == "FAILED"
    assert records(mlops_run)[-1][1][0] == "FAILED"
    assert mlops_run.end() == "FAILED"  # idempotent
    with pytest.raises(NoActiveRunError, match="%mlops track"):
        tracking.log_metric("x", 1)


def test_only_one_active_run(mlops_run: tracking.Run, mlops_project: Project) -> None:
    with pytest.raises(TrackingError, match="still active"):
        tracking.start_run(capture_context=False, config=mlops_project.config(flusher_autostart=False))


def test_without_a_run_the_error_says_how_to_start_one() -> None:
    tracking.run._active = None
    with pytest.raises(NoActiveRunError, match="no run is active"):
        tracking.log_metric("x", 1)
    with pytest.raises(NoActiveRunError):
        tracking.end_run()


def test_integral_steps_of_other_types_are_accepted(mlops_run: tracking.Run) -> None:
    tracking.log_metric("a", 1, step=3.0, timestamp=1000.0)
    assert records(mlops_run) == [("m", ("a", "1.0", "1000", "3"))]


def test_artifact_paths_and_sources_are_checked(mlops_run: tracking.Run, mlops_project: Project) -> None:
    with pytest.raises(TrackingError, match="relative path inside the run"):
        tracking.log_artifact(mlops_project.root / "README.md", "../outside")
    with pytest.raises(TrackingError, match="holds the tracking spool"):
        tracking.log_artifact(mlops_project.root)
    assert records(mlops_run) == []


def test_a_run_that_fails_to_start_leaves_nothing_behind(mlops_project: Project) -> None:
    config = mlops_project.config(flusher_autostart=False)
    with pytest.raises(InvalidValueError, match="longer than 6000"):
        tracking.start_run(capture_context=False, config=config, params={"p": "x" * 7000})
    assert tracking.active_run() is None
    assert [p.name for p in config.resolved_spool_dir.iterdir() if p.is_dir()] == []


def test_a_full_disk_raises_and_keeps_the_spool_whole(mlops_project: Project, mlops_small_fs: Path) -> None:
    from jupyter_mlops.errors import SpoolError
    from jupyter_mlops.tracking.flusher import sync

    ballast = mlops_small_fs / "ballast"
    ballast.write_bytes(b"x" * 16384)  # freed below, as a user frees space before syncing
    config = mlops_project.config(flusher_autostart=False, spool_dir=str(mlops_small_fs / "spool"))
    run = tracking.start_run(experiment="full", capture_context=False, config=config)
    logged = 0
    with pytest.raises(SpoolError, match="No space left"):
        for step in range(100_000):
            run.log_metric("a_rather_long_metric_name_to_fill_the_disk", step, step=step)
            logged += 1
    events = (mlops_small_fs / "spool" / run.spool_id / "events.log").read_bytes()
    assert events.endswith(b"\n") and events.count(b"\n") == logged  # whole records only
    run._writer.close()  # the kernel "dies" with a full disk
    ballast.unlink()
    sync(config.resolved_spool_dir)
    history = mlops_project.client().get_metric_history(run.run_id, "a_rather_long_metric_name_to_fill_the_disk")
    assert len(history) == logged
