"""What the spool says about runs: which are still waiting, which are uploaded, and where.

Read-only helpers for the CLI and the runners; no mlflow here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spool import DONE_DIR, EVENTS, HEADER, REJECTED, STATE, iter_run_dirs, read_json, writer_alive

__all__ = ["SpooledRun", "spooled_runs", "run_status", "refusal_note"]


def run_status(state: dict[str, Any], *, ended: str | None = None, writer_alive: bool = False) -> str:
    """The one wording of a run's state, for ``runs``, ``sync`` and ``%mlops status`` alike.

    REFUSED: the server takes nothing of the run (it refused to create it, or the run was deleted)
    or refused its end record. ``FINISHED, 2 refused``: ended, with records set aside. Else the
    end status, or RUNNING / UNFINISHED (the writer died before ending it).
    """
    if state.get("failed") or state.get("end_refused"):
        return "REFUSED"
    status = state.get("ended") or ended or ("RUNNING" if writer_alive else "UNFINISHED")
    rejected = int(state.get("rejected") or 0)
    return f"{status}, {rejected} refused" if rejected else status


def refusal_note(state: dict[str, Any], rejected_log: Path | str | None = None) -> str | None:
    """What the server refused, why and what to do, in one line; None when it refused nothing."""
    if state.get("failed"):
        return f"refused by the tracking server: {state['failed']}"
    rejected = int(state.get("rejected") or 0)
    if not rejected:
        return None
    where = state.get("rejected_log") or rejected_log
    return (f"{rejected} record(s) refused: {state.get('refusal') or 'see the log'}; see {where}; the rest "
            "is uploaded, the refused records are kept there: fix them and log them again if they matter")


@dataclass
class SpooledRun:
    spool_id: str
    header: dict[str, Any]
    state: dict[str, Any]
    done: bool
    pending_bytes: int
    writer_alive: bool
    run_dir: Path | None = None  # None once uploaded (then the summary names its rejected.log)

    @property
    def run_id(self) -> str | None:
        return self.header.get("run_id") or self.state.get("run_id")

    @property
    def status(self) -> str:
        return run_status(self.state, writer_alive=self.writer_alive)

    @property
    def refusal(self) -> str | None:
        """What the server refused and what to do (see :func:`refusal_note`)."""
        return refusal_note(self.state, self.rejected_log)

    @property
    def rejected_log(self) -> Path | None:
        if self.state.get("rejected_log"):
            return Path(self.state["rejected_log"])
        return self.run_dir / REJECTED if self.run_dir else None


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
        runs.append(SpooledRun(run_dir.name, header, state, False, max(0, size - int(state.get("offset", 0))), writer_alive(run_dir), run_dir))
    done_dir = spool_dir / DONE_DIR
    if done_dir.is_dir():
        for path in sorted(done_dir.glob("*.json")):
            summary = read_json(path) or {}
            runs.append(SpooledRun(path.stem, summary, summary, True, 0, False))
    if invocation is not None:
        runs = [r for r in runs if r.header.get("invocation") == invocation]
    return runs
