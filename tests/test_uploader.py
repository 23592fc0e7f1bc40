"""The uploader against a real MLflow store: exactly once, nothing dropped, dead writers closed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jupyter_mlops import tracking
from jupyter_mlops.tracking.flusher import running_pid, sync
from jupyter_mlops.tracking.spool import atomic_write_json, read_json

from .conftest import Project, find_run


def start(project: Project, **kwargs) -> tracking.Run:
    return tracking.start_run(capture_context=False, config=project.config(flusher_autostart=False), **kwargs)


def test_a_run_arrives_whole(mlops_project: Project, tmp_path: Path) -> None:
    run = start(mlops_project, experiment="whole", name="r1", tags={"team": "a"})
    for step in range(1500):  # more than one log_batch
        run.log_metric("loss", 1 / (step + 1), step=step)
    run.log_params({"lr": 0.1, "model": "rf"})
    run.set_tag("stage", "dev")
    (tmp_path / "model.txt").write_text("weights")
    run.log_artifact(tmp_path / "model.txt", "model")
    run.end(log_notebook=False)
    result = sync(mlops_project.spool)
    assert result.finished == [run.spool_id] and not result.waiting and not result.failed

    found = find_run(mlops_project, "whole")
    client = mlops_project.client()
    assert found.info.run_id == run.run_id
    assert found.info.status == "FINISHED" and found.info.run_name == "r1"
    assert found.data.params == {"lr": "0.1", "model": "rf"}
    assert found.data.tags["team"] == "a" and found.data.tags["stage"] == "dev"
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1500))
    assert [a.path for a in client.list_artifacts(run.run_id, "model")] == ["model/model.txt"]
    assert not (mlops_project.spool / run.spool_id).exists()
    assert read_json(mlops_project.spool / "done" / f"{run.spool_id}.json")["run_id"] == run.run_id


def test_a_crash_between_upload_and_bookkeeping_doubles_nothing(mlops_project: Project) -> None:
    run = start(mlops_project, experiment="replay")
    for step in range(2500):
        run.log_metric("loss", step * 0.5, step=step)
    run.log_param("lr", 0.1)
    sync(mlops_project.spool)
    state_path = mlops_project.spool / run.spool_id / "state.json"
    state = read_json(state_path)
    assert state["offset"] > 0
    state["offset"] = 0  # as if the uploader died before recording its progress
    atomic_write_json(state_path, state)
    sync(mlops_project.spool)
    run.end(log_notebook=False)
    sync(mlops_project.spool)
    history = mlops_project.client().get_metric_history(run.run_id, "loss")
    assert len(history) == 2500
    assert len({m.step for m in history}) == 2500


def test_a_crash_while_creating_the_run_creates_it_once(mlops_project: Project) -> None:
    run = start(mlops_project, experiment="create-once")
    run.log_metric("x", 1)
    sync(mlops_project.spool)
    first = run.run_id
    state_path = mlops_project.spool / run.spool_id / "state.json"
    atomic_write_json(state_path, {"offset": 0, "creating": True})  # died right after create_run
    run.end(log_notebook=False)
    sync(mlops_project.spool)
    client = mlops_project.client()
    exp = client.get_experiment_by_name("create-once")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [first]
    assert len(client.get_metric_history(first, "x")) == 1


def test_refused_records_are_kept_aside_not_dropped_and_do_not_block(mlops_project: Project) -> None:
    run = start(mlops_project, experiment="refused")
    run.log_param("lr", 0.1)
    run.log_metric("before", 1)
    # Records only a broken or foreign writer could produce: a changed param, a damaged line.
    os.write(run._fd, b'p\tlr\t"0.2"\nm\tbroken\n')
    run.log_metric("after", 2)
    run.end(log_notebook=False)
    sync(mlops_project.spool)
    found = find_run(mlops_project, "refused")
    assert found.data.params == {"lr": "0.1"}
    assert found.data.metrics == {"before": 1.0, "after": 2.0}
    assert found.data.tags["mlops.rejected_records"] == "2"
    assert found.info.status == "FINISHED"
    summary = read_json(mlops_project.spool / "done" / f"{run.spool_id}.json")
    lines = Path(summary["rejected_log"]).read_text().splitlines()
    rejected = {tuple(json.loads(line)["record"][:2]): json.loads(line)["reason"] for line in lines}
    assert set(rejected) == {("p", "lr"), ("m", "broken")}
    assert "Changing param values is not allowed" in rejected[("p", "lr")]
    assert rejected[("m", "broken")] == "malformed record"


def test_an_artifact_record_outside_the_runs_files_is_set_aside(mlops_project: Project, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the tracking server\n")
    run = start(mlops_project, experiment="escape")
    # a crafted spool (e.g. one handed back by a pod) naming a file outside the run's folder
    for src in (str(secret), "../../../../" + str(secret).lstrip("/")):
        os.write(run._fd, f"a\t{json.dumps({'src': src, 'path': None})}\n".encode())
    run.end(log_notebook=False)
    sync(mlops_project.spool)
    found = find_run(mlops_project, "escape")
    assert found.data.tags["mlops.rejected_records"] == "2"
    artifacts = mlops_project.client().list_artifacts(found.info.run_id)
    assert "secret.txt" not in {a.path for a in artifacts}


def test_a_run_whose_writer_died_is_closed_as_killed(mlops_project: Project) -> None:
    code = (
        "import os, signal\n"
        "from jupyter_mlops import tracking\n"
        "from jupyter_mlops.config import load_config\n"
        "run = tracking.start_run(experiment='killed', capture_context=False,\n"
        "                         config=load_config(read_files=False, flusher_autostart=False))\n"
        "for i in range(100): run.log_metric('m', i, step=i)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=mlops_project.root, check=False)
    assert proc.returncode == -9
    result = sync(mlops_project.spool)
    assert len(result.finished) == 1
    found = find_run(mlops_project, "killed")
    assert found.info.status == "KILLED"
    assert "died" in found.data.tags["mlops.end_reason"]
    assert len(mlops_project.client().get_metric_history(found.info.run_id, "m")) == 100


def test_nesting_under_a_parent_and_attaching_to_a_run(mlops_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    client = mlops_project.client()
    exp_id = client.create_experiment("nest", artifact_location=(mlops_project.root / ".mlops" / "artifacts").as_uri())
    parent = client.create_run(exp_id).info.run_id
    monkeypatch.setenv("MLOPS_PARENT_RUN_ID", parent)
    child = start(mlops_project, experiment="nest")
    child.end(log_notebook=False)
    monkeypatch.delenv("MLOPS_PARENT_RUN_ID")
    step_run = client.create_run(exp_id).info.run_id
    monkeypatch.setenv("MLOPS_RUN_ID", step_run)
    attached = start(mlops_project, experiment="nest")
    attached.log_metric("acc", 0.9)
    attached.end(log_notebook=False)
    sync(mlops_project.spool)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent
    assert attached.run_id == step_run
    assert client.get_run(step_run).data.metrics == {"acc": 0.9}
    assert len(client.search_runs([exp_id])) == 3


def test_an_unreachable_server_keeps_everything_spooled(mlops_project: Project) -> None:
    from .conftest import free_port

    config = mlops_project.config(flusher_autostart=False, tracking_uri=f"http://127.0.0.1:{free_port()}")
    run = tracking.start_run(experiment="down", capture_context=False, config=config)
    run.log_metric("x", 1)
    run.end(log_notebook=False)
    result = sync(mlops_project.spool)
    assert result.waiting and not result.finished
    assert "127.0.0.1" in result.waiting[0]
    assert (mlops_project.spool / run.spool_id / "events.log").stat().st_size > 0


def test_the_background_flusher_uploads_and_then_leaves(mlops_project: Project) -> None:
    run = tracking.start_run(experiment="daemon", capture_context=False, config=mlops_project.config())
    run.log_metric("x", 3)
    assert run.wait(60)
    assert mlops_project.client().get_run(run.run_id).data.metrics == {"x": 3.0}
    run.end(log_notebook=False)
    assert run.wait(60)
    deadline = time.monotonic() + 30
    while running_pid(mlops_project.spool) is not None and time.monotonic() < deadline:
        time.sleep(0.1)  # the flusher exits on its own after its idle time (1 s in tests)
    assert running_pid(mlops_project.spool) is None
    assert mlops_project.client().get_run(run.run_id).info.status == "FINISHED"


def test_a_refused_run_waits_for_the_fix_and_sync_retries_it(mlops_project: Project) -> None:
    client = mlops_project.client()
    exp_id = client.create_experiment("gone", artifact_location=(mlops_project.root / ".mlops" / "artifacts").as_uri())
    client.delete_experiment(exp_id)
    run = start(mlops_project, experiment="gone")
    run.log_metric("x", 1)
    run.end(log_notebook=False)
    result = sync(mlops_project.spool)
    assert not result.finished
    assert "is deleted; restore it" in result.failed[0]
    client.restore_experiment(exp_id)
    result = sync(mlops_project.spool)
    assert result.finished == [run.spool_id]
    assert client.get_run(run.run_id).data.metrics == {"x": 1.0}


def test_a_dead_writers_cut_record_is_set_aside_and_the_run_finishes(mlops_project: Project) -> None:
    code = (
        "import os, signal\n"
        "from jupyter_mlops import tracking\n"
        "from jupyter_mlops.config import load_config\n"
        "run = tracking.start_run(experiment='cut', capture_context=False,\n"
        "                         config=load_config(read_files=False, flusher_autostart=False))\n"
        "run.log_metric('m', 1)\n"
        "os.write(run._fd, b'm\\tm\\t2.0\\t12')  # killed inside a write\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=mlops_project.root, check=False)
    result = sync(mlops_project.spool)
    assert len(result.finished) == 1
    found = find_run(mlops_project, "cut")
    assert found.info.status == "KILLED" and found.data.metrics == {"m": 1.0}
    assert found.data.tags["mlops.rejected_records"] == "1"


def test_the_flusher_leaves_when_only_refused_runs_remain(mlops_project: Project) -> None:
    client = mlops_project.client()
    exp_id = client.create_experiment("gone2", artifact_location=(mlops_project.root / ".mlops" / "artifacts").as_uri())
    client.delete_experiment(exp_id)
    run = tracking.start_run(experiment="gone2", capture_context=False, config=mlops_project.config())
    run.end(log_notebook=False)
    state_file = mlops_project.spool / run.spool_id / "state.json"
    deadline = time.monotonic() + 60
    pid = None  # noted as soon as seen: under load its first pass outlasts its idle time, and it
    while pid is None or "failed" not in (read_json(state_file) or {}):  # leaves right after it
        assert time.monotonic() < deadline, "the flusher never tried the run"
        found = running_pid(mlops_project.spool)
        pid = found if found and found > 0 else pid
        time.sleep(0.05)  # the flusher works in its own process; its state file is what it says
    import psutil

    try:
        psutil.Process(pid).wait(timeout=30)  # the process, not its lock: a spinning flusher
    except psutil.NoSuchProcess:              # frees the lock for an instant on every turn
        pass
    except psutil.TimeoutExpired:
        psutil.Process(pid).kill()
        pytest.fail("the flusher kept going with only a refused run left")
    assert (mlops_project.spool / run.spool_id).is_dir()  # kept for `jupyter mlops sync`
    assert "is deleted" in read_json(state_file)["failed"]


def test_a_run_whose_experiment_was_deleted_is_kept_whole_and_says_what_to_do(mlops_project: Project) -> None:
    from jupyter_mlops.tracking.ledger import spooled_runs

    run = start(mlops_project, experiment="deleted-later")
    run.log_metric("x", 1, step=0)
    sync(mlops_project.spool)
    client = mlops_project.client()
    exp_id = client.get_experiment_by_name("deleted-later").experiment_id
    client.delete_experiment(exp_id)
    run.log_metric("x", 2, step=1)
    run.log_param("lr", 0.1)
    run.end(log_notebook=False)
    for _ in range(2):  # refused again by a second sync: the same clear line, nothing set aside
        result = sync(mlops_project.spool)
        assert not result.finished and len(result.failed) == 1
        assert "experiment 'deleted-later' was deleted" in result.failed[0]
        assert f"mlflow experiments restore --experiment-id {exp_id}" in result.failed[0]
    [listed] = spooled_runs(mlops_project.spool)
    assert listed.status == "REFUSED" and run.status == "REFUSED"
    assert "jupyter mlops sync --give-up" in run.refusal()
    assert not run.wait(30)  # refused: nothing to wait for
    assert not (mlops_project.spool / run.spool_id / "rejected.log").exists()
    client.restore_experiment(exp_id)
    result = sync(mlops_project.spool)
    assert result.finished == [run.spool_id] and not result.failed
    found = client.get_run(run.run_id)
    assert found.info.status == "FINISHED" and found.data.params == {"lr": "0.1"}
    assert len(client.get_metric_history(run.run_id, "x")) == 2
    assert run.status == "FINISHED" and run.refusal() is None


def test_given_up_a_refused_run_finishes_in_the_spool_with_its_refusal(mlops_project: Project) -> None:
    from jupyter_mlops.tracking.ledger import spooled_runs

    run = start(mlops_project, experiment="given-up")
    sync(mlops_project.spool)
    client = mlops_project.client()
    client.delete_experiment(client.get_experiment_by_name("given-up").experiment_id)
    run.log_metric("x", 2)
    run.end(log_notebook=False)
    assert sync(mlops_project.spool).failed
    result = sync(mlops_project.spool, give_up=[run.spool_id])
    assert result.finished == [run.spool_id] and not result.failed
    [listed] = spooled_runs(mlops_project.spool)
    assert listed.done and listed.status == "REFUSED"
    assert "2 record(s) refused" in listed.refusal and "rejected.log" in listed.refusal
    kinds = [json.loads(line)["record"][0] for line in Path(listed.state["rejected_log"]).read_text().splitlines()]
    assert kinds == ["m", "e"]
    assert run.status == "REFUSED"
    assert not sync(mlops_project.spool).failed  # nothing left to loop on
