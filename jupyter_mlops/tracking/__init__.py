"""Experiment tracking that never blocks the kernel and never loses a record.

``start_run`` / ``log_metric`` / ... append to a durable local spool; a separate flusher process
uploads to MLflow in batches. See docs/tracking.md for the design. Importing this package does not
import mlflow.
"""

from .run import (
    Run,
    active_run,
    end_run,
    flush,
    last_run,
    log_artifact,
    log_metric,
    log_metrics,
    log_param,
    log_params,
    set_tag,
    set_tags,
    start_run,
)

__all__ = [
    "Run",
    "active_run",
    "end_run",
    "flush",
    "last_run",
    "log_artifact",
    "log_metric",
    "log_metrics",
    "log_param",
    "log_params",
    "set_tag",
    "set_tags",
    "start_run",
]
