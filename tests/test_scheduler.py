"""Schedules in the state store and the scheduler loop, driven by a fake clock (no sleeps).

The store tests run on SQLite and, where it answers, on the PostgreSQL at 127.0.0.1:5432 (each
test in a schema of its own, chosen through the URL's search_path).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from jupyter_mlops.cli import main
from jupyter_mlops.pipelines import state
from jupyter_mlops.pipelines.cron import CronError
from jupyter_mlops.pipelines.scheduler import (Fire, Schedule, ScheduleError, Scheduler, SubprocessLauncher,
                                               UnknownScheduleError, pipeline_argv)
from jupyter_mlops.pipelines.state import StateStore

from .conftest import Project, make_notebook

UTC = timezone.utc
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class FakeRun:
    """A run that goes on until the test finishes it; its pid is a live process unless told."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    def poll(self) -> int | None:
        return self.status

    def wait(self, timeout: float | None = None) -> int:
        if self.status is None:
            raise subprocess.TimeoutExpired("fake run", timeout or 0)
        return self.status

    def finish(self, status: int = 0) -> None:
        self.status = status


class FakeLauncher:
    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.calls: list[tuple[str, datetime]] = []
        self.runs: list[FakeRun] = []
        self.error: Exception | None = None
        self.on_launch: Callable[[], None] | None = None

    def __call__(self, schedule: Schedule, scheduled: datetime) -> FakeRun:
        if self.error:
            raise self.error
        self.calls.append((schedule.id, scheduled))
        self.runs.append(FakeRun(self.pid))
        if self.on_launch:
            self.on_launch()
        return self.runs[-1]


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def mlops_state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A state database of this test's own: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield "sqlite:///" + str(tmp_path / "state" / "pipelines.db")
        return
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL server answers at {POSTGRES} ({str(e).strip()})")
    schema = f"mlops_sched_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@pytest.fixture
def mlops_open(mlops_state_url: str) -> Iterator[Callable[[], StateStore]]:
    """Opens connections to the test's database (one per simulated process); closes them after."""
    opened: list[StateStore] = []

    def open_one() -> StateStore:
        opened.append(StateStore(mlops_state_url))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def mlops_store(mlops_open: Callable[[], StateStore]) -> StateStore:
    return mlops_open()


@pytest.fixture
def mlops_clock() -> FakeClock:
    return FakeClock(utc(2024, 1, 1, 0, 0))  # a Monday


def make_scheduler(store: StateStore, clock: FakeClock, launcher: FakeLauncher | None = None, **kw: Any) -> Scheduler:
    return Scheduler(store, clock=clock, launcher=launcher or FakeLauncher(), **kw)


def lease(store: StateStore, schedule_id: str) -> dict[str, Any]:
    rows = store.query("SELECT lease_token, lease_host, lease_pid, lease_fire FROM schedules WHERE id = ?", [schedule_id])
    return rows[0]


# -- adding and changing schedules -------------------------------------------------------------------


def test_add_computes_the_next_fire_and_names_the_schedule(mlops_store: StateStore, mlops_clock: FakeClock,
                                                           tmp_path: Path) -> None:
    scheduler = make_scheduler(mlops_store, mlops_clock)
    first = scheduler.add(tmp_path / "p" / "pipeline.yaml", "0 3 * * MON", pipeline_name="Iris Demo",
                          parameters={"seed": "3"})
    assert (first.id, first.cron, first.tz, first.policy, first.paused) == ("iris-demo", "0 3 * * 1", "UTC", "skip", False)
    assert first.next_fire == utc(2024, 1, 1, 3) and first.created == mlops_clock.now
    assert first.pipeline_file == str((tmp_path / "p" / "pipeline.yaml").resolve())
    assert first.parameters == {"seed": "3"}
    second = scheduler.add(tmp_path / "p" / "pipeline.yaml", "CRON_TZ=Europe/Berlin 0 3 * * *", pipeline_name="Iris Demo",
                           policy="catch_up")
    assert (second.id, second.tz, second.policy) == ("iris-demo-2", "Europe/Berlin", "catch_up")
    assert second.next_fire == utc(2024, 1, 1, 2)  # 03:00 CET
    assert scheduler.add(tmp_path / "q" / "pipeline.yaml", "@daily").id == "q"  # default: the folder's name
    assert [s.id for s in scheduler.schedules()] == ["iris-demo", "iris-demo-2", "q"]


def test_add_refuses_bad_names_policies_and_crons(mlops_store: StateStore, mlops_clock: FakeClock, tmp_path: Path) -> None:
    scheduler = make_scheduler(mlops_store, mlops_clock)
    scheduler.add(tmp_path / "pipeline.yaml", "@daily", name="nightly")
    with pytest.raises(ScheduleError, match="a schedule named 'nightly' exists; pick another --name or remove it"):
        scheduler.add(tmp_path / "pipeline.yaml", "@daily", name="nightly")
    with pytest.raises(ScheduleError, match="schedule name 'Night_ly': use lowercase letters, digits and '-'"):
        scheduler.add(tmp_path / "pipeline.yaml", "@daily", name="Night_ly")
    with pytest.raises(ScheduleError, match="policy 'always': use skip .* or catch_up"):
        scheduler.add(tmp_path / "pipeline.yaml", "@daily", policy="always")
    with pytest.raises(CronError, match="hour 24 is out of range 0-23"):
        scheduler.add(tmp_path / "pipeline.yaml", "0 24 * * *")
    with pytest.raises(CronError, match="unknown time zone 'Europe/Berln'"):
        scheduler.add(tmp_path / "pipeline.yaml", "@daily", tz="Europe/Berln")
    assert [s.id for s in scheduler.schedules()] == ["nightly"]


def test_unknown_ids_list_the_known_ones(mlops_store: StateStore, mlops_clock: FakeClock, tmp_path: Path) -> None:
    scheduler = make_scheduler(mlops_store, mlops_clock)
    with pytest.raises(UnknownScheduleError, match="no schedule 'x'; there are none; add one with"):
        scheduler.pause("x")
    scheduler.add(tmp_path / "pipeline.yaml", "@daily", name="b")
    scheduler.add(tmp_path / "pipeline.yaml", "@daily", name="a")
    for action in (scheduler.pause, scheduler.resume, scheduler.remove, scheduler.get):
        with pytest.raises(UnknownScheduleError, match="^no schedule 'x'; known: a, b$"):
            action("x")


# -- firing ---------------------------------------------------------------------------------------------


def test_fires_when_due_and_not_before(mlops_store: StateStore, mlops_clock: FakeClock, tmp_path: Path) -> None:
    launcher = FakeLauncher()
    scheduler = make_scheduler(mlops_store, mlops_clock, launcher)
    scheduler.add(tmp_path / "pipeline.yaml", "0 3 * * 1", name="weekly")
    mlops_clock.now = utc(2024, 1, 1, 2, 59, 59)
    assert scheduler.tick() == [] and launcher.calls == []
    mlops_clock.now = utc(2024, 1, 1, 3, 0, 0)
    [fire] = scheduler.tick()
    assert (fire.outcome, fire.scheduled, fire.pid) == ("launched", utc(2024, 1, 1, 3), os.getpid())
    assert launcher.calls == [("weekly", utc(2024, 1, 1, 3))]
    assert scheduler.get("weekly").next_fire == utc(2024, 1, 8, 3)
    assert scheduler.get("weekly").last_fire == utc(2024, 1, 1, 3)
    assert scheduler.tick() == [] and len(launcher.calls) == 1  # a fire is acted on once
    assert lease(mlops_store, "weekly")["lease_pid"] == os.getpid()
    assert scheduler.history("weekly")[0].summary == f"running (pid {os.getpid()})"


def test_a_finished_run_is_reaped_its_status_recorded_and_the_lease_released(
        mlops_store: StateStore, mlops_clock: FakeClock, tmp_path: Path) -> None:
    launcher = FakeLauncher()
    scheduler = make_scheduler(mlops_store, mlops_clock, launcher)
    scheduler.add(tmp_path / "pipeline.yaml", "*/10 * * * *", name="often")
    mlops_clock.advance(minutes=10)
    scheduler.tick()
    launcher.runs[0].finish(3)
    mlops_clock.advance(minutes=1)
    assert scheduler.tick() == []
    [fire] = scheduler.history("often")
    assert (fire.exit_status, fire.ended, fire.summary) == (3, mlops_clock.now, "failed (exit 3)")
    assert lease(mlops_store, "often") == {"lease_token": None, "lease_host": None, "lease_pid": None, "lease_fire": None}
    assert scheduler.running == {}
    mlops_clock.advance(minutes=9)
    assert [f.outcome for f in scheduler.tick()] == ["launched"]


def test_pause_and_resume(mlops_store: StateStore, mlops_clock: FakeClock, tmp_path: Path) -> None:
    launcher = FakeLauncher()
    scheduler = make_scheduler(mlops_store, mlops_clock, launcher)
    scheduler.add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly", policy="catch_up")
    assert scheduler.pause("hourly").paused
    mlops_clock.now = utc(2024, 1, 1, 5, 30)
    assert scheduler.tick() == [] and launcher.calls == []
    resumed = scheduler.resume("hourly")
    assert not resumed.paused and resumed.next_fire == utc(2024, 1, 1, 6)  # what fell in the pause is not run
    assert scheduler.tick() == []
    mlops_clock.now = utc(2024, 1, 1, 6)
    assert [f.outcome for f in scheduler.tick()] == ["launched"]


def test_skip_policy_after_downtime_records_the_missed_window(mlops_open: Callable[[], StateStore],
                                                              mlops_clock: FakeClock, tmp_path: Path) -> None:
    make_scheduler(mlops_open(), mlops_clock).add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly")
    mlops_clock.now = utc(2024, 1, 1, 5, 10)  # no scheduler ran from 00:00 to 05:10
    launcher = FakeLauncher()
    restarted = make_scheduler(mlops_open(), mlops_clock, launcher)
    [fire] = restarted.tick()
    assert (fire.outcome, fire.scheduled) == ("missed", utc(2024, 1, 1, 1))
    assert "5 fire(s) from 2024-01-01 01:00 UTC to 2024-01-01 05:00 UTC passed while no scheduler ran" in fire.detail
    assert launcher.calls == [] and restarted.get("hourly").next_fire == utc(2024, 1, 1, 6)
    assert restarted.tick() == []
    mlops_clock.now = utc(2024, 1, 1, 6, 0, 30)  # late, but within the grace
    assert [f.outcome for f in restarted.tick()] == ["launched"]


def test_catch_up_policy_runs_once_for_the_whole_missed_window(mlops_open: Callable[[], StateStore],
                                                               mlops_clock: FakeClock, tmp_path: Path) -> None:
    make_scheduler(mlops_open(), mlops_clock).add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly",
                                                  policy="catch_up")
    mlops_clock.now = utc(2024, 1, 1, 5, 10)
    launcher = FakeLauncher()
    restarted = make_scheduler(mlops_open(), mlops_clock, launcher)
    [fire] = restarted.tick()
    assert (fire.outcome, fire.scheduled) == ("launched", utc(2024, 1, 1, 1))
    assert restarted.tick() == [] and launcher.calls == [("hourly", utc(2024, 1, 1, 1))]
    assert restarted.get("hourly").next_fire == utc(2024, 1, 1, 6)


def test_a_fire_while_the_last_run_is_going_is_skipped(mlops_store: StateStore, mlops_clock: FakeClock,
                                                       tmp_path: Path) -> None:
    launcher = FakeLauncher()
    scheduler = make_scheduler(mlops_store, mlops_clock, launcher)
    scheduler.add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly", policy="catch_up")
    mlops_clock.now = utc(2024, 1, 1, 1)
    scheduler.tick()
    mlops_clock.now = utc(2024, 1, 1, 2)  # the 01:00 run overran
    [skipped] = scheduler.tick()
    assert (skipped.outcome, skipped.scheduled, skipped.summary) == ("skipped_running", utc(2024, 1, 1, 2),
                                                                     "skipped (still running)")
    assert "the run started for 2024-01-01 01:00 UTC" in skipped.detail and len(launcher.calls) == 1
    launcher.runs[0].finish(0)
    mlops_clock.now = utc(2024, 1, 1, 3)
    assert [f.outcome for f in scheduler.tick()] == ["launched"]
    assert [f.outcome for f in scheduler.history("hourly")] == ["launched", "skipped_running", "launched"]
    assert scheduler.history("hourly")[2].summary == "succeeded"


def test_two_schedulers_on_one_database_never_run_a_schedule_twice(
        mlops_open: Callable[[], StateStore], mlops_clock: FakeClock, tmp_path: Path) -> None:
    one, two = FakeLauncher(), FakeLauncher()
    a = make_scheduler(mlops_open(), mlops_clock, one)
    b = make_scheduler(mlops_open(), mlops_clock, two)
    a.add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly")
    mlops_clock.now = utc(2024, 1, 1, 1)
    assert [f.outcome for f in a.tick()] == ["launched"]
    assert b.tick() == []  # the fire was taken
    mlops_clock.now = utc(2024, 1, 1, 2)
    assert [f.outcome for f in b.tick()] == ["skipped_running"]  # a's run still holds the lease
    assert a.tick() == []
    one.runs[0].finish(0)
    a.tick()  # reaped, released
    mlops_clock.now = utc(2024, 1, 1, 3)
    assert [f.outcome for f in b.tick()] == ["launched"]
    assert (len(one.calls), len(two.calls)) == (1, 1)


def test_racing_schedulers_launch_each_due_schedule_exactly_once(
        mlops_open: Callable[[], StateStore], mlops_clock: FakeClock, tmp_path: Path) -> None:
    setup = make_scheduler(mlops_open(), mlops_clock)
    for n in range(20):
        setup.add(tmp_path / "pipeline.yaml", "0 * * * *", name=f"s{n}")
    mlops_clock.now = utc(2024, 1, 1, 1)
    launchers = [FakeLauncher() for _ in range(4)]
    schedulers = [make_scheduler(mlops_open(), mlops_clock, launcher) for launcher in launchers]
    barrier = threading.Barrier(len(schedulers))
    errors: list[BaseException] = []

    def race(scheduler: Scheduler) -> None:
        try:
            barrier.wait(30)
            scheduler.tick()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=race, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    launched = sorted(call[0] for launcher in launchers for call in launcher.calls)
    assert launched == sorted(f"s{n}" for n in range(20))
    fires = mlops_open().query("SELECT schedule_id, outcome FROM schedule_fires")
    assert len(fires) == 20 and {f["outcome"] for f in fires} == {"launched"}


def test_a_lease_whose_process_died_on_this_host_is_taken_over(
        mlops_open: Callable[[], StateStore], mlops_clock: FakeClock, tmp_path: Path) -> None:
    crashed = make_scheduler(mlops_open(), mlops_clock, FakeLauncher(pid=dead_pid()))
    crashed.add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly")
    mlops_clock.now = utc(2024, 1, 1, 1)
    crashed.tick()  # then its scheduler dies: nobody reaps the run, and its process is gone
    launcher = FakeLauncher()
    successor = make_scheduler(mlops_open(), mlops_clock, launcher)
    mlops_clock.now = utc(2024, 1, 1, 2)
    assert [f.outcome for f in successor.tick()] == ["launched"]
    latest, lost = successor.history("hourly")
    assert (latest.scheduled, lost.summary) == (utc(2024, 1, 1, 2), "lost (exit unknown)")
    assert lost.ended == utc(2024, 1, 1, 2) and "exit status unknown" in lost.detail


def test_a_lease_held_on_another_host_lasts_while_renewed(
        mlops_open: Callable[[], StateStore], mlops_clock: FakeClock, tmp_path: Path) -> None:
    node_a = make_scheduler(mlops_open(), mlops_clock, FakeLauncher(pid=dead_pid()), host="node-a", lease_ttl=300)
    b_launcher = FakeLauncher()
    node_b = make_scheduler(mlops_open(), mlops_clock, b_launcher, host="node-b", lease_ttl=300)
    node_a.add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly")
    mlops_clock.now = utc(2024, 1, 1, 1)
    node_a.tick()
    mlops_clock.now = utc(2024, 1, 1, 1, 59, 30)
    node_a.tick()  # renews until 02:04:30; node-b cannot see node-a's pids
    mlops_clock.now = utc(2024, 1, 1, 2)
    assert [f.outcome for f in node_b.tick()] == ["skipped_running"]
    mlops_clock.now = utc(2024, 1, 1, 3)  # node-a stopped renewing at 01:59:30
    assert [f.outcome for f in node_b.tick()] == ["launched"] and len(b_launcher.calls) == 1
    assert lease(mlops_open(), "hourly")["lease_host"] == "node-b"


def test_a_launch_that_fails_is_recorded_and_releases_the_lease(
        mlops_store: StateStore, mlops_clock: FakeClock, tmp_path: Path) -> None:
    launcher = FakeLauncher()
    launcher.error = FileNotFoundError("no such interpreter")
    scheduler = make_scheduler(mlops_store, mlops_clock, launcher)
    scheduler.add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly")
    mlops_clock.now = utc(2024, 1, 1, 1)
    [fire] = scheduler.tick()
    assert (fire.outcome, fire.detail) == ("failed_to_launch", "FileNotFoundError: no such interpreter")
    assert scheduler.history("hourly")[0].summary == "failed to launch"
    assert lease(mlops_store, "hourly")["lease_token"] is None
    launcher.error = None
    mlops_clock.now = utc(2024, 1, 1, 2)
    assert [f.outcome for f in scheduler.tick()] == ["launched"]


def test_remove_deletes_the_schedule_and_its_history(mlops_store: StateStore, mlops_clock: FakeClock,
                                                     tmp_path: Path) -> None:
    scheduler = make_scheduler(mlops_store, mlops_clock)
    scheduler.add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly")
    mlops_clock.now = utc(2024, 1, 1, 1)
    scheduler.tick()
    scheduler.remove("hourly")
    assert scheduler.schedules() == [] and scheduler.history("hourly") == []
    scheduler.running["hourly"].finish(0)  # type: ignore[attr-defined]
    assert scheduler.tick() == [] and scheduler.running == {}


def test_a_naive_clock_is_refused(mlops_store: StateStore, tmp_path: Path) -> None:
    scheduler = Scheduler(mlops_store, clock=lambda: datetime(2024, 1, 1), launcher=FakeLauncher())
    with pytest.raises(ValueError, match="naive datetime"):
        scheduler.tick()


# -- the loop --------------------------------------------------------------------------------------------


def test_sleeps_until_the_next_fire_at_most_the_cap(mlops_store: StateStore, mlops_clock: FakeClock,
                                                    tmp_path: Path) -> None:
    scheduler = make_scheduler(mlops_store, mlops_clock)
    assert scheduler.seconds_until_due(30) == 30
    scheduler.add(tmp_path / "pipeline.yaml", "0 3 * * *", name="night")
    mlops_clock.now = utc(2024, 1, 1, 2, 59, 50)
    assert scheduler.seconds_until_due(30) == 10
    mlops_clock.now = utc(2024, 1, 1, 3, 0, 5)
    assert scheduler.seconds_until_due(30) == 0
    scheduler.pause("night")
    assert scheduler.seconds_until_due(30) == 30


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_forever_stops_cleanly_on_a_signal(sig: signal.Signals, mlops_store: StateStore,
                                               mlops_clock: FakeClock, tmp_path: Path) -> None:
    launcher = FakeLauncher()
    launcher.on_launch = lambda: os.kill(os.getpid(), sig)  # the signal lands in the middle of a pass
    scheduler = make_scheduler(mlops_store, mlops_clock, launcher)
    scheduler.add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly")
    mlops_clock.now = utc(2024, 1, 1, 1)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
    scheduler.run_forever(max_sleep=30)  # returns without a KeyboardInterrupt, after finishing its pass
    assert len(launcher.calls) == 1 and scheduler.history("hourly")[0].pid == os.getpid()
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # restored to none


def test_run_forever_in_a_thread_stops_on_stop(mlops_store: StateStore, mlops_clock: FakeClock) -> None:
    scheduler = make_scheduler(mlops_store, mlops_clock)
    started = threading.Event()
    original_tick = scheduler.tick

    def tick() -> list[Fire]:
        started.set()
        return original_tick()

    scheduler.tick = tick  # type: ignore[method-assign]
    thread = threading.Thread(target=scheduler.run_forever, kwargs={"max_sleep": 600})
    thread.start()
    assert started.wait(30)
    scheduler.stop()
    thread.join(30)
    assert not thread.is_alive()


def test_pipeline_argv_runs_the_pipeline_with_its_schedule_id_and_parameters(
        mlops_store: StateStore, mlops_clock: FakeClock, tmp_path: Path) -> None:
    scheduler = make_scheduler(mlops_store, mlops_clock)
    schedule = scheduler.add(tmp_path / "pipeline.yaml", "@daily", name="nightly",
                             parameters={"seed": "3", "train.model": "rf"})
    assert pipeline_argv(schedule, utc(2024, 1, 2)) == [
        sys.executable, "-m", "jupyter_mlops", "pipeline", "run", str(tmp_path / "pipeline.yaml"),
        "--schedule-id", "nightly", "--logical-date", "2024-01-02T00:00:00+00:00", "-p", "seed=3",
        "-p", "train.model=rf"]
    # the fire time in the schedule's own zone; a forced schedule forces its runs
    forced = scheduler.add(tmp_path / "pipeline.yaml", "30 2 * * *", tz="Europe/Berlin", name="forced", force=True)
    assert forced.force and not schedule.force
    assert pipeline_argv(forced, utc(2024, 1, 2, 1, 30))[-4:] == [
        "forced", "--logical-date", "2024-01-02T02:30:00+01:00", "--force"]


def test_a_fire_whose_run_computed_nothing_says_all_cached(mlops_store: StateStore, mlops_clock: FakeClock,
                                                           tmp_path: Path) -> None:
    launcher = FakeLauncher()
    scheduler = make_scheduler(mlops_store, mlops_clock, launcher)
    scheduler.add(tmp_path / "pipeline.yaml", "@hourly", name="hourly")
    for hour, steps in ((1, ["succeeded", "cached"]), (2, ["cached", "cached"])):
        mlops_clock.now = utc(2024, 1, 1, hour)
        scheduler.tick()
        with mlops_store.transaction() as tx:  # the run the launched process records, as the runner does
            run_id = f"run-{hour}"
            tx.execute("INSERT INTO pipeline_runs (id, pipeline, file, status, started, parameters, options, "
                       "schedule_id, host, pid) VALUES (?, 'p', 'f', 'succeeded', ?, '{}', '{}', 'hourly', ?, ?)",
                       [run_id, mlops_clock.now.timestamp(), socket.gethostname(), launcher.pid])
            for n, status in enumerate(steps):
                tx.execute("INSERT INTO step_runs (run_id, step, status) VALUES (?, ?, ?)", [run_id, f"s{n}", status])
        launcher.runs[-1].finish(0)
        scheduler.tick()
    assert [(f.summary, f.run_id) for f in scheduler.history("hourly")] == [
        ("succeeded, all cached", "run-2"), ("succeeded", "run-1")]


class Gate:
    """Children connect and block until the test sends their exit status; a child that never
    connects fails the test after a timeout instead of hanging it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(60)
        self.port = self.server.getsockname()[1]
        self.code = textwrap.dedent(f"""
            import os, socket, sys
            print("schedule", os.environ["MLOPS_SCHEDULE_ID"], "fire", os.environ["MLOPS_SCHEDULED_TIME"], flush=True)
            with socket.create_connection(("127.0.0.1", {self.port})) as s:
                sys.exit(int(s.recv(16) or b"1"))
        """)

    def open(self) -> socket.socket:
        conn, _ = self.server.accept()
        return conn

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def mlops_gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.close()


@pytest.mark.slow
def test_a_real_process_holds_the_lease_until_it_exits(mlops_open: Callable[[], StateStore], mlops_clock: FakeClock,
                                                       mlops_gate: Gate, tmp_path: Path) -> None:
    launcher = SubprocessLauncher(tmp_path / "logs", argv=lambda schedule, fire: [sys.executable, "-c", mlops_gate.code])
    a = Scheduler(mlops_open(), clock=mlops_clock, launcher=launcher)
    b = Scheduler(mlops_open(), clock=mlops_clock, launcher=launcher)
    a.add(tmp_path / "pipeline.yaml", "0 * * * *", name="hourly")
    mlops_clock.now = utc(2024, 1, 1, 1)
    [fire] = a.tick()
    child = a.running["hourly"]
    with mlops_gate.open() as conn:  # the child is up and waiting
        assert fire.pid == child.pid and lease(mlops_open(), "hourly")["lease_pid"] == child.pid
        mlops_clock.now = utc(2024, 1, 1, 2)
        assert [f.outcome for f in b.tick()] == ["skipped_running"]  # a real, live pid on this host
        conn.sendall(b"3")
    child.wait(60)
    a.tick()
    reaped = a.history("hourly")[1]
    assert (reaped.exit_status, reaped.summary) == (3, "failed (exit 3)")
    assert reaped.log is not None and Path(reaped.log).parent == tmp_path / "logs"
    assert "schedule hourly fire 2024-01-01T01:00:00+00:00" in Path(reaped.log).read_text()
    assert lease(mlops_open(), "hourly")["lease_token"] is None

    # the next run's scheduler "dies" and its process is killed: another scheduler takes over
    mlops_clock.now = utc(2024, 1, 1, 3)
    a.tick()
    orphan = a.running["hourly"]
    with mlops_gate.open():  # up and waiting (and its connection is not mistaken for the next one's)
        os.kill(orphan.pid, signal.SIGKILL)
        orphan.wait(60)
    mlops_clock.now = utc(2024, 1, 1, 4)
    [taken] = b.tick()
    assert taken.outcome == "launched" and taken.pid != orphan.pid
    with mlops_gate.open() as conn:
        conn.sendall(b"0")
    b.running["hourly"].wait(60)
    b.tick()
    assert [f.summary for f in b.history("hourly")] == ["succeeded", "lost (exit unknown)", "skipped (still running)",
                                                         "failed (exit 3)"]


# -- the command line -------------------------------------------------------------------------------------


@pytest.fixture
def mlops_pipeline(mlops_project: Project) -> Iterator[Path]:
    """A one-step pipeline with a `schedule:` (stores opened are closed by mlops_no_leftover_store)."""
    make_notebook(mlops_project.root / "step.ipynb", ["pass"], parameters="seed = 0")
    path = mlops_project.root / "pipeline.yaml"
    path.write_text('name: nightly\nschedule: "30 2 * * *"\nsteps:\n  step:\n    notebook: step.ipynb\n')
    yield path


def test_cli_add_list_pause_resume_remove(mlops_pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "add", str(mlops_pipeline)]) == 0
    assert "Scheduled nightly: " in capsys.readouterr().out
    assert main(["schedule", "add", "pipeline.yaml", "--cron", "0 4 * * MON", "--tz", "Europe/Berlin",
                 "--policy", "catch_up", "-p", "seed=5", "--name", "weekly"]) == 0
    assert "at '0 4 * * 1' (Europe/Berlin), policy catch_up" in capsys.readouterr().out
    assert main(["schedule", "pause", "weekly"]) == 0
    capsys.readouterr()
    assert main(["schedule", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "PIPELINE", "CRON", "NEXT", "FIRE", "LAST", "OUTCOME", "PAUSED"]
    assert lines[1].split()[:3] == ["nightly", "pipeline.yaml", "30"] and lines[1].split()[-1] == "no"
    assert "(Europe/Berlin)" in lines[2] and lines[2].split()[-1] == "yes"
    assert main(["schedule", "resume", "weekly"]) == 0
    assert "Resumed weekly; next run: " in capsys.readouterr().out
    assert main(["schedule", "remove", "nightly"]) == 0
    capsys.readouterr()
    main(["schedule", "list"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["ID", "weekly"]


@pytest.mark.parametrize(("argv", "message"), [
    (["schedule", "pause", "nope"], "error: no schedule 'nope'; there are none; add one with `jupyter mlops schedule add"),
    (["schedule", "add", "pipeline.yaml", "--cron", "0 24 * * *"], "error: cron '0 24 * * *': hour 24 is out of range 0-23"),
    (["schedule", "add", "pipeline.yaml", "-p", "nope=1"], "error: pipeline.yaml: -p nope: no step's notebook declares"),
    (["schedule", "add", "missing.yaml"], "error: missing.yaml: no such file; check the path"),
    (["schedule", "add", "pipeline.yaml", "--tz", "Mars/Base"], "error: cron '30 2 * * *': unknown time zone 'Mars/Base'"),
])
def test_cli_errors_are_one_line(argv: list[str], message: str, mlops_pipeline: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_add_needs_a_cron_somewhere(mlops_pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mlops_pipeline.write_text("steps:\n  step:\n    notebook: step.ipynb\n")
    assert main(["schedule", "add", str(mlops_pipeline)]) == 1
    assert "has no `schedule:`; give --cron" in capsys.readouterr().err
    mlops_pipeline.write_text('schedule: "0 0 30 2 *"\nsteps:\n  step:\n    notebook: step.ipynb\n')
    assert main(["schedule", "add", str(mlops_pipeline)]) == 1
    assert "schedule: day-of-month 30 never occurs in month 2" in capsys.readouterr().err


def test_cli_scheduler_once(mlops_pipeline: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    launcher = FakeLauncher()
    monkeypatch.setattr(Scheduler, "_default_launcher", lambda self: launcher)
    assert main(["schedule", "add", str(mlops_pipeline)]) == 0
    assert main(["scheduler", "--once"]) == 0
    assert capsys.readouterr().out.endswith("Nothing due.\n")
    from jupyter_mlops.config import load_config

    store = state.open_store(load_config().resolved_pipeline_state_url)  # the one the CLI used
    with store.transaction() as tx:  # make it due now on the real clock
        tx.execute("UPDATE schedules SET next_fire = ?", [datetime.now(UTC).timestamp() - 5])
    launcher.on_launch = lambda: launcher.runs[-1].finish(0)
    assert main(["scheduler", "--once"]) == 0
    assert "nightly: fire of " in capsys.readouterr().out and len(launcher.calls) == 1
    main(["schedule", "list"])
    assert "succeeded" in capsys.readouterr().out


def test_cli_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["schedule", "--help"])
    out = capsys.readouterr().out
    assert all(word in out for word in ("add", "list", "pause", "resume", "remove"))
    assert main(["schedule"]) == 2


@pytest.mark.slow
def test_the_scheduler_command_stops_on_sigterm(mlops_pipeline: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_mlops", "scheduler"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "SIGTERM or Ctrl-C stops it" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and err == "Scheduler stopped.\n"


DAILY = """\
name: daily
steps:
  fetch:
    notebook: fetch.ipynb
    cache: false
  report:
    notebook: report.ipynb
  static:
    notebook: static.ipynb
"""


def _ran(root: Path) -> list[str]:
    return (root / "ran.txt").read_text().splitlines() if (root / "ran.txt").exists() else []


@pytest.mark.slow
def test_scheduled_fires_rerun_what_reads_the_world_and_say_when_nothing_ran(
        mlops_project: Project, mlops_clock: FakeClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = mlops_project.root
    append = "with open('ran.txt', 'a') as f:\n    f.write({line} + '\\n')"
    make_notebook(root / "fetch.ipynb", [append.format(line="'fetch'")])  # reads a database: `cache: false`
    make_notebook(root / "report.ipynb", [append.format(line="'report ' + logical_date")], "logical_date = 'none'")
    make_notebook(root / "static.ipynb", [append.format(line="'static'")])
    (root / "pipeline.yaml").write_text(DAILY)
    store = state.open_store(mlops_project.config().resolved_pipeline_state_url)
    scheduler = Scheduler(store, clock=mlops_clock, launcher=SubprocessLauncher(tmp_path / "logs"))
    scheduler.add(root / "pipeline.yaml", "30 0 * * *", tz="Europe/Berlin", name="daily")

    mlops_clock.now = utc(2024, 1, 1, 23, 30)
    scheduler.run_once()
    assert sorted(_ran(root)) == ["fetch", "report 2024-01-02T00:30:00+01:00", "static"]
    mlops_clock.now = utc(2024, 1, 2, 23, 30)
    scheduler.run_once()
    assert sorted(_ran(root)[3:]) == ["fetch", "report 2024-01-03T00:30:00+01:00"]  # static: cached
    assert [f.summary for f in scheduler.history("daily")] == ["succeeded", "succeeded"]

    # a backfill by hand; then a run that computes nothing says so
    assert main(["pipeline", "run", "pipeline.yaml", "--no-progress", "--only", "report",
                 "-p", "logical_date=2023-12-31"]) == 0
    assert _ran(root)[-1] == "report 2023-12-31"
    assert main(["pipeline", "run", "pipeline.yaml", "--no-progress", "--only", "static"]) == 0
    capsys.readouterr()
    assert main(["pipeline", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert "all cached" in listing[1] and "all cached" not in "".join(listing[2:])
