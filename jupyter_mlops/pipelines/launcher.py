"""How the scheduler starts a pipeline run for a fire: a child process, its log, its handle.

A launcher is any callable ``(schedule, fire time) -> RunHandle``; tests inject their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from .scheduler import Schedule

__all__ = ["Launcher", "RunHandle", "SubprocessLauncher", "pipeline_argv"]


class RunHandle(Protocol):
    """A started run, as the scheduler needs it (``subprocess.Popen`` is one)."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


#: Starts the run of a schedule for a fire time; raising means the fire failed to launch.
Launcher = Callable[["Schedule", datetime], RunHandle]


def pipeline_argv(schedule: Schedule, scheduled: datetime) -> list[str]:
    """``python -m jupyter_mlops pipeline run FILE --schedule-id ID --logical-date WHEN [--force] -p k=v ...``;
    WHEN is the fire time in the schedule's zone (ISO 8601)."""
    from .cron import zone

    argv = [sys.executable, "-m", "jupyter_mlops", "pipeline", "run", schedule.pipeline_file,
            "--schedule-id", schedule.id, "--logical-date", scheduled.astimezone(zone(schedule.tz)).isoformat()]
    if schedule.force:
        argv.append("--force")
    for key, value in schedule.parameters.items():
        argv += ["-p", f"{key}={value}"]
    return argv


class _Process:
    """A Popen and the log file it writes to."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log = str(log)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)


class SubprocessLauncher:
    """Runs each fire as a child process, output to ``log_dir/ID-YYYYMMDDTHHMMSSZ.log``.

    The child gets its own session (a Ctrl-C meant for the scheduler does not stop runs), the
    scheduler's working directory and environment, plus MLOPS_SCHEDULE_ID and MLOPS_SCHEDULED_TIME.
    """

    def __init__(self, log_dir: Path, argv: Callable[[Schedule, datetime], list[str]] = pipeline_argv) -> None:
        self.log_dir = log_dir
        self.argv = argv

    def __call__(self, schedule: Schedule, scheduled: datetime) -> _Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stamp = scheduled.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        log = self.log_dir / f"{schedule.id}-{stamp}.log"
        argv = self.argv(schedule, scheduled)
        env = {**os.environ, "MLOPS_SCHEDULE_ID": schedule.id, "MLOPS_SCHEDULED_TIME": scheduled.isoformat()}
        with open(log, "ab") as out:
            out.write(f"# schedule {schedule.id}, fire {scheduled.isoformat()}: {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        return _Process(proc, log)
