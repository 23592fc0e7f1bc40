"""Tracking benchmark: what `jupyter_mlops.tracking` costs the caller, end to end, and at startup.

    python bench/tracking.py [--quick]

Measures, each against what a user would do without us (the anchor), interleaved, medians:

1. caller cost of ``run.log_metric`` (the flusher live, uploading in the background)
   vs the call time of ``MlflowClient.log_metric`` (from 2) and, in the default run, vs MLflow's
   own non-blocking path, ``MlflowClient.log_metric(..., synchronous=False)``;
2. end to end, first ``log_metric`` until ``run.wait()`` says the store has every point,
   vs ``MlflowClient.log_metric`` per point and vs ``MlflowClient.log_batch`` in chunks of 1000,
   on one SQLite store and then through a real ``mlflow server`` on loopback;
3. ``%load_ext jupyter_mlops`` + ``%mlops track`` in a fresh kernel (wall time, kernel peak RSS
   growth) vs ``import mlflow; mlflow.set_tracking_uri(...); mlflow.start_run()``;
4. ``%mlops log loss=0.3 --step {i}`` in a loop, in a real IPython shell (IPython's own magic
   dispatch and ``{i}`` expansion included), vs ``run.log_metric`` in the same loop in the same
   shell, and vs the magic as it was (its argument parser rebuilt for every call).

Everything lives in one temporary folder, removed at the end; the server and every flusher the
benchmark caused are stopped. The last line of stdout is one JSON object (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

# MLflow's INFO lines (migrations, run links) stay off stdout; the flusher and server log to files.
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
warnings.filterwarnings("ignore")

from _common import Logger, fmt, goal_met, interleave, median, ratio  # noqa: E402

log = Logger('tracking')

GOALS = {
    "caller_us_per_metric": "<=5",
    "vs_mlflow_sync": ">=40",
    "vs_log_batch": ">=1",
    "track_startup_s": "<=0.15",
    "track_rss_mib": "<=25",
    "magic_us_per_log": "<=50",
}

EXPERIMENT = "bench"
KEY = "loss"


# -- small helpers ----------------------------------------------------------------------------------






def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of ``pid`` (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")  # a zombie has exited; its parent reaps it
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def stop_pid(pid: int, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop one process this benchmark caused (a flusher), by its id."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while not pid_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not pid_gone(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        while not pid_gone(pid):
            time.sleep(0.05)


# -- the stores ---------------------------------------------------------------------------------------


class MlflowServer:
    """A real ``mlflow server`` on a free loopback port with a SQLite backend."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the server; it comes up in the background (see :meth:`wait_ready`)."""
        self.t0 = time.perf_counter()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server",
                 "--backend-store-uri", "sqlite:///" + str(self.folder / "server.db"),
                 "--artifacts-destination", str(self.folder / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=str(self.folder), start_new_session=True,
            )

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Block until GET /health answers; return seconds since :meth:`launch`."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(0.1)  # nothing to block on until the server listens
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health in {timeout:g}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
            except ProcessLookupError:
                pass
            try:
                # A throwaway server: a few seconds for a clean exit, then the whole group goes.
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        try:  # anything of its group still there (a worker that outlived the leader)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None


class Store:
    """One tracking store (SQLite file or server) and what each contender needs to write to it."""

    def __init__(self, label: str, uri: str, tmp: Path, artifact_location: str | None) -> None:
        from mlflow import MlflowClient

        from jupyter_mlops.config import load_config

        self.label = label
        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            EXPERIMENT, artifact_location=artifact_location
        )
        self.spool_dir = tmp / f"spool-{label}"
        # A long idle timeout keeps the flusher warm between repeats (the anchors run meanwhile);
        # the benchmark stops it itself at the end.
        self.config = load_config(
            read_files=False, project_root=str(tmp), tracking_uri=uri,
            spool_dir=str(self.spool_dir), flusher_idle_timeout=120.0,
        )

    def new_run_id(self) -> str:
        """A fresh MLflow run for an anchor (not timed)."""
        return self.client.create_run(self.experiment_id).info.run_id

    def stop_flusher(self) -> None:
        stop_flusher(self.spool_dir)


# -- the contenders -----------------------------------------------------------------------------------


def ours_started(store: Store, name: str) -> Any:
    """A run of ours, already created in MLflow by a warm flusher (nothing of this is timed)."""
    from jupyter_mlops import tracking

    run = tracking.start_run(experiment=EXPERIMENT, name=name, capture_context=False, config=store.config)
    if not run.wait(120, uploaded=False):
        raise RuntimeError(f"the flusher did not create the run in 120 s; see {store.spool_dir}/flusher.log")
    return run


def ours_finish(run: Any, store: Store, timeout: float = 600.0) -> None:
    """End the run and wait until the flusher has uploaded everything, so the next measure runs alone."""
    run.end()
    if not run.wait(timeout):
        raise RuntimeError(f"run {run.run_id} not uploaded in {timeout:g}s; see {store.spool_dir}/flusher.log")


def ours_e2e(store: Store, n: int) -> float:
    run = ours_started(store, "ours-e2e")
    log_metric = run.log_metric
    t0 = time.perf_counter()
    for i in range(n):
        log_metric(KEY, 0.5 + i * 1e-6, step=i)
    ok = run.wait(300)
    dt = time.perf_counter() - t0
    if not ok:
        raise RuntimeError(f"{store.label}: run {run.run_id} not uploaded in 300 s")
    ours_finish(run, store)
    check_points(store, run.run_id, n)
    return dt / n * 1e6


def anchor_sync(store: Store, n: int) -> float:
    run_id = store.new_run_id()
    client = store.client
    t0 = time.perf_counter()
    for i in range(n):
        client.log_metric(run_id, KEY, 0.5 + i * 1e-6, step=i)
    dt = time.perf_counter() - t0
    end_run(store, run_id)
    return dt / n * 1e6


def anchor_log_batch(store: Store, n: int) -> float:
    from mlflow.entities import Metric

    run_id = store.new_run_id()
    client = store.client
    t0 = time.perf_counter()
    batch: list[Metric] = []
    for i in range(n):
        batch.append(Metric(KEY, 0.5 + i * 1e-6, time.time_ns() // 1_000_000, i))
        if len(batch) == 1000:  # MLflow's limit per log_batch
            client.log_batch(run_id, metrics=batch)
            batch = []
    if batch:
        client.log_batch(run_id, metrics=batch)
    dt = time.perf_counter() - t0
    end_run(store, run_id)
    return dt / n * 1e6


def end_run(store: Store, run_id: str) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run ..." links for a server
        store.client.set_terminated(run_id)


def check_points(store: Store, run_id: str, n: int) -> None:
    """The store really holds all n points of the run (read back once, not timed)."""
    got = len(store.client.get_metric_history(run_id, KEY))
    if got != n:
        raise RuntimeError(f"{store.label}: run {run_id} holds {got} points of {KEY!r}, expected {n}")


def ours_caller(store: Store, n: int) -> float:
    run = ours_started(store, "ours-caller")
    log_metric = run.log_metric
    t0 = time.perf_counter()
    for i in range(n):
        log_metric(KEY, 0.5, step=i)
    dt = time.perf_counter() - t0
    if not run.wait(900):  # drain before the next measure, so it does not compete for the CPU
        raise RuntimeError(f"caller run {run.run_id} not uploaded in 900 s")
    ours_finish(run, store)
    return dt / n * 1e6


def anchor_async_caller(store: Store, n: int) -> float:
    """MLflow's own non-blocking logging: the caller's cost per call, then drained (not timed).

    Its worker thread shares the caller's GIL and drains at about the synchronous rate (some
    7 ms a point with MLflow 3.17 on SQLite), so the drain is waited for, untimed, before
    anything else is measured; hence the small N, and only in the default run.
    """
    run_id = store.new_run_id()
    client = store.client
    op = None
    t0 = time.perf_counter()
    for i in range(n):
        op = client.log_metric(run_id, KEY, 0.5, step=i, synchronous=False)
    dt = time.perf_counter() - t0
    if op is not None:
        op.wait()
    deadline = time.monotonic() + 300
    while len(client.get_metric_history(run_id, KEY)) < n and time.monotonic() < deadline:
        time.sleep(0.1)  # the last operation's wait() returns a few points early
    end_run(store, run_id)
    return dt / n * 1e6




# -- the magic in a loop ------------------------------------------------------------------------------

MAGIC_LINE = "log loss=0.3 --step {i}"


def old_style_magic(line: str) -> None:
    """``%mlops log`` as it was: the argparse parser built for each call, values passed as text."""
    import shlex

    from jupyter_mlops import magics, tracking

    args = magics._build_parser().parse_args(shlex.split(line))
    run = tracking.active_run()
    for key, value in magics._pairs(args.pairs, "log").items():
        run.log_metric(key, value, step=args.step)


class MagicLoop:
    """One IPython shell with the extension loaded and a run of ours started in it; each measure
    runs a cell that loops N times, so IPython's per-cell cost is spread over N calls."""

    def __init__(self, store: Store) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        from jupyter_mlops import tracking

        self.shell = InteractiveShell.instance()
        self.shell.run_line_magic("load_ext", "jupyter_mlops")
        self.run = tracking.start_run(experiment=EXPERIMENT, name="magic", capture_context=False, config=store.config)
        self.shell.user_ns.update(run=self.run, old_style_magic=old_style_magic)

    def cell(self, body: str, n: int) -> float:
        code = f"for i in range({n}):\n    {body}\n"
        t0 = time.perf_counter()
        result = self.shell.run_cell(code, store_history=False, silent=True)
        dt = time.perf_counter() - t0
        result.raise_error()
        return dt / n * 1e6

    def magic(self, n: int) -> float:
        return self.cell(f"%mlops {MAGIC_LINE}", n)

    def api(self, n: int) -> float:
        return self.cell("run.log_metric('loss', 0.3, step=i)", n)

    def old(self, n: int) -> float:
        return self.cell(f"old_style_magic(f{MAGIC_LINE!r})", n)

    def close(self, store: Store) -> None:
        ours_finish(self.run, store)
        self.shell.run_line_magic("unload_ext", "jupyter_mlops")


# -- kernels ------------------------------------------------------------------------------------------

OURS_CELL = "%load_ext jupyter_mlops\n%mlops track"


def anchor_cell(uri: str) -> str:
    return f"import mlflow\nmlflow.set_tracking_uri({uri!r})\nmlflow.start_run()"


class Kernels:
    """Fresh kernels, one per measure, each with its own spool folder."""

    def __init__(self, tmp: Path, uri: str) -> None:
        self.tmp = tmp
        self.uri = uri
        self.project = tmp / "kernel-project"
        self.project.mkdir()
        self.count = 0
        env = dict(os.environ)
        for name in ("JPY_SESSION_NAME", "MLOPS_NOTEBOOK_PATH", "MLOPS_RUN_ID", "MLOPS_PARENT_RUN_ID",
                     "MLOPS_EXPERIMENT", "MLFLOW_EXPERIMENT_NAME", "MLOPS_TRACKING_URI", "MLOPS_INVOCATION_ID"):
            env.pop(name, None)  # nothing from the caller's shell changes what the kernels do
        env.update({"MLOPS_PROJECT_ROOT": str(self.project), "MLFLOW_TRACKING_URI": uri,
                    "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
        self.env = env
        self.spools: list[Path] = []

    def ours(self) -> tuple[float, float]:
        return self.once(OURS_CELL, ours=True)

    def mlflow(self) -> tuple[float, float]:
        return self.once(anchor_cell(self.uri), ours=False)

    def once(self, code: str, ours: bool) -> tuple[float, float]:
        """Fresh kernel: run one cell; return (wall seconds, kernel VmHWM growth in MiB)."""
        from jupyter_client import KernelManager

        self.count += 1
        spool = self.tmp / f"kernel-spool-{self.count}"  # a killed kernel's run is no next kernel's work
        self.spools.append(spool)
        env = dict(self.env, MLOPS_SPOOL_DIR=str(spool))
        km = KernelManager(kernel_name="python3")
        km.start_kernel(env=env, cwd=str(self.project))
        kc = km.client()
        outputs: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            content = msg.get("content", {})
            if msg["msg_type"] == "stream":
                outputs.append(content.get("text", ""))
            elif msg["msg_type"] == "error":
                outputs.append("\n".join(content.get("traceback", [])))

        try:
            kc.start_channels()
            kc.wait_for_ready(timeout=120)
            # A no-op cell first, in both kernels: a kernel's first execution is no one's cost.
            kc.execute_interactive("pass", timeout=60, output_hook=hook)
            pid = km.provisioner.pid  # type: ignore[union-attr]
            before = vm_hwm_kib(pid)
            outputs.clear()
            t0 = time.perf_counter()
            reply = kc.execute_interactive(code, timeout=300, output_hook=hook)
            wall = time.perf_counter() - t0
            after = vm_hwm_kib(pid)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"cell failed in the kernel:\n{code}\n{''.join(outputs)}")
            return wall, (after - before) / 1024
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            if ours:
                # The flusher the cell started uploads in a session of its own. Its work is not
                # measured here and would compete with the next kernel for the CPU: stop it.
                stop_flusher(spool, wait_for_start=15.0, sig=signal.SIGKILL)


def stop_flusher(spool_dir: Path, *, wait_for_start: float = 0.0, sig: int = signal.SIGTERM) -> None:
    """Stop the flusher serving ``spool_dir`` (found by its lock file), waiting for it to start."""
    from jupyter_mlops.tracking.flusher import running_pid

    deadline = time.monotonic() + wait_for_start
    while True:
        pid = running_pid(spool_dir) if spool_dir.exists() else None
        if pid and pid > 0:
            stop_pid(pid, grace=15.0, sig=sig)
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)  # it is starting (-1: lock taken, pid not written yet)


# -- report -------------------------------------------------------------------------------------------






QUICK = dict(caller_n=20_000, async_n=0, caller_rounds=3, e2e_n=2_000, sync_n=50,
             e2e_rounds=3, server_rounds=3, kernel_rounds=2, kernel_warmup=False,
             magic_n=5_000, old_magic_n=100, magic_rounds=3)
DEFAULT = dict(caller_n=100_000, async_n=500, caller_rounds=5, e2e_n=5_000, sync_n=200,
               e2e_rounds=5, server_rounds=5, kernel_rounds=5, kernel_warmup=True,
               magic_n=20_000, old_magic_n=400, magic_rounds=5)


def run_all(p: dict[str, Any], tmp: Path) -> dict[str, float]:
    m: dict[str, float] = {}
    server = MlflowServer(tmp / "server")
    stores: list[Store] = []
    kernels: Kernels | None = None
    try:
        # The server comes up in the background while the untimed setup below runs.
        server.launch()
        log(f"launched mlflow server on {server.uri}")
        import mlflow  # noqa: F401  (imported once, before anything is timed)

        from jupyter_mlops import tracking  # noqa: F401

        local = Store("sqlite", "sqlite:///" + str(tmp / "db.sqlite"), tmp, (tmp / "artifacts").as_uri())
        stores.append(local)
        ours_caller(local, 2_000)  # warm-up; starts the flusher
        if p["async_n"]:
            anchor_async_caller(local, 50)
        m["server_start_s"] = server.wait_ready()
        log(f"mlflow server answered /health {m['server_start_s']:.1f} s after launch")

        # 1. caller cost -------------------------------------------------------------------------
        log(f"caller cost: {p['caller_n']:,} calls (ours)"
            + (f", {p['async_n']:,} (mlflow async)" if p["async_n"] else "") + f" x {p['caller_rounds']}")
        contenders = [("ours", lambda: ours_caller(local, p["caller_n"]))]
        if p["async_n"]:
            contenders.insert(0, ("mlflow_async", lambda: anchor_async_caller(local, p["async_n"])))
        caller = interleave(log, p["caller_rounds"], contenders)
        m["caller_us_per_metric"] = median(caller["ours"])
        if p["async_n"]:
            m["caller_mlflow_async_us_per_metric"] = median(caller["mlflow_async"])

        # 1b. %mlops log in a loop, in an IPython shell -----------------------------------------------
        loop = MagicLoop(local)
        log(f"%mlops log: {p['magic_n']:,} calls (magic, API), {p['old_magic_n']} (old magic) x {p['magic_rounds']}")
        res = interleave(log, p["magic_rounds"], [
            ("magic", lambda: loop.magic(p["magic_n"])),
            ("api", lambda: loop.api(p["magic_n"])),
            ("old_magic", lambda: loop.old(p["old_magic_n"])),
        ], warmup=[lambda: loop.magic(500), lambda: loop.api(500), lambda: loop.old(20)])
        loop.close(local)
        m["magic_us_per_log"] = median(res["magic"])
        m["magic_api_us_per_log"] = median(res["api"])
        m["magic_old_us_per_log"] = median(res["old_magic"])

        # 2. end to end, SQLite store, then server -----------------------------------------------
        for label, rounds, key in (("sqlite", p["e2e_rounds"], ""), ("server", p["server_rounds"], "server_")):
            if label == "server":
                local.stop_flusher()
                store = Store("server", server.uri, tmp, None)
                stores.append(store)
            else:
                store = local
            log(f"end to end, {label}: {p['e2e_n']:,} metrics (ours, log_batch), {p['sync_n']} (sync) x {rounds}")
            res = interleave(log, rounds, [
                ("mlflow_sync", lambda: anchor_sync(store, p["sync_n"])),
                ("ours", lambda: ours_e2e(store, p["e2e_n"])),
                ("log_batch", lambda: anchor_log_batch(store, p["e2e_n"])),
            ], warmup=[lambda: anchor_sync(store, 10), lambda: ours_e2e(store, 200), lambda: anchor_log_batch(store, 200)])
            m[f"{key}end_to_end_us_per_metric"] = median(res["ours"])
            m[f"{key}mlflow_sync_us_per_metric"] = median(res["mlflow_sync"])
            m[f"{key}log_batch_us_per_metric"] = median(res["log_batch"])
        t0 = time.perf_counter()
        for store in stores:
            store.stop_flusher()
        t1 = time.perf_counter()
        server.stop()
        log(f"stopped the flushers in {t1 - t0:.1f} s and the server in {time.perf_counter() - t1:.1f} s")

        # 3. %mlops track in a fresh kernel vs mlflow.start_run --------------------------------
        # The SQLite store's schema exists already: the anchor kernel pays no migrations.
        kernels = Kernels(tmp, local.uri)
        log(f"fresh kernels: {p['kernel_rounds']} x (ours, mlflow)" + (", after a warm-up pair" if p["kernel_warmup"] else ""))
        res = interleave(log, p["kernel_rounds"], [("ours", kernels.ours), ("mlflow", kernels.mlflow)],
                         warmup=[kernels.ours, kernels.mlflow] if p["kernel_warmup"] else None)
        m["track_startup_s"] = median([t for t, _ in res["ours"]])
        m["track_rss_mib"] = median([r for _, r in res["ours"]])
        m["mlflow_startup_s"] = median([t for t, _ in res["mlflow"]])
        m["mlflow_rss_mib"] = median([r for _, r in res["mlflow"]])
    finally:
        server.stop()
        spools = [store.spool_dir for store in stores] + (kernels.spools if kernels else [])
        for spool in spools:
            try:
                stop_flusher(spool)
            except Exception as e:  # cleanup goes on
                log(f"could not stop the flusher of {spool}: {e}")
    return m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller N (< 60 s on 2 cores)")
    args = parser.parse_args(argv)
    p = QUICK if args.quick else DEFAULT

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    old_cwd = os.getcwd()
    os.chdir(tmp)  # MLflow's defaults (./mlruns, ./mlartifacts) land in the temp folder, not the repo
    log(f"temp folder {tmp}; {'quick' if args.quick else 'default'} mode: {p}")
    try:
        m = run_all(p, tmp)
    finally:
        os.chdir(old_cwd)
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - started

    ratios = {
        "vs_mlflow_sync": ratio(m, "mlflow_sync_us_per_metric", "end_to_end_us_per_metric"),
        "vs_log_batch": ratio(m, "log_batch_us_per_metric", "end_to_end_us_per_metric"),
        "server_vs_mlflow_sync": ratio(m, "server_mlflow_sync_us_per_metric", "server_end_to_end_us_per_metric"),
        "server_vs_log_batch": ratio(m, "server_log_batch_us_per_metric", "server_end_to_end_us_per_metric"),
        "vs_mlflow_startup": ratio(m, "mlflow_startup_s", "track_startup_s"),
        # a growth under 0.1 MiB counts as 0.1 MiB, so the ratio stays finite
        "vs_mlflow_rss": ratio(m, "mlflow_rss_mib", "track_rss_mib", floor=0.1),
        "caller_vs_mlflow_sync": ratio(m, "mlflow_sync_us_per_metric", "caller_us_per_metric"),
        "caller_vs_mlflow_async": ratio(m, "caller_mlflow_async_us_per_metric", "caller_us_per_metric"),
        "magic_vs_old_magic": ratio(m, "magic_old_us_per_log", "magic_us_per_log"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}

    rows = [
        # measure, anchor, anchor metric, ours metric, unit, ratio, goal key (checked on ours or on the ratio)
        ("caller: per log_metric call", "MlflowClient.log_metric", "mlflow_sync_us_per_metric",
         "caller_us_per_metric", "us", "caller_vs_mlflow_sync", "caller_us_per_metric"),
        ("caller: per log_metric call", "same, synchronous=False", "caller_mlflow_async_us_per_metric",
         "caller_us_per_metric", "us", "caller_vs_mlflow_async", None),
        ("%mlops log: per line", "the magic as it was", "magic_old_us_per_log",
         "magic_us_per_log", "us", "magic_vs_old_magic", "magic_us_per_log"),
        ("%mlops log: per line", "run.log_metric (API)", "magic_api_us_per_log",
         "magic_us_per_log", "us", None, None),
        ("SQLite e2e: per metric", "MlflowClient.log_metric", "mlflow_sync_us_per_metric",
         "end_to_end_us_per_metric", "us", "vs_mlflow_sync", "vs_mlflow_sync"),
        ("SQLite e2e: per metric", "MlflowClient.log_batch", "log_batch_us_per_metric",
         "end_to_end_us_per_metric", "us", "vs_log_batch", "vs_log_batch"),
        ("server e2e: per metric", "MlflowClient.log_metric", "server_mlflow_sync_us_per_metric",
         "server_end_to_end_us_per_metric", "us", "server_vs_mlflow_sync", None),
        ("server e2e: per metric", "MlflowClient.log_batch", "server_log_batch_us_per_metric",
         "server_end_to_end_us_per_metric", "us", "server_vs_log_batch", None),
        ("kernel: track cell wall time", "mlflow import+start_run", "mlflow_startup_s",
         "track_startup_s", "s", "vs_mlflow_startup", "track_startup_s"),
        ("kernel: peak RSS growth", "mlflow import+start_run", "mlflow_rss_mib",
         "track_rss_mib", "MiB", "vs_mlflow_rss", "track_rss_mib"),
    ]
    print()
    print(f"tracking benchmark ({'--quick' if args.quick else 'default'}): medians; ratio = anchor / ours, bigger is better")
    print(f"  caller N={p['caller_n']:,}" + (f" (async anchor N={p['async_n']:,})" if p["async_n"] else "")
          + f" x{p['caller_rounds']}; e2e N={p['e2e_n']:,} (sync anchor N={p['sync_n']}) "
          f"x{p['e2e_rounds']} SQLite, x{p['server_rounds']} server; kernels x{p['kernel_rounds']}; "
          f"mlflow server up in {m.get('server_start_s', float('nan')):.1f} s; total {wall:.0f} s")
    header = f"{'measure':<29} {'anchor':<25} {'anchor':>10} {'ours':>10} {'ratio':>9}  {'goal':<23} met"
    print(header)
    print("-" * len(header))
    for label, anchor_name, a_key, o_key, unit, r_key, goal_key in rows:
        if a_key not in m:
            continue
        r = ratios.get(r_key)
        goal_txt = met = ""
        if goal_key:
            goal = GOALS[goal_key]
            goal_txt = f"{goal_key.replace('_per_metric', '')} {goal}"
            met = goal_met(m.get(goal_key) if goal_key in m else r, goal)
        r_txt = f"{r:>8.2f}x" if r is not None else f"{'-':>9}"
        print(f"{label:<29} {anchor_name:<25} {fmt(m[a_key], unit):>10} {fmt(m.get(o_key), unit):>10} {r_txt}  {goal_txt:<23} {met}")
    print()
    metrics = {k: round(v, 4) for k, v in m.items()}
    print(json.dumps({"bench": "tracking", "metrics": metrics, "ratios": ratios, "goals": GOALS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
