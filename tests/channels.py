"""Conda channels and environments the tests build themselves (no conda channel is reachable here).

The channel holds:

* ``python`` 3.11.7: a stand-in. No conda ``python`` package can be had offline, so its
  ``bin/python`` is a two-line shell script that runs the test runner's own interpreter (which has
  ipykernel) with the prefix's ``site-packages`` first on the path. Everything else a kernel gets from
  the prefix is real: the prefix itself, its activation, its variables, its packages.
* ``mlops-demo`` 1.0 and 2.0: a ``noarch: python`` module that says its version.
* ``mlops-act``: a ``noarch: generic`` package whose activation script exports ``MLOPS_ACT=on``.
* ``mlops-pad-NN`` (``pads`` of them, none by default): a few files of a few KiB each, like a small
  data or script package, for benchmarks that want an environment of some size (bench/kernels.py).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path

import pytest

SHIM = """#!/bin/sh
prefix=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$prefix/lib/python3.11/site-packages${{PYTHONPATH:+:$PYTHONPATH}}" exec {python} "$@"
"""


def package(channel: Path, stage: Path, name: str, version: str, subdir: str, files: dict[str, str],
            **kw: object) -> None:
    import rattler_build

    folder = stage / f"{name}-{version}"
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
        if rel.startswith("bin/"):
            (folder / rel).chmod(0o755)
    (channel / subdir).mkdir(parents=True, exist_ok=True)
    rattler_build.assemble_package(name=name, version=version, target_platform=subdir, build_string=kw.pop("build", "0"),
                                   output_dir=str(channel / subdir), files_dir=str(folder), **kw)


def build_channel(root: Path, pads: int = 0, **kw: object) -> Path:
    """The channel described above, indexed, under ``root/channel``; ``kw`` go to every package
    (``compression_level=1`` where building fast matters more than size)."""
    pytest.importorskip("rattler_build")
    rattler = pytest.importorskip("rattler")
    from jupyter_mlops.environments.spec import current_platform

    if current_platform() != "linux-64":
        pytest.skip("the channel's stand-in python is built for linux-64")
    channel, stage = root / "channel", root / "stage"
    package(channel, stage, "python", "3.11.7", "linux-64", {"bin/python": SHIM.format(python=sys.executable)},
            build="h0_0", **kw)
    for version in ("1.0", "2.0"):
        package(channel, stage, "mlops-demo", version, "noarch",
                {"site-packages/mlops_demo.py": f"VERSION = '{version}'\n"}, noarch="python",
                depends=["python >=3.8"], build="pyh0_0", **kw)
    package(channel, stage, "mlops-act", "1.0", "noarch", {"etc/conda/activate.d/mlops-act.sh": "export MLOPS_ACT=on\n"},
            noarch="generic", **kw)
    for i in range(pads):
        files = {f"share/mlops-pad-{i:02d}/part{j}.txt": (f"pad {i} part {j}\n" * 200) for j in range(8)}
        package(channel, stage, f"mlops-pad-{i:02d}", "1.0", "noarch", files, noarch="generic", **kw)
    done = rattler.index.index_fs(channel, force=True)
    if inspect.isawaitable(done):
        asyncio.run(done)
    return channel


def define(folder: Path, channel: Path, deps: str, extra: str = "") -> Path:
    """An environment definition ``folder/environment.yml`` over ``channel``."""
    folder.mkdir(parents=True)
    (folder / "environment.yml").write_text(f"channels: ['{channel.as_uri()}']\nplatforms: [linux-64]\n"
                                            f"dependencies: {deps}\n{extra}")
    return folder
