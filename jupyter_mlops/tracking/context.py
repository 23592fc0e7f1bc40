"""What a run records without being asked: where the code came from and what it ran on.

Everything here is cheap (tens of milliseconds in all) because it runs inside ``%mlops track``:
no package metadata parsing, no mlflow, two ``git`` calls run in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..parameters_cell import notebook_parameters, parse_assignments

__all__ = [
    "RunContext",
    "capture",
    "notebook_path",
    "papermill_parameters",
    "installed_packages",
    "parameter_defaults",
    "papermill_cli_paths",
]

#: The comment papermill puts first in the cell it injects (papermill.translators codify()).
PAPERMILL_MARKER = "# Parameters"


@dataclass
class RunContext:
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    #: artifact files to record: (artifact dir, file name, text)
    files: list[tuple[str, str, str]] = field(default_factory=list)


def notebook_path(user_ns: Mapping[str, Any] | None = None, cwd: Path | None = None) -> Path | None:
    """The notebook this kernel runs, if anything says so.

    In order: ``MLOPS_NOTEBOOK_PATH`` (set by our runners), ``JPY_SESSION_NAME`` (Jupyter Server
    gives it to kernels; relative to the server root, so looked up from the working directory
    upwards), VS Code's ``__vsc_ipynb_file__``.
    """
    cwd = cwd or Path.cwd()
    explicit = os.environ.get("MLOPS_NOTEBOOK_PATH")
    if explicit:
        return (cwd / explicit).resolve()
    session = os.environ.get("JPY_SESSION_NAME")
    if session:
        candidate = Path(session)
        if candidate.is_absolute():
            return candidate
        for folder in (cwd, *cwd.parents):
            if (folder / candidate).is_file():
                return (folder / candidate).resolve()
        if (cwd / candidate.name).is_file():
            return (cwd / candidate.name).resolve()
    vscode = (user_ns or {}).get("__vsc_ipynb_file__")
    if isinstance(vscode, str) and vscode:
        return Path(vscode)
    cli = papermill_cli_paths()
    if cli is not None:
        return cli[0]
    return None


def papermill_cli_paths(ppid: int | None = None) -> tuple[Path, Path] | None:
    """(input, output) when this kernel was started by the ``papermill`` command (Linux).

    papermill tells its kernel neither path, but the kernel is its child: the parent's command
    line ``papermill IN.ipynb OUT.ipynb ...`` names both, relative to the parent's folder.
    """
    ppid = os.getppid() if ppid is None else ppid
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        cwd = Path(os.readlink(f"/proc/{ppid}/cwd"))
    except OSError:
        return None
    if "papermill" not in [Path(a).name for a in argv[:3]]:  # papermill ... or python [-m] papermill ...
        return None
    notebooks = [a for a in argv[1:] if a.endswith(".ipynb") and "://" not in a]
    if len(notebooks) < 2:
        return None
    return (cwd / notebooks[0]).resolve(), (cwd / notebooks[1]).resolve()


def _assignments(source: str) -> dict[str, str] | None:
    """``name -> text`` of a cell made only of assignments, else None (see :mod:`..parameters_cell`)."""
    try:
        found = parse_assignments(source, only_assignments=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return None if found is None else {name: p.text for name, p in found.items()}


def parameter_defaults(notebook: Mapping[str, Any]) -> dict[str, str]:
    """Defaults of the cell tagged ``parameters`` in a notebook (a JSON or nbformat dict), as text:
    a literal as MLflow stringifies it, an expression as written (its value is the kernel's)."""
    try:
        return {name: p.text for name, p in notebook_parameters(notebook).items()}
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return {}


def papermill_parameters(history: Sequence[str]) -> tuple[dict[str, str], dict[str, str]] | None:
    """(defaults, injected) from a kernel's input history, or None when papermill did not run it.

    papermill inserts its cell right after the cell tagged ``parameters`` and runs cells in order,
    so in the history the injected cell (starting ``# Parameters``) follows the defaults.
    """
    explicit = os.environ.get("MLOPS_NOTEBOOK_PARAMETERS")
    if explicit:  # set by our runners, which read the notebook's parameters cell themselves
        try:
            given = json.loads(explicit)
            return dict(given.get("defaults", {})), dict(given.get("injected", {}))
        except (ValueError, AttributeError, TypeError):
            pass
    for i in range(len(history) - 1, -1, -1):
        if history[i].lstrip().split("\n", 1)[0].rstrip() == PAPERMILL_MARKER:
            injected = _assignments(history[i]) or {}
            defaults = (_assignments(history[i - 1]) if i > 0 else None) or {}
            return defaults, injected
    return None


def installed_packages() -> list[str]:
    """``name==version`` of every distribution on sys.path, from dist-info folder names (fast)."""
    found = set()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info"):
                stem = name[: -len(".dist-info")]
                dist, _, version = stem.partition("-")
                found.add(f"{dist.lower().replace('_', '-')}=={version}")
    return sorted(found)


def _git(args: list[str], cwd: Path) -> subprocess.Popen[str] | None:
    try:
        return subprocess.Popen(
            ["git", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
    except OSError:
        return None


def _git_context(folder: Path, notebook: Path | None) -> dict[str, str]:
    head = _git(["rev-parse", "HEAD", "--abbrev-ref", "HEAD", "--show-toplevel"], folder)
    status = _git(["status", "--porcelain", "-z", "--untracked-files=no"], folder)
    remote = _git(["config", "--get", "remote.origin.url"], folder)
    tracked = _git(["ls-files", "--error-unmatch", "--", str(notebook)], folder) if notebook is not None else None
    tags: dict[str, str] = {}
    if head is None:
        return tags
    out, _ = head.communicate()
    status_out = status.communicate()[0] if status else ""
    remote_out = remote.communicate()[0].strip() if remote else ""
    if tracked is not None:
        tracked.communicate()
    untracked = tracked is not None and tracked.returncode != 0
    if head.returncode != 0:
        return tags
    lines = out.split()
    if len(lines) >= 3:
        commit, branch, top = lines[0], lines[1], " ".join(lines[2:])
        tags["mlflow.source.git.commit"] = commit
        tags["mlflow.source.git.branch"] = branch
        tags["mlops.git.root"] = top
        changed = [entry[3:] for entry in status_out.split("\0") if entry]
        tags["mlops.git.repo_dirty"] = str(bool(changed)).lower()
        if notebook is not None:
            try:
                rel = notebook.resolve().relative_to(Path(top).resolve()).as_posix()
                tags["mlops.notebook.dirty"] = str(rel in changed or untracked).lower()
            except ValueError:
                pass
    if remote_out:
        tags["mlflow.source.git.repoURL"] = remote_out
    return tags


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


MAX_REASON = 500  # characters of an NVML error kept in the tag


def gpu_inventory() -> list[dict[str, str]]:
    """GPUs NVML reports (needs nvidia-ml-py and a driver); empty when there are none or NVML
    cannot tell (see :func:`gpu_census` for which)."""
    return gpu_census()[0] or []


def gpu_census() -> tuple[list[dict[str, str]] | None, str | None]:
    """(GPUs NVML reports, None), or (None, why NVML cannot tell): no nvidia-ml-py, or the
    driver failed. An empty list only when NVML answered that there are none."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py to record GPUs)"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError: no driver, or it failed: that says nothing about GPUs
        return None, f"NVML did not start: {type(e).__name__}: {e}"[:MAX_REASON]
    try:
        return _nvml_devices(pynvml), None
    except Exception as e:  # a driver failing mid-way: unknown, not zero
        return None, f"NVML failed: {type(e).__name__}: {e}"[:MAX_REASON]
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass



def _nvml_devices(pynvml: Any) -> list[dict[str, str]]:
    """The GPUs NVML lists, those of CUDA_VISIBLE_DEVICES only when it is set."""
    gpus = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        gpus.append({
            "index": str(index),
            "name": name.decode() if isinstance(name, bytes) else name,
            "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
            "memory_bytes": str(memory),
        })
    if visible is not None:
        allowed = {v.strip() for v in visible.split(",") if v.strip()}
        gpus = [g for g in gpus if g["index"] in allowed or g["uuid"] in allowed]
    return gpus


def capture(notebook: Path | None, history: Sequence[str] = (), cwd: Path | None = None) -> RunContext:
    """Collect the run's context. Never raises for a missing tool: absent facts are just absent."""
    cwd = cwd or Path.cwd()
    ctx = RunContext()
    tags = ctx.tags
    tags.update(_git_context(cwd, notebook))
    if notebook is not None:
        tags["mlflow.source.name"] = str(notebook)
        tags["mlflow.source.type"] = "NOTEBOOK"
        tags["mlops.notebook.path"] = str(notebook)
    try:
        import getpass

        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    tags["mlops.python.version"] = platform.python_version()
    tags["mlops.python.executable"] = sys.executable
    packages = installed_packages()
    listing = "\n".join(packages) + "\n"
    tags["mlops.packages.sha256"] = hashlib.sha256(listing.encode()).hexdigest()
    tags["mlops.packages.count"] = str(len(packages))
    ctx.files.append(("environment", "packages.txt", listing))
    lock = _conda_lock()
    if lock is not None:
        text = lock.read_text(encoding="utf-8", errors="replace")
        tags["mlops.conda_lock.sha256"] = hashlib.sha256(text.encode()).hexdigest()
        tags["mlops.conda_lock.path"] = str(lock)
        ctx.files.append(("environment", "conda-lock.yml", text))
    if os.environ.get("CONDA_PREFIX"):
        tags["mlops.conda.prefix"] = os.environ["CONDA_PREFIX"]
    # set by the mlops kernel provisioners: what the kernel was started as
    for variable, tag in (("MLOPS_KERNEL_ENVIRONMENT", "mlops.kernel.environment"),
                          ("MLOPS_KERNEL_PROFILE", "mlops.kernel.profile")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    tags["mlops.host"] = socket.gethostname()
    tags["mlops.platform"] = platform.platform()
    cpus = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    tags["mlops.cpu_count"] = str(cpus)
    memory = _memory_bytes()
    if memory:
        tags["mlops.memory_bytes"] = str(memory)
    gpus, unknown = gpu_census()
    tags["mlops.gpu_count"] = str(len(gpus)) if gpus is not None else "unknown"  # not 0: nobody asked NVML
    if unknown:
        tags["mlops.gpu_inventory"] = unknown
    if gpus:
        tags["mlops.gpus"] = json.dumps(gpus)
    parameters = papermill_parameters(history)
    if parameters is not None:
        defaults, injected = parameters
        tags["mlops.papermill.defaults"] = json.dumps(defaults, sort_keys=True)
        tags["mlops.papermill.injected"] = json.dumps(injected, sort_keys=True)
        ctx.params.update(defaults)
        ctx.params.update(injected)
    elif notebook is not None:
        # Run by hand: the values of the saved notebook's cell tagged "parameters", as a
        # papermill run of it with no -p would record them.
        defaults = _saved_parameters(notebook)
        if defaults:
            tags["mlops.parameters.source"] = "the saved notebook's parameters cell"
            ctx.params.update(defaults)
    return ctx


def _saved_parameters(notebook: Path) -> dict[str, str]:
    """The parameters cell's values of a saved notebook (read as JSON: no nbformat in the kernel)."""
    try:
        with open(notebook, encoding="utf-8") as f:
            nb = json.load(f)
    except (OSError, ValueError):
        return {}
    return parameter_defaults(nb) if isinstance(nb, dict) else {}


def _conda_lock() -> Path | None:
    """The lock file of the environment the kernel runs in, when one is known.

    ``MLOPS_ENV_LOCK`` is set by the environment-aware kernel provisioner; a prefix created by
    ``jupyter mlops env create`` also keeps a copy at ``<prefix>/conda-meta/mlops-lock.yml``.
    """
    explicit = os.environ.get("MLOPS_ENV_LOCK")
    if explicit and Path(explicit).is_file():
        return Path(explicit)
    prefix = os.environ.get("CONDA_PREFIX")
    if prefix:
        candidate = Path(prefix) / "conda-meta" / "mlops-lock.yml"
        if candidate.is_file():
            return candidate
    return None
