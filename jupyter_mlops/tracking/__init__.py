"""Experiment tracking that never blocks the kernel and never loses a record.

``start_run`` / ``log_metric`` / ... append to a durable local spool; a separate flusher process
uploads to MLflow in batches. See docs/tracking.md for the design. Importing this package does not
import mlflow.
"""

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


def __getattr__(name: str) -> object:
    """The API lives in .run; imported on first use, so ``jupyter_mlops.tracking.context`` and
    friends (a pipeline's no-op re-run) do not pay for it."""
    if name in __all__:
        from . import run

        value = getattr(run, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
