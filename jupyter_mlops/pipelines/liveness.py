"""Is the process that holds a run (or a schedule's lease) still there?

One judgement for the runner's rows and the scheduler's leases: on the holder's own host, its
pid is checked, together with the process's start time (from ``/proc/PID/stat`` on Linux) so
that a pid the system handed to a new process after the holder died does not count; on another
host, the holder must have renewed its heartbeat within ``ttl`` seconds.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["HEARTBEAT_INTERVAL", "HEARTBEAT_TTL", "holder_alive", "pid_alive", "process_start", "this_host"]

#: How often a runner renews its heartbeat (and looks for a cancel request), in seconds.
HEARTBEAT_INTERVAL = 2.0
#: A runner on another host whose heartbeat is older than this is taken as dead.
HEARTBEAT_TTL = 60.0

_host: str | None = None


def this_host() -> str:
    global _host
    if _host is None:
        _host = socket.gethostname()
    return _host


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), as a token to compare; None
    where it cannot be read (no such process, no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count from its end
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else None


def pid_alive(pid: int | None, start: str | None = None) -> bool:
    """Whether ``pid`` (on this host) is alive and, when ``start`` is given and readable, is the
    same process that recorded it."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    if start:
        now = process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused
    return True


def holder_alive(host: str | None, pid: int | None, start: str | None, heartbeat: float | None,
                 ttl: float = HEARTBEAT_TTL, now: float | None = None) -> bool:
    """Whether the holder recorded as (``host``, ``pid``, ``start``, ``heartbeat``) still lives."""
    if host == this_host() and os.name == "posix":
        return pid_alive(pid, start)
    return heartbeat is not None and heartbeat >= (time.time() if now is None else now) - ttl
