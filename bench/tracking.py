"""Tracking benchmark: what `jupyter_mlops.tracking` costs the caller, end to end, and at startup.

    python bench/tracking.py [--quick]

Measures, each against what a user would do without us (the anchor), interleaved, medians:

1. caller cost of ``run.log_metric`` (the flusher live, uploading in the background)
   vs MLflow's own non-blocking path, ``MlflowClient.log_metric(..., synchronous=False)``;
2. end to end, first ``log_metric`` until ``run.wait()`` says the store has every point,
   vs ``MlflowClient.log_metric`` per point and vs ``MlflowClient.log_batch`` in chunks of 1000,
   on one SQLite store and then through a real ``mlflow server`` on loopback;
3. ``%load_ext jupyter_mlops`` + ``%mlops track`` in a fresh kernel (wall time, kernel peak RSS
   growth) vs ``import mlflow; mlflow.set_tracking_uri(...); mlflow.start_run()``.

Everything lives in one temporary folder, removed at the end; the server and every flusher the
benchmark caused are stopped. The last line of stdout is one JSON object (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable

# MLflow's INFO lines (migrations, run links) stay off stdout; the flusher and server log to files.
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
warnings.filterwarnings("ignore")

GOALS = {
    "caller_us_per_metric": "<=5",
    "vs_mlflow_sync": ">=40",
    "vs_log_batch": ">=1",
    "track_startup_s": "<=0.15",
    "track_rss_mib": "<=25",
}

EXPERIMENT = "bench"
KEY = "loss"


# -- small helpers ----------------------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the table and the JSON line."""
    print(f"[bench tracking {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


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

    def start(self, timeout: float = 120.0) -> float:
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server",
                 "--backend-store-uri", "sqlite:///" + str(self.folder / "server.db"),
                 "--artifacts-destination", str(self.folder / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=str(self.folder), start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
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
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
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
        return self.client.create_run(self.experiment_id).info.run_id

    def stop_flusher(self) -> None:
        from jupyter_mlops.tracking.flusher import running_pid

        pid = running_pid(self.spool_dir)
        if pid and pid > 0:
            stop_pid(pid, grace=15.0)


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
    client.set_terminated(run_id)
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
    client.set_terminated(run_id)
    return dt / n * 1e6


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
    """MLflow's own non-blocking logging: the caller's cost per call, then drained (not timed)."""
    import mlflow

    run_id = store.new_run_id()
    client = store.client
    t0 = time.perf_counter()
    for i in range(n):
        client.log_metric(run_id, KEY, 0.5, step=i, synchronous=False)
    dt = time.perf_counter() - t0
    mlflow.flush_async_logging()
    client.set_terminated(run_id)
    return dt / n * 1e6


def interleave(rounds: int, contenders: list[tuple[str, Callable[[], Any]]], *, warmup: bool = True) -> dict[str, list[Any]]:
    """A warm-up round, then ``rounds`` rounds; odd rounds run the contenders in reverse order."""
    results: dict[str, list[Any]] = {name: [] for name, _ in contenders}
    if warmup:
        for name, fn in contenders:
            fn()
    for r in range(rounds):
        order = contenders if r % 2 == 0 else list(reversed(contenders))
        for name, fn in order:
            value = fn()
            results[name].append(value)
            shown = ", ".join(f"{v:,.3f}" for v in value) if isinstance(value, tuple) else f"{value:,.2f}"
            log(f"  round {r + 1}/{rounds} {name}: {shown}")
    return results


# -- kernels ------------------------------------------------------------------------------------------

OURS_CELL = "%load_ext jupyter_mlops\n%mlops track"


def anchor_cell(uri: str) -> str:
    return f"import mlflow\nmlflow.set_tracking_uri({uri!r})\nmlflow.start_run()"


def kernel_once(code: str, env: dict[str, str], cwd: Path, ours: bool) -> tuple[float, float]:
    """Fresh kernel: run one cell; return (wall seconds, kernel VmHWM growth in MiB)."""
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(cwd))
    kc = km.client()
    flusher_pids: list[int] = []
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        outputs: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            content = msg.get("content", {})
            if msg["msg_type"] == "stream":
                outputs.append(content.get("text", ""))
            elif msg["msg_type"] == "error":
                outputs.append("\n".join(content.get("traceback", [])))

        # One no-op cell first, in both kernels: the first execution's own setup is no one's cost.
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
        if ours:
            outputs.clear()
            kc.execute_interactive(
                "from jupyter_mlops.tracking import flusher as _f\nprint(*[p.pid for p in _f._spawned])",
                timeout=60, output_hook=hook,
            )
            flusher_pids = [int(p) for p in "".join(outputs).split()]
        return wall, (after - before) / 1024
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        # The flusher our cell started uploads in a session of its own; its work is not measured
        # here, and it would compete with the next kernel for the CPU: stop it now.
        for fpid in flusher_pids:
            stop_pid(fpid, grace=0.0, sig=signal.SIGKILL)


# -- report -------------------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    if value != value:  # nan
        return "-"
    if unit == "us":
        return f"{value:,.2f} us" if value < 100 else f"{value:,.0f} us"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:g}"


def goal_met(value: float, goal: str) -> str:
    if value != value:
        return ""
    target = float(goal[2:])
    ok = value <= target if goal.startswith("<=") else value >= target
    return "yes" if ok else "NO"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller N (< 60 s on 2 cores)")
    args = parser.parse_args(argv)

    if args.quick:
        p = dict(caller_n=20_000, async_n=2_000, caller_rounds=3, e2e_n=2_000, sync_n=100,
                 e2e_rounds=3, server_rounds=2, kernel_rounds=2, kernel_warmup=False)
    else:
        p = dict(caller_n=100_000, async_n=10_000, caller_rounds=5, e2e_n=5_000, sync_n=200,
                 e2e_rounds=5, server_rounds=5, kernel_rounds=5, kernel_warmup=True)

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    old_cwd = os.getcwd()
    os.chdir(tmp)  # MLflow's defaults (./mlruns, ./mlartifacts) land in the temp folder, not the repo
    server: MlflowServer | None = None
    stores: list[Store] = []
    m: dict[str, float] = {}
    try:
        log(f"temp folder {tmp}; {'quick' if args.quick else 'default'} mode: {p}")
        import mlflow  # noqa: F401  (imported once, before anything is timed)

        from jupyter_mlops import tracking  # noqa: F401

        # 1 + 2: the SQLite store --------------------------------------------------------------
        sqlite_uri = "sqlite:///" + str(tmp / "db.sqlite")
        local = Store("sqlite", sqlite_uri, tmp, (tmp / "artifacts").as_uri())
        stores.append(local)

        log(f"caller cost: {p['caller_n']:,} calls (ours) / {p['async_n']:,} (mlflow async) x {p['caller_rounds']}")
        # warm-up: a small run each, which also starts the flusher
        ours_caller(local, 2_000)
        anchor_async_caller(local, 500)
        caller = interleave(p["caller_rounds"], [
            ("mlflow_async", lambda: anchor_async_caller(local, p["async_n"])),
            ("ours", lambda: ours_caller(local, p["caller_n"])),
        ], warmup=False)
        m["caller_us_per_metric"] = median(caller["ours"])
        m["caller_mlflow_async_us_per_metric"] = median(caller["mlflow_async"])

        log(f"end to end on SQLite: {p['e2e_n']:,} metrics (ours, log_batch), {p['sync_n']} (sync) x {p['e2e_rounds']}")
        e2e = interleave(p["e2e_rounds"], [
            ("mlflow_sync", lambda: anchor_sync(local, p["sync_n"])),
            ("ours", lambda: ours_e2e(local, p["e2e_n"])),
            ("log_batch", lambda: anchor_log_batch(local, p["e2e_n"])),
        ])
        m["end_to_end_us_per_metric"] = median(e2e["ours"])
        m["mlflow_sync_us_per_metric"] = median(e2e["mlflow_sync"])
        m["log_batch_us_per_metric"] = median(e2e["log_batch"])
        local.stop_flusher()

        # 2 again: a real mlflow server on loopback --------------------------------------------
        server = MlflowServer(tmp / "server")
        log(f"starting mlflow server on {server.uri}")
        m["server_start_s"] = server.start()
        remote = Store("server", server.uri, tmp, None)
        stores.append(remote)
        log(f"end to end via server: {p['e2e_n']:,} metrics (ours, log_batch), {p['sync_n']} (sync) x {p['server_rounds']}")
        srv = interleave(p["server_rounds"], [
            ("mlflow_sync", lambda: anchor_sync(remote, p["sync_n"])),
            ("ours", lambda: ours_e2e(remote, p["e2e_n"])),
            ("log_batch", lambda: anchor_log_batch(remote, p["e2e_n"])),
        ])
        m["server_end_to_end_us_per_metric"] = median(srv["ours"])
        m["server_mlflow_sync_us_per_metric"] = median(srv["mlflow_sync"])
        m["server_log_batch_us_per_metric"] = median(srv["log_batch"])
        remote.stop_flusher()
        server.stop()
        server = None

        # 3: %mlops track in a fresh kernel vs mlflow.start_run --------------------------------
        kproj = tmp / "kernel-project"
        kproj.mkdir()
        kuri = "sqlite:///" + str(tmp / "kernel.db")
        from mlflow import MlflowClient

        MlflowClient(kuri).search_experiments()  # create the schema now: neither kernel pays migrations
        env = dict(os.environ)
        env.update({
            "MLOPS_PROJECT_ROOT": str(kproj),
            "MLOPS_SPOOL_DIR": str(tmp / "kernel-spool"),
            "MLFLOW_TRACKING_URI": kuri,
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        })
        for name in ("JPY_SESSION_NAME", "MLOPS_NOTEBOOK_PATH", "MLOPS_RUN_ID", "MLOPS_PARENT_RUN_ID",
                     "MLOPS_EXPERIMENT", "MLFLOW_EXPERIMENT_NAME", "MLOPS_TRACKING_URI"):
            env.pop(name, None)  # nothing from the caller's shell changes what the kernels do
        log(f"fresh kernels: {p['kernel_rounds']} x (ours, mlflow){' after a warm-up pair' if p['kernel_warmup'] else ''}")
        kernels = interleave(p["kernel_rounds"], [
            ("ours", lambda: kernel_once(OURS_CELL, env, kproj, ours=True)),
            ("mlflow", lambda: kernel_once(anchor_cell(kuri), env, kproj, ours=False)),
        ], warmup=p["kernel_warmup"])
        m["track_startup_s"] = median([t for t, _ in kernels["ours"]])
        m["track_rss_mib"] = median([r for _, r in kernels["ours"]])
        m["mlflow_startup_s"] = median([t for t, _ in kernels["mlflow"]])
        m["mlflow_rss_mib"] = median([r for _, r in kernels["mlflow"]])
        ks = Path(env["MLOPS_SPOOL_DIR"])
        from jupyter_mlops.tracking.flusher import running_pid

        fpid = running_pid(ks)
        if fpid and fpid > 0:
            stop_pid(fpid, grace=0.0, sig=signal.SIGKILL)
    finally:
        if server is not None:
            server.stop()
        for store in stores:
            try:
                store.stop_flusher()
            except Exception as e:  # cleanup goes on
                log(f"could not stop the {store.label} flusher: {e}")
        from jupyter_mlops.tracking import flusher as _flusher

        for proc in list(_flusher._spawned):  # reap the flushers this process started
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.chdir(old_cwd)
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio(anchor: float, ours: float, floor: float = 1e-9) -> float:
        return round(anchor / max(ours, floor), 2)

    ratios = {
        "vs_mlflow_sync": ratio(m["mlflow_sync_us_per_metric"], m["end_to_end_us_per_metric"]),
        "vs_log_batch": ratio(m["log_batch_us_per_metric"], m["end_to_end_us_per_metric"]),
        "server_vs_mlflow_sync": ratio(m["server_mlflow_sync_us_per_metric"], m["server_end_to_end_us_per_metric"]),
        "server_vs_log_batch": ratio(m["server_log_batch_us_per_metric"], m["server_end_to_end_us_per_metric"]),
        "vs_mlflow_startup": ratio(m["mlflow_startup_s"], m["track_startup_s"]),
        # a growth under 0.1 MiB is read as 0.1 MiB, so the ratio stays finite
        "vs_mlflow_rss": ratio(m["mlflow_rss_mib"], m["track_rss_mib"], floor=0.1),
        "caller_vs_mlflow_async": ratio(m["caller_mlflow_async_us_per_metric"], m["caller_us_per_metric"]),
    }
    wall = time.perf_counter() - started

    rows = [
        ("caller: us per log_metric", "mlflow async log_metric", m["caller_mlflow_async_us_per_metric"],
         m["caller_us_per_metric"], "us", ratios["caller_vs_mlflow_async"], "caller_us_per_metric"),
        ("SQLite e2e: us per metric", "MlflowClient.log_metric", m["mlflow_sync_us_per_metric"],
         m["end_to_end_us_per_metric"], "us", ratios["vs_mlflow_sync"], "vs_mlflow_sync"),
        ("SQLite e2e: us per metric", "MlflowClient.log_batch", m["log_batch_us_per_metric"],
         m["end_to_end_us_per_metric"], "us", ratios["vs_log_batch"], "vs_log_batch"),
        ("server e2e: us per metric", "MlflowClient.log_metric", m["server_mlflow_sync_us_per_metric"],
         m["server_end_to_end_us_per_metric"], "us", ratios["server_vs_mlflow_sync"], None),
        ("server e2e: us per metric", "MlflowClient.log_batch", m["server_log_batch_us_per_metric"],
         m["server_end_to_end_us_per_metric"], "us", ratios["server_vs_log_batch"], None),
        ("kernel: track cell wall time", "import mlflow; start_run()", m["mlflow_startup_s"],
         m["track_startup_s"], "s", ratios["vs_mlflow_startup"], "track_startup_s"),
        ("kernel: peak RSS growth", "import mlflow; start_run()", m["mlflow_rss_mib"],
         m["track_rss_mib"], "MiB", ratios["vs_mlflow_rss"], "track_rss_mib"),
    ]
    print()
    print(f"tracking benchmark ({'--quick' if args.quick else 'default'}; medians; ratio = anchor / ours, bigger is better)")
    print(f"  caller N={p['caller_n']:,} (mlflow async N={p['async_n']:,}) x{p['caller_rounds']}; "
          f"e2e N={p['e2e_n']:,} (sync N={p['sync_n']}) x{p['e2e_rounds']} SQLite, x{p['server_rounds']} server; "
          f"kernels x{p['kernel_rounds']}; mlflow server started in {m['server_start_s']:.1f} s; total {wall:.0f} s")
    header = f"{'measure':<30} {'anchor':<28} {'anchor':>12} {'ours':>12} {'ratio':>9}  {'goal':<22} met"
    print(header)
    print("-" * len(header))
    for label, anchor_name, a, o, unit, r, goal_key in rows:
        goal_txt, met = "", ""
        if goal_key:
            goal = GOALS[goal_key]
            value = o if goal_key in ("caller_us_per_metric", "track_startup_s", "track_rss_mib") else r
            goal_txt = f"{goal_key.replace('_per_metric', '')} {goal}"
            met = goal_met(value, goal)
        print(f"{label:<30} {anchor_name:<28} {fmt(a, unit):>12} {fmt(o, unit):>12} {r:>8.2f}x  {goal_txt:<22} {met}")
    print()
    metrics = {k: round(v, 4) for k, v in m.items()}
    print(json.dumps({"bench": "tracking", "metrics": metrics, "ratios": ratios, "goals": GOALS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
