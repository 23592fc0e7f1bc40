"""Helpers every benchmark shares: progress lines, interleaved rounds, table cells, goals.

Imported as ``_common`` (a benchmark runs as ``python bench/NAME.py``, so bench/ is on sys.path).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable

__all__ = ["Logger", "median", "interleave", "fmt", "goal_met"]


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
