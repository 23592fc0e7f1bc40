"""``jupyter mlops ...``: a thin face over the libraries.

``--help`` imports argparse and nothing heavy; each command imports what it needs when it runs.
Errors the user can fix print as one line on stderr with exit status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ._cli_args import add_parameter_option, parameters
from ._version import __version__
from .errors import MlopsError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jupyter mlops",
        description="Tracked runs, versioned data, reproducible kernels and notebook pipelines for Jupyter.",
    )
    parser.add_argument("--version", action="version", version=f"jupyter_mlops {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="execute a notebook headless with tracking on, and say where its run is")
    p.add_argument("notebook", type=Path)
    add_parameter_option(p, "papermill parameter (repeatable); JSON values keep their type")
    p.add_argument("-o", "--output", type=Path, help="executed notebook (default .mlops/outputs/NAME.out.ipynb)")
    p.add_argument("-k", "--kernel", help="kernel name (default: the notebook's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("sync", help="upload what is still spooled (e.g. left by a kernel that died)")
    p.add_argument("--spool-dir", type=Path, help="spool folder (default from config: .mlops/spool)")
    p.add_argument("--give-up", action="append", default=[], metavar="LOCAL_ID",
                   help="a refused run (e.g. its experiment is deleted for good): set aside what the server "
                        "refuses, kept in its rejected.log, and finish it; repeatable")
    p.set_defaults(func=_cmd_sync)

    p = sub.add_parser("runs", help="runs in the local spool: waiting for upload, or uploaded")
    p.add_argument("--spool-dir", type=Path)
    p.add_argument("--all", action="store_true", help="include runs already uploaded")
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("init", help="make this folder a git + DVC project with the embedded defaults")
    p.add_argument("folder", nargs="?", type=Path, default=Path("."))
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("lineage", help="what a run read and wrote, or which runs made or used a data version")
    p.add_argument("run_id", nargs="?", metavar="RUN_ID")
    p.add_argument("--data", metavar="PATH[@REV]", help="list the runs that produced or used this version")
    p.set_defaults(func=_cmd_lineage)

    p = sub.add_parser("ui", help="serve the MLflow UI on the embedded store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=_cmd_ui)

    from .data_cli import add_data_commands
    from .environment_cli import add_environment_commands
    from .kernel_cli import add_kernel_commands
    from .pipeline_cli import add_pipeline_commands
    from .schedule_cli import add_schedule_commands

    add_data_commands(sub)
    add_pipeline_commands(sub)
    add_schedule_commands(sub)
    add_environment_commands(sub)
    add_kernel_commands(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipelines.notebook import run_notebook

    config = load_config()
    params = parameters(args.parameters)
    print(f"Running {args.notebook} (tracking: {config.resolved_tracking_uri})")
    result = run_notebook(
        args.notebook,
        parameters=params,
        output=args.output,
        kernel_name=args.kernel,
        progress=not args.no_progress,
        config=config,
        on_wait=lambda runs: print(f"Uploading {len(runs)} run(s) to the tracking store..."),
    )
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    print(f"Executed notebook: {result.output}")
    if not result.runs:
        print("The notebook tracked no run (it has no `%mlops track`).")
    for run in result.runs:
        _print_run(run)
    return 1 if result.error or any(not r.done for r in result.runs) else 0


def _print_run(run: object) -> None:
    from .tracking.ledger import SpooledRun

    assert isinstance(run, SpooledRun)
    header = run.header
    if not run.done:
        reason = run.refusal or run.state.get("waiting") or "the tracking server did not take it yet"
        print(f"Run {run.spool_id} is kept in the local spool ({run.pending_bytes} bytes, nothing lost): {reason}.")
        print("  Upload it once the server answers: jupyter mlops sync")
        return
    print(f"Run {run.run_id} ({run.status}) recorded in experiment {header.get('experiment')!r}")
    print(f"  tracking store: {header.get('tracking_uri')}")
    if run.state.get("url"):
        print(f"  see it: {run.state['url']}")
    elif not str(header.get("tracking_uri", "")).startswith(("http://", "https://")):
        print("  see it: jupyter mlops ui   (then open http://127.0.0.1:5000)")
    if run.refusal:
        print(f"  {run.refusal}")


def _spool_dir(args: argparse.Namespace) -> Path:
    from .config import load_config

    return args.spool_dir.resolve() if args.spool_dir else load_config().resolved_spool_dir


def _cmd_sync(args: argparse.Namespace) -> int:
    from .tracking.flusher import sync
    from .tracking.ledger import spooled_runs

    spool_dir = _spool_dir(args)
    waiting = [r for r in spooled_runs(spool_dir) if not r.done]
    unknown = sorted(set(args.give_up) - {r.spool_id for r in waiting})
    if unknown:
        print(f"error: no run {', '.join(unknown)} waiting in {spool_dir}; `jupyter mlops runs` lists them", file=sys.stderr)
        return 1
    if not waiting:
        print(f"Nothing to upload in {spool_dir}.")
        return 0
    print(f"Uploading {len(waiting)} spooled run(s) from {spool_dir}...")
    display = _UploadProgress(sys.stdout)
    try:
        result = sync(spool_dir, give_up=args.give_up, on_progress=display.update)
    finally:
        display.close()
    after = {r.spool_id: r for r in spooled_runs(spool_dir)}
    for spool_id in result.finished:
        run = after.get(spool_id)
        print(f"  {spool_id}: uploaded" + (f" ({run.status})" if run else ""))
        if run and run.refusal:
            print(f"    {run.refusal}")
    for line in result.waiting:
        print(f"  {line} (kept; try again when the server answers)")
    for line in result.failed:
        print(f"  REFUSED {line}")
    still_open = [r for r in after.values() if not r.done and r.writer_alive]
    if still_open:
        print(f"  {len(still_open)} run(s) are still being written by a live kernel; uploaded so far.")
    return 1 if result.waiting or result.failed else 0


class _UploadProgress:
    """``sync``'s progress, fed by the uploader after each request: per run, the bytes of its
    records uploaded of the total. Redrawn in place on a terminal (at most 10 times a second),
    a line every ``interval`` seconds otherwise (a log file or CI gets no flood)."""

    def __init__(self, out: Any, interval: float = 5.0) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else interval
        self.last = time.monotonic()
        self.width = 0

    def update(self, spool_id: str, records: int, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and done < total:
            return
        self.last = now
        percent = 100 * done // total if total else 100
        text = f"  {spool_id}: {_bytes(done)} of {_bytes(total)} ({percent}%), {records:,} records"
        if self.tty:
            self.out.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cmd_runs(args: argparse.Namespace) -> int:
    from .tracking.ledger import spooled_runs

    runs = [r for r in spooled_runs(_spool_dir(args)) if args.all or not r.done]
    if not runs:
        print("No runs waiting for upload." if not args.all else "No runs in the spool.")
        return 0
    header = ("LOCAL ID", "MLFLOW RUN", "STATUS", "WAITING", "EXPERIMENT")
    rows = [(r.spool_id, r.run_id or "-", r.status, f"{r.pending_bytes}B", str(r.header.get("experiment"))) for r in runs]
    # widths from the data: a long status ("FINISHED, 2 refused") or id must not push a row out of line
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [row[i].rjust(w) if header[i] == "WAITING" else row[i].ljust(w) for i, w in enumerate(widths)]
        print("  ".join([*cells, row[-1]]))
    for r in runs:
        if r.refusal:
            print(f"{r.spool_id}: {r.refusal}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from .data.project import init_project

    done = init_project(args.folder)
    where = args.folder.resolve()
    if not done:
        print(f"{where} is already a jupyter_mlops project; nothing to do.")
        return 0
    for line in done:
        print(f"  {line}")
    if any("DVC" in line for line in done):  # a clone's init only creates its .mlops/: nothing to commit
        print(f"{where} is ready. Commit the DVC setup: git add .dvc .dvcignore && git commit -m 'Set up DVC'")
    else:
        print(f"{where} is ready.")
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    if bool(args.run_id) == bool(args.data):
        print("error: give a RUN_ID or --data PATH[@REV] (one of them)", file=sys.stderr)
        return 2
    from mlflow import MlflowClient

    from .config import load_config
    from .data.lineage import run_lineage, runs_for_digest

    client = MlflowClient(load_config().resolved_tracking_uri)
    if args.run_id:
        try:
            entries = run_lineage(client, args.run_id)
        except Exception as e:  # MlflowException for an unknown id; keep it to one line
            print(f"error: no run {args.run_id} at {client.tracking_uri} ({type(e).__name__})", file=sys.stderr)
            return 1
        if not entries:
            print(f"Run {args.run_id} recorded no data versions.")
        for e in entries:
            extra = f"{e.nfiles} files, " if e.nfiles and e.nfiles > 1 else ""
            rev = f"git {e.rev[:10]}" if e.rev else "uncommitted .dvc"
            print(f"{'read ' if e.role == 'input' else 'wrote'}  {e.path}  md5 {e.digest}  ({extra}{e.size} bytes, {rev})"
                  + ("  MODIFIED" if e.modified else ""))
        return 0
    from . import data

    path, _, rev = args.data.partition("@")
    version = data.version(path, rev or None)
    entries = runs_for_digest(client, version.digest)
    print(f"{version.path} md5 {version.digest}" + (f" (at {rev})" if rev else ""))
    if not entries:
        print("  no run recorded this version")
    for e in entries:
        print(f"  {'produced by' if e.role == 'output' else 'used by    '} run {e.run_id} ({e.run_name or '-'}, experiment {e.experiment_id}"
              + (f", git {e.rev[:10]}" if e.rev else "") + (", modified" if e.modified else "") + ")")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from .config import load_config

    config = load_config()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", config.resolved_tracking_uri,
           "--host", args.host, "--port", str(args.port)]
    print(f"Serving {config.resolved_tracking_uri} on http://{args.host}:{args.port} (Ctrl-C stops)")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except MlopsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
