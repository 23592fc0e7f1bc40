"""Lineage read back from MLflow: per run, with or without lineage.json, from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

from jupyter_mlops import data
from jupyter_mlops.tracking.flusher import sync

from .conftest import Project, git
from .test_data import commit, mlops_dvc, start  # noqa: F401 - mlops_dvc is a fixture


def test_lineage_from_the_command_line(mlops_dvc: Project) -> None:
    producer = start(mlops_dvc)
    data.add("data/train.csv")
    producer.end(log_notebook=False)
    commit(mlops_dvc, "v1", tag="v1")
    consumer = start(mlops_dvc)
    data.use("data/train.csv", rev="v1")
    consumer.end(log_notebook=False)
    sync(mlops_dvc.spool)
    cli = [sys.executable, "-m", "jupyter_mlops.cli", "lineage"]
    shown = subprocess.run([*cli, consumer.run_id], cwd=mlops_dvc.root, capture_output=True, text=True, check=True)
    assert "read   data/train.csv" in shown.stdout
    listed = subprocess.run([*cli, "--data", "data/train.csv@v1"], cwd=mlops_dvc.root, capture_output=True, text=True, check=True)
    assert f"produced by run {producer.run_id}" in listed.stdout
    assert f"used by     run {consumer.run_id}" in listed.stdout
    assert f"git {git(mlops_dvc.root, 'rev-parse', 'v1')[:10]})" in listed.stdout  # the revision that run read
    both = subprocess.run(cli, cwd=mlops_dvc.root, capture_output=True, text=True)
    assert both.returncode == 2 and "RUN_ID or --data" in both.stderr


def test_each_run_sees_its_own_revision_and_flags_of_a_shared_version(mlops_dvc: Project) -> None:
    """MLflow keeps one dataset per (experiment, name, digest): each run's lineage still shows the
    revision and modified flag that run saw, with or without a lineage.json (step runs have none)."""
    from jupyter_mlops.data.lineage import run_lineage, runs_for_digest

    data.add("data/train.csv")
    commit(mlops_dvc, "v1", tag="v1")
    (mlops_dvc.root / "notes.txt").write_text("the data is unchanged at v2\n")
    commit(mlops_dvc, "v2", tag="v2")
    rev = {tag: git(mlops_dvc.root, "rev-parse", tag).strip() for tag in ("v1", "v2")}
    runs = {}
    for tag in ("v1", "v2"):
        runs[tag] = start(mlops_dvc)
        data.use("data/train.csv", rev=tag)
        runs[tag].end(log_notebook=False)
    runs["step"] = start(mlops_dvc)  # as a pipeline step records its inputs: no lineage.json
    runs["step"].log_dataset(data.version("data/train.csv", rev="v2").to_json(), "input")
    runs["step"].end(log_notebook=False)
    (mlops_dvc.root / "data" / "train.csv").write_text("x,y\n3,4\n")
    runs["modified"] = start(mlops_dvc)
    data.use("data/train.csv")
    runs["modified"].end(log_notebook=False)
    data.add("data/train.csv", record=False)
    runs["added"] = start(mlops_dvc)
    data.use("data/train.csv")
    runs["added"].end(log_notebook=False)
    sync(mlops_dvc.spool)

    client = mlops_dvc.client()
    ids = {name: run.run_id for name, run in runs.items()}
    old_digest = data.version("data/train.csv", rev="v1").digest
    seen = {e.run_id: (e.role, e.path, e.rev, e.modified) for e in runs_for_digest(client, old_digest)}
    assert seen == {ids["v1"]: ("input", "data/train.csv", rev["v1"], False),
                    ids["v2"]: ("input", "data/train.csv", rev["v2"], False),
                    ids["step"]: ("input", "data/train.csv", rev["v2"], False)}
    new_digest = data.version("data/train.csv").digest
    assert {e.run_id: (e.rev, e.modified) for e in runs_for_digest(client, new_digest)} == {
        ids["modified"]: (None, True), ids["added"]: (None, False)}
    for name in ("v1", "v2", "step", "modified", "added"):  # lineage.json (when there is one) agrees
        (entry,) = run_lineage(client, ids[name])
        assert (entry.role, entry.path, entry.rev, entry.modified) == seen.get(ids[name], ("input", "data/train.csv", None, name == "modified"))
    shown = subprocess.run([sys.executable, "-m", "jupyter_mlops.cli", "lineage", ids["step"]], cwd=mlops_dvc.root,
                           capture_output=True, text=True, check=True)
    assert f"git {rev['v2'][:10]}" in shown.stdout


def test_lineage_of_a_run_recorded_before_per_run_tags_reads_the_dataset_source(mlops_dvc: Project) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from jupyter_mlops.data.lineage import run_lineage

    client = mlops_dvc.client()
    run = client.create_run(client.create_experiment("older"))
    source = json.dumps({"path": "data/train.csv", "md5": "a" * 32, "rev": "b" * 40, "kind": "file"})
    dataset = Dataset("data/train.csv", "a" * 32, "dvc", source, profile=json.dumps({"size": 8, "nfiles": 1, "modified": True}))
    client.log_inputs(run.info.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", "output")])])
    (entry,) = run_lineage(client, run.info.run_id)
    assert (entry.role, entry.path, entry.rev, entry.modified, entry.size) == ("output", "data/train.csv", "b" * 40, True, 8)
