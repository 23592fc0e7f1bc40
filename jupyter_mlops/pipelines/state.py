"""Where pipeline runs, step runs, cache entries and schedules are kept.

One small SQL store with two backends: SQLite (the embedded default, ``.mlops/pipelines.db``) and
PostgreSQL (``postgresql://...``, for several server replicas or schedulers sharing state). The
SQL is written once, with ``?`` placeholders, in the subset both understand.

Why not SQLAlchemy: a no-op pipeline re-run must answer in well under 0.2 s, and importing
SQLAlchemy alone costs about half of that. sqlite3 is in the standard library; psycopg is imported
only for a PostgreSQL URL (``pip install 'jupyter_mlops[postgres]'``).

Modules declare their tables with :func:`register_schema`; a store creates what is missing when it
opens (``CREATE TABLE IF NOT EXISTS``: adding a table later needs no migration tool).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import StateError

__all__ = ["StateStore", "StateError", "register_schema", "open_store"]


_SCHEMAS: list[tuple[str, ...]] = []
_stores: dict[str, "StateStore"] = {}


def register_schema(*statements: str) -> None:
    """Tables (``CREATE TABLE IF NOT EXISTS ...``) a module keeps in the store; created in the
    stores opened from now on and in those already open (whatever the import order)."""
    _SCHEMAS.append(statements)
    for store in list(_stores.values()):
        with store.transaction() as tx:
            for sql in statements:
                tx.execute(sql)


register_schema(
    """CREATE TABLE IF NOT EXISTS pipeline_runs (
        id TEXT PRIMARY KEY,
        pipeline TEXT NOT NULL,
        file TEXT NOT NULL,
        status TEXT NOT NULL,
        started DOUBLE PRECISION NOT NULL,
        ended DOUBLE PRECISION,
        parameters TEXT NOT NULL,
        options TEXT NOT NULL,
        resumed_from TEXT,
        schedule_id TEXT,
        spool_id TEXT,
        host TEXT,
        pid INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS pipeline_runs_started ON pipeline_runs (started)",
    """CREATE TABLE IF NOT EXISTS step_runs (
        run_id TEXT NOT NULL,
        step TEXT NOT NULL,
        status TEXT NOT NULL,
        cache_key TEXT,
        started DOUBLE PRECISION,
        ended DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0,
        output_notebook TEXT,
        error TEXT,
        spool_id TEXT,
        cached_from TEXT,
        PRIMARY KEY (run_id, step)
    )""",
    """CREATE TABLE IF NOT EXISTS step_cache (
        pipeline_file TEXT NOT NULL,
        step TEXT NOT NULL,
        cache_key TEXT NOT NULL,
        outputs TEXT NOT NULL,
        run_id TEXT NOT NULL,
        spool_id TEXT,
        created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (pipeline_file, step)
    )""",
)


class StateStore:
    """A connection to the state database; safe to share between threads (one lock)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        self.dialect = "postgresql" if url.startswith(("postgresql:", "postgres:", "postgresql+")) else "sqlite"
        try:
            self._conn = self._connect(url)
            with self.transaction() as tx:
                for statements in _SCHEMAS:
                    for sql in statements:
                        tx.execute(sql)
        except StateError:
            raise
        except Exception as e:  # the driver's own error types differ; say what and where
            reason = " ".join(str(e).split())  # drivers' messages run over several lines
            raise StateError(f"cannot open the pipeline state database {_shown(url)}: {reason}") from e

    def _connect(self, url: str) -> Any:
        if self.dialect == "sqlite":
            if not url.startswith("sqlite:///"):
                raise StateError(f"state URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")
            path = Path(url[len("sqlite:///"):])
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StateError(f"cannot create {path.parent} for the pipeline state: {e.strerror}") from e
            # Autocommit mode; transactions are explicit (BEGIN IMMEDIATE) so writers queue.
            conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        try:
            import psycopg
        except ModuleNotFoundError:
            raise StateError("a PostgreSQL state URL needs psycopg: pip install 'jupyter_mlops[postgres]'") from None
        dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)

    @contextlib.contextmanager
    def transaction(self) -> Iterator["Transaction"]:
        """All statements inside commit together, or none do."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
                yield Transaction(cur, self.dialect)
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, outside any transaction (a read sees the last commit)."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute(_portable(sql, self.dialect), tuple(params))
                names = [d[0] for d in cur.description or ()]
                return [dict(zip(names, row)) for row in cur.fetchall()]
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transaction:
    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cur = cursor
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        self._cur.execute(_portable(sql, self.dialect), tuple(params))
        return self._cur.rowcount

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self._cur.execute(_portable(sql, self.dialect), tuple(params))
        names = [d[0] for d in self._cur.description or ()]
        return [dict(zip(names, row)) for row in self._cur.fetchall()]


def _portable(sql: str, dialect: str) -> str:
    if dialect == "postgresql":
        return sql.replace("%", "%%").replace("?", "%s")
    return sql


def _shown(url: str) -> str:
    """The URL without a password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        rest = f"{user}:***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def dumps(value: Any) -> str:
    """Canonical JSON for columns that hold structures."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def open_store(url: str) -> StateStore:
    """The process's store for ``url`` (opened once)."""
    store = _stores.get(url)
    if store is None:
        store = _stores[url] = StateStore(url)
    return store
