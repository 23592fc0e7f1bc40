"""Tell someone a pipeline failed: a JSON POST to the webhook URL in config.

Best effort by design: a webhook that is down, slow or refuses must never fail or hang the
pipeline (5 s timeout, one try); what went wrong is logged as a warning.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

__all__ = ["notify_failure", "failure_payload"]

log = logging.getLogger("jupyter_mlops.pipelines")


def failure_payload(result: Any) -> dict[str, Any]:
    failed = {name: step.error for name, step in result.steps.items() if step.status == "failed"}
    text = f"pipeline {result.pipeline} run {result.run_id} failed: " + "; ".join(
        f"{name}: {error}" for name, error in failed.items())
    return {
        "text": text[:3000],  # Slack and Mattermost show `text`
        "pipeline": result.pipeline,
        "file": result.file,
        "run_id": result.run_id,
        "status": result.status,
        "failed_steps": failed,
        "steps": {name: step.status for name, step in result.steps.items()},
        "resume": f"jupyter mlops pipeline resume {result.run_id}",
    }


def notify_failure(url: str, result: Any, timeout: float = 5.0) -> bool:
    """POST the failure; returns whether the webhook accepted it (2xx)."""
    body = json.dumps(failure_payload(result)).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "jupyter_mlops"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - a configured URL
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as e:
        log.warning("failure webhook %s not notified: %s", url, e)
        return False
