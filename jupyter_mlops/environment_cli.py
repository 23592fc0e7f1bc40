"""``jupyter mlops env list|show|lock|create|export|remove``: a thin face over jupyter_mlops.environments."""

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

    p = cmds.add_parser("lock", help="solve environment.yml for its platforms and write conda-lock.yml")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_lock)

    p = cmds.add_parser("create", help="install the lock exactly (no re-solve); a no-op when already installed")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_create)

    p = cmds.add_parser("export", help="the lock for this platform as an explicit list (conda/micromamba create --file)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_export)

    p = cmds.add_parser("remove", help="remove the installed prefixes of an environment (its definition stays)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_remove)


def _directory() -> Any:
    from .config import load_config

    return load_config().resolved_environments_dir


def _spec(name: str) -> Any:
    from .environments.spec import find_environments, load_environment
    from .errors import MlopsError

    directory = _directory()
    found = find_environments(directory)
    if name not in found:
        raise MlopsError(f"no environment {name!r} in {directory} (known: {', '.join(found) or 'none'})")
    return load_environment(found[name])


def _cmd_lock(args: argparse.Namespace) -> int:
    from .environments.solve import lock_environment

    spec = _spec(args.name)
    print(f"solving {spec.name} for {', '.join(spec.platforms)} from {', '.join(spec.channels)}...")
    path = lock_environment(spec)
    print(f"wrote {path}")
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    from .config import load_config
    from .environments.install import create_environment

    config = load_config()
    env = create_environment(_spec(args.name), config.resolved_envs_dir, config.resolved_pkgs_dir, say=print)
    state = "created" if env.created else "already installed"
    print(f"{env.name}: {state} at {env.prefix} ({env.packages} packages)")
    _sync_kernelspecs()
    return 0


def _sync_kernelspecs() -> None:
    """Kernel specs follow the installed environments (JupyterLab's launcher, papermill -k)."""
    from .kernels.kernelspecs import sync_from_config

    done = sync_from_config()
    if done.written:
        print(f"kernels: {', '.join(done.written)}")
    if done.removed:
        print(f"kernels removed: {', '.join(done.removed)}")


def _cmd_export(args: argparse.Namespace) -> int:
    """The conda packages as an explicit list; the lock's pip packages after them as comment lines.

    Comments, because conda and micromamba read an explicit file's URLs as conda packages and skip
    comments: ``micromamba create --file`` stays exact for the conda part, and nothing is lost. Each
    such line is ``# pip: NAME @ URL --hash=sha256:HASH``, so the lines without their ``# pip: ``
    make a requirements file for ``python -m pip install --no-deps --require-hashes -r`` in the
    new environment.
    """
    from .environments.lockfile import read_lock, read_pip_lock
    from .environments.spec import current_platform

    spec = _spec(args.name)
    print(f"# {spec.name}, from {spec.lock_file}")
    print(f"# platform: {current_platform()}")
    print("@EXPLICIT")
    for package in read_lock(spec.lock_file, current_platform()):
        print(f"{package.url}#{package.md5}")
    wheels = read_pip_lock(spec.lock_file, current_platform())
    if wheels:
        print("# pip packages (not installed from this file; strip '# pip: ' for pip install --no-deps "
              "--require-hashes -r):")
    for wheel in wheels:
        print(f"# pip: {wheel.name} @ {wheel.url} --hash=sha256:{wheel.sha256}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from .config import load_config
    from .environments.install import remove_environment

    removed = remove_environment(args.name, load_config().resolved_envs_dir)
    for prefix in removed:
        print(f"removed {prefix}")
    if not removed:
        print(f"{args.name}: nothing installed")
        return 0  # nothing changed: the kernel specs stay as they are
    _sync_kernelspecs()
    return 0


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
        print(f"not locked yet: run `jupyter mlops env lock {args.name}` where its channels are reachable")
    return 0
