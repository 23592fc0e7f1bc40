"""What a pipeline run shows while it runs, and the summary at the end.

On a terminal: one line per step, redrawn in place (state, cell n/m of running steps, elapsed
time). Elsewhere (CI logs, a scheduler's log file): one line per state change, nothing redrawn.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

__all__ = ["Progress", "summary_table"]

MARKS = {"pending": " ", "running": ">", "succeeded": "+", "failed": "x", "cached": "=", "blocked": "-",
         "cancelled": "!", "kept": "="}


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


def _line(step: Any, width: int) -> str:
    state = step.status
    if state == "running" and step.cell:
        state = f"running  cell {step.cell[0]}/{step.cell[1]}"
    elif state == "running" and step.attempts > 1:
        state = f"running  attempt {step.attempts}"
    elif state == "cached" and step.cached_from:
        state = f"cached   (from {step.cached_from})"
    return f"  {MARKS.get(step.status, '?')} {step.name:<{width}}  {state:<34} {_seconds(step.duration)}"


class Progress:
    """A listener for :func:`run_pipeline`. ``live``: redraw in place (default: on a terminal)."""

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._lock = threading.Lock()
        self._drawn = 0
        self._result: Any = None
        self._last: dict[str, str] = {}
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, result: Any, step: Any) -> None:
        with self._lock:
            self._result = result
            if self.live:
                self._draw()
                if self._ticker is None:
                    self._ticker = threading.Thread(target=self._tick, name="mlops-progress", daemon=True)
                    self._ticker.start()
                return
            state = step.status if step.status != "running" or step.attempts <= 1 else f"running (attempt {step.attempts})"
            if self._last.get(step.name) == state:
                return  # cell progress is for terminals; logs get state changes only
            self._last[step.name] = state
            detail = f" in {_seconds(step.duration)}" if step.status in ("succeeded", "failed") else ""
            if step.status == "failed" and step.error:
                detail += f": {step.error}"
            elif step.status == "running" and step.error:
                detail += f" (last attempt: {step.error})"
            print(f"[{time.strftime('%H:%M:%S')}] {step.name}: {state}{detail}", file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._draw()

    def _draw(self) -> None:
        result = self._result
        if result is None:
            return
        steps = list(result.steps.values())
        width = max((len(s.name) for s in steps), default=4)
        lines = [f"pipeline {result.pipeline}  run {result.run_id}"] + [_line(s, width) for s in steps]
        out = ""
        if self._drawn:
            out += f"\x1b[{self._drawn}F"  # back to the first line drawn last time
        out += "".join(f"\x1b[2K{line}\n" for line in lines)
        self.stream.write(out)
        self.stream.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with self._lock:
            if self.live:
                self._draw()


def summary_table(result: Any, with_steps: bool = True) -> str:
    """The end-of-run summary: one line per step (unless a live display just showed them), then
    the totals and what to do next."""
    steps = list(result.steps.values())
    width = max((len(s.name) for s in steps), default=4)
    lines = []
    if with_steps:
        lines.append(f"{'step':<{width}}  {'status':<10} {'time':>8}  attempts")
        for s in steps:
            lines.append(f"{s.name:<{width}}  {s.status:<10} {_seconds(s.duration):>8}  {s.attempts or '':>8}")
    counts = ", ".join(f"{n} {state}" for state in ("succeeded", "cached", "kept", "failed", "blocked", "cancelled")
                       if (n := result.count(state)))
    total = _seconds((result.ended or time.time()) - result.started)
    lines.append(f"pipeline {result.pipeline} {result.status} in {total}: {counts}")
    for s in steps:
        if s.status == "failed" and s.error:
            lines.append(f"  {s.name}: {s.error}")
    if result.status in ("failed", "cancelled"):
        lines.append(f"resume with: jupyter mlops pipeline resume {result.run_id}")
    return "\n".join(lines)
