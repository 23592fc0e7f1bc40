from __future__ import annotations

import json
from pathlib import Path

import pytest

from jupyter_mlops.tracking.context import capture, installed_packages, notebook_path, papermill_parameters, parameter_defaults

from .conftest import Project, git, make_notebook


def test_papermill_history_gives_defaults_and_injected_values() -> None:
    history = [
        "",
        "import os",
        "alpha = 0.5\nmodel = 'rf'\nlayers = [1, 2]",
        "# Parameters\nalpha = 0.1\n",
        "%load_ext jupyter_mlops",
    ]
    assert papermill_parameters(history) == (
        {"alpha": "0.5", "model": "rf", "layers": "[1, 2]"},
        {"alpha": "0.1"},
    )


def test_no_papermill_cell_means_no_parameters() -> None:
    assert papermill_parameters(["", "# Parameters of the model below\nx = 1", "y = 2"]) is None


def test_runner_supplied_parameters_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_NOTEBOOK_PARAMETERS", json.dumps({"defaults": {"a": "1"}, "injected": {"a": "2"}}))
    assert papermill_parameters([]) == ({"a": "1"}, {"a": "2"})


def test_parameter_defaults_come_from_the_tagged_cell(tmp_path: Path) -> None:
    import nbformat

    path = make_notebook(tmp_path / "nb.ipynb", ["x = compute()"], parameters="lr = 0.01\nepochs: int = 3")
    assert parameter_defaults(nbformat.read(path, as_version=4)) == {"lr": "0.01", "epochs": "3"}


def test_jupyter_session_name_is_found_from_the_kernel_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "work").mkdir()
    nb = tmp_path / "work" / "train.ipynb"
    nb.write_text("{}")
    monkeypatch.delenv("MLOPS_NOTEBOOK_PATH", raising=False)
    monkeypatch.setenv("JPY_SESSION_NAME", "work/train.ipynb")
    assert notebook_path(cwd=tmp_path / "work") == nb.resolve()
    monkeypatch.delenv("JPY_SESSION_NAME")
    assert notebook_path({"__vsc_ipynb_file__": str(nb)}, cwd=tmp_path) == nb
    assert notebook_path({}, cwd=tmp_path) is None


def test_capture_records_git_environment_and_machine(mlops_project: Project) -> None:
    nb = make_notebook(mlops_project.root / "nb.ipynb", ["1"])
    git(mlops_project.root, "add", "nb.ipynb")
    git(mlops_project.root, "commit", "-qm", "nb")
    ctx = capture(nb, cwd=mlops_project.root)
    head = git(mlops_project.root, "rev-parse", "HEAD").strip()
    assert ctx.tags["mlflow.source.git.commit"] == head
    assert ctx.tags["mlflow.source.git.branch"] == "main"
    assert ctx.tags["mlops.notebook.dirty"] == "false"
    assert ctx.tags["mlops.python.version"].count(".") == 2
    assert int(ctx.tags["mlops.cpu_count"]) >= 1 and int(ctx.tags["mlops.memory_bytes"]) > 0
    assert "mlops.gpu_count" in ctx.tags
    listing = dict((f[1], f[2]) for f in ctx.files)["packages.txt"]
    assert any(line.startswith("pytest==") for line in listing.splitlines())
    nb.write_text(nb.read_text().replace('"1"', '"2"'))
    assert capture(nb, cwd=mlops_project.root).tags["mlops.notebook.dirty"] == "true"


def test_an_untracked_notebook_is_dirty(mlops_project: Project) -> None:
    nb = make_notebook(mlops_project.root / "new.ipynb", ["1"])
    assert capture(nb, cwd=mlops_project.root).tags["mlops.notebook.dirty"] == "true"


def test_outside_git_there_are_no_git_tags(tmp_path: Path) -> None:
    ctx = capture(None, cwd=tmp_path)
    assert not any(key.startswith("mlflow.source.git") for key in ctx.tags)


def test_installed_packages_are_named_with_versions() -> None:
    packages = installed_packages()
    assert packages == sorted(packages) and all("==" in p for p in packages)
    assert any(p.startswith("traitlets==") for p in packages)


def test_a_known_environment_lock_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = tmp_path / "conda-lock.yml"
    lock.write_text("version: 1\npackage: []\n")
    monkeypatch.setenv("MLOPS_ENV_LOCK", str(lock))
    ctx = capture(None, cwd=tmp_path)
    import hashlib

    assert ctx.tags["mlops.conda_lock.sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert ("environment", "conda-lock.yml", lock.read_text()) in ctx.files


def test_the_kernel_profile_and_environment_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_KERNEL_PROFILE", "gpu-1")
    monkeypatch.setenv("MLOPS_KERNEL_ENVIRONMENT", "pytorch-gpu")
    tags = capture(None, cwd=tmp_path).tags
    assert (tags["mlops.kernel.profile"], tags["mlops.kernel.environment"]) == ("gpu-1", "pytorch-gpu")
    monkeypatch.delenv("MLOPS_KERNEL_PROFILE")
    monkeypatch.delenv("MLOPS_KERNEL_ENVIRONMENT")
    assert "mlops.kernel.profile" not in capture(None, cwd=tmp_path).tags


def test_a_plain_papermill_command_is_recognised_from_the_parent(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A stand-in parent whose command line reads like papermill's; the probe is its child.
    fake = tmp_path / "papermill"
    fake.write_text(
        "import subprocess, sys\n"
        "code = 'from jupyter_mlops.tracking.context import papermill_cli_paths; print(papermill_cli_paths())'\n"
        "print(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).stdout)\n"
    )
    done = subprocess.run([sys.executable, str(fake), "in.ipynb", "out/o.ipynb", "-p", "a", "1"],
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    assert f"PosixPath('{tmp_path.resolve()}/in.ipynb')" in done.stdout
    assert f"PosixPath('{tmp_path.resolve()}/out/o.ipynb')" in done.stdout


class _Nvml:
    """NVML as nvidia-ml-py shows it: no driver (nvmlInit fails, as on a machine without one),
    or a driver that answers with ``count`` GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self, count: int | None) -> None:
        self.count = count

    def nvmlInit(self) -> None:
        if self.count is None:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return self.count or 0

    def nvmlShutdown(self) -> None:
        pass


def test_gpus_are_unknown_not_zero_when_nvml_cannot_tell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    tags = capture(None, cwd=tmp_path).tags
    assert tags["mlops.gpu_count"] == "unknown" and "nvidia-ml-py is not installed" in tags["mlops.gpu_inventory"]
    monkeypatch.setitem(sys.modules, "pynvml", _Nvml(None))
    tags = capture(None, cwd=tmp_path).tags
    assert tags["mlops.gpu_count"] == "unknown"
    assert tags["mlops.gpu_inventory"] == "NVML did not start: NVMLError: NVML Shared Library Not Found"
    monkeypatch.setitem(sys.modules, "pynvml", _Nvml(0))
    tags = capture(None, cwd=tmp_path).tags
    assert tags["mlops.gpu_count"] == "0" and "mlops.gpu_inventory" not in tags
