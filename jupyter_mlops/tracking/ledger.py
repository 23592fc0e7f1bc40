"""What the spool says about runs: which are still waiting, which are uploaded, and where.

Read-only helpers for the CLI and the runners; no mlflow here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spool import DONE_DIR, EVENTS, HEADER, STATE, iter_run_dirs, read_json, writer_alive

__all__ = ["SpooledRun", "spooled_runs"]


@dataclass
class SpooledRun:
    spool_id: str
    header: dict[str, Any]
    state: dict[str, Any]
    done: bool
    pending_bytes: int
    writer_alive: bool

    @property
    def run_id(self) -> str | None:
        return self.header.get("run_id") or self.state.get("run_id")

    @property
    def status(self) -> str:
        if self.state.get("failed"):
            return "REFUSED"
        return self.state.get("ended") or ("RUNNING" if self.writer_alive else "UNFINISHED")


def spooled_runs(spool_dir: Path, invocation: str | None = None) -> list[SpooledRun]:
    """Runs still in the spool and runs already uploaded (``done/``), optionally of one invocation."""
    runs = []
    for run_dir in iter_run_dirs(spool_dir):
        header = read_json(run_dir / HEADER) or {}
        state = read_json(run_dir / STATE) or {}
        try:
            size = os.stat(run_dir / EVENTS).st_size
        except FileNotFoundError:
            size = 0
        runs.append(SpooledRun(run_dir.name, header, state, False, max(0, size - int(state.get("offset", 0))), writer_alive(run_dir)))
    done_dir = spool_dir / DONE_DIR
    if done_dir.is_dir():
        for path in sorted(done_dir.glob("*.json")):
            summary = read_json(path) or {}
            runs.append(SpooledRun(path.stem, summary, summary, True, 0, False))
    if invocation is not None:
        runs = [r for r in runs if r.header.get("invocation") == invocation]
    return runs
