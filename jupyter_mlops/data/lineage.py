"""Lineage read back from MLflow: what a run read and wrote; which runs made or used a version."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["LineageEntry", "run_lineage", "runs_for_digest"]


@dataclass(frozen=True)
class LineageEntry:
    run_id: str
    run_name: str | None
    experiment_id: str
    role: str  # "input" or "output"
    path: str
    digest: str
    rev: str | None
    size: int | None
    nfiles: int | None
    modified: bool


def _entries(run: Any) -> list[LineageEntry]:
    """The run's own view of each dataset it logged.

    The revision, path and modified flag come from the dataset input's tags (per run); the
    dataset's ``source`` and ``profile`` are shared by every run of the experiment that logged
    the same digest (the first one wrote them), so they are only a fallback for runs recorded
    before those tags existed.
    """
    entries = []
    for item in run.inputs.dataset_inputs:
        dataset = item.dataset
        if dataset.source_type != "dvc":
            continue
        tags = {t.key: t.value for t in item.tags}
        source = json.loads(dataset.source or "{}")
        profile = json.loads(dataset.profile or "{}")
        if "mlops.data.path" in tags:
            path, rev, modified = tags["mlops.data.path"], tags.get("mlops.data.rev"), tags.get("mlops.data.modified") == "true"
        else:
            path, rev, modified = dataset.name, source.get("rev"), bool(profile.get("modified"))
        entries.append(LineageEntry(
            run.info.run_id, run.info.run_name, run.info.experiment_id, tags.get("mlflow.data.context", "input"),
            path, dataset.digest, rev, profile.get("size"), profile.get("nfiles"), modified,
        ))
    return entries


def run_lineage(client: Any, run_id: str) -> list[LineageEntry]:
    """The data versions a run recorded, inputs first.

    Read from the run's ``lineage.json`` artifact when it has one: MLflow keeps one dataset entry
    per run and version whatever its role, so a run that wrote and then read the same version
    shows only one role among its datasets, while lineage.json keeps both.
    """
    run = client.get_run(run_id)
    entries = _from_artifact(client, run) or _entries(run)
    return sorted(entries, key=lambda e: (e.role != "input", e.path))


def _from_artifact(client: Any, run: Any) -> list[LineageEntry] | None:
    import tempfile

    try:
        if not any(a.path == "lineage.json" for a in client.list_artifacts(run.info.run_id)):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run.info.run_id, "lineage.json", tmp)
            with open(local, encoding="utf-8") as f:
                lineage = json.load(f)
    except (OSError, ValueError):
        return None
    entries = []
    for role, key in (("input", "inputs"), ("output", "outputs")):
        for v in lineage.get(key, []):
            entries.append(LineageEntry(
                run.info.run_id, run.info.run_name, run.info.experiment_id, role, v["path"],
                str(v["md5"]).removesuffix(".dir"), v.get("rev"), v.get("size"), v.get("nfiles"),
                bool(v.get("modified")),
            ))
    return entries


def runs_for_digest(client: Any, digest: str) -> list[LineageEntry]:
    """Every run, in every experiment, that recorded this version (as input or output)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: list[LineageEntry] = []
    for start in range(0, len(experiments), 100):
        token = None
        while True:
            page = client.search_runs(experiments[start:start + 100], f"dataset.digest = '{digest}'",
                                      max_results=1000, page_token=token)
            for run in page:
                found.extend(e for e in _entries(run) if e.digest == digest)
            token = page.token
            if not token:
                break
    return found
