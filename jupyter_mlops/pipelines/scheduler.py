"""Pipelines on a cron schedule: schedules and their fires in the state database, and the loop
(``jupyter mlops scheduler``) that starts the runs that are due.

Everything lives in the state store, so a restarted scheduler carries on where the last one
stopped, and several schedulers (or hosts, on PostgreSQL) can share one database. A schedule is
run by whoever first takes its *lease*: a compare-and-swap UPDATE of the schedule row that also
moves ``next_fire`` on, so a fire is acted on once. The lease stays taken while the run's process
lives; the scheduler that started the run releases it when it reaps the process. A lease is
treated as abandoned when its process is gone (same host: the pid is checked) or, for a lease
held on another host, when its holder stopped renewing it for ``lease_ttl`` seconds.

A fire whose schedule still has a run going is skipped (recorded as ``skipped_running``). A fire
found more than ``grace`` seconds late (no scheduler was running) follows the schedule's policy:
``skip`` records the missed window and waits for the next fire; ``catch_up`` runs once for the
whole window, however many fires it held.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..errors import ScheduleError, UnknownScheduleError
from .cron import CronError, CronSchedule, parse
from .launcher import Launcher, RunHandle, SubprocessLauncher, pipeline_argv
from .liveness import pid_alive, process_start
from .state import StateStore, register_columns, register_schema
from .state import _shown as _shown_url

__all__ = ["Fire", "Launcher", "POLICIES", "RunHandle", "Schedule", "ScheduleError", "Scheduler",
           "SubprocessLauncher", "UnknownScheduleError", "pipeline_argv"]

POLICIES = ("skip", "catch_up")
MISSED_COUNT_LIMIT = 1000  # a long outage of a minutely schedule is counted this far, then "more than"

register_schema(
    """CREATE TABLE IF NOT EXISTS schedules (
        id TEXT PRIMARY KEY,
        pipeline_file TEXT NOT NULL,
        cron TEXT NOT NULL,
        tz TEXT NOT NULL,
        parameters TEXT NOT NULL,
        policy TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        next_fire DOUBLE PRECISION,
        last_fire DOUBLE PRECISION,
        created DOUBLE PRECISION NOT NULL,
        lease_token TEXT,
        lease_host TEXT,
        lease_pid INTEGER,
        lease_expires DOUBLE PRECISION,
        lease_fire TEXT,
        lease_pid_start TEXT,
        force INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS schedule_fires (
        id TEXT PRIMARY KEY,
        schedule_id TEXT NOT NULL,
        scheduled DOUBLE PRECISION NOT NULL,
        recorded DOUBLE PRECISION NOT NULL,
        outcome TEXT NOT NULL,
        launched DOUBLE PRECISION,
        ended DOUBLE PRECISION,
        host TEXT,
        pid INTEGER,
        exit_status INTEGER,
        log TEXT,
        detail TEXT,
        run_id TEXT,
        run_summary TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS schedule_fires_schedule ON schedule_fires (schedule_id, recorded)",
)
# lease_pid_start: the leased process's start time, so a reused pid does not hold the lease; force:
# its runs run every step (--force). run_id, run_summary: the pipeline run a fire started, and how
# it went ("succeeded, all cached" tells a run that computed nothing from one that did)
register_columns("schedules", lease_pid_start="TEXT", force="INTEGER")
register_columns("schedule_fires", run_id="TEXT", run_summary="TEXT")

#: Schedule ids double as Kubernetes CronJob names later: DNS labels short enough for the Job suffix.
_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,50}[a-z0-9])?$")
_RELEASE = ("lease_token = NULL, lease_host = NULL, lease_pid = NULL, lease_expires = NULL, lease_fire = NULL, "
            "lease_pid_start = NULL")


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


@dataclass(frozen=True)
class Schedule:
    id: str
    pipeline_file: str  # absolute
    cron: str  # canonical five fields
    tz: str
    parameters: dict[str, str]  # -p overrides, as typed: the run parses them like a command line
    policy: str  # "skip" | "catch_up"
    paused: bool
    next_fire: datetime | None
    last_fire: datetime | None
    created: datetime
    force: bool = False  # every step runs, cached or not (a notebook reading a database, an API)

    @property
    def expression(self) -> CronSchedule:
        return parse(self.cron, self.tz)

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> "Schedule":
        return cls(row["id"], row["pipeline_file"], row["cron"], row["tz"], json.loads(row["parameters"]),
                   row["policy"], bool(row["paused"]), _dt(row["next_fire"]), _dt(row["last_fire"]),
                   _dt(row["created"]), bool(row.get("force")))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Fire:
    """One fire of a schedule: ``launched``, ``skipped_running``, ``missed`` or ``failed_to_launch``."""

    id: str
    schedule_id: str
    scheduled: datetime
    outcome: str
    launched: datetime | None = None
    ended: datetime | None = None
    host: str | None = None
    pid: int | None = None
    exit_status: int | None = None
    log: str | None = None
    detail: str | None = None
    run_id: str | None = None  # the pipeline run it started, once reaped
    run_summary: str | None = None  # that run's status for listings ("succeeded, all cached")

    @property
    def summary(self) -> str:
        """A few words for `schedule list`."""
        if self.outcome != "launched":
            return {"skipped_running": "skipped (still running)", "failed_to_launch": "failed to launch"}.get(
                self.outcome, self.outcome)
        if self.ended is None:
            return f"running (pid {self.pid})" if self.pid else "starting"
        if self.exit_status is None:
            return "lost (exit unknown)"
        if self.exit_status < 0:
            return f"killed (signal {-self.exit_status})"
        if self.exit_status == 0:
            return self.run_summary or "succeeded"
        return f"failed (exit {self.exit_status})"

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> "Fire":
        return cls(row["id"], row["schedule_id"], _dt(row["scheduled"]), row["outcome"],  # type: ignore[arg-type]
                   _dt(row["launched"]), _dt(row["ended"]), row["host"], row["pid"], row["exit_status"],
                   row["log"], row["detail"], row.get("run_id"), row.get("run_summary"))


@dataclass
class _Child:
    token: str
    fire_id: str
    handle: RunHandle


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Scheduler:
    """Schedules in ``store`` and the loop that fires them.

    ``clock`` returns the current time (aware); ``launcher`` starts a run (default: a
    :class:`SubprocessLauncher` logging under ``.mlops/schedules/logs``). ``grace``: seconds a fire
    may be late and still count as on time. ``lease_ttl``: seconds a lease held on *another* host
    stays valid without renewal (the holder renews it every pass). ``log`` gets one line per event.
    """

    def __init__(self, store: StateStore, *, clock: Callable[[], datetime] = _utcnow,
                 launcher: Launcher | None = None, grace: float = 60.0, lease_ttl: float = 300.0,
                 host: str | None = None, log: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.grace = grace
        self.lease_ttl = lease_ttl
        self.host = host or socket.gethostname()
        self._launcher = launcher
        self._log = log or (lambda line: None)
        self._running: dict[str, _Child] = {}
        self._stopping = threading.Event()
        self._wake: tuple[int, int] | None = None

    # -- schedules ----------------------------------------------------------------------------------

    def add(self, pipeline_file: str | Path, cron: str, *, tz: str | None = None, policy: str = "skip",
            parameters: Mapping[str, str] | None = None, name: str | None = None,
            pipeline_name: str | None = None, force: bool = False) -> Schedule:
        """A new schedule; ``name`` is its id (default: from ``pipeline_name``, made unique);
        ``force``: its runs run every step, cached or not.

        Raises :class:`CronError` for a bad expression or zone, :class:`ScheduleError` for a bad
        policy or a name that is malformed or taken.
        """
        if policy not in POLICIES:
            raise ScheduleError(f"policy {policy!r}: use skip (missed fires are dropped) or catch_up "
                                "(one run for a missed window)")
        expression = parse(cron, tz)
        path = Path(pipeline_file).resolve()
        now = self._now()
        with self.store.transaction() as tx:
            taken = {row["id"] for row in tx.rows("SELECT id FROM schedules")}
            schedule_id = _checked_id(name, taken) if name else _free_id(pipeline_name or path.parent.name, taken)
            tx.execute(
                "INSERT INTO schedules (id, pipeline_file, cron, tz, parameters, policy, paused, next_fire, created,"
                " force) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                [schedule_id, str(path), expression.text, expression.tz, json.dumps(dict(parameters or {})),
                 policy, expression.next_after(now).timestamp(), now.timestamp(), 1 if force else 0])
        return self.get(schedule_id)

    def schedules(self) -> list[Schedule]:
        return [Schedule._from_row(r) for r in self.store.query("SELECT * FROM schedules ORDER BY id")]

    def get(self, schedule_id: str) -> Schedule:
        rows = self.store.query("SELECT * FROM schedules WHERE id = ?", [schedule_id])
        if not rows:
            raise UnknownScheduleError(schedule_id, [s.id for s in self.schedules()])
        return Schedule._from_row(rows[0])

    def pause(self, schedule_id: str) -> Schedule:
        self._update(schedule_id, "UPDATE schedules SET paused = 1 WHERE id = ?", [schedule_id])
        return self.get(schedule_id)

    def resume(self, schedule_id: str) -> Schedule:
        """Unpause; the next fire is counted from now (what fell in the pause is not caught up)."""
        following = self.get(schedule_id).expression.next_after(self._now())
        self._update(schedule_id, "UPDATE schedules SET paused = 0, next_fire = ? WHERE id = ?",
                     [following.timestamp(), schedule_id])
        return self.get(schedule_id)

    def remove(self, schedule_id: str) -> None:
        """Delete the schedule and its history; a run already going is left to finish."""
        with self.store.transaction() as tx:
            if tx.execute("DELETE FROM schedules WHERE id = ?", [schedule_id]) != 1:
                raise UnknownScheduleError(schedule_id, [r["id"] for r in tx.rows("SELECT id FROM schedules ORDER BY id")])
            tx.execute("DELETE FROM schedule_fires WHERE schedule_id = ?", [schedule_id])

    def history(self, schedule_id: str, limit: int = 20) -> list[Fire]:
        """The latest fires first."""
        rows = self.store.query("SELECT * FROM schedule_fires WHERE schedule_id = ? "
                                "ORDER BY recorded DESC, scheduled DESC LIMIT ?", [schedule_id, limit])
        return [Fire._from_row(r) for r in rows]

    def _update(self, schedule_id: str, sql: str, params: list[Any]) -> None:
        with self.store.transaction() as tx:
            changed = tx.execute(sql, params)
        if changed != 1:
            raise UnknownScheduleError(schedule_id, [s.id for s in self.schedules()])

    # -- the loop -----------------------------------------------------------------------------------

    @property
    def running(self) -> dict[str, RunHandle]:
        """Runs this scheduler started that it has not reaped yet, by schedule id."""
        return {sid: child.handle for sid, child in self._running.items()}

    def tick(self) -> list[Fire]:
        """One pass: reap finished runs, act on every due schedule once, renew held leases."""
        now = self._now()
        self._reap(now)
        fires = []
        for row in self.store.query("SELECT * FROM schedules WHERE paused = 0 AND next_fire <= ? "
                                    "ORDER BY next_fire, id", [now.timestamp()]):
            fire = self._fire(row, now)
            if fire is not None:
                fires.append(fire)
        self._renew(now)
        return fires

    def seconds_until_due(self, cap: float = 30.0) -> float:
        """How long the loop may sleep: until the earliest fire, at most ``cap``."""
        rows = self.store.query("SELECT MIN(next_fire) AS due FROM schedules WHERE paused = 0")
        due = rows[0]["due"] if rows else None
        if self._running and self._wake is None:
            cap = min(cap, 1.0)  # no SIGCHLD to wake on (not the main thread): look for exits often
        if due is None:
            return cap
        return max(0.0, min(cap, due - self._now().timestamp()))

    def run_forever(self, max_sleep: float = 30.0) -> None:
        """Tick, sleep until the next fire (at most ``max_sleep``, so new schedules are seen), repeat,
        until SIGTERM, SIGINT or :meth:`stop`. Runs already started are left to finish."""
        with self._wakeups():
            count = len(self.store.query("SELECT id FROM schedules"))
            self._log(f"Scheduler on {_shown_url(self.store.url)} ({count} schedule(s), host {self.host}); "
                      "SIGTERM or Ctrl-C stops it.")  # said once the signals are handled: safe to send one now
            while not self._stopping.is_set():
                self.tick()
                if not self._stopping.is_set():
                    self._wait(max(0.05, self.seconds_until_due(max_sleep)))

    def run_once(self, *, wait: bool = True) -> list[Fire]:
        """One pass; with ``wait``, also wait for the runs it started and record how they ended."""
        with self._wakeups():
            fires = self.tick()
            while wait and not self._stopping.is_set():
                now = self._now()
                self._reap(now)
                if not self._running:
                    break
                self._renew(now)
                self._wait(30.0 if self._wake else 1.0)
        return fires

    def stop(self) -> None:
        """Ask :meth:`run_forever` to return after its current pass (safe from any thread)."""
        self._stopping.set()
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"\0")

    # -- one fire -----------------------------------------------------------------------------------

    def _fire(self, row: Mapping[str, Any], now: datetime) -> Fire | None:
        schedule = Schedule._from_row(row)
        due = schedule.next_fire
        assert due is not None
        try:
            following = schedule.expression.next_after(now)
        except CronError as e:  # e.g. a zone gone from this host's tz database: stop retrying it
            self._update(schedule.id, "UPDATE schedules SET paused = 1 WHERE id = ?", [schedule.id])
            return self._record(row, None, Fire(_new_id(), schedule.id, due, "failed_to_launch",
                                                detail=f"{e}; the schedule is paused"), now)
        if self._lease_held(row, now):
            detail = (f"the run started for {_shown(_dt(row['last_fire']))} (pid {row['lease_pid']} on "
                      f"{row['lease_host']}) is still going")
            return self._record(row, following, Fire(_new_id(), schedule.id, due, "skipped_running", detail=detail),
                                now)
        if (now - due).total_seconds() > self.grace:
            missed = [due, *schedule.expression.fires_between(due, now, MISSED_COUNT_LIMIT)]
            count = f"more than {MISSED_COUNT_LIMIT}" if len(missed) > MISSED_COUNT_LIMIT else str(len(missed))
            window = f"{count} fire(s) from {_shown(due)} to {_shown(missed[-1])} passed while no scheduler ran"
            if schedule.policy == "skip":
                detail = f"{window}; policy skip: next run at {_shown(following)}"
                return self._record(row, following, Fire(_new_id(), schedule.id, due, "missed", detail=detail), now)
            self._log(f"{schedule.id}: {window}; policy catch_up: one run for them")
        return self._launch(row, schedule, due, following, now)

    def _record(self, row: Mapping[str, Any], following: datetime | None, fire: Fire, now: datetime) -> Fire | None:
        """Move next_fire on and record ``fire``, unless another scheduler acted on this fire first."""
        with self.store.transaction() as tx:
            if following is not None and tx.execute(
                    "UPDATE schedules SET next_fire = ? WHERE id = ? AND next_fire = ? AND paused = 0",
                    [following.timestamp(), row["id"], row["next_fire"]]) != 1:
                return None
            _insert_fire(tx, fire, now)
        self._log(f"{fire.schedule_id}: fire of {_shown(fire.scheduled)} {fire.summary}: {fire.detail}")
        return fire

    def _launch(self, row: Mapping[str, Any], schedule: Schedule, scheduled: datetime, following: datetime,
                now: datetime) -> Fire | None:
        token, fire = uuid.uuid4().hex, Fire(_new_id(), schedule.id, scheduled, "launched", launched=now, host=self.host)
        stale = row["lease_token"]  # None, or a lease judged abandoned by _lease_held
        with self.store.transaction() as tx:
            taken = tx.execute(
                "UPDATE schedules SET lease_token = ?, lease_host = ?, lease_pid = ?, lease_pid_start = ?,"
                " lease_expires = ?, lease_fire = ?, next_fire = ?, last_fire = ? WHERE id = ? AND paused = 0"
                " AND next_fire = ? AND (lease_token IS NULL OR lease_token = ?)",
                [token, self.host, os.getpid(), process_start(os.getpid()), now.timestamp() + self.lease_ttl,
                 fire.id, following.timestamp(),
                 scheduled.timestamp(), schedule.id, row["next_fire"], stale])
            if taken != 1:
                return None
            if stale is not None:
                tx.execute("UPDATE schedule_fires SET ended = ?, detail = ? WHERE id = ? AND ended IS NULL",
                           [now.timestamp(), "its scheduler stopped before the run ended; exit status unknown",
                            row["lease_fire"]])
            _insert_fire(tx, fire, now)
        try:
            handle = (self._launcher or self._default_launcher())(schedule, scheduled)
        except Exception as e:  # whatever the launcher raised is this fire's failure, not the loop's
            failed = Fire(fire.id, schedule.id, scheduled, "failed_to_launch", launched=now, ended=now,
                          host=self.host, detail=f"{type(e).__name__}: {e}")
            with self.store.transaction() as tx:
                tx.execute("UPDATE schedule_fires SET outcome = ?, ended = ?, detail = ? WHERE id = ?",
                           [failed.outcome, now.timestamp(), failed.detail, fire.id])
                tx.execute(f"UPDATE schedules SET {_RELEASE} WHERE id = ? AND lease_token = ?", [schedule.id, token])
            self._log(f"{schedule.id}: fire of {_shown(scheduled)} failed to launch: {failed.detail}")
            return failed
        log = getattr(handle, "log", None)
        with self.store.transaction() as tx:
            tx.execute("UPDATE schedules SET lease_pid = ?, lease_pid_start = ? WHERE id = ? AND lease_token = ?",
                       [handle.pid, process_start(handle.pid), schedule.id, token])
            tx.execute("UPDATE schedule_fires SET pid = ?, log = ? WHERE id = ?", [handle.pid, log, fire.id])
        self._running[schedule.id] = _Child(token, fire.id, handle)
        self._log(f"{schedule.id}: fire of {_shown(scheduled)} launched, pid {handle.pid}"
                  + (f", log {log}" if log else ""))
        return Fire(fire.id, schedule.id, scheduled, "launched", launched=now, host=self.host, pid=handle.pid, log=log)

    def _lease_held(self, row: Mapping[str, Any], now: datetime) -> bool:
        token = row["lease_token"]
        if token is None:
            return False
        child = self._running.get(row["id"])
        if child is not None and child.token == token:
            return True
        if row["lease_host"] == self.host and os.name == "posix":
            return pid_alive(row["lease_pid"], row.get("lease_pid_start"))
        return (row["lease_expires"] or 0.0) >= now.timestamp()

    def _reap(self, now: datetime) -> None:
        for schedule_id, child in list(self._running.items()):
            status = child.handle.poll()
            if status is None:
                continue
            del self._running[schedule_id]
            run_id, summary = self._run_of(schedule_id, child.handle.pid)
            with self.store.transaction() as tx:
                tx.execute("UPDATE schedule_fires SET exit_status = ?, ended = ?, run_id = ?, run_summary = ? "
                           "WHERE id = ?", [status, now.timestamp(), run_id, summary, child.fire_id])
                tx.execute(f"UPDATE schedules SET {_RELEASE} WHERE id = ? AND lease_token = ?", [schedule_id, child.token])
            self._log(f"{schedule_id}: run (pid {child.handle.pid}) ended with exit status {status}")

    def _run_of(self, schedule_id: str, pid: int) -> tuple[str | None, str | None]:
        """The pipeline run the fire's process ran, and its summary (None, None: it started none,
        or a custom launcher ran something else)."""
        from .results import run_summary

        rows = self.store.query("SELECT id, status FROM pipeline_runs WHERE schedule_id = ? AND host = ? AND pid = ? "
                                "ORDER BY started DESC LIMIT 1", [schedule_id, self.host, pid])
        if not rows:
            return None, None
        counts = {r["status"]: int(r["n"]) for r in self.store.query(
            "SELECT status, COUNT(*) AS n FROM step_runs WHERE run_id = ? GROUP BY status", [rows[0]["id"]])}
        return rows[0]["id"], run_summary(rows[0]["status"], counts)

    def _renew(self, now: datetime) -> None:
        if not self._running:
            return
        with self.store.transaction() as tx:
            for schedule_id, child in self._running.items():
                tx.execute("UPDATE schedules SET lease_expires = ? WHERE id = ? AND lease_token = ?",
                           [now.timestamp() + self.lease_ttl, schedule_id, child.token])

    def _default_launcher(self) -> Launcher:
        from ..config import load_config

        self._launcher = SubprocessLauncher(load_config().embedded_dir / "schedules" / "logs")
        return self._launcher

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError(f"the scheduler's clock returned a naive datetime {now!r}; return an aware one")
        return now

    # -- sleeping and signals -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _wakeups(self) -> Iterator[None]:
        """In the main thread: SIGTERM/SIGINT stop the loop, SIGCHLD wakes it to reap, via a pipe."""
        self._stopping.clear()
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        handlers = {signal.SIGTERM: lambda *_: self._stopping.set(), signal.SIGINT: lambda *_: self._stopping.set(),
                    signal.SIGCHLD: lambda *_: None}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        self._wake = (r, w)
        try:
            yield
        finally:
            self._wake = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_fd)
            os.close(r)
            os.close(w)

    def _wait(self, seconds: float) -> None:
        if self._wake is None:
            self._stopping.wait(seconds)
            return
        select.select([self._wake[0]], [], [], seconds)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake[0], 512):
                pass


def _insert_fire(tx: Any, fire: Fire, now: datetime) -> None:
    tx.execute(
        "INSERT INTO schedule_fires (id, schedule_id, scheduled, recorded, outcome, launched, host, pid, log, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [fire.id, fire.schedule_id, fire.scheduled.timestamp(), now.timestamp(), fire.outcome,
         fire.launched.timestamp() if fire.launched else None, fire.host, fire.pid, fire.log, fire.detail])


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


def _shown(when: datetime | None) -> str:
    """For details and log lines: always UTC (`schedule list` shows the schedule's own zone)."""
    return "-" if when is None else when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M %Z")


def _checked_id(name: str, taken: set[str]) -> str:
    if not _ID.match(name):
        raise ScheduleError(f"schedule name {name!r}: use lowercase letters, digits and '-', starting and ending "
                            "with a letter or digit, at most 52 characters (it becomes a Kubernetes name later)")
    if name in taken:
        raise ScheduleError(f"a schedule named {name!r} exists; pick another --name or remove it first "
                            f"(jupyter mlops schedule remove {name})")
    return name


def _free_id(base: str, taken: set[str]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")[:44].rstrip("-") or "pipeline"
    candidate, n = slug, 1
    while candidate in taken:
        n += 1
        candidate = f"{slug}-{n}"
    return candidate
