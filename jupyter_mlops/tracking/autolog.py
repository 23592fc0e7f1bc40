"""``%mlops track --autolog``: MLflow's autologging, pointed at our run.

This is the one tracking path that imports mlflow in the kernel (autolog patches the ML libraries
from inside the process), so it is opt-in and its cost (~2 s, ~150 MiB) is said in the help.
"""

from __future__ import annotations

from ..errors import TrackingError
from .run import Run


def enable(run: Run, timeout: float = 60.0) -> None:
    if not run.wait(timeout, uploaded=False):
        raise TrackingError(
            f"--autolog needs the run to exist on {run.header['tracking_uri']}, and it was not "
            f"created within {timeout:g}s (is the server up?). Tracking continues without autolog."
        )
    try:
        import mlflow
    except ImportError as e:
        raise TrackingError("--autolog needs mlflow in the kernel's environment: pip install mlflow "
                            "(tracking goes on without autolog)") from e

    mlflow.set_tracking_uri(run.header["tracking_uri"])
    mlflow.start_run(run_id=run.run_id)
    mlflow.autolog(silent=True)
    run.set_tag("mlops.autolog", "true")

    def close_mlflow_run(status: str) -> None:
        if mlflow.active_run() is not None:
            mlflow.end_run(status)

    run.on_end(close_mlflow_run)
