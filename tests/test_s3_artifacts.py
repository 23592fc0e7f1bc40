"""A run's artifacts on S3 (moto's server on loopback): through an `mlflow server` with an
``s3://`` artifact root, proxied by the server or written directly by the kernel's uploader.

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION), the endpoint from MLFLOW_S3_ENDPOINT_URL; the fixtures are in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_mlops import tracking
from jupyter_mlops.tracking.flusher import sync

from .conftest import MlflowServer, Project, cell_text, execute_notebook, find_run, make_notebook
from .s3_server import Bucket

pytestmark = pytest.mark.s3


@pytest.mark.parametrize("serve_artifacts", [True, False], ids=["proxied-by-the-server", "direct-to-the-bucket"])
def test_a_runs_artifacts_land_in_the_bucket_and_come_back_whole(
    mlops_project: Project, mlops_s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    serve_artifacts: bool,
) -> None:
    """`%mlops artifact` in a real kernel; the kernel's uploader (the spool's flusher process) sends
    it. Proxied, the server writes to the bucket; direct, the uploader does, with boto3 and
    MLFLOW_S3_ENDPOINT_URL. The bigger file is above boto3's multipart threshold (8 MiB)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", mlops_s3.endpoint)
    server = MlflowServer(tmp_path / "server", artifacts=mlops_s3.url("mlflow"), serve_artifacts=serve_artifacts)
    server.folder.mkdir()
    server.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        payloads = {"small.txt": b"weights\n", "model.bin": os.urandom(9 * 2**20)}
        for name, payload in payloads.items():
            (mlops_project.root / name).write_bytes(payload)
        nb = make_notebook(mlops_project.root / "train.ipynb", [
            "%load_ext jupyter_mlops\n%mlops track --experiment s3",
            "%mlops artifact small.txt\n%mlops artifact model.bin --path model",
            "%mlops end",
            "%mlops flush --timeout 120",
        ])
        executed = execute_notebook(nb, timeout=180)
        assert "up to date" in cell_text(executed, 3)
        run = find_run(server.uri, "s3")

        in_bucket = mlops_s3.objects()
        for name, path in (("small.txt", "small.txt"), ("model.bin", "model/model.bin")):
            keys = [k for k in in_bucket if k.startswith("mlflow/") and k.endswith(f"/{run.info.run_id}/artifacts/{path}")]
            assert len(keys) == 1, f"{path} is not in the bucket once: {sorted(in_bucket)}"
            assert in_bucket[keys[0]] == payloads[name]
            local = MlflowClient(server.uri).download_artifacts(run.info.run_id, path, str(tmp_path / "down"))
            assert Path(local).read_bytes() == payloads[name]
    finally:
        server.stop()


def test_an_s3_artifact_root_without_boto3_keeps_the_run_and_names_the_extra(
    mlops_project: Project, mlops_s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded store with MLOPS_ARTIFACT_ROOT on S3: the uploader writes artifacts itself."""
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", mlops_s3.endpoint)
    config = mlops_project.config(artifact_root=mlops_s3.url("mlflow"), flusher_autostart=False)
    run = tracking.start_run(experiment="s3-direct", capture_context=False, config=config)
    (tmp_path / "model.bin").write_bytes(b"weights")
    run.log_artifact(tmp_path / "model.bin")
    run.end(log_notebook=False)

    # `jupyter mlops sync` in a process without boto3 (this one may hold MLflow's cached S3 client)
    without_boto3 = ("import sys\nsys.modules['boto3'] = None\n"
                     "from jupyter_mlops.cli import main\nsys.exit(main(['sync']))")
    done = subprocess.run([sys.executable, "-c", without_boto3], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "pip install 'jupyter_mlops[s3]'" in done.stdout, done.stdout + done.stderr
    assert (mlops_project.spool / run.spool_id).is_dir()  # kept: nothing lost

    assert sync(mlops_project.spool).finished == [run.spool_id]
    keys = [k for k in mlops_s3.objects() if k.endswith(f"/{run.run_id}/artifacts/model.bin")]
    assert len(keys) == 1 and keys[0].startswith("mlflow/")
