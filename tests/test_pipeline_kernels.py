"""Pipeline steps run on kernels of the environment and profile they name.

Real throughout: an environment ``demo`` locked and installed by py-rattler from a channel the test
builds (tests/channels.py: its ``python`` runs this interpreter with the prefix's site-packages
first), the ``mlops-local`` provisioner reading a ``jupyter_mlops_config.py`` in the project, real
kernels, papermill, DVC versioning.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from jupyter_mlops.data.project import init_project
from jupyter_mlops.kernels.registry import KERNELS
from jupyter_mlops.pipelines.runner import run_pipeline

from .channels import build_channel, define
from .conftest import Project, make_notebook

CONFIG = """\
c.KernelProfiles.profiles = {"default": {"display_name": "Default"},
                             "small": {"display_name": "Small", "cpu": 1}}
c.LocalKernels.gpu_inventory = "none"
c.LocalKernels.gpu_lease_dir = %r
"""

#: What a step's kernel is made of, written to the step's declared output ``{out}``.
FACTS = """\
import importlib.util, json, os
facts = {"demo": importlib.util.find_spec("mlops_demo") is not None,
         "profile": os.environ.get("MLOPS_KERNEL_PROFILE"), "environment": os.environ.get("MLOPS_KERNEL_ENVIRONMENT"),
         "prefix": os.environ.get("CONDA_PREFIX"), "omp": os.environ.get("OMP_NUM_THREADS")}
if facts["demo"]:
    import mlops_demo
    facts["version"] = mlops_demo.VERSION
with open(out, "w") as f:
    json.dump(facts, f)
"""

PIPELINE = """\
name: kernels
steps:
  in_env:
    notebook: facts.ipynb
    parameters: {out: in_env.json}
    outputs: [in_env.json]
    environment: demo
  sized:
    notebook: facts.ipynb
    parameters: {out: sized.json}
    outputs: [sized.json]
    environment: demo
    profile: small
  profile_only:
    notebook: facts.ipynb
    parameters: {out: profile_only.json}
    outputs: [profile_only.json]
    profile: small
  plain:
    notebook: facts.ipynb
    parameters: {out: plain.json}
    outputs: [plain.json]
"""


@pytest.fixture(scope="module")
def mlops_envs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``demo`` locked and installed; ``later`` locked, never created."""
    from jupyter_mlops.environments.install import create_environment
    from jupyter_mlops.environments.solve import lock_environment
    from jupyter_mlops.environments.spec import load_environment

    root = tmp_path_factory.mktemp("pipeline-kernels")
    channel = build_channel(root)
    defs = root / "environments"
    define(defs / "demo", channel, "[python, 'mlops-demo <2', mlops-act]")
    define(defs / "later", channel, "[python, mlops-demo]")
    demo = load_environment(defs / "demo")
    lock_environment(demo)
    lock_environment(load_environment(defs / "later"))
    env = create_environment(demo, root / "envs", root / "pkgs")
    return {"definitions": defs, "envs": root / "envs", "pkgs": root / "pkgs", "prefix": env.prefix}


@pytest.fixture
def mlops_kernels_project(mlops_project: Project, mlops_envs: dict[str, Path], tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> Project:
    """A DVC project whose config declares profiles ``default`` and ``small``, the test's
    environments and kernel specs folder, and one notebook that reports on its kernel."""
    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(mlops_envs["definitions"]))
    monkeypatch.setenv("MLOPS_ENVS_DIR", str(mlops_envs["envs"]))
    monkeypatch.setenv("MLOPS_PKGS_DIR", str(mlops_envs["pkgs"]))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    root = mlops_project.root
    init_project(root)
    (root / "jupyter_mlops_config.py").write_text(CONFIG % str(tmp_path / "leases"))
    make_notebook(root / "facts.ipynb", [FACTS], "out = 'facts.json'")
    return mlops_project


def run(project: Project, pipeline: str) -> Any:
    (project.root / "pipeline.yaml").write_text(pipeline)
    return run_pipeline(project.root / "pipeline.yaml", config=project.config(), retry_backoff=0.01)


def kernel_processes(pid: int | None = None) -> set[int]:
    """The kernels (children running ipykernel) of ``pid`` (default: this process), wherever their
    interpreter came from."""
    found = set()
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            if "ipykernel_launcher" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            pass
    return found


def test_steps_run_in_the_environment_and_profile_they_name(mlops_kernels_project: Project,
                                                            mlops_envs: dict[str, Path]) -> None:
    root = mlops_kernels_project.root
    before = kernel_processes()
    result = run(mlops_kernels_project, PIPELINE)
    assert result.ok, {n: s.error for n, s in result.steps.items()}
    facts = {name: json.loads((root / f"{name}.json").read_text()) for name in result.steps}
    prefix = str(mlops_envs["prefix"])
    assert facts["in_env"] == {"demo": True, "version": "1.0", "profile": "default", "environment": "demo",
                               "prefix": prefix, "omp": None}
    assert facts["sized"] == {**facts["in_env"], "profile": "small", "omp": "1"}
    # a profile alone: the server's interpreter, with the profile's limits
    assert facts["profile_only"] == {"demo": False, "profile": "small", "environment": "", "prefix": None, "omp": "1"}
    # no environment, no profile: the run's own kernel spec (python3), as before
    assert facts["plain"] == {"demo": False, "profile": None, "environment": None, "prefix": None, "omp": None}
    # the base spec the environment steps started from was written where Jupyter looks
    from jupyter_mlops.kernels.kernelspecs import BASE_SPEC, default_kernels_dir

    assert (default_kernels_dir() / BASE_SPEC / "kernel.json").is_file()
    # every pool closed with the run: no kernel is left, none is still registered
    assert not KERNELS.all()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in kernel_processes() - before], timeout=10)
    assert not alive

    again = run(mlops_kernels_project, PIPELINE)
    assert {s.status for s in again.steps.values()} == {"cached"}


FAILING = """\
name: kernels
steps:
  not_created:
    notebook: facts.ipynb
    parameters: {out: a.json}
    outputs: [a.json]
    environment: later
  unknown:
    notebook: facts.ipynb
    parameters: {out: b.json}
    outputs: [b.json]
    environment: nope
  no_such_profile:
    notebook: facts.ipynb
    parameters: {out: c.json}
    outputs: [c.json]
    profile: huge
  downstream:
    notebook: facts.ipynb
    parameters: {out: d.json}
    inputs: [a.json]
    outputs: [d.json]
  plain:
    notebook: facts.ipynb
    parameters: {out: e.json}
    outputs: [e.json]
"""


def test_a_kernel_that_cannot_start_fails_its_step_at_once_saying_why(mlops_kernels_project: Project) -> None:
    started = time.monotonic()
    result = run(mlops_kernels_project, FAILING)
    assert time.monotonic() - started < 60  # the reasons, not a start timeout
    assert result.status == "failed"
    assert {n: s.status for n, s in result.steps.items()} == {
        "not_created": "failed", "unknown": "failed", "no_such_profile": "failed", "downstream": "blocked",
        "plain": "succeeded"}
    errors = {n: s.error or "" for n, s in result.steps.items()}
    assert all("\n" not in e for e in errors.values()), errors
    assert errors["not_created"] == ("environment 'later' is not installed for its current lock; "
                                     "run `jupyter mlops env create later`")
    assert errors["unknown"].startswith("no environment 'nope' (known: demo, later)")
    assert errors["unknown"].endswith("run `jupyter mlops env create nope`")
    assert errors["no_such_profile"] == "kernel profiles: no kernel profile 'huge' (known: default, small)"
    assert not KERNELS.all()


SLEEPERS = """\
name: kernels
steps:
  in_env:
    notebook: sleep.ipynb
    environment: demo
    profile: small
  plain:
    notebook: sleep.ipynb
"""


@pytest.mark.slow
def test_ctrl_c_shuts_down_the_environment_kernels_too(mlops_kernels_project: Project) -> None:
    from jupyter_mlops.pipelines.state import open_store

    root = mlops_kernels_project.root
    make_notebook(root / "sleep.ipynb", ["import time\ntime.sleep(300)"])
    (root / "pipeline.yaml").write_text(SLEEPERS)
    command = [sys.executable, "-m", "jupyter_mlops", "pipeline", "run", "pipeline.yaml", "--no-progress"]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = open_store(mlops_kernels_project.config().resolved_pipeline_state_url)
    deadline = time.monotonic() + 120
    kernels: set[int] = set()
    while time.monotonic() < deadline:  # wait for the state the test needs: both sleepers running
        rows = store.query("SELECT step FROM step_runs WHERE status = 'running'")
        kernels = kernel_processes(proc.pid)
        if len(rows) == 2 and len(kernels) >= 2:
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    else:
        pytest.fail("the two steps never ran")
    processes = [psutil.Process(p) for p in kernels]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"kernels left behind: {[p.pid for p in alive]}"
    steps = {r["step"]: r["status"] for r in store.query("SELECT step, status FROM step_runs")}
    assert steps == {"in_env": "cancelled", "plain": "cancelled"}


def test_re_locking_an_environment_changes_the_keys_of_its_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_mlops.pipelines.cache import _environment_lock

    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(tmp_path))
    (tmp_path / "demo").mkdir()
    assert _environment_lock("demo") is None and _environment_lock(None) is None
    (tmp_path / "demo" / "conda-lock.yml").write_text("version: 1\npackage: []\n")
    first = _environment_lock("demo")
    (tmp_path / "demo" / "conda-lock.yml").write_text("version: 1\npackage: [{name: x}]\n")
    assert first is not None and _environment_lock("demo") not in (None, first)


@pytest.mark.slow
def test_a_fresh_runner_process_never_races_its_own_imports(mlops_kernels_project: Project) -> None:
    """The CLI in a fresh interpreter: the prewarm thread and the steps' workers import papermill,
    the kernel modules and DVC at once. Each try is a new process, so each one races anew."""
    root = mlops_kernels_project.root
    # no plain step: nothing imports the kernel modules before the threads start
    (root / "pipeline.yaml").write_text(PIPELINE.split("  plain:")[0])
    command = [sys.executable, "-m", "jupyter_mlops", "pipeline", "run", "pipeline.yaml", "--no-progress", "--force"]
    for attempt in range(4):
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"try {attempt + 1}:\n{out[-4000:]}"
        assert "partially initialized" not in out and "Deadlock" not in out


def _kernelspec(data_dir: Path, name: str, env: dict[str, str] | None = None) -> None:
    folder = data_dir / "kernels" / name
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python", "env": env or {}}))


def test_the_key_covers_the_kernels_environment_not_the_runners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_mlops.pipelines.cache import step_key
    from jupyter_mlops.pipelines.spec import StepSpec

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    site = tmp_path / "site"  # on kernel b's path only
    site.mkdir()
    _kernelspec(tmp_path / "data", "a")
    _kernelspec(tmp_path / "data", "b", {"PYTHONPATH": str(site)})
    nb = make_notebook(tmp_path / "nb.ipynb", ["pass"])

    def key(kernel: str) -> str:
        return step_key(StepSpec("s", "s", nb, {}, [], [], [], kernel=kernel), {})

    a, b = key("a"), key("b")
    assert a != b  # another kernel, another key
    runner_only = tmp_path / "runner-only"  # a package only this (the runner's) process can import
    (runner_only / "unrelated-1.0.dist-info").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(runner_only))
    assert (key("a"), key("b")) == (a, b)
    (site / "newpkg-2.0.dist-info").mkdir()  # installed where kernel b's interpreter looks
    assert key("a") == a and key("b") not in (a, b)


def test_a_venv_kernel_is_keyed_on_the_venvs_own_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A venv's bin/python is a link to the base interpreter: only through the link is it the venv's."""
    import venv

    from jupyter_mlops.pipelines.cache import step_key
    from jupyter_mlops.pipelines.spec import StepSpec

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    venv.create(tmp_path / "venv", symlinks=True)
    python = tmp_path / "venv" / "bin" / "python"
    folder = tmp_path / "data" / "kernels" / "v"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "v"}))
    nb = make_notebook(tmp_path / "nb.ipynb", ["pass"])
    before = step_key(StepSpec("s", "s", nb, {}, [], [], [], kernel="v"), {})
    site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    (site / "installed_in_the_venv-1.0.dist-info").mkdir()
    assert step_key(StepSpec("s", "s", nb, {}, [], [], [], kernel="v"), {}) != before


DIFFERENT = """\
name: kernels
steps:
  mine:
    notebook: which.ipynb
    parameters: {out: mine.json}
    outputs: [mine.json]
  other:
    notebook: which_other.ipynb
    parameters: {out: other.json}
    outputs: [other.json]
"""


def test_each_step_runs_on_its_notebooks_kernelspec(mlops_kernels_project: Project, tmp_path: Path) -> None:
    root = mlops_kernels_project.root
    _kernelspec(tmp_path / "jupyter-data", "other", {"MLOPS_WHICH_KERNEL": "other"})
    code = "import json, os\njson.dump(os.environ.get('MLOPS_WHICH_KERNEL'), open(out, 'w'))"
    make_notebook(root / "which.ipynb", [code], "out = 'x.json'")
    nb = json.loads(make_notebook(root / "which_other.ipynb", [code], "out = 'x.json'").read_text())
    nb["metadata"]["kernelspec"] = {"name": "other", "display_name": "other", "language": "python"}
    (root / "which_other.ipynb").write_text(json.dumps(nb))
    result = run(mlops_kernels_project, DIFFERENT)
    assert result.ok, {n: s.error for n, s in result.steps.items()}
    assert json.loads((root / "mine.json").read_text()) is None  # python3, the notebook's own
    assert json.loads((root / "other.json").read_text()) == "other"
    assert not KERNELS.all()
    # the run names a kernel: both steps run on it, and the key says so (the step that ran on
    # python3 runs again, the other one ran on this kernel already)
    forced = run_pipeline(root / "pipeline.yaml", config=mlops_kernels_project.config(), kernel_name="other")
    assert {n: s.status for n, s in forced.steps.items()} == {"mine": "succeeded", "other": "cached"}
    assert json.loads((root / "mine.json").read_text()) == "other"
