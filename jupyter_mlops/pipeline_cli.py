"""``jupyter mlops pipeline run|resume|status|list``: a thin face over pipelines.runner."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--schedule-id", help=argparse.SUPPRESS)  # set by the scheduler
    p.set_defaults(func=_cmd_run)

    p = cmds.add_parser("resume", help="re-run the failed steps of a run and what depends on them")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--workers", type=int)
    p.add_argument("--kernel", help="kernel spec for steps that name no kernel, environment or profile "
                   "(default: the one the run was given)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_resume)

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
    return 0 if result.ok else 1


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
                              schedule_id=args.schedule_id, kernel_name=args.kernel)
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
        result = resume_pipeline(args.run_id, listener=progress, workers=args.workers, kernel_name=args.kernel)
    except KeyboardInterrupt:
        progress.close()
        print("cancelled", file=sys.stderr)
        return 130
    return _report(result, progress)


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
    if run is None:
        if args.run_id:
            raise MlopsError(f"no pipeline run {args.run_id!r}; {history.unknown_run_hint()} "
                             "(jupyter mlops pipeline list)")
        print("no pipeline has run here yet: jupyter mlops pipeline run PIPELINE.yaml")
        return 0
    print(f"pipeline {run['pipeline']}  run {run['id']}  {run['status']}  started {_when(run['started'])}  "
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
    counts = history.step_counts(r["id"] for r in rows)
    print(f"{'run':<23} {'pipeline':<16} {'status':<10} {'started':<19} {'time':>8}  steps")
    for r in rows:
        steps = ", ".join(f"{n} {k}" for k, n in sorted(counts.get(r["id"], {}).items()))
        print(f"{r['id']:<23} {r['pipeline'][:16]:<16} {r['status']:<10} {_when(r['started']):<19} "
              f"{_took(r['started'], r['ended']):>8}  {steps}")
    return 0
