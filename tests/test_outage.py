"""Never block, never lose: a real mlflow server goes down mid-loop, a kernel is killed mid-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from jupyter_client.manager import KernelManager

from .conftest import MlflowServer, Project, find_run

pytestmark = pytest.mark.slow


class Kernel:
    """A real IPython kernel, driven cell by cell; output collected as text."""

    def __init__(self, cwd: Path) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 120) -> str:
        out: list[str] = []

        def collect(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                out.append(content["text"])
            elif msg["msg_type"] == "error":
                out.append(f"{content['ename']}: {content['evalue']}")

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=collect)
        text = "".join(out)
        assert reply["content"]["status"] == "ok", text
        return text

    def submit(self, code: str) -> str:
        return self.kc.execute(code)

    def wait_reply(self, msg_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def kill(self) -> None:
        """SIGKILL, as the OOM killer would: no atexit, no shutdown message."""
        self.km.signal_kernel(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.km.is_alive():
            assert time.monotonic() < deadline, "the kernel survived SIGKILL"
            time.sleep(0.05)  # waiting for the OS to reap the process

    def close(self) -> None:
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=False)
        else:
            self.km.cleanup_resources()
        for context in {id(c): c for c in (self.kc.context, self.km.context)}.values():
            context.destroy(linger=0)


@pytest.fixture
def mlops_kernel(mlops_project: Project) -> Iterator[Kernel]:
    kernel = Kernel(mlops_project.root)
    yield kernel
    kernel.close()


def test_server_outage_mid_loop_loses_and_doubles_nothing(
    mlops_project: Project, mlops_private_server: MlflowServer, mlops_kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = mlops_private_server
    kernel = mlops_kernel
    halfway = mlops_project.root / "halfway"
    kernel.run(
        f"import os; os.environ['MLFLOW_TRACKING_URI'] = {server.uri!r}\n"
        "%load_ext jupyter_mlops\n%mlops track --experiment outage\n"
        "from jupyter_mlops import tracking\n"
        "for i in range(200):\n    tracking.log_metric('m', i, step=i)\n"
        "%mlops params before=1"
    )
    assert "up to date" in kernel.run("%mlops flush --timeout 60")
    # The loop goes on while the server is stopped under it.
    loop = kernel.submit(
        "import time\n"
        "for i in range(200, 2200):\n"
        "    tracking.log_metric('m', i, step=i)\n"
        f"    if i == 1200: open({str(halfway)!r}, 'w').close()\n"
        "    time.sleep(0.001)\n"
    )
    deadline = time.monotonic() + 60
    while not halfway.exists():
        assert time.monotonic() < deadline, "the logging loop never reached its middle"
        time.sleep(0.01)  # waiting for the kernel to write the marker file
    server.stop()
    reply = kernel.wait_reply(loop)
    assert reply["content"]["status"] == "ok"  # logging went on with the server down
    (mlops_project.root / "report.txt").write_text("made during the outage")
    kernel.run("%mlops params during=1\n%mlops artifact report.txt")
    waiting = kernel.run("%mlops status")
    assert "bytes waiting" in waiting
    server.start()
    kernel.run("%mlops end")
    assert "up to date" in kernel.run("%mlops flush --timeout 90")

    run = find_run(server.uri, "outage")
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    history = client.get_metric_history(run.info.run_id, "m")
    assert len(history) == 2200
    assert sorted(m.step for m in history) == list(range(2200))
    assert run.data.params == {"before": "1", "during": "1"}
    assert run.info.status == "FINISHED"
    assert "report.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_killed_kernel_is_uploaded_by_sync_once(mlops_project: Project, mlops_kernel: Kernel) -> None:
    # No background uploader: everything the kernel logs stays in the spool when it dies.
    (mlops_project.root / "jupyter_mlops_config.py").write_text("c.MlopsConfig.flusher_autostart = False\n")
    kernel = mlops_kernel
    kernel.run(
        "%load_ext jupyter_mlops\n%mlops track --experiment killed\n"
        "from jupyter_mlops import tracking\n"
        "for i in range(500):\n    tracking.log_metric('m', i, step=i)\n"
        "%mlops params lr=0.1"
    )
    kernel.kill()

    sync = [sys.executable, "-m", "jupyter_mlops.cli", "sync"]
    done = subprocess.run(sync, cwd=mlops_project.root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "uploaded" in done.stdout
    run = find_run(mlops_project, "killed")
    client = mlops_project.client()
    assert run.info.status == "KILLED"
    assert run.data.params == {"lr": "0.1"}
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "m")) == list(range(500))

    again = subprocess.run(sync, cwd=mlops_project.root, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "Nothing to upload" in again.stdout
    assert len(client.get_metric_history(run.info.run_id, "m")) == 500


def test_the_next_flusher_uploads_what_a_dead_kernel_left(mlops_project: Project, mlops_kernel: Kernel) -> None:
    config_file = mlops_project.root / "jupyter_mlops_config.py"
    config_file.write_text("c.MlopsConfig.flusher_autostart = False\n")
    mlops_kernel.run("%load_ext jupyter_mlops\n%mlops track --experiment orphan\n%mlops log x=7")
    mlops_kernel.kill()
    config_file.unlink()

    from jupyter_mlops import tracking

    later = tracking.start_run(experiment="later", capture_context=False, config=mlops_project.config())
    later.end(log_notebook=False)
    assert later.wait(60)
    deadline = time.monotonic() + 60
    while True:
        client = mlops_project.client()
        exp = client.get_experiment_by_name("orphan")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].info.status == "KILLED":
            break
        assert time.monotonic() < deadline, "the flusher did not finish the dead kernel's run"
        time.sleep(0.2)  # the flusher works in its own process; we can only look at the store
    assert runs[0].data.metrics == {"x": 7.0}


def test_jupyter_mlops_run_against_a_server(mlops_project: Project, mlops_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from .conftest import make_notebook

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlops_server.uri)
    make_notebook(
        mlops_project.root / "job.ipynb",
        ["%load_ext jupyter_mlops\n%mlops track --experiment served", "%mlops log acc={alpha * 2}"],
        parameters="alpha = 0.1",
    )
    done = subprocess.run(
        [sys.executable, "-m", "jupyter_mlops.cli", "run", "job.ipynb", "-p", "alpha=0.3", "--no-progress"],
        cwd=mlops_project.root, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run = find_run(mlops_server.uri, "served")
    assert run.info.run_id in done.stdout
    assert f"{mlops_server.uri}/#/experiments/" in done.stdout
    assert run.data.params == {"alpha": "0.3"}
    assert run.data.metrics == {"acc": 0.6}
    assert run.data.tags["mlops.papermill.defaults"] == '{"alpha": "0.1"}'
    from mlflow import MlflowClient

    notebook = [a.path for a in MlflowClient(mlops_server.uri).list_artifacts(run.info.run_id, "notebook")]
    assert notebook == ["notebook/job.out.ipynb"]
