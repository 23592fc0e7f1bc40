"""Kernel specs for every installed environment x the profiles that allow it.

JupyterLab's launcher, ``jupyter kernelspec list``, papermill (``-k``) and pipeline steps see them
as ordinary kernel specs, named ``mlops-<environment>-<profile>`` and shown as "Python (cpu, Small
(2 CPU, 4 GiB))"; each runs the ``mlops-local`` provisioner with its environment and profile. They
are written by ``jupyter mlops env create|remove`` and at server start (:func:`sync_kernelspecs`),
with one more, ``mlops``, that a launch names when it chooses environment and profile itself,
and only specs this module wrote (``metadata.mlops.generated``) are ever replaced or removed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .profiles import Profile

__all__ = ["kernelspec_name", "kernelspec_json", "sync_kernelspecs", "sync_from_config", "default_kernels_dir",
           "SyncResult", "BASE_SPEC"]

PROVISIONER = "mlops-local"
#: the provisioner of each kernel backend (``c.MlopsConfig.kernel_backend``)
PROVISIONERS = {"local": "mlops-local", "kubernetes": "mlops-kubernetes"}
#: The spec a launch-time choice starts from: the ``mlops-local`` provisioner with no environment or
#: profile of its own (the server's interpreter and the default profile unless the start says otherwise).
BASE_SPEC = "mlops"


def kernelspec_name(environment: str, profile: str) -> str:
    return f"mlops-{environment}-{profile}".lower()


def kernelspec_json(environment: str | None, profile: Profile | None, backend: str = "local") -> dict:
    """The spec of ``environment`` x ``profile``; both None: :data:`BASE_SPEC`. On Kubernetes the
    kernel is in a pod, where signals do not reach: interrupts are messages."""
    spec = _spec(environment, profile)
    spec["metadata"]["kernel_provisioner"]["provisioner_name"] = PROVISIONERS[backend]
    if backend != "local":
        spec["interrupt_mode"] = "message"
    return spec


def _spec(environment: str | None, profile: Profile | None) -> dict:
    if environment is None or profile is None:
        return {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python (mlops: the server's environment, default profile)", "language": "python",
                "metadata": {"kernel_provisioner": {"provisioner_name": PROVISIONER, "config": {}},
                             "mlops": {"generated": True, "environment": None, "profile": None, "gpus": 0},
                             "debugger": True}}
    return {
        # "python" is replaced by the environment's own interpreter when the kernel starts
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({environment}, {profile.display_name})",
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": PROVISIONER,
                                   "config": {"environment": environment, "profile": profile.name}},
            "mlops": {"generated": True, "environment": environment, "profile": profile.name,
                      "gpus": profile.gpus},
            "debugger": True,
        },
    }


def default_kernels_dir() -> Path:
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "kernels"


@dataclass(frozen=True)
class SyncResult:
    written: list[str]
    removed: list[str]


def _ours(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "kernel.json").read_text())["metadata"]["mlops"]["generated"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def sync_kernelspecs(environments: Iterable[str], profiles: Iterable[Profile], kernels_dir: Path,
                     backend: str = "local") -> SyncResult:
    """Make ``kernels_dir`` hold exactly one spec per environment x allowed profile (of ours).

    A spec that would not change is not rewritten, so a running launcher sees no churn.
    """
    wanted = {kernelspec_name(env, p.name): kernelspec_json(env, p, backend)
              for env in sorted(set(environments)) for p in profiles if p.allows_environment(env)}
    wanted[BASE_SPEC] = kernelspec_json(None, None, backend)
    written, removed = [], []
    for name, spec in wanted.items():
        file = kernels_dir / name / "kernel.json"
        text = json.dumps(spec, indent=1, sort_keys=True) + "\n"
        try:
            if file.read_text() == text:
                continue
        except OSError:
            pass
        if file.parent.exists() and not _ours(file.parent):
            continue  # someone's own spec by that name: theirs wins
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_suffix(".json.partial")
        partial.write_text(text)
        partial.replace(file)
        written.append(name)
    if kernels_dir.is_dir():
        for folder in sorted(kernels_dir.glob("mlops*")):
            if folder.name not in wanted and _ours(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
    return SyncResult(written, removed)


def sync_from_config(config: object = None) -> SyncResult:
    """:func:`sync_kernelspecs` for the configured profiles and the environments the backend can
    run: installed prefixes (local), definitions with an ``image:`` (kubernetes). The names are
    the same on both, so a notebook or a pipeline moves between them unchanged."""
    from ..config import load_config
    from ..environments.install import installed
    from ..errors import ConfigError
    from .profiles import KernelProfiles

    settings = load_config(config)  # type: ignore[arg-type]
    backend = settings.kernel_backend
    if backend not in PROVISIONERS:
        raise ConfigError(f"kernel_backend {backend!r} is not one of {', '.join(PROVISIONERS)}", source="MlopsConfig")
    profiles = KernelProfiles(config=settings.config).parsed().values()
    if backend == "local":
        names = [e.name for e in installed(settings.resolved_envs_dir)]
    else:
        names = _image_environments(settings.resolved_environments_dir)
    return sync_kernelspecs(names, list(profiles), default_kernels_dir(), backend)


def _image_environments(directory: Path) -> list[str]:
    from ..environments.spec import find_environments, load_environment
    from ..errors import MlopsError

    names = []
    for name, folder in find_environments(directory).items():
        try:
            if load_environment(folder).image:
                names.append(name)
        except MlopsError:
            continue  # a broken definition has no kernel; `env list` says why
    return names
