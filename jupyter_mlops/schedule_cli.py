"""``jupyter mlops schedule ...`` and ``jupyter mlops scheduler``: a thin face over pipelines.scheduler."""

from __future__ import annotations

import argparse

__all__ = ["add_schedule_commands"]


def add_schedule_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the schedule commands (filled in with the scheduler)."""
