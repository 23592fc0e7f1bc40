"""``jupyter_mlops.data``: version data with DVC and record every version on the active run."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError
from . import pinned
from .dvc_client import DvcProject
from .index import DataIndex, snapshot
from .versions import DataVersion

if TYPE_CHECKING:
    from ..tracking.run import Run

__all__ = ["add", "use", "version", "status", "push", "pull", "DataChange"]

VERSIONS_DIR = Path(".mlops") / "data" / "versions"
_projects: dict[Path, DvcProject] = {}
_told_no_run = False


def _project(start: Path | None = None) -> DvcProject:
    found = DvcProject.find(start or Path.cwd())
    return _projects.setdefault(found.root, found)


def version(path: str | os.PathLike[str], rev: str | None = None, *, start: Path | None = None,
            with_commit: bool = True) -> DataVersion:
    """The version of ``path`` in the workspace (or at git revision ``rev``), without recording it.

    In the workspace, an unchanged path costs a stat walk (no hashing, no dvc import); a changed
    one is hashed again. Raises :class:`DataError` subclasses for a path outside the project, a
    missing path, an unknown revision or a path DVC does not track. ``start``: a folder inside
    the project (default: the current one). ``with_commit=False`` leaves ``rev`` unset and saves
    the two git calls that find it (a cache check needs the md5 only).
    """
    project = _project(start)
    rel = project.rel(path)
    if rev:
        return project.version_at(rel, rev)
    if not (project.root / rel).exists():
        raise DataError(f"{path} does not exist (pull it with `%mlops data pull` if it is versioned)", path=str(path))
    target, dvcfile = project.tracked_target(rel)
    md5, size, nfiles, kind = project.recorded(target, dvcfile)
    current = _current(project, target)
    if current is None:
        raise DataError(f"{target} does not exist (pull it with `%mlops data pull {target}`)", path=target)
    current_md5, size, nfiles, snap = current
    modified = current_md5 != md5
    rev_of = None if modified or not with_commit else project.commit_of(dvcfile)
    return DataVersion(target, current_md5, size, nfiles, kind, rev_of, modified, snap)


def _current(project: DvcProject, target: str) -> tuple[str, int, int, str] | None:
    """(md5, size, nfiles, snapshot) of the bytes on disk; hashes only what the snapshot says changed."""
    snap = snapshot(project.root / target)
    if snap is None:
        return None
    index = DataIndex(project.root)
    known = index.get(target)
    if known and known["snapshot"] == snap.digest:
        return known["md5"], snap.size, snap.nfiles, snap.digest
    md5, size, nfiles = project.hash_workspace(target)
    index.put(target, md5, snap)
    return md5, size, nfiles, snap.digest


def use(path: str | os.PathLike[str], rev: str | None = None) -> Path:
    """Record the exact version of ``path`` as an input of the active run; return a path to read.

    With ``rev`` (a commit, tag or branch) the version that revision records is materialised once
    under ``.mlops/data/versions/`` and that private, read-only copy is returned: the workspace is
    untouched. The copy is checked before each reuse and replaced if it was altered (see
    :mod:`.pinned`); :class:`DataError` if it must be fetched again and DVC cannot.
    """
    project = _project()
    rel = project.rel(path)
    found = version(path, rev)
    if rev:
        local = pinned.materialize(project, found, project.root / VERSIONS_DIR)
        inner = rel[len(found.path):].lstrip("/")
        local = local / inner if inner else local
        if not local.exists():
            raise DataError(f"{rel} is not in {found.path} at revision {rev}", path=rel)
    else:
        local = project.root / rel
        if found.modified:
            print(f"note: {found.path} differs from its versioned copy; recorded as modified "
                  f"(run `%mlops data add {found.path}` to version it)", file=sys.stderr)
    _record(found, "input")
    return local


def add(*paths: str | os.PathLike[str], record: bool = True, start: Path | None = None) -> list[DataVersion]:
    """Version each path with DVC and record it as an output of the active run (``record``).

    Unchanged paths are not hashed again. An interrupted add leaves the previous version intact.
    """
    if not paths:
        raise DataError("name at least one file or folder to version")
    project = _project(start)
    rels = []
    for path in paths:
        rel = project.rel(path)
        if not (project.root / rel).exists():
            raise DataError(f"{path} does not exist", path=str(path))
        rels.append(rel)
    index = DataIndex(project.root)
    changed = [rel for rel in rels if not _unchanged(project, index, rel)]
    if changed:
        project.add(*changed)  # one DVC call for all: its set-up costs more than a small file
    versions = []
    for rel in rels:
        dvcfile = rel + ".dvc"
        snap = snapshot(project.root / rel)
        md5, size, nfiles, kind = project.recorded(rel, dvcfile)
        assert snap is not None
        index.put(rel, md5, snap)
        found = DataVersion(rel, md5, size, nfiles, kind, project.commit_of(dvcfile), False, snap.digest)
        if record:
            _record(found, "output")
        versions.append(found)
    return versions


def _unchanged(project: DvcProject, index: DataIndex, rel: str) -> bool:
    """The .dvc file already records what is on disk (by stat snapshot: nothing is hashed)."""
    known = index.get(rel)
    snap = snapshot(project.root / rel)
    return (
        (project.root / (rel + ".dvc")).is_file()
        and known is not None
        and snap is not None
        and known["snapshot"] == snap.digest
        and project.recorded(rel, rel + ".dvc")[0] == known["md5"]
    )


@dataclass(frozen=True)
class DataChange:
    """One recorded version against the workspace. ``state``: ``unchanged``, ``changed``,
    ``missing``, or ``pinned`` for a version read at a past revision (``data.use(PATH, rev=...)``):
    it is fixed by that revision (``recorded.rev``), and the workspace is no measure of it."""

    role: str  # "input" or "output"
    recorded: DataVersion
    current_md5: str | None  # None: the path is gone, or the version is pinned
    pinned: bool = False

    @property
    def state(self) -> str:
        if self.pinned:
            return "pinned"
        if self.current_md5 is None:
            return "missing"
        return "unchanged" if self.current_md5 == self.recorded.md5 else "changed"


def status() -> list[DataChange]:
    """For each version the active (or last) run recorded: is the workspace still at it?"""
    from ..tracking import run as _tracking

    run = _tracking.last_run()
    if run is None:
        raise DataError("no run has recorded data yet: start one with `%mlops track`")
    project = _project()
    changes = []
    for role, recorded in run.datasets:
        if recorded.rev and not recorded.snapshot:  # a past version: nothing in the workspace to compare
            changes.append(DataChange(role, recorded, None, pinned=True))
            continue
        current = _current(project, recorded.path)
        changes.append(DataChange(role, recorded, current[0] if current else None))
    return changes


def push(*paths: str | os.PathLike[str]) -> int:
    """Upload versioned data to the DVC remote; returns how many files were sent."""
    project = _project()
    return project.push([project.rel(p) for p in paths] or None)


def pull(*paths: str | os.PathLike[str]) -> dict[str, object]:
    """Fetch versioned data from the DVC remote into the cache and the workspace."""
    project = _project()
    return project.pull([project.rel(p) for p in paths] or None)


def _record(found: DataVersion, role: str) -> None:
    global _told_no_run
    from ..tracking import run as _tracking

    run = _tracking.active_run()
    if run is None:
        if not _told_no_run:
            print(f"note: no active run, so {found.short} is not recorded (start one with %mlops track)",
                  file=sys.stderr)
            _told_no_run = True
        return
    if (role, found) in run.datasets:
        return  # already recorded: same role, same version, same snapshot
    if not run.datasets:
        run.before_end(_check_inputs_at_end)
    run.log_dataset(found.to_json(), role)
    run.datasets.append((role, found))


def _check_inputs_at_end(run: Run) -> None:
    """Before the run ends: did anything it read change since? Then say so, and log lineage.json."""
    changed = []
    for role, recorded in run.datasets:
        if role != "input" or not recorded.snapshot:
            continue
        try:
            root = DvcProject.find(Path.cwd()).root
        except DataError:
            break
        snap = snapshot(root / recorded.path)
        if snap is None or snap.digest != recorded.snapshot:
            changed.append(recorded.path)
    if changed:
        run.set_tag("mlops.data.changed_during_run", ", ".join(sorted(set(changed))))
    lineage = {
        "inputs": [v.to_json() for role, v in run.datasets if role == "input"],
        "outputs": [v.to_json() for role, v in run.datasets if role == "output"],
        "changed_during_run": sorted(set(changed)),
    }
    run.log_text(json.dumps(lineage, indent=1), None, "lineage.json")
