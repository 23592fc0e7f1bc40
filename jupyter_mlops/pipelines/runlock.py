"""One run per pipeline file at a time, across processes and hosts sharing the state store.

Two runs of one pipeline at once would read each other's half-written outputs and record the
wrong versions, so a run first takes the pipeline's row in ``pipeline_locks``, in the same
transaction that inserts its run row: an INSERT that does nothing when the row exists, or, when
the run holding it is dead (see :mod:`.liveness`), a compare-and-swap UPDATE that takes it over
and marks that run ``crashed``. While the run goes, a :class:`Heartbeat` thread renews its
heartbeat (so runners on other hosts see it alive) and watches for a cancel request
(``pipeline cancel``, from any host). The run's end releases the lock (``RunHistory.finish``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from ..errors import PipelineBusyError
from .history import RunHistory
from .liveness import HEARTBEAT_INTERVAL, process_start, this_host

__all__ = ["Heartbeat", "start_run"]

#: How often a waiting run looks at the lock again, in seconds.
POLL = 1.0


def start_run(history: RunHistory, result: Any, *, wait: bool, on_wait: Callable[[str], None],
              cancel: threading.Event, **row: Any) -> None:
    """Take ``result.file``'s lock and insert the run (``row``: :meth:`RunHistory.insert_run`'s
    keywords). While another live run holds it: with ``wait``, say so once through ``on_wait`` and
    wait (until ``cancel`` is set: KeyboardInterrupt); without, raise :class:`PipelineBusyError`."""
    holder = (this_host(), os.getpid(), process_start(os.getpid()))
    told = False
    while True:
        other = _try_take(history, result, holder, row)
        if other is None:
            return
        if not other:
            continue  # the lock changed hands while we looked: look again
        where = f"pid {other['pid']} on {other['host']}"
        if not wait:
            raise PipelineBusyError(result.file, other["id"], where)
        if not told:
            on_wait(f"waiting for run {other['id']} ({where}) of this pipeline to finish; --no-wait refuses")
            told = True
        if cancel.wait(POLL):
            raise KeyboardInterrupt


def _try_take(history: RunHistory, result: Any, holder: tuple[str, int, str | None],
              row: dict[str, Any]) -> dict[str, Any] | None:
    """None once the lock is ours (and the run inserted); else the live run holding it."""
    with history.store.transaction() as tx:
        now = time.time()
        if tx.execute("INSERT INTO pipeline_locks (pipeline_file, run_id, taken) VALUES (?, ?, ?) "
                      "ON CONFLICT (pipeline_file) DO NOTHING", (result.file, result.run_id, now)) != 1:
            rows = tx.rows("SELECT l.run_id AS lock_run, r.* FROM pipeline_locks l "
                           "LEFT JOIN pipeline_runs r ON r.id = l.run_id WHERE l.pipeline_file = ?", (result.file,))
            if not rows:
                return {}  # released between the two statements: try again
            other = rows[0]
            if other["id"] is not None and other["status"] == "running" and RunHistory.alive(other):
                return other
            # its holder is dead (or ended without releasing it): take it over, mark it crashed
            if tx.execute("UPDATE pipeline_locks SET run_id = ?, taken = ? WHERE pipeline_file = ? AND run_id = ?",
                          (result.run_id, now, result.file, other["lock_run"])) != 1:
                return {}
            if other["id"] is not None:
                RunHistory.mark_ended(tx, other["id"], "crashed")
        result.started = now  # the run starts now, not when it began to wait
        RunHistory.insert_run(tx, result, holder=holder, **row)
    return None


class Heartbeat:
    """A daemon thread renewing the run's heartbeat every ``interval`` seconds and calling
    ``on_cancel`` (once) when the run's ``cancel_requested`` is set."""

    def __init__(self, history: RunHistory, run_id: str, on_cancel: Callable[[], None],
                 interval: float = HEARTBEAT_INTERVAL) -> None:
        self._history = history
        self._run_id = run_id
        self._on_cancel = on_cancel
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlops-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        cancelled = False
        while not self._stop.wait(self._interval):
            try:
                wanted = self._history.beat(self._run_id)
            except Exception:  # a store hiccup: the next beat tries again (the TTL allows for many)
                continue
            if wanted and not cancelled:
                cancelled = True
                self._on_cancel()
