"""The store that outgrows SQLite: MLflow on the real PostgreSQL at 127.0.0.1:5432.

Skipped, with the reason, where no PostgreSQL server answers.
"""

from __future__ import annotations


import pytest

from jupyter_mlops import tracking
from jupyter_mlops.tracking.flusher import sync
from jupyter_mlops.tracking.spool import atomic_write_json, read_json

from .conftest import Project, find_run

pytestmark = pytest.mark.postgres


def test_runs_upload_exactly_once_into_postgresql(mlops_project: Project, mlops_postgres_uri: str) -> None:
    project = Project(mlops_project.root, mlops_postgres_uri)
    config = project.config(flusher_autostart=False)
    assert config.resolved_artifact_root == (project.root / ".mlops" / "artifacts").as_uri()
    run = tracking.start_run(experiment="pg", capture_context=False, config=config)
    for step in range(1500):
        run.log_metric("loss", 1 / (step + 1), step=step)
    run.log_params({"lr": 0.1})
    (project.root / "model.txt").write_text("weights")
    run.log_artifact(project.root / "model.txt", "model")
    sync(project.spool)
    state_path = project.spool / run.spool_id / "state.json"
    state = read_json(state_path)
    state["offset"] = 0  # replay everything, as after an uploader crash
    atomic_write_json(state_path, state)
    run.end(log_notebook=False)
    result = sync(project.spool)
    assert result.finished == [run.spool_id]

    found = find_run(project, "pg")
    client = project.client()
    assert found.info.status == "FINISHED" and found.data.params == {"lr": "0.1"}
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "loss")) == list(range(1500))
    assert [a.path for a in client.list_artifacts(found.info.run_id, "model")] == ["model/model.txt"]
