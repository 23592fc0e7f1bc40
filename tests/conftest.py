"""Shared fixtures: isolated projects, a real `mlflow server` on loopback, real kernels.

Every test gets its own project folder (a real git repository), spool and tracking store; the
environment variables that point the product at them are set per test and undone after.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from jupyter_mlops.config import MlopsConfig, load_config

HERE = Path(__file__).parent
ROOT = HERE.parent


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=test@example.invalid", "-c", "user.name=test", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout


@dataclass
class Project:
    root: Path
    tracking_uri: str

    @property
    def spool(self) -> Path:
        return self.root / ".mlops" / "spool"

    def config(self, **overrides: Any) -> MlopsConfig:
        settings: dict[str, Any] = {"project_root": str(self.root), "tracking_uri": self.tracking_uri, **overrides}
        return load_config(read_files=False, **settings)

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)


def stop_flusher(spool: Path) -> None:
    from jupyter_mlops.tracking.flusher import running_pid

    pid = running_pid(spool)
    if pid and pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def mlops_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """A git repository with one commit, used as the project root with the embedded store."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "README.md").write_text("test project\n")
    git(root, "add", ".")
    git(root, "commit", "-qm", "init")
    uri = "sqlite:///" + str(root / ".mlops" / "mlflow.db")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLOPS_PROJECT_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLOPS_FLUSHER_IDLE", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))  # not /var/tmp/dvc
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the kernel fingerprints' cache
    for name in ("MLOPS_SPOOL_DIR", "MLOPS_EXPERIMENT", "MLFLOW_EXPERIMENT_NAME", "MLOPS_PARENT_RUN_ID",
                 "MLOPS_RUN_ID", "MLOPS_NOTEBOOK_PATH", "MLOPS_OUTPUT_NOTEBOOK_PATH", "JPY_SESSION_NAME",
                 "MLOPS_NOTEBOOK_PARAMETERS", "MLOPS_INVOCATION_ID"):
        monkeypatch.delenv(name, raising=False)
    project = Project(root, uri)
    yield project
    stop_flusher(project.spool)


@pytest.fixture(autouse=True)
def mlops_no_leftover_store() -> Iterator[None]:
    """State stores a test opened are closed after it (the process caches one per URL)."""
    from jupyter_mlops.pipelines import state

    known = set(state._stores)
    yield
    for url in set(state._stores) - known:
        try:
            state._stores.pop(url).close()
        except Exception:  # a PostgreSQL database the test dropped: nothing left to close
            pass


@pytest.fixture(autouse=True)
def mlops_no_leftover_run() -> Iterator[None]:
    """Each test starts with no active run in this process, whatever the last one left."""
    from jupyter_mlops.tracking import run as run_module

    yield
    leftover = run_module._active
    if leftover is not None and not leftover.ended:
        leftover._writer.close()
    run_module._active = None


def stop_process_group(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM a server started with start_new_session=True (it and its workers), SIGKILL after 15 s."""
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on a loopback port, with a SQLite backend; stoppable, restartable.

    ``artifacts``: where artifacts go (default: a folder of its own; an ``s3://`` URL for object
    storage). ``serve_artifacts``: the server proxies artifact transfers (``--artifacts-destination``);
    without it, clients write to ``artifacts`` themselves (``--no-serve-artifacts
    --default-artifact-root``), as a team whose notebooks reach the bucket directly would run it.
    """

    def __init__(self, folder: Path, *, artifacts: str | None = None, serve_artifacts: bool = True) -> None:
        self.folder = folder
        self.artifacts = artifacts or str(folder / "artifacts")
        self.serve_artifacts = serve_artifacts
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        with open(self.folder / "server.log", "ab") as log:
            self.proc = self._launch(log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)  # waiting for a server to start listening: nothing to block on
        raise RuntimeError("mlflow server did not answer /health in time")

    def _launch(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", "sqlite:///" + str(self.folder / "server.db"),
             *(["--artifacts-destination", self.artifacts] if self.serve_artifacts
               else ["--no-serve-artifacts", "--default-artifact-root", self.artifacts]),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None


@pytest.fixture(scope="session")
def mlops_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real mlflow server for the session's tests that only read and write through it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlops_private_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server of this test's own, which the test may stop and restart."""
    server = MlflowServer(tmp_path / "server")
    server.folder.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlops_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One S3 server (moto's, tests/s3_server.py) for the session; tests keep apart by bucket."""
    from .s3_server import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        server.start()
    except RuntimeError as e:
        pytest.skip(f"moto's S3 server cannot start here, so the object-storage tests cannot run: {e}")
    yield server
    server.stop()


@pytest.fixture
def mlops_s3(mlops_s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh bucket (an s3_server.Bucket); credentials in the environment, and nothing else of
    AWS's that could leak in (a profile, a config file, a global endpoint), so each tool must be
    given the endpoint its own way (DVC's endpointurl, MLFLOW_S3_ENDPOINT_URL)."""
    from .s3_server import CREDENTIALS, Bucket, s3_client

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = Bucket(mlops_s3_server.endpoint, f"mlops-{uuid.uuid4().hex[:16]}")
    s3_client(bucket.endpoint).create_bucket(Bucket=bucket.name)
    return bucket


@pytest.fixture
def mlops_readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write to: a read-only tmpfs as root, mode 0500 otherwise."""
    path = tmp_path / "readonly"
    path.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"running as root and cannot mount a read-only tmpfs: {done.stderr.decode().strip()}")
        yield path
        subprocess.run(["umount", str(path)], check=False)
    else:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)


@pytest.fixture
def mlops_small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB file system that fills up (a tmpfs; needs root)."""
    path = tmp_path / "small"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def mlops_postgres_uri(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database of this test's own, dropped afterwards. MLflow's SQL stores in this process
    keep no pooled connections (NullPool): the drop terminates the database's connections, and a
    pooled one would be garbage-collected later, in some other test, as an unraisable error."""
    psycopg = pytest.importorskip("psycopg")
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    try:
        admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL server answers on 127.0.0.1:5432 ({str(e).strip()})")
    admin.autocommit = True
    name = f"mlops_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def make_notebook(path: Path, cells: list[str], parameters: str | None = None) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nb.cells.extend(nbformat.v4.new_code_cell(source) for source in cells)
    nbformat.write(nb, path)
    return path


def execute_notebook(path: Path, *, allow_errors: bool = False, timeout: int = 120) -> Any:
    """Run a notebook in a real kernel with nbclient; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    nbformat.write(nb, path)
    return nb


def cell_text(nb: Any, index: int) -> str:
    """Everything a cell printed or raised, as text."""
    out = []
    for output in nb.cells[index].get("outputs", []):
        if output.get("output_type") == "stream":
            out.append(output["text"])
        elif output.get("output_type") == "error":
            out.append(f"{output['ename']}: {output['evalue']}\n" + "\n".join(output.get("traceback", [])))
        elif "data" in output:
            out.append(output["data"].get("text/plain", ""))
    return "".join(out)


def find_run(project_or_uri: Any, experiment: str) -> Any:
    from mlflow import MlflowClient

    uri = project_or_uri if isinstance(project_or_uri, str) else project_or_uri.tracking_uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created"
    runs = client.search_runs([exp.experiment_id], order_by=["start_time DESC"])
    assert runs, f"no run in experiment {experiment!r}"
    return runs[0]


@pytest.fixture(scope="session")
def mlops_demo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Environment ``demo`` (mlops-demo 1.0, mlops-act, the stand-in python of tests/channels.py, a
    variable MLOPS_LEVEL=3), locked and installed once by py-rattler from a channel built here.
    Keys: root, definitions (the environments dir), envs, pkgs, prefix."""
    from jupyter_mlops.environments.install import create_environment
    from jupyter_mlops.environments.solve import lock_environment
    from jupyter_mlops.environments.spec import load_environment

    from .channels import build_channel, define

    root = tmp_path_factory.mktemp("demo-env")
    channel = build_channel(root)
    defs = root / "environments"
    define(defs / "demo", channel, "[python, 'mlops-demo <2', mlops-act]", "variables: {MLOPS_LEVEL: '3'}\n")
    spec = load_environment(defs / "demo")
    lock_environment(spec)
    env = create_environment(spec, root / "envs", root / "pkgs")
    return {"root": root, "definitions": defs, "envs": root / "envs", "pkgs": root / "pkgs", "prefix": env.prefix}
