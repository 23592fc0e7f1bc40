"""The one place that talks to MLflow: timeouts, retries and error mapping.

Used by the flusher process and the CLI, never by the kernel. Errors come out as two kinds:
:class:`Retryable` (server unreachable, 5xx, 429, database locked: try again later, keep the data)
and :class:`Rejected` (the server understood and said no: retrying cannot help).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from ..errors import TrackingServerError

__all__ = ["MlflowGateway", "Retryable", "Rejected"]

T = TypeVar("T")

# MLflow retries a failed HTTP call 7 times with backoff (minutes in all) and waits 120 s for a
# reply. The flusher has its own retry loop over durable data, so it wants to hear fast.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class Retryable(TrackingServerError):
    """The server could not take the request now; the same request may succeed later."""


class Rejected(TrackingServerError):
    """The server refused the request itself; sending it again will not help."""


# How an unreachable server shows up inside MLflow's (long) messages, and what to say instead.
_UNREACHABLE = (
    ("Connection refused", "not answering (connection refused)"),
    ("Name or service not known", "host name not found"),
    ("Max retries exceeded", "not answering"),
    ("timed out", "timed out"),
    ("database is locked", "database is locked by another writer"),
)


# Modules MLflow imports for a store or an artifact location, and the extra of ours that installs them
_EXTRAS = {"psycopg": "postgres", "psycopg2": "postgres", "boto3": "s3", "botocore": "s3"}


def _classify(uri: str, e: BaseException) -> TrackingServerError:
    from mlflow.exceptions import MlflowException

    if isinstance(e, (TypeError, ValueError, UnicodeError, OverflowError)) and not isinstance(e, MlflowException):
        # The request itself cannot be made (a value MLflow's client or JSON cannot encode, a
        # malformed URL): sending it again gives the same answer.
        return Rejected(uri, _short(f"{type(e).__name__}: {e}"))
    if isinstance(e, ModuleNotFoundError):
        module = (e.name or str(e)).partition(".")[0]
        extra = _EXTRAS.get(module)
        install = f"pip install 'jupyter_mlops[{extra}]'" if extra else f"pip install {module}"
        return Retryable(uri, f"a package this store needs is not installed ({module}): {install}; "
                              "the run stays spooled until then")
    text = str(e)
    for needle, plain in _UNREACHABLE:
        if needle in text:
            return Retryable(uri, plain)
    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        message = e.message if hasattr(e, "message") else str(e)
        if status >= 500 or status == 429:
            return Retryable(uri, _short(message))
        return Rejected(uri, _short(message))
    return Retryable(uri, _short(f"{type(e).__name__}: {e}"))


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MlflowGateway:
    """A tracking server (or database store) as the uploader needs it."""

    def __init__(self, tracking_uri: str, artifact_root: str | None = None) -> None:
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient

        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri
        self.artifact_root = artifact_root
        self._client = MlflowClient(tracking_uri)
        self._experiments: dict[str, str] = {}

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # every failure is classified; none escapes unmapped
            raise _classify(self.uri, e) from e

    def experiment_id(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        experiment = self.call(self._client.get_experiment_by_name, name)
        if experiment is None:
            try:
                exp_id = self.call(self._client.create_experiment, name, artifact_location=self.artifact_root)
            except Rejected:
                # another uploader created it a moment ago
                experiment = self.call(self._client.get_experiment_by_name, name)
                if experiment is None:
                    raise
                exp_id = experiment.experiment_id
        elif experiment.lifecycle_stage == "deleted":
            raise Rejected(
                self.uri,
                f"experiment {name!r} is deleted; restore it (mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}) or track into another experiment",
            )
        else:
            exp_id = experiment.experiment_id
        self._experiments[name] = exp_id
        return exp_id

    def find_run(self, experiment_id: str, spool_id: str) -> str | None:
        runs = self.call(
            self._client.search_runs, [experiment_id], f"tags.`mlops.spool_id` = '{spool_id}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def create_run(self, experiment_id: str, start_time: int, tags: dict[str, str], run_name: str | None) -> str:
        run = self.call(self._client.create_run, experiment_id, start_time=start_time, tags=tags, run_name=run_name)
        return run.info.run_id

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.log_batch(run_id, (), (), list(tags.items()))

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[tuple[str, float, int, int]],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.call(
            self._client.log_batch,
            run_id,
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in metrics],
            params=[Param(k, v) for k, v in params],
            tags=[RunTag(k, v) for k, v in tags],
            synchronous=True,
        )

    def log_artifact(self, run_id: str, local_path: Path, artifact_path: str | None) -> None:
        if local_path.is_dir():
            self.call(self._client.log_artifacts, run_id, str(local_path), artifact_path)
        else:
            self.call(self._client.log_artifact, run_id, str(local_path), artifact_path)

    def log_dataset(self, run_id: str, role: str, version: dict[str, Any]) -> None:
        """A data version as an MLflow dataset of the run, its role in ``mlflow.data.context``.

        MLflow has dataset inputs only, so outputs are dataset inputs with context ``output``.
        Logging the same dataset twice is a no-op in MLflow's store (replays are safe).

        MLflow keeps one dataset per (experiment, name, digest): its ``source`` and ``profile``
        are those of whichever run logged that digest first. What differs between runs (the git
        revision, whether the bytes were modified, the path) is written where MLflow keeps it per
        run, the dataset input's tags: ``mlops.data.path``, ``mlops.data.modified``
        (``true``/``false``) and ``mlops.data.rev`` (absent while the .dvc file is uncommitted).
        """
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        digest = str(version["md5"]).removesuffix(".dir")
        source = {k: version.get(k) for k in ("path", "md5", "rev", "kind")}
        profile = {k: version.get(k) for k in ("size", "nfiles", "modified")}
        dataset = Dataset(
            name=str(version["path"]), digest=digest, source_type="dvc",
            source=json.dumps(source, sort_keys=True), profile=json.dumps(profile, sort_keys=True),
        )
        tags = [InputTag("mlflow.data.context", role), InputTag("mlops.data.path", str(version["path"])),
                InputTag("mlops.data.modified", "true" if version.get("modified") else "false")]
        if version.get("rev"):
            tags.append(InputTag("mlops.data.rev", str(version["rev"])))
        self.call(self._client.log_inputs, run_id, datasets=[DatasetInput(dataset, tags)])

    def run_refusal(self, run_id: str) -> str | None:
        """Why the run takes no record at all (it or its experiment was deleted, or it is gone),
        with what to do; None when the run is active (then a refusal is about the record)."""
        try:
            run = self.call(self._client.get_run, run_id)
        except Rejected as e:
            return f"run {run_id} is not on the tracking server ({e.reason})"
        if run.info.lifecycle_stage != "deleted":
            return None
        experiment = self.call(self._client.get_experiment, run.info.experiment_id)
        if experiment.lifecycle_stage == "deleted":
            return (f"experiment {experiment.name!r} was deleted with this run in it; restore it "
                    f"(mlflow experiments restore --experiment-id {experiment.experiment_id})")
        return f"run {run_id} was deleted; restore it (mlflow runs restore --run-id {run_id})"

    def terminate(self, run_id: str, status: str, end_time: int) -> None:
        self.call(self._client.set_terminated, run_id, status, end_time)

    def run_url(self, experiment_id: str, run_id: str) -> str | None:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return None
