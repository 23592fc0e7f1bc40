"""Pipeline runs, their steps and the step cache, as rows of the state store (:mod:`.state`).

The runner writes here as a run goes; ``pipeline status`` / ``list`` / ``resume`` read here.

A run row says ``running`` for as long as its runner lives. A runner that was killed (SIGKILL, a
lost host) cannot say otherwise, so every reader settles what it reads: a ``running`` run whose
runner is gone (see :mod:`.liveness`) becomes ``crashed``, with its pending and running steps,
and gives up the pipeline's lock (:mod:`.runlock`).
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from .cache import CacheEntry
from .liveness import holder_alive
from .state import StateStore, Transaction, dumps

__all__ = ["RunHistory"]


class RunHistory:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    # -- written by the runner ---------------------------------------------------------------------

    @staticmethod
    def insert_run(tx: Transaction, result: Any, *, parameters: dict[str, Any], options: dict[str, Any],
                   resumed_from: str | None, schedule_id: str | None, holder: tuple[str, int, str | None],
                   cancel_signal: bool) -> None:
        """The run's row and its steps', in ``tx`` (the one that took the pipeline's lock)."""
        host, pid, pid_start = holder
        tx.execute("INSERT INTO pipeline_runs (id, pipeline, file, status, started, parameters, options, "
                   "resumed_from, schedule_id, host, pid, pid_start, heartbeat, cancel_signal) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (result.run_id, result.pipeline, result.file, "running", result.started, dumps(parameters),
                    dumps(options), resumed_from, schedule_id, host, pid, pid_start, time.time(),
                    1 if cancel_signal else 0))
        for res in result.steps.values():
            tx.execute("INSERT INTO step_runs (run_id, step, status, cache_key, spool_id, cached_from, outputs) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (result.run_id, res.name, res.status, res.cache_key, res.spool_id, res.cached_from,
                        dumps(res.outputs) if res.outputs is not None else None))

    def save_step(self, run_id: str, res: Any) -> None:
        with self.store.transaction() as tx:
            tx.execute("UPDATE step_runs SET status = ?, cache_key = ?, started = ?, ended = ?, attempts = ?, "
                       "output_notebook = ?, error = ?, spool_id = ?, cached_from = ?, outputs = ? "
                       "WHERE run_id = ? AND step = ?",
                       (res.status, res.cache_key, res.started, res.ended, res.attempts, res.output_notebook,
                        res.error, res.spool_id, res.cached_from,
                        dumps(res.outputs) if res.outputs is not None else None, run_id, res.name))

    def set_spool(self, run_id: str, spool_id: str) -> None:
        with self.store.transaction() as tx:
            tx.execute("UPDATE pipeline_runs SET spool_id = ? WHERE id = ?", (spool_id, run_id))

    def finish(self, run_id: str, status: str, ended: float) -> None:
        """The run's end, and the pipeline's lock given up, together."""
        with self.store.transaction() as tx:
            tx.execute("UPDATE pipeline_runs SET status = ?, ended = ? WHERE id = ?", (status, ended, run_id))
            tx.execute("DELETE FROM pipeline_locks WHERE run_id = ?", (run_id,))

    def beat(self, run_id: str) -> bool:
        """Renew the run's heartbeat; True when the run must stop: someone asked to cancel it, or
        it was judged dead (its heartbeat was not seen in time, say from a host whose clock is
        ahead) and so no longer holds its pipeline."""
        with self.store.transaction() as tx:
            tx.execute("UPDATE pipeline_runs SET heartbeat = ? WHERE id = ?", (time.time(), run_id))
            rows = tx.rows("SELECT cancel_requested, status FROM pipeline_runs WHERE id = ?", (run_id,))
        return bool(rows and (rows[0]["cancel_requested"] or rows[0]["status"] != "running"))

    # -- runs whose runner is gone ----------------------------------------------------------------

    @staticmethod
    def alive(row: dict[str, Any]) -> bool:
        """Whether the runner of a ``running`` row lives (a row from before heartbeats counts its
        start as one)."""
        return holder_alive(row["host"], row["pid"], row.get("pid_start"), row.get("heartbeat") or row["started"])

    def settle(self, row: dict[str, Any], status: str = "crashed") -> dict[str, Any]:
        """``row`` as it stands: a ``running`` run whose runner is dead is marked ``status`` now,
        with its unfinished steps, and its lock released (the first reader to see it does it)."""
        if row["status"] != "running" or self.alive(row):
            return row
        with self.store.transaction() as tx:
            self.mark_ended(tx, row["id"], status)
        return self.run(row["id"]) or row

    @staticmethod
    def mark_ended(tx: Transaction, run_id: str, status: str) -> bool:
        """Mark a ``running`` run and its unfinished steps ``status`` (compare-and-swap: False when
        it had ended meanwhile)."""
        now = time.time()
        if tx.execute("UPDATE pipeline_runs SET status = ?, ended = ? WHERE id = ? AND status = 'running'",
                      (status, now, run_id)) != 1:
            return False
        why = "its runner stopped (killed, or its host was lost)" if status == "crashed" else status
        tx.execute("UPDATE step_runs SET status = ?, ended = ?, error = ? WHERE run_id = ? "
                   "AND status IN ('pending', 'running')", (status, now, why, run_id))
        tx.execute("DELETE FROM pipeline_locks WHERE run_id = ?", (run_id,))
        return True

    def request_cancel(self, run_id: str) -> None:
        with self.store.transaction() as tx:
            tx.execute("UPDATE pipeline_runs SET cancel_requested = 1 WHERE id = ?", (run_id,))

    # -- the step cache ---------------------------------------------------------------------------

    def cached_steps(self, pipeline_file: str) -> set[str]:
        rows = self.store.query("SELECT step FROM step_cache WHERE pipeline_file = ?", (pipeline_file,))
        return {r["step"] for r in rows}

    def cache_entry(self, pipeline_file: str, step: str) -> CacheEntry | None:
        rows = self.store.query("SELECT * FROM step_cache WHERE pipeline_file = ? AND step = ?", (pipeline_file, step))
        if not rows:
            return None
        row = rows[0]
        return CacheEntry(row["cache_key"], json.loads(row["outputs"]), row["run_id"], row["spool_id"])

    def store_cache(self, pipeline_file: str, step: str, entry: CacheEntry) -> None:
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM step_cache WHERE pipeline_file = ? AND step = ?", (pipeline_file, step))
            tx.execute("INSERT INTO step_cache (pipeline_file, step, cache_key, outputs, run_id, spool_id, created) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (pipeline_file, step, entry.key, dumps(entry.outputs), entry.run_id, entry.spool_id, time.time()))

    # -- read by the faces --------------------------------------------------------------------------

    def run(self, run_id: str) -> dict[str, Any] | None:
        rows = self.store.query("SELECT * FROM pipeline_runs WHERE id = ?", (run_id,))
        return rows[0] if rows else None

    def latest(self) -> dict[str, Any] | None:
        rows = self.store.query("SELECT * FROM pipeline_runs ORDER BY started DESC LIMIT 1")
        return self.settle(rows[0]) if rows else None

    def recent(self, limit: int = 20, pipeline: str | None = None) -> list[dict[str, Any]]:
        """The latest runs first, settled (see :meth:`settle`)."""
        if pipeline:
            rows = self.store.query("SELECT * FROM pipeline_runs WHERE pipeline = ? ORDER BY started DESC LIMIT ?",
                                    (pipeline, limit))
        else:
            rows = self.store.query("SELECT * FROM pipeline_runs ORDER BY started DESC LIMIT ?", (limit,))
        return [self.settle(row) for row in rows]

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        return self.store.query("SELECT * FROM step_runs WHERE run_id = ? ORDER BY started", (run_id,))

    def step_counts(self, run_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """{run id: {status: number of steps}}."""
        ids = list(run_ids)
        if not ids:
            return {}
        marks = ", ".join("?" for _ in ids)
        counts: dict[str, dict[str, int]] = {}
        for row in self.store.query(f"SELECT run_id, status, COUNT(*) AS n FROM step_runs WHERE run_id IN ({marks}) "
                                    "GROUP BY run_id, status", ids):
            counts.setdefault(row["run_id"], {})[row["status"]] = int(row["n"])
        return counts

    def unknown_run_hint(self) -> str:
        recent = [r["id"] for r in self.recent(5)]
        return f"recent runs: {', '.join(recent)}" if recent else "no pipeline has run here yet"
