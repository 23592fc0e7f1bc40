"""Pipeline runs, their steps and the step cache, as rows of the state store (:mod:`.state`).

The runner writes here as a run goes; ``pipeline status`` / ``list`` / ``resume`` read here.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Iterable

from .cache import CacheEntry
from .state import StateStore, dumps

__all__ = ["RunHistory"]


class RunHistory:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    # -- written by the runner ---------------------------------------------------------------------

    def start(self, result: Any, *, parameters: dict[str, Any], options: dict[str, Any],
              resumed_from: str | None, schedule_id: str | None) -> None:
        with self.store.transaction() as tx:
            tx.execute("INSERT INTO pipeline_runs (id, pipeline, file, status, started, parameters, options, "
                       "resumed_from, schedule_id, host, pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (result.run_id, result.pipeline, result.file, "running", result.started, dumps(parameters),
                        dumps(options), resumed_from, schedule_id, socket.gethostname(), os.getpid()))
            for res in result.steps.values():
                tx.execute("INSERT INTO step_runs (run_id, step, status, cache_key, spool_id, cached_from) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (result.run_id, res.name, res.status, res.cache_key, res.spool_id, res.cached_from))

    def save_step(self, run_id: str, res: Any) -> None:
        with self.store.transaction() as tx:
            tx.execute("UPDATE step_runs SET status = ?, cache_key = ?, started = ?, ended = ?, attempts = ?, "
                       "output_notebook = ?, error = ?, spool_id = ?, cached_from = ? WHERE run_id = ? AND step = ?",
                       (res.status, res.cache_key, res.started, res.ended, res.attempts, res.output_notebook,
                        res.error, res.spool_id, res.cached_from, run_id, res.name))

    def set_spool(self, run_id: str, spool_id: str) -> None:
        with self.store.transaction() as tx:
            tx.execute("UPDATE pipeline_runs SET spool_id = ? WHERE id = ?", (spool_id, run_id))

    def finish(self, run_id: str, status: str, ended: float) -> None:
        with self.store.transaction() as tx:
            tx.execute("UPDATE pipeline_runs SET status = ?, ended = ? WHERE id = ?", (status, ended, run_id))

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
        return rows[0] if rows else None

    def recent(self, limit: int = 20, pipeline: str | None = None) -> list[dict[str, Any]]:
        if pipeline:
            return self.store.query("SELECT * FROM pipeline_runs WHERE pipeline = ? ORDER BY started DESC LIMIT ?",
                                    (pipeline, limit))
        return self.store.query("SELECT * FROM pipeline_runs ORDER BY started DESC LIMIT ?", (limit,))

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
