"""``jupyter mlops env list|show``: a thin face over jupyter_mlops.environments.

(``lock``, ``create``, ``export`` and ``remove`` come with the installer; see docs/kernels.md.)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_environment_commands"]


def add_environment_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    top = sub.add_parser("env", help="environments: conda definitions and locks under environments/")
    cmds = top.add_subparsers(dest="env_command", metavar="SUBCOMMAND")
    top.set_defaults(func=lambda args: (top.print_help(), 2)[1])

    p = cmds.add_parser("list", help="the environments defined here, with their platforms and lock state")
    p.set_defaults(func=_cmd_list)

    p = cmds.add_parser("show", help="one environment: channels, platforms, dependencies, image, lock")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=_cmd_show)


def _directory() -> Any:
    from .config import load_config

    return load_config().resolved_environments_dir


def _cmd_list(args: argparse.Namespace) -> int:
    from .environments.spec import find_environments, load_environment

    directory = _directory()
    found = find_environments(directory)
    if not found:
        print(f"no environments in {directory} (a folder NAME/ with an environment.yml makes one)")
        return 0
    print(f"{'name':<16} {'platforms':<34} {'lock':<8} image")
    status = 0
    for name, folder in found.items():
        try:
            spec = load_environment(folder)
        except Exception as e:  # one broken definition must not hide the others
            print(f"{name:<16} error: {e}")
            status = 1
            continue
        print(f"{name:<16} {','.join(spec.platforms):<34} {'locked' if spec.locked else 'no':<8} {spec.image or ''}")
    return status


def _cmd_show(args: argparse.Namespace) -> int:
    from .environments.spec import describe, find_environments, load_environment
    from .errors import MlopsError

    directory = _directory()
    found = find_environments(directory)
    if args.name not in found:
        known = ", ".join(found) or "none"
        raise MlopsError(f"no environment {args.name!r} in {directory} (known: {known})")
    info = describe(load_environment(found[args.name]))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        print(f"{key + ':':<14}{value if value is not None else '-'}")
    if not info["locked"]:
        print("not locked yet: `jupyter mlops env lock` (coming with the installer, see docs/kernels.md) "
              "writes conda-lock.yml where its channels are reachable")
    return 0
