"""What a local kernel of (environment, profile) gets, decided before its process starts.

:func:`plan_launch` turns the names a user chose into a :class:`LaunchPlan`: the installed prefix
and its interpreter, the variables activation sets, the profile's resources as the OS can apply them
and the facts a tracked run records (``MLOPS_KERNEL_PROFILE``, ``MLOPS_KERNEL_ENVIRONMENT``). It starts nothing and holds nothing: the
provisioner (:mod:`.provisioner`) applies the plan and takes the GPUs.

Settings for local kernels are ``c.LocalKernels.*`` (:class:`LocalKernels`).
"""

from __future__ import annotations

import getpass
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, List, Unicode
from traitlets.config import Configurable

from ..config import MlopsConfig
from ..errors import KernelStartError
from .profiles import KernelProfiles, Profile

__all__ = ["LaunchPlan", "LocalKernels", "plan_launch", "find_prefix", "current_user"]

#: Thread-pool sizes that numeric libraries read at import: a kernel with 2 CPUs starts 2 threads
#: per pool, not one per core of the machine.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_MAX_THREADS")


class LocalKernels(Configurable):
    """How kernels on this machine get their GPUs and limits (``c.LocalKernels.*``)."""

    gpu_inventory = Unicode("nvml", help="Where the GPUs come from: nvml (nvidia-ml-py), static "
                            "(gpu_devices), none, or a jupyter_mlops.gpu_inventories entry point.").tag(config=True)
    gpu_devices = List([], help="For the static inventory: dicts with name and optionally index, uuid, "
                       "memory_total.").tag(config=True)
    gpu_wait = Bool(False, help="When the GPUs a profile asks for are busy: wait in a queue (the kernel "
                    "start reports its place) instead of failing at once.").tag(config=True)
    gpu_wait_timeout = Float(300.0, help="Seconds a queued GPU request waits before it fails.").tag(config=True)
    gpu_lease_dir = Unicode("", help="Folder of GPU leases, shared by every server of the machine. Empty: "
                            "<jupyter runtime dir>/mlops-gpus.").tag(config=True)
    limit_memory = Bool(True, help="Cap a kernel's data memory (RLIMIT_DATA) at its profile's memory. "
                        "RLIMIT_AS is not used: CUDA reserves far more address space than it uses.").tag(config=True)

    @property
    def lease_dir(self) -> Path:
        if self.gpu_lease_dir:
            return Path(self.gpu_lease_dir)
        from jupyter_core.paths import jupyter_runtime_dir

        return Path(jupyter_runtime_dir()) / "mlops-gpus"


@dataclass
class LaunchPlan:
    """A kernel to start: who, in which environment, with what."""

    user: str
    profile: Profile
    environment: str | None = None  # None: the kernel spec's own interpreter and packages
    prefix: Path | None = None
    python: str | None = None  # the prefix's interpreter
    env: dict[str, str] = field(default_factory=dict)  # added to the kernel's environment
    memory: int | None = None  # bytes, applied as RLIMIT_DATA; None: no cap

    def describe(self) -> dict[str, Any]:
        return {"user": self.user, "environment": self.environment, "profile": self.profile.name,
                "prefix": str(self.prefix) if self.prefix else None, "python": self.python,
                "memory_limit": self.memory, "cpu": self.profile.cpu}


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def find_prefix(name: str, config: MlopsConfig) -> tuple[Path, dict[str, str]]:
    """The installed prefix of environment ``name`` and its definition's ``variables:``.

    The prefix is the one of the definition's current lock; with no definition here (a server that
    only runs environments installed elsewhere), the newest installed prefix of that name. Raises
    :class:`KernelStartError` saying what to run when there is none.
    """
    from ..environments.install import MARKER, installed
    from ..environments.spec import find_environments, load_environment

    envs_dir = config.resolved_envs_dir
    definitions = find_environments(config.resolved_environments_dir)
    if name in definitions:
        import hashlib

        spec = load_environment(definitions[name])
        if not spec.locked:
            raise KernelStartError(f"environment {name!r} is not locked; run `jupyter mlops env lock {name}` "
                                   "where its channels are reachable, then `jupyter mlops env create " f"{name}`")
        digest = hashlib.sha256(spec.lock_file.read_bytes()).hexdigest()
        prefix = envs_dir / f"{name}-{digest[:12]}"
        if not (prefix / MARKER).is_file():
            raise KernelStartError(f"environment {name!r} is not installed for its current lock; run "
                                   f"`jupyter mlops env create {name}`")
        return prefix, dict(spec.variables)
    found = sorted((e for e in installed(envs_dir) if e.name == name), key=lambda e: e.prefix.stat().st_mtime)
    if not found:
        known = sorted({*definitions, *(e.name for e in installed(envs_dir))})
        raise KernelStartError(f"no environment {name!r} (known: {', '.join(known) or 'none'}); define it under "
                               f"{config.resolved_environments_dir} and run `jupyter mlops env create {name}`")
    return found[-1].prefix, {}


def plan_launch(environment: str | None, profile: str | None, user: str | None, *,
                config: MlopsConfig, profiles: KernelProfiles) -> LaunchPlan:
    """Check that ``user`` may run ``environment`` with ``profile`` and say how.

    Raises :class:`~jupyter_mlops.errors.ConfigError` for a profile that does not exist or is not
    theirs, :class:`KernelStartError` for an environment that is not installed or has no Python.
    """
    user = user or current_user()
    chosen = profiles.get(profile, user, environment)
    plan = LaunchPlan(user=user, profile=chosen, environment=environment or None, memory=chosen.memory)
    if environment:
        from ..environments.activation import activation_env

        prefix, variables = find_prefix(environment, config)
        python = prefix / "bin" / "python"
        if not os.access(python, os.X_OK):
            raise KernelStartError(f"environment {environment!r} has no Python at {python}; add python and "
                                   "ipykernel to its dependencies, lock and create it again")
        plan.prefix, plan.python = prefix, str(python)
        plan.env.update(activation_env(prefix, variables))
        from ..environments.install import LOCK_COPY

        if (prefix / LOCK_COPY).is_file():
            plan.env["MLOPS_ENV_LOCK"] = str(prefix / LOCK_COPY)
    if chosen.cpu is not None:
        threads = str(max(1, math.ceil(chosen.cpu)))
        plan.env.update({name: threads for name in THREAD_VARIABLES})
    # what a tracked run records; not the user: a pooled kernel is started before anyone claims it
    plan.env.update({"MLOPS_KERNEL_PROFILE": chosen.name, "MLOPS_KERNEL_ENVIRONMENT": environment or ""})
    return plan
