"""Helpers every benchmark shares: progress lines, interleaved rounds, table cells, goals, the
command line, and a scratch folder with DVC and git kept inside it.

Imported as ``_common`` (a benchmark runs as ``python bench/NAME.py``, so bench/ is on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["Logger", "median", "interleave", "fmt", "goal_met", "quick_mode", "scratch", "stdout_to_stderr", "ratio"]


class Logger:
    """Progress goes to stderr, so stdout holds only the table and the JSON line."""

    def __init__(self, bench: str) -> None:
        self.bench = bench

    def __call__(self, msg: str) -> None:
        print(f"[bench {self.bench} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def interleave(log: Callable[[str], None], rounds: int, contenders: list[tuple[str, Callable[[], Any]]],
               warmup: list[Callable[[], Any]] | None = None) -> dict[str, list[Any]]:
    """Warm-up calls first (untimed), then ``rounds`` rounds A B ...; odd rounds run in reverse order."""
    for fn in warmup or []:
        fn()
    results: dict[str, list[Any]] = {name: [] for name, _ in contenders}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else list(reversed(contenders))
        for name, fn in order:
            value = fn()
            results[name].append(value)
            shown = ", ".join(f"{v:,.3f}" for v in value) if isinstance(value, tuple) else f"{value:,.3f}"
            log(f"  round {r + 1}/{rounds} {name}: {shown}")
    return results


def ratio(m: dict[str, Any], anchor_key: str, ours_key: str, floor: float = 1e-9) -> float | None:
    """anchor / ours from the metrics ``m`` (bigger is better for us), or None when one is missing."""
    a, o = m.get(anchor_key), m.get(ours_key)
    if a is None or o is None:
        return None
    return round(a / max(o, floor), 2)


def fmt(value: float | None, unit: str) -> str:
    """A table cell: ``value`` in ``unit`` (us, s, MiB, MB/s), or "-" when there is none."""
    if value is None or value != value:
        return "-"
    if unit == "us":
        return f"{value:,.2f} us" if value < 100 else f"{value:,.0f} us"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    return f"{value:g}"


def goal_met(value: float | None, goal: str) -> str:
    """"yes" or "NO" for a goal like ``<=5`` or ``>=40``; "" when there is no value."""
    if value is None or value != value:
        return ""
    target = float(goal[2:])
    ok = value <= target if goal.startswith("<=") else value >= target
    return "yes" if ok else "NO"


def quick_mode(doc: str | None, quick_help: str, argv: list[str] | None) -> bool:
    """The benchmarks' one option: ``--quick``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return bool(parser.parse_args(argv).quick)


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder holding DVC's state, index and config (no analytics daemon) and a git
    identity, with no ``MLOPS_*``, ``DVC_*`` or ``MLFLOW_*`` from the caller's shell; the working
    folder and the environment are restored and the folder removed afterwards. Set in this
    process, so in-process contenders and their subprocesses share it."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    old_cwd = os.getcwd()
    old_env = dict(os.environ)
    for name in [k for k in os.environ if k.startswith(("MLOPS_", "DVC_", "MLFLOW_"))]:
        os.environ.pop(name)
    os.environ.update({
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),  # default: /var/tmp/dvc, outside tmp
        "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global-config"),
        "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system-config"),
        "DVC_NO_ANALYTICS": "1",  # else every `dvc` command leaves a daemon behind to report
        "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
        "GIT_CONFIG_NOSYSTEM": "1",
    })
    try:
        yield tmp
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """What runs in-process (DVC's hints, a runner, a kernel manager) may print to file
    descriptor 1; point it at stderr meanwhile, so stdout holds only the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
