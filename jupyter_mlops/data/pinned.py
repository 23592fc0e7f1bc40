"""Private read-only copies of past versions (``data.use(PATH, rev=...)``): made once, checked
before every reuse, never served altered.

A copy lives at ``<into>/<digest>/<name>`` with a record beside it (``.mlops-<name>.json``): the
version's md5 and (size, mtime_ns, inode) of every file as materialised. Files are 0o444 and
folders 0o555, so an accidental write fails (root ignores the bits, hence the check). Before a
copy is served again its stats are compared with the record; when they differ its md5 is
computed, and a copy whose md5 is not the version's is replaced from the DVC cache. Kernels
materialising the same version at once take turns on a lock file beside the copy; a copy is
written to a temporary folder and renamed into place, so no reader sees half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..tracking.spool import atomic_write_json
from .dvc_client import DvcProject
from .versions import DataVersion

__all__ = ["materialize", "remove_tree"]

FILE_MODE = 0o444
DIR_MODE = 0o555


def materialize(project: DvcProject, version: DataVersion, into: Path) -> Path:
    """The intact read-only copy of ``version`` under ``into``, made or repaired as needed.

    Raises :class:`DataError` when the copy is missing or altered and DVC cannot fetch the
    version (its object is neither in the cache nor on a remote DVC reaches): the message says
    to pull it. An altered copy is deleted even then: it is never served.
    """
    folder = into / version.digest
    dest = folder / Path(version.path).name
    record = folder / f".mlops-{dest.name}.json"
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f".mlops-{dest.name}.lock"):
        altered = False
        if os.path.lexists(dest):
            if _intact(project, version, dest, record):
                return dest
            altered = True
            _discard(dest, folder)
        # beside dest: a folder renamed within its parent needs no write permission of its own
        tmp = folder / f".tmp-{os.getpid()}-{threading.get_ident()}"
        remove_tree(tmp)  # left by a process that died here with our pid
        try:
            try:
                project.fetch(version, tmp)
            except DataError as e:
                if not altered:
                    raise
                raise DataError(f"the private copy of {version.path} at {_short(version)} was altered and is "
                                f"deleted; DVC cannot fetch that version again ({e}): pull it with "
                                "`%mlops data pull` (or `dvc pull`) and use it again", path=version.path) from e
            files = _seal(tmp)
            os.rename(tmp, dest)  # under the lock dest is free: nobody else writes this folder
        finally:
            remove_tree(tmp)
        atomic_write_json(record, {"md5": version.md5, "files": files})
    return dest


def _short(version: DataVersion) -> str:
    return f"revision {version.rev[:10]}" if version.rev else f"md5 {version.digest[:8]}"


def _intact(project: DvcProject, version: DataVersion, dest: Path, record: Path) -> bool:
    """The copy still holds the version: same stats as recorded, or else the same md5."""
    try:
        saved: Any = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = None  # made before records existed, or the process died before writing it
    files = _stats(dest)
    if isinstance(saved, dict) and saved.get("md5") == version.md5 and saved.get("files") == files:
        return True
    try:
        same = project.md5_of(dest, version.kind) == version.md5
    except (DataError, OSError):
        same = False
    if same:  # touched, copied back or chmod-ed, but the bytes are the version's: keep it
        atomic_write_json(record, {"md5": version.md5, "files": _seal(dest)})
    return same


def _stats(path: Path) -> dict[str, list[int]]:
    """relative path -> [size, mtime_ns, inode] of every file under ``path`` ("" for a file)."""
    if not path.is_dir() or path.is_symlink():
        st = os.lstat(path)
        return {"": [st.st_size, st.st_mtime_ns, st.st_ino]}
    found = {}
    for folder, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            st = os.lstat(full)
            found[os.path.relpath(full, path)] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return found


def _seal(path: Path) -> dict[str, list[int]]:
    """Make ``path`` read-only (files 0o444, folders 0o555, deepest first); its stats after."""
    if path.is_dir() and not path.is_symlink():
        for folder, _dirs, names in os.walk(path, topdown=False):
            for name in names:
                os.chmod(os.path.join(folder, name), FILE_MODE, follow_symlinks=False)
            os.chmod(folder, DIR_MODE)
    else:
        os.chmod(path, FILE_MODE)
    return _stats(path)


def _discard(dest: Path, folder: Path) -> None:
    """Take an altered copy out of the way: renamed aside at once (no one opens it again by its
    path), then deleted."""
    aside = folder / f".altered-{os.getpid()}-{threading.get_ident()}"
    remove_tree(aside)
    os.rename(dest, aside)
    remove_tree(aside)


def remove_tree(path: Path) -> None:
    """Delete a file or folder we made read-only (a folder's entries need it writable)."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        for folder, _dirs, _names in os.walk(path):
            os.chmod(folder, stat.S_IRWXU)
        shutil.rmtree(path)
    else:
        path.unlink()


class _locked:
    """An exclusive ``flock`` on ``path`` for the block: between processes and between threads
    (each holds its own open file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # closing the file releases the lock
