"""What a pipeline run and its steps came to: returned by the runner, shown by the faces."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["PipelineResult", "StepResult", "STEP_STATES", "DONE_OK", "run_summary"]

#: pending -> running -> succeeded | failed | cancelled; or cached (skipped by the cache),
#: blocked (a step it needs failed), kept (resume: reused from the run being resumed), crashed
#: (its runner died: set by whoever reads the run next, see history.RunHistory.settle)
STEP_STATES = ("pending", "running", "succeeded", "failed", "cached", "blocked", "cancelled", "kept", "crashed")
DONE_OK = frozenset({"succeeded", "cached", "kept"})


@dataclass
class StepResult:
    name: str
    status: str = "pending"
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    cell: tuple[int, int] | None = None
    error: str | None = None
    output_notebook: str | None = None
    cache_key: str | None = None
    spool_id: str | None = None
    cached_from: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # input path -> md5 the key was made of
    outputs: dict[str, str] | None = None  # output path -> md5 this step's outputs had (done steps)

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started


@dataclass
class PipelineResult:
    run_id: str
    pipeline: str
    file: str
    status: str = "running"  # running | succeeded | failed | cancelled | crashed (see history)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    steps: dict[str, StepResult] = field(default_factory=dict)
    spool_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def count(self, status: str) -> int:
        return sum(1 for s in self.steps.values() if s.status == status)




def run_summary(status: str, counts: Mapping[str, int], *, short: bool = False) -> str:
    """A run's status for listings: a success in which no step ran (every one cached) says so, for
    "succeeded" would hide that a scheduled run computed nothing new. ``short``: "all cached"."""
    if status == "succeeded" and counts and set(counts) == {"cached"}:
        return "all cached" if short else "succeeded, all cached"
    return status
