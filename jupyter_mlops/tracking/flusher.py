"""The background uploader process, and how a kernel makes sure one is running.

At most one flusher runs per spool folder (``flusher.lock``, which also holds its pid). It is a
detached process in a session of its own, so interrupting or killing a kernel does not touch it;
it uploads whatever any kernel spooled, and exits once every run is closed and uploaded. A kernel
calls :func:`ensure_running` when it starts or ends a run; ``jupyter mlops sync`` runs
:func:`sync` in the foreground instead.

This module is imported by the kernel, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection

from ..errors import SpoolError
from .spool import iter_run_dirs

if TYPE_CHECKING:
    from ..config import MlopsConfig
    from .uploader import PassResult

__all__ = ["ensure_running", "prepare_spool_dir", "running_pid", "sync", "main"]

FLUSHER_LOCK = "flusher.lock"
FLUSHER_LOG = "flusher.log"
MAX_LOG_BYTES = 1 << 20  # then flusher.log becomes flusher.log.1 (one generation kept)

def prepare_spool_dir(spool_dir: Path, config: MlopsConfig) -> None:
    """Create the spool folder (and the embedded ``.mlops/`` with a ``.gitignore``), or say why not."""
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        embedded = config.embedded_dir
        if embedded.is_dir() and not (embedded / ".gitignore").exists():
            (embedded / ".gitignore").write_text("# local state of jupyter_mlops: never commit it\n*\n")
        probe = spool_dir / f".probe-{os.getpid()}-{threading.get_ident()}"  # threads of one process too
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = "permission denied (read-only folder?)" if isinstance(e, PermissionError) or e.errno == 30 else (e.strerror or str(e))
        raise SpoolError(str(spool_dir), reason) from e


def running_pid(spool_dir: Path) -> int | None:
    """Pid of the flusher serving ``spool_dir``, or None when none is running."""
    path = spool_dir / FLUSHER_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


def ensure_running(spool_dir: Path, config: MlopsConfig, *, nudge: bool = False) -> None:
    """Start a flusher for ``spool_dir`` unless one runs; ``nudge`` wakes a running one at once."""
    if not config.flusher_autostart:
        return
    pid = running_pid(spool_dir)
    if pid is None:
        _spawn(spool_dir, config)
    elif nudge and pid > 0:
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass


def _spawn(spool_dir: Path, config: MlopsConfig) -> None:
    """Start a detached flusher: in a session of its own (a kernel interrupt, a SIGINT to the
    kernel's process group, must not reach it), and orphaned at once through ``sh ... &`` so the
    kernel neither waits for it nor keeps a zombie when it exits."""
    env = dict(os.environ)
    env["MLOPS_FLUSHER_IDLE"] = str(config.flusher_idle_timeout)
    env["MLOPS_FLUSHER_LINGER"] = str(config.flusher_max_linger)
    log_path = spool_dir / FLUSHER_LOG
    try:
        if log_path.stat().st_size > MAX_LOG_BYTES:
            os.replace(log_path, log_path.with_suffix(".log.1"))
    except OSError:
        pass
    with open(log_path, "ab") as log_file:
        subprocess.run(
            ["/bin/sh", "-c", '"$@" &', "sh", config.flusher_python, "-m", "jupyter_mlops.tracking", str(spool_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=str(spool_dir),
            check=False,
        )


def sync(spool_dir: Path, *, progress: Callable[[PassResult], None] | None = None, attempts: int = 3,
         give_up: Collection[str] = (), on_progress: Callable[[str, int, int, int], None] | None = None) -> PassResult:
    """Upload everything in ``spool_dir`` now, in this process (``jupyter mlops sync``).

    Makes up to ``attempts`` passes while there is progress; returns the last pass's result,
    whose ``waiting`` lists what could not be uploaded (server unreachable) and stays spooled.
    Runs the server refused are tried again; those named in ``give_up`` have what the server
    refuses set aside instead, and finish. ``on_progress``: see :class:`.uploader.Uploader`.
    """
    from .uploader import Uploader

    uploader = Uploader(spool_dir, retry_refused=True, give_up=give_up, on_progress=on_progress)
    result = uploader.pass_once(wait_for_lock=True, windows=None)
    if progress:
        progress(result)
    for _ in range(attempts - 1):
        if not result.uploaded or not result.pending or result.waiting:
            break
        result = uploader.pass_once(wait_for_lock=True, windows=None)
        if progress:
            progress(result)
    return result


def _take_lock(spool_dir: Path) -> int | None:
    fd = os.open(spool_dir / FLUSHER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def serve(spool_dir: Path, idle_timeout: float, max_linger: float) -> int:
    """The flusher's main loop. Returns when there is nothing left to do (or nothing it can do)."""
    log = logging.getLogger("jupyter_mlops.flusher")
    # Handlers first: a kernel may nudge (SIGUSR1) as soon as the lock file names our pid, and
    # SIGUSR1's default action would end us.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGUSR1, lambda *_: None)  # the wakeup fd is the message
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    lock_fd = _take_lock(spool_dir)
    if lock_fd is None:
        return 0  # another flusher serves this folder

    from .uploader import PassResult, Uploader

    uploader = Uploader(spool_dir)
    last_progress = time.monotonic()
    backoff = 0.5
    while not stop:
        try:
            result = uploader.pass_once()
        except Exception:  # never die with work left: log it, wait, try again
            log.exception("upload pass failed; retrying")
            result = PassResult(waiting=["pass failed"])
        now = time.monotonic()
        if result.uploaded or result.finished:
            last_progress = now
        if result.waiting:
            timeout = backoff
            backoff = min(backoff * 2, 10.0)
        else:
            backoff = 0.5
            timeout = 0.02 if result.uploaded else 0.25
        nothing_open = result.live == 0
        idle = result.pending == len(result.failed) and nothing_open and now - last_progress >= idle_timeout
        gave_up = bool(result.waiting) and nothing_open and now - last_progress >= max_linger
        if idle or gave_up:
            if gave_up:
                log.warning("giving up for now; %d run(s) stay spooled in %s: upload them with "
                            "`jupyter mlops sync`", result.pending, spool_dir)
            # Release the lock, then look once more: a run that appeared meanwhile either saw the
            # lock free (and started a flusher of its own) or is seen here (and we carry on).
            # Runs the server refused stay for `sync` and do not keep us here.
            os.close(lock_fd)
            new = [d for d in iter_run_dirs(spool_dir) if d.name not in result.seen]
            if not new or (lock_fd := _take_lock(spool_dir)) is None:
                return 1 if gave_up else 0
            last_progress = now
            continue
        select.select([wake_r], [], [], timeout)
        try:
            while os.read(wake_r, 512):
                pass
        except BlockingIOError:
            pass
    return 0


def _background_priority() -> None:
    """The uploader gives way to the kernels and pipeline steps that feed it (importing mlflow
    alone is seconds of CPU): it runs only on CPU time nobody else wants (Linux SCHED_IDLE), else
    at nice 10. Its data is durable in the spool, so late is fine; starved is not possible, since
    an idle CPU comes as soon as the work it waits behind is done."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
        return
    except (AttributeError, OSError):
        pass
    try:
        os.nice(10)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m jupyter_mlops.tracking SPOOL_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s flusher[{os.getpid()}] %(levelname)s %(message)s",
    )
    idle = float(os.environ.get("MLOPS_FLUSHER_IDLE", "5"))
    linger = float(os.environ.get("MLOPS_FLUSHER_LINGER", "900"))
    _background_priority()
    return serve(Path(argv[0]), idle, linger)

