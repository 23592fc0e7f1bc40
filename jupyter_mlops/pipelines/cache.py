"""When a step may be skipped: its cache key, and whether its outputs are still what it wrote.

A step's key is the sha256 of, in canonical JSON:
  * the source of the notebook's code cells, and nothing else of the notebook (outputs,
    execution counts and papermill's timestamps change on every run; they are why ``dvc repro``
    re-runs everything downstream of a re-executed notebook);
  * the parameters the pipeline, the step, the matrix and ``-p`` set (the cell's own defaults are
    in its source, above), and its declared outputs;
  * the versions (DVC md5s) of its inputs;
  * what its kernel runs on, and nothing of the runner's own process:
      - the kernel spec it runs on (the step's ``kernel:``, ``--kernel`` or the notebook's own), its
        ``environment`` and ``profile`` names;
      - for a step in a named environment: that environment's lock (re-locking re-runs it);
      - otherwise the fingerprint of the kernel's interpreter (:mod:`.kernel_env`): the spec's argv
        and env, the interpreter's version and the distributions on *its* ``sys.path``. So a
        ``pip install`` into the runner's venv re-runs nothing when the kernel is another
        interpreter, and re-runs the steps of a kernel that can import what was installed (it may
        have changed what they compute). A profile-only step runs the runner's interpreter (the
        ``mlops`` spec), fingerprinted the same way.
    Why not the runner's packages, as before: the runner is not what executes the notebook; keying
    on it re-ran every step after any unrelated install, and missed what changed in a kernel of
    another interpreter (an R notebook's kernel, a conda environment's python).
A step is a hit when its key equals the key of its last success and each output still has the
version recorded then (a stat snapshot check: nothing is hashed unless it changed on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
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


def environment_digest(step: StepSpec) -> str | None:
    """What ``step``'s kernel runs on, for its key: None for a named environment (its lock is keyed)."""
    from .kernel_env import kernel_fingerprint, python_fingerprint

    if step.environment:
        return None
    if step.profile:  # the mlops spec without an environment: this interpreter, the profile's limits
        import sys

        return python_fingerprint(os.path.abspath(sys.executable))
    return kernel_fingerprint(step.kernel or "python3")


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
    """sha256 of what the step's result depends on (see the module's docstring)."""
    parts = {
        "code": code_digest(step.notebook),
        "parameters": step.parameters,
        "outputs": step.outputs,
        "inputs": dict(inputs),
        "environment": environment_digest(step),
        "kernel": [step.kernel, step.environment, step.profile, _environment_lock(step.environment)],
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
