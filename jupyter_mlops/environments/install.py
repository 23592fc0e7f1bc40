"""``jupyter mlops env create|remove NAME``: install a lock exactly (no re-solve) into a prefix.

Prefixes live under the environments directory of config (``c.MlopsConfig.envs_dir``, default
``~/.local/share/jupyter_mlops/envs``) and share one package cache, so a second environment with the
same packages downloads and extracts nothing. The prefix of an environment is named after the
lock's content (``NAME-<sha256[:12]>``): a new lock makes a new prefix, the old one stays usable
until removed, and creating the same lock again is a no-op.

An install goes into ``<prefix>.partial`` and is renamed into place only when complete, with the
lock kept inside it (``conda-meta/mlops-lock.yml``): an interrupted create leaves a ``.partial``
folder (cleared by the next create), never a prefix that looks complete.

The lock's ``manager: pip`` packages of this platform are downloaded and checked against their
sha256 before anything is linked, and installed by the prefix's own pip after the conda packages,
still inside the ``.partial`` folder (:mod:`.pip`). Files that embed the prefix's path (conda's
placeholders, pip's script lines) name the final prefix, not the ``.partial`` one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import EnvironmentSpecError, MlopsError
from .lockfile import read_lock, read_pip_lock
from .spec import EnvironmentSpec, current_platform

__all__ = ["InstalledEnvironment", "create_environment", "installed", "remove_environment", "LOCK_COPY"]

LOCK_COPY = Path("conda-meta") / "mlops-lock.yml"
MARKER = Path("conda-meta") / "mlops-environment.json"


@dataclass(frozen=True)
class InstalledEnvironment:
    name: str
    prefix: Path
    lock_sha256: str
    packages: int
    created: bool  # False: it was there already

    @property
    def lock(self) -> Path:
        return self.prefix / LOCK_COPY


def _lock_digest(lock: Path) -> str:
    return hashlib.sha256(lock.read_bytes()).hexdigest()


def create_environment(spec: EnvironmentSpec, envs_dir: Path, cache_dir: Path, *,
                       say: Callable[[str], None] = lambda text: None) -> InstalledEnvironment:
    """Install ``spec``'s lock for this platform. Returns at once when that lock is installed.

    Raises :class:`EnvironmentSpecError` for a missing or damaged lock, :class:`MlopsError` when
    the packages cannot be fetched or linked (with py-rattler's or pip's reason), when a pip
    wheel's sha256 differs from the lock's, or when the lock has pip packages and the prefix no
    ``bin/python -m pip``. On any failure no prefix is left, complete or partial.
    """
    if not spec.locked:
        raise EnvironmentSpecError(str(spec.lock_file), None, f"{spec.name} is not locked; run `jupyter mlops env "
                                   f"lock {spec.name}` where its channels are reachable")
    digest = _lock_digest(spec.lock_file)
    prefix = envs_dir / f"{spec.name}-{digest[:12]}"
    if (prefix / MARKER).is_file():
        packages = json.loads((prefix / MARKER).read_text())["packages"]
        return InstalledEnvironment(spec.name, prefix, digest, packages, created=False)
    packages = read_lock(spec.lock_file, current_platform())
    wheels = read_pip_lock(spec.lock_file, current_platform())
    partial = prefix.with_name(prefix.name + ".partial")
    if partial.exists():
        say(f"removing an unfinished earlier create: {partial}")
        shutil.rmtree(partial)
    envs_dir.mkdir(parents=True, exist_ok=True)
    count = len(packages) + len(wheels)
    say(f"installing {count} packages of {spec.name} into {prefix}")
    try:
        files = _fetch_wheels(wheels, cache_dir)  # a wrong hash stops here: nothing linked yet
        asyncio.run(_install(packages, partial, prefix, cache_dir))
        if wheels:
            from .pip import install_wheels

            install_wheels(wheels, files, partial, final=prefix)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(e, MlopsError):
            raise MlopsError(f"{spec.name}: {e}") from e
        raise MlopsError(f"{spec.name}: the packages could not be installed ({' '.join(str(e).split())[:400]})") from e
    (partial / LOCK_COPY).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.lock_file, partial / LOCK_COPY)
    (partial / MARKER).write_text(json.dumps({"name": spec.name, "lock_sha256": digest, "packages": count,
                                              "definition": str(spec.folder)}))
    os.replace(partial, prefix)  # complete, or not there at all
    return InstalledEnvironment(spec.name, prefix, digest, count, created=True)


def _fetch_wheels(wheels: list, cache_dir: Path) -> list[Path]:
    if not wheels:
        return []
    from .pip import fetch_wheels

    return fetch_wheels(wheels, cache_dir)


async def _install(packages: list, prefix: Path, final: Path, cache_dir: Path) -> None:
    import rattler

    # linked into the .partial folder, but with the final prefix written into files that embed it
    await rattler.install([p.to_record() for p in packages], target_prefix=prefix, cache_dir=cache_dir,
                          show_progress=False, alternative_target_prefix=final)


def installed(envs_dir: Path) -> list[InstalledEnvironment]:
    """The complete prefixes under ``envs_dir`` (``.partial`` ones are not)."""
    found = []
    if envs_dir.is_dir():
        for prefix in sorted(envs_dir.iterdir()):
            marker = prefix / MARKER
            if prefix.name.endswith(".partial") or not marker.is_file():
                continue
            data = json.loads(marker.read_text())
            found.append(InstalledEnvironment(data["name"], prefix, data["lock_sha256"], data["packages"], False))
    return found


def remove_environment(name: str, envs_dir: Path) -> list[Path]:
    """Remove every installed prefix of ``name``; returns what was removed."""
    removed = []
    for env in installed(envs_dir):
        if env.name == name:
            shutil.rmtree(env.prefix)
            removed.append(env.prefix)
    for partial in envs_dir.glob(f"{name}-*.partial") if envs_dir.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)
    return removed
