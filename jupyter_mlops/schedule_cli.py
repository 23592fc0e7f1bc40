"""``jupyter mlops schedule ...`` and ``jupyter mlops scheduler``: a thin face over pipelines.scheduler.

Nothing heavy at import: the state store, the scheduler and the pipeline loader are imported by
the commands that use them.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ._cli_args import add_parameter_option
from .errors import UsageError

if TYPE_CHECKING:
    from .pipelines.scheduler import Fire, Scheduler

__all__ = ["add_schedule_commands"]


def add_schedule_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``schedule add|list|pause|resume|remove`` and ``scheduler`` under ``sub``."""
    schedule = sub.add_parser("schedule", help="run pipelines on a cron schedule (see also: jupyter mlops scheduler)")
    commands = schedule.add_subparsers(dest="schedule_command", metavar="ACTION")
    schedule.set_defaults(func=lambda args: _usage(schedule))

    p = commands.add_parser("add", help="schedule a pipeline (its `schedule:`, or --cron)")
    p.add_argument("pipeline", type=Path, metavar="PIPELINE.yaml")
    p.add_argument("--cron", help="five fields, e.g. '0 3 * * 1' (default: the pipeline's `schedule:`)")
    p.add_argument("--tz", help="IANA time zone the cron is read in (default UTC), e.g. Europe/Berlin")
    p.add_argument("--policy", choices=["skip", "catch_up"], default="skip",
                   help="fires missed while no scheduler ran: skip them (default) or run once for them all")
    add_parameter_option(p, "pipeline parameter for every run (repeatable), as for `pipeline run`")
    p.add_argument("--name", help="schedule id (default: from the pipeline's name)")
    p.add_argument("--force", action="store_true",
                   help="run every step at each fire, even when its cache says unchanged (the notebooks read a "
                        "database or an API); or set `cache: false` on those steps only")
    p.set_defaults(func=_cmd_add)

    p = commands.add_parser("list", help="schedules, their next fire and how the last one went")
    p.set_defaults(func=_cmd_list)
    for action, text in (("pause", "stop firing a schedule until resumed"),
                         ("resume", "fire a paused schedule again, from now on"),
                         ("remove", "delete a schedule and its history (a run going on finishes)")):
        p = commands.add_parser(action, help=text)
        p.add_argument("schedule_id", metavar="ID")
        p.set_defaults(func=_cmd_change, action=action)

    p = commands.add_parser("export", help="the schedules as Kubernetes CronJobs: print them as YAML, or --apply them")
    p.add_argument("--kubernetes", action="store_true", required=True,
                   help="as CronJobs (the only format so far); see c.Kubernetes.pipeline_image")
    p.add_argument("--apply", action="store_true",
                   help="create, replace and delete this project's CronJobs in the cluster instead of printing them")
    p.add_argument("--user", help="whose namespace they go to (default: you)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("scheduler", help="run the schedules that are due, until stopped (SIGTERM, Ctrl-C)")
    p.add_argument("--once", action="store_true",
                   help="one pass: start what is due, wait for those runs, then exit (for a system cron)")
    p.set_defaults(func=_cmd_scheduler)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _scheduler(**kwargs: object) -> "Scheduler":
    from .config import load_config
    from .pipelines.scheduler import Scheduler
    from .pipelines.state import open_store

    return Scheduler(open_store(load_config().resolved_pipeline_state_url), **kwargs)  # type: ignore[arg-type]


def _cmd_add(args: argparse.Namespace) -> int:
    from ._cli_args import parameters as typed
    from .pipelines.spec import load_pipeline

    parameters = dict(args.parameters)
    spec = load_pipeline(args.pipeline, typed(args.parameters))  # also checks the file's `schedule:`
    cron = args.cron or spec.schedule
    if not cron:
        raise UsageError(f"{args.pipeline} has no `schedule:`; give --cron 'MIN HOUR DAY MONTH WEEKDAY' "
                         "(e.g. '0 3 * * 1') or add `schedule:` to the file")
    added = _scheduler().add(spec.file, cron, tz=args.tz, policy=args.policy, parameters=parameters,
                             name=args.name, pipeline_name=spec.name, force=args.force)
    print(f"Scheduled {added.id}: {added.pipeline_file} at '{added.cron}' ({added.tz}), policy {added.policy}"
          + (", every step forced." if added.force else "."))
    print(f"  next run: {_when(added.next_fire, added.tz)}. Runs start while a scheduler runs: jupyter mlops scheduler")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    scheduler = _scheduler()
    schedules = scheduler.schedules()
    if not schedules:
        print("No schedules. Add one: jupyter mlops schedule add PIPELINE.yaml [--cron '0 3 * * 1']")
        return 0
    rows = [("ID", "PIPELINE", "CRON", "NEXT FIRE", "LAST OUTCOME", "PAUSED")]
    for s in schedules:
        last = scheduler.history(s.id, limit=1)
        cron = s.cron if s.tz == "UTC" else f"{s.cron} ({s.tz})"
        rows.append((s.id, _relative(s.pipeline_file), cron, "-" if s.paused else _when(s.next_fire, s.tz),
                     _outcome(last[0], s.tz) if last else "-", "yes" if s.paused else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _cmd_change(args: argparse.Namespace) -> int:
    scheduler = _scheduler()
    if args.action == "remove":
        scheduler.remove(args.schedule_id)
        print(f"Removed schedule {args.schedule_id}.")
    elif args.action == "pause":
        scheduler.pause(args.schedule_id)
        print(f"Paused {args.schedule_id}; `jupyter mlops schedule resume {args.schedule_id}` fires it again.")
    else:
        s = scheduler.resume(args.schedule_id)
        print(f"Resumed {s.id}; next run: {_when(s.next_fire, s.tz)}.")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .config import load_config
    from .k8s import cronjobs

    config = load_config()
    schedules = _scheduler().schedules()
    if args.apply:
        done = cronjobs.apply_schedules(schedules, config, user=args.user)
        for what in ("created", "replaced", "unchanged", "deleted"):
            for name in getattr(done, what):
                print(f"CronJob {name} {what}")
        if not schedules and not done.deleted:
            print("No schedules, and no CronJobs of this project's to delete.")
        return 0
    if not schedules:  # on stderr: stdout stays a (here empty) YAML stream for kubectl apply -f -
        print("No schedules to export; add one with `jupyter mlops schedule add PIPELINE.yaml`.", file=sys.stderr)
        return 0
    import yaml

    print(yaml.safe_dump_all(cronjobs.cronjobs_for_schedules(schedules, config, user=args.user), sort_keys=False),
          end="")
    return 0


def _cmd_scheduler(args: argparse.Namespace) -> int:
    scheduler = _scheduler(log=lambda line: print(line, flush=True))
    if args.once:
        fires = scheduler.run_once()
        if not fires:
            print("Nothing due.")
        return 0
    scheduler.run_forever()
    left = len(scheduler.running)
    print("Scheduler stopped." + (f" {left} run(s) still going finish on their own." if left else ""), file=sys.stderr)
    return 0


def _when(when: datetime | None, tz: str) -> str:
    if when is None:
        return "-"
    from .pipelines.cron import zone

    return when.astimezone(zone(tz)).strftime("%Y-%m-%d %H:%M %Z")


def _outcome(fire: "Fire", tz: str) -> str:
    return f"{fire.summary} ({_when(fire.scheduled, tz)})"


def _relative(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path
