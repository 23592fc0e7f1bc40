"""``jupyter mlops data push|pull``: the DVC remote from a shell or a CI job, as ``%mlops data``
does in a notebook; a thin face over :mod:`jupyter_mlops.data` (imported when a command runs)."""

from __future__ import annotations

import argparse

__all__ = ["add_data_commands"]


def add_data_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("data", help="versioned data (DVC): push to and pull from the project's DVC remote")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = actions.add_parser("push", help="upload versioned data to the DVC remote")
    q.add_argument("paths", nargs="*", metavar="PATH", help="versioned files or folders (default: all)")
    q.set_defaults(func=_cmd_push)
    q = actions.add_parser("pull", help="fetch versioned data from the DVC remote into the workspace")
    q.add_argument("paths", nargs="*", metavar="PATH", help="versioned files or folders (default: all)")
    q.set_defaults(func=_cmd_pull)


def _cmd_push(args: argparse.Namespace) -> int:
    from . import data

    print(f"Pushed {data.push(*args.paths)} file(s) to the DVC remote.")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from . import data

    stats = data.pull(*args.paths)
    print(f"Pulled: {len(stats.get('fetched', []) or [])} fetched, {len(stats.get('added', []) or [])} added.")
    return 0
