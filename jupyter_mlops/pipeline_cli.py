"""``jupyter mlops pipeline run|resume|cancel|status|list``: a thin face over pipelines.runner."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ._cli_args import add_parameter_option, parameters

__all__ = ["add_pipeline_commands"]


def add_pipeline_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    top = sub.add_parser("pipeline", help="run notebooks as a cached DAG of papermill steps (pipeline.yaml)")
    cmds = top.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND")
    top.set_defaults(func=lambda args: (top.print_help(), 2)[1])

    p = cmds.add_parser("run", help="run a pipeline: steps in order, independent ones at once, unchanged ones skipped")
    p.add_argument("pipeline", type=Path, metavar="PIPELINE.yaml")
    add_parameter_option(p, "override a parameter (STEP.KEY=VALUE for one step); JSON values keep their type")
    p.add_argument("--only", action="append", default=[], metavar="STEP",
                   help="run only this step (repeatable); the steps it needs are not run, their outputs must exist")
    p.add_argument("--force", action="store_true", help="run every selected step even when its cache says unchanged")
    p.add_argument("--workers", type=int, help="steps at once (default: the pipeline's `workers:`, else 2)")
    p.add_argument("--no-progress", action="store_true", help="one line per step state change, nothing redrawn")
    p.add_argument("--kernel", help="kernel spec for steps that name no kernel, environment or profile "
                   "(default: each notebook's own kernelspec)")
    p.add_argument("--no-wait", action="store_true",
                   help="while another run of this pipeline goes, fail naming it (default: wait for it)")
    p.add_argument("--schedule-id", help=argparse.SUPPRESS)  # set by the scheduler
    p.add_argument("--logical-date", help=argparse.SUPPRESS)  # set by the scheduler: the fire time
    p.set_defaults(func=_cmd_run)

    p = cmds.add_parser("resume", help="re-run the failed steps of a run and what depends on them")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--workers", type=int)
    p.add_argument("--kernel", help="kernel spec for steps that name no kernel, environment or profile "
                   "(default: the one the run was given)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-wait", action="store_true",
                   help="while another run of this pipeline goes, fail naming it (default: wait for it)")
    p.set_defaults(func=_cmd_resume)

    p = cmds.add_parser("cancel", help="stop a running pipeline run (from any host sharing its state store)")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the run to stop (default 60); it stops anyway, later")
    p.set_defaults(func=_cmd_cancel)

    p = cmds.add_parser("status", help="the steps of a pipeline run (default: the latest)")
    p.add_argument("run_id", nargs="?", metavar="RUN_ID")
    p.set_defaults(func=_cmd_status)

    p = cmds.add_parser("list", help="recent pipeline runs")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--pipeline", help="only runs of the pipeline with this name")
    p.set_defaults(func=_cmd_list)


def _terminate_as_interrupt() -> None:
    """SIGTERM (the scheduler, a service manager) and SIGINT cancel cleanly. SIGINT is set
    explicitly: a shell starts background jobs with it ignored, and Python keeps that."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _listener(no_progress: bool) -> Any:
    from .pipelines.progress import Progress

    return Progress(live=False if no_progress else None)


def _report(result: Any, progress: Any) -> int:
    from .pipelines.progress import summary_table

    progress.close()
    print(summary_table(result, with_steps=not progress.live))
    ran = [s for s in result.steps.values() if s.output_notebook]
    if ran:
        print(f"output notebooks: {Path(ran[0].output_notebook).parent}")
    if result.spool_id:
        print("runs upload to the tracking store in the background (jupyter mlops runs; jupyter mlops ui)")
    if result.status == "cancelled":  # by `pipeline cancel`: as for Ctrl-C
        print("cancelled", file=sys.stderr)  # the summary above says how to resume
        return 130
    return 0 if result.ok else 1


def _waiting(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipelines.runner import run_pipeline

    _terminate_as_interrupt()
    progress = _listener(args.no_progress)
    if args.workers is not None and args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        result = run_pipeline(args.pipeline, parameters=parameters(args.parameters),
                              only=args.only, force=args.force, workers=args.workers, listener=progress,
                              schedule_id=args.schedule_id, kernel_name=args.kernel, wait=not args.no_wait,
                              on_wait=_waiting, cancel_signal=True, logical_date=args.logical_date)
    except KeyboardInterrupt:
        progress.close()
        print("cancelled: running kernels were stopped; resume with `jupyter mlops pipeline resume RUN_ID` "
              "(see `jupyter mlops pipeline list`)", file=sys.stderr)
        return 130
    return _report(result, progress)


def _cmd_resume(args: argparse.Namespace) -> int:
    from .pipelines.runner import resume_pipeline

    _terminate_as_interrupt()
    progress = _listener(args.no_progress)
    try:
        result = resume_pipeline(args.run_id, listener=progress, workers=args.workers, kernel_name=args.kernel,
                                 wait=not args.no_wait, on_wait=_waiting, cancel_signal=True)
    except KeyboardInterrupt:
        progress.close()
        print("cancelled", file=sys.stderr)
        return 130
    return _report(result, progress)


def _cmd_cancel(args: argparse.Namespace) -> int:
    """Ask the run to stop (its heartbeat sees the request on any host; on this one a runner that
    takes SIGTERM as a cancel gets one too), then wait for it to say it stopped."""
    from .errors import MlopsError
    from .pipelines.liveness import pid_alive, this_host

    history = _history()
    run = history.run(args.run_id)
    if run is None:
        raise MlopsError(f"no pipeline run {args.run_id!r}; {history.unknown_run_hint()} (jupyter mlops pipeline list)")
    if run["status"] == "running" and not history.alive(run):
        history.settle(run, "cancelled")  # nobody is running it: the mark is all there is to do
        print(f"run {args.run_id} had no live runner (pid {run['pid']} on {run['host']}): marked cancelled")
        return 0
    if run["status"] != "running":
        raise MlopsError(f"pipeline run {args.run_id} is not running (status: {run['status']}); nothing to cancel")
    history.request_cancel(args.run_id)
    if run["cancel_signal"] and run["host"] == this_host() and pid_alive(run["pid"], run["pid_start"]):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(run["pid"], signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        run = history.settle(history.run(args.run_id) or run, "cancelled")
        if run["status"] != "running":
            print(f"run {args.run_id} {run['status']}")
            return 0
        time.sleep(0.2)  # polling the store: the runner is another process, maybe on another host
    print(f"run {args.run_id} was asked to stop and has not yet (pid {run['pid']} on {run['host']}); "
          f"see `jupyter mlops pipeline status {args.run_id}`", file=sys.stderr)
    return 1


def _history() -> Any:
    from .config import load_config
    from .pipelines.history import RunHistory
    from .pipelines.state import open_store

    return RunHistory(open_store(load_config().resolved_pipeline_state_url))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _took(start: float | None, end: float | None) -> str:
    if not start:
        return ""
    return f"{(end or time.time()) - start:.1f}s"


def _cmd_status(args: argparse.Namespace) -> int:
    from .errors import MlopsError

    history = _history()
    run = history.run(args.run_id) if args.run_id else history.latest()
    if run is not None:
        run = history.settle(run)  # a run whose runner died says crashed, not running
    if run is None:
        if args.run_id:
            raise MlopsError(f"no pipeline run {args.run_id!r}; {history.unknown_run_hint()} "
                             "(jupyter mlops pipeline list)")
        print("no pipeline has run here yet: jupyter mlops pipeline run PIPELINE.yaml")
        return 0
    from .pipelines.results import run_summary

    status = run_summary(run["status"], history.step_counts([run["id"]]).get(run["id"], {}))
    print(f"pipeline {run['pipeline']}  run {run['id']}  {status}  started {_when(run['started'])}  "
          f"took {_took(run['started'], run['ended'])}")
    print(f"  file: {run['file']}")
    params = json.loads(run["parameters"] or "{}")
    if params:
        print("  parameters: " + " ".join(f"{k}={v}" for k, v in params.items()))
    if run["resumed_from"]:
        print(f"  resumes: {run['resumed_from']}")
    steps = history.steps(run["id"])
    width = max((len(s["step"]) for s in steps), default=4)
    print(f"  {'step':<{width}}  {'status':<10} {'time':>8}  attempts  note")
    for s in steps:
        note = s["error"] or (f"cached from {s['cached_from']}" if s["cached_from"] else "") or (s["output_notebook"] or "")
        print(f"  {s['step']:<{width}}  {s['status']:<10} {_took(s['started'], s['ended']):>8}  {s['attempts'] or '':>8}  {note}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    history = _history()
    rows = history.recent(args.limit, args.pipeline)
    if not rows:
        print("no pipeline runs yet: jupyter mlops pipeline run PIPELINE.yaml")
        return 0
    from .pipelines.results import run_summary

    counts = history.step_counts(r["id"] for r in rows)
    print(f"{'run':<23} {'pipeline':<16} {'status':<10} {'started':<19} {'time':>8}  steps")
    for r in rows:
        steps = ", ".join(f"{n} {k}" for k, n in sorted(counts.get(r["id"], {}).items()))
        status = run_summary(r["status"], counts.get(r["id"], {}), short=True)
        print(f"{r['id']:<23} {r['pipeline'][:16]:<16} {status:<10} {_when(r['started']):<19} "
              f"{_took(r['started'], r['ended']):>8}  {steps}")
    return 0
