"""Where pipeline runs, step runs, cache entries and schedules are kept.

One small SQL store with two backends: SQLite (the embedded default, ``.mlops/pipelines.db``) and
PostgreSQL (``postgresql://...``, for several server replicas or schedulers sharing state). The
SQL is written once, with ``?`` placeholders, in the subset both understand.

Why not SQLAlchemy: a no-op pipeline re-run must answer in well under 0.2 s, and importing
SQLAlchemy alone costs about half of that. sqlite3 is in the standard library; psycopg is imported
only for a PostgreSQL URL (``pip install 'jupyter_mlops[postgres]'``).

Modules declare their tables with :func:`register_schema`; a store creates what is missing when it
opens (``CREATE TABLE IF NOT EXISTS``: adding a table later needs no migration tool). A column added
to a table later is declared with :func:`register_columns` too: ``CREATE TABLE IF NOT EXISTS`` leaves
an existing table as it was, so the store adds the columns it lacks (``ALTER TABLE ... ADD COLUMN``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import StateError

__all__ = ["StateStore", "StateError", "register_columns", "register_schema", "open_store"]


_SCHEMAS: list[tuple[str, ...]] = []
_COLUMNS: list[tuple[str, str, str]] = []  # (table, column, SQL type) added after the table's first release
_stores: dict[str, "StateStore"] = {}


def register_schema(*statements: str) -> None:
    """Tables (``CREATE TABLE IF NOT EXISTS ...``) a module keeps in the store; created in the
    stores opened from now on and in those already open (whatever the import order)."""
    _SCHEMAS.append(statements)
    for store in list(_stores.values()):
        with store.transaction() as tx:
            for sql in statements:
                tx.execute(sql)


def register_columns(table: str, **columns: str) -> None:
    """Columns (name=SQL type, nullable) that ``table`` gained after databases with it were created;
    stores add them where missing when they open (and those already open, now). A new column also
    goes into the table's ``CREATE TABLE`` for new databases."""
    added = [(table, name, kind) for name, kind in columns.items()]
    _COLUMNS.extend(added)
    for store in list(_stores.values()):
        with store.transaction() as tx:
            _add_missing_columns(tx, added)


def _add_missing_columns(tx: "Transaction", columns: Sequence[tuple[str, str, str]]) -> None:
    """Inside the transaction that created the tables: on SQLite BEGIN IMMEDIATE serialises two
    processes opening one old database at once; PostgreSQL has ADD COLUMN IF NOT EXISTS."""
    tables = {table for table, _, _ in columns}
    for table in sorted(tables):
        if tx.dialect == "sqlite":
            have = {row["name"] for row in tx.rows(f"PRAGMA table_info({table})")}
        else:
            have = {row["column_name"] for row in tx.rows(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                "AND table_schema = current_schema()", (table,))}
        for _, name, kind in (c for c in columns if c[0] == table):
            if name not in have:
                exists = " IF NOT EXISTS" if tx.dialect == "postgresql" else ""
                tx.execute(f"ALTER TABLE {table} ADD COLUMN{exists} {name} {kind}")
                have.add(name)


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
        pid INTEGER,
        pid_start TEXT,
        heartbeat DOUBLE PRECISION,
        cancel_requested INTEGER,
        cancel_signal INTEGER
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
        outputs TEXT,
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
    # One run per pipeline file at a time: the row names the run holding it (see .runlock).
    """CREATE TABLE IF NOT EXISTS pipeline_locks (
        pipeline_file TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        taken DOUBLE PRECISION NOT NULL
    )""",
)
# pid_start guards the pid against reuse, heartbeat shows a runner on another host alive (see
# .liveness); cancel_requested is polled by the runner; cancel_signal: it turns SIGTERM into a
# clean cancel (the CLI). outputs: the md5s a step run's outputs had, which resume checks.
register_columns("pipeline_runs", pid_start="TEXT", heartbeat="DOUBLE PRECISION", cancel_requested="INTEGER",
                 cancel_signal="INTEGER")
register_columns("step_runs", outputs="TEXT")


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
                _add_missing_columns(tx, _COLUMNS)
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
