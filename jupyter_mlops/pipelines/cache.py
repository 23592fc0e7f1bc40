"""When a step may be skipped: its cache key, and whether its outputs are still what it wrote.

A step's key is the sha256 of, in canonical JSON:
  * the source of the notebook's code cells, and nothing else of the notebook (outputs,
    execution counts and papermill's timestamps change on every run; they are why ``dvc repro``
    re-runs everything downstream of a re-executed notebook);
  * the step's resolved parameters and its declared outputs;
  * the versions (DVC md5s) of its inputs;
  * the environment: interpreter, installed packages, conda lock, and the step's environment
    and profile names with that environment's lock.
A step is a hit when its key equals the key of its last success and each output still has the
version recorded then (a stat snapshot check: nothing is hashed unless it changed on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import (
    MlopsError,
    NotInRepoError,
    NotTrackedError,
    OutsideRepoError,
    StepInputError,
)
from .spec import StepSpec

__all__ = ["code_digest", "environment_digest", "input_versions", "step_key", "outputs_unchanged", "CacheEntry",
           "StepInputError"]

#: DVC is not thread-safe: every data call of the runner goes through this lock.
DATA_LOCK = threading.RLock()


def code_digest(notebook: Path) -> str:
    """sha256 of the code cells' source, in order."""
    try:
        with open(notebook, encoding="utf-8") as f:
            nb = json.load(f)
    except (OSError, ValueError) as e:
        raise MlopsError(f"cannot read notebook {notebook}: {e}") from e
    sources = [_text(c.get("source", "")) for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def _text(source: Any) -> str:
    return "".join(source) if isinstance(source, list) else str(source)


_env_digest: str | None = None


def environment_digest() -> str:
    """What the kernel's environment is made of (computed once per process)."""
    global _env_digest
    if _env_digest is None:
        from ..tracking.context import _conda_lock, installed_packages

        lock = _conda_lock()
        parts = {
            "python": sys.executable,
            "version": sys.version,
            "packages": installed_packages(),
            "conda_lock": hashlib.sha256(lock.read_bytes()).hexdigest() if lock else None,
        }
        _env_digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return _env_digest


def _environment_lock(environment: str | None) -> str | None:
    """sha256 of a named environment's lock (read each time: a long-lived scheduler sees a re-lock),
    so re-locking an environment re-runs the steps that use it."""
    if not environment:
        return None
    from ..config import load_config  # half a millisecond: config files may change between runs too

    lock = load_config().resolved_environments_dir / environment / "conda-lock.yml"
    try:
        return hashlib.sha256(lock.read_bytes()).hexdigest()
    except OSError:
        return None  # not locked: the step fails to start and is never cached


def _content_md5(path: Path) -> str:
    """md5 of a file's bytes, or of a folder's sorted (relative path, md5) list."""
    if path.is_file():
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    entries = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(folder) / name
            entries.append((full.relative_to(path).as_posix(), _content_md5(full)))
    return hashlib.md5(json.dumps(entries).encode()).hexdigest() + ".dir"


def version_md5(path: Path, start: Path) -> str | None:
    """The DVC md5 of ``path`` as it is on disk; content md5 when DVC does not track it; None if absent."""
    from ..data import api

    if not path.exists():
        return None
    with DATA_LOCK:
        try:
            return api.version(path, start=start, with_commit=False).md5
        except (NotTrackedError, NotInRepoError, OutsideRepoError):
            pass  # not versioned (yet): its content identifies it
        from ..data.dvc_client import find_dvc_root
        from ..data.index import DataIndex, snapshot

        root = find_dvc_root(start)
        snap = snapshot(path)
        key = "untracked:" + str(path.resolve())
        index = DataIndex(root) if root else None
        known = index.get(key) if index else None
        if known and snap is not None and known["snapshot"] == snap.digest:
            return str(known["md5"])
        md5 = _content_md5(path)
        if index is not None and snap is not None:
            index.put(key, md5, snap)
        return md5


def input_versions(step: StepSpec, base: Path) -> dict[str, str]:
    """{input path: md5} for each of the step's inputs; raises :class:`StepInputError` if one is missing."""
    found = {}
    for rel in step.inputs:
        md5 = version_md5(base / rel, base)
        if md5 is None:
            raise StepInputError(f"step {step.name}: input {rel} does not exist; run the step that writes it, "
                                 "or add it to the project")
        found[rel] = md5
    return found


def step_key(step: StepSpec, inputs: Mapping[str, str]) -> str:
    parts = {
        "code": code_digest(step.notebook),
        "parameters": step.parameters,
        "outputs": step.outputs,
        "inputs": dict(inputs),
        "environment": environment_digest(),
        "kernel": [step.environment, step.profile, _environment_lock(step.environment)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


@dataclass
class CacheEntry:
    key: str
    outputs: dict[str, str]
    run_id: str
    spool_id: str | None


def outputs_unchanged(entry: CacheEntry, base: Path) -> bool:
    """Every output still has the version the step's last success recorded."""
    return all(version_md5(base / rel, base) == md5 for rel, md5 in entry.outputs.items())
