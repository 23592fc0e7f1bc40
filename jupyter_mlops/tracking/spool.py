"""The durable local spool: one folder per run, written by a kernel, read by a flusher.

Layout of ``<spool_dir>/<spool_id>/``:

``run.json``     header, written once (atomically) before any event: destination, experiment,
                 run name, tags captured at start, parent run, the writer's invocation id.
``events.log``   append-only records, one per line, each appended with one ``os.write`` on an
                 ``O_APPEND`` descriptor (so a record is either whole or absent, and is in the
                 page cache, safe from a killed process, as soon as the call returns)::

                     m <TAB> key <TAB> value <TAB> timestamp_ms <TAB> step
                     p <TAB> key <TAB> json(value)
                     t <TAB> key <TAB> json(value)
                     a <TAB> json({"src": relative path under files/, "path": artifact dir or null})
                     d <TAB> role <TAB> json(data version)   (role: input or output)
                     e <TAB> status <TAB> timestamp_ms

``files/``       artifact snapshots, copied at call time.
``writer.lock``  flock held by the writing process while the run is open.
``state.json``   the uploader's progress: MLflow run id, experiment id, byte offset uploaded.
``rejected.log`` records the tracking server refused, with the reason (never silently dropped).

Keys are validated before they reach the spool (letters, digits and ``_-. :/`` only, so no tab or
newline); values of params and tags are JSON strings, so any text round-trips. A record the
uploader cannot parse is set aside in ``rejected.log``, never left to block the records after it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import SpoolError

__all__ = [
    "HEADER",
    "EVENTS",
    "STATE",
    "Record",
    "SpoolWriter",
    "atomic_write_json",
    "read_json",
    "iter_run_dirs",
    "read_records",
    "writer_alive",
    "RunLock",
]

HEADER = "run.json"
EVENTS = "events.log"
STATE = "state.json"
FILES = "files"
WRITER_LOCK = "writer.lock"
RUN_LOCK = "upload.lock"
REJECTED = "rejected.log"
DONE_DIR = "done"


def atomic_write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON, so a reader sees the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _spool_error(path: Path, e: OSError) -> SpoolError:
    reason = os.strerror(e.errno) if e.errno else str(e)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "permission denied (read-only folder?)"
    return SpoolError(str(path), reason)


class SpoolWriter:
    """Appends one run's records. Used by the kernel; the hot path is :meth:`write`."""

    def __init__(self, run_dir: Path, header: dict[str, Any]) -> None:
        self.run_dir = run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            (run_dir / FILES).mkdir()
            self._lock_fd = os.open(run_dir / WRITER_LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            atomic_write_json(run_dir / HEADER, header)
            self.fd = os.open(run_dir / EVENTS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise _spool_error(run_dir, e) from e
        self._files = 0

    def write(self, line: str) -> None:
        data = line.encode()
        try:
            written = os.write(self.fd, data)
        except OSError as e:
            self.finish_or_undo(data, 0, e)
        else:
            if written != len(data):
                self.finish_or_undo(data, written, None)

    def finish_or_undo(self, data: bytes, written: int, error: OSError | None, *, ended: bool = False) -> None:
        """After a short or failed write of one record: complete it, or cut the partial record off
        again (the spool holds whole lines only) and raise :class:`SpoolError`."""
        if ended:
            from ..errors import NoActiveRunError

            raise NoActiveRunError("log after the run ended")
        while error is None and written < len(data):
            try:
                n = os.write(self.fd, data[written:])
            except OSError as e:
                error = e
                break
            if n == 0:
                error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                break
            written += n
        if error is None:
            return
        if written:
            try:
                os.ftruncate(self.fd, os.fstat(self.fd).st_size - written)
            except OSError:
                pass
        raise _spool_error(self.run_dir, error) from error

    def snapshot(self, src: Path) -> str:
        """Copy ``src`` (file or folder) under ``files/``; return its path relative to ``files/``."""
        self._files += 1
        rel = f"{self._files}/{src.resolve().name or 'root'}"
        dest = self.run_dir / FILES / rel
        try:
            dest.parent.mkdir(parents=True)
            if src.is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copy2(src, dest)
        except OSError as e:
            raise _spool_error(self.run_dir, e) from e
        return rel

    def snapshot_text(self, text: str, name: str) -> str:
        """Write ``text`` as a file under ``files/``; return its path relative to ``files/``."""
        self._files += 1
        rel = f"{self._files}/{name}"
        dest = self.run_dir / FILES / rel
        try:
            dest.parent.mkdir(parents=True)
            dest.write_text(text, encoding="utf-8")
        except OSError as e:
            raise _spool_error(self.run_dir, e) from e
        return rel

    def close(self) -> None:
        """Release the writer lock: from now on the flusher may finish the run on its own."""
        for fd in (self.fd, self._lock_fd):
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass(frozen=True, slots=True)
class Record:
    kind: str  # "m", "p", "t", "a", "e"
    fields: tuple[str, ...]
    end: int  # byte offset just past this record's newline


def read_records(run_dir: Path, offset: int, limit_bytes: int = 4 << 20) -> list[Record]:
    """Whole records from ``offset`` on (at most about ``limit_bytes``); a torn tail is left."""
    try:
        with open(run_dir / EVENTS, "rb") as f:
            f.seek(offset)
            data = f.read(limit_bytes)
    except FileNotFoundError:
        return []
    cut = data.rfind(b"\n")
    if cut < 0:
        return []
    records = []
    pos = offset
    for raw in data[: cut + 1].split(b"\n")[:-1]:
        pos += len(raw) + 1
        parts = raw.decode("utf-8", "replace").split("\t")
        records.append(Record(parts[0], tuple(parts[1:]), pos))
    return records


def writer_alive(run_dir: Path) -> bool:
    """True while a process holds this run's writer lock (the OS drops it when that process dies)."""
    try:
        fd = os.open(run_dir / WRITER_LOCK, os.O_RDONLY)  # flock needs no write access
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class RunLock:
    """Exclusive right to upload one run (the background flusher and `sync` take turns)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / RUN_LOCK
        self.fd: int | None = None

    def acquire(self, blocking: bool = False) -> bool:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def iter_run_dirs(spool_dir: Path) -> Iterator[Path]:
    """Run folders with a complete header, oldest first."""
    try:
        entries = sorted(os.scandir(spool_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir() and entry.name != DONE_DIR and os.path.exists(os.path.join(entry.path, HEADER)):
            yield Path(entry.path)
