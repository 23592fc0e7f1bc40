"""Why a pod will not become a running kernel (or step), said in one line, as soon as it is known.

Read from what the watches deliver (the pod's status and the events about it), never from a
timeout: Unschedulable (the scheduler's own message: no node with a free GPU, a node selector no
node matches, quota), image pull errors, a crash, OOMKilled. :func:`progress` says what a slow start
is doing (pulling an image) so a frontend can show it while it lasts.
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["start_failure", "progress", "is_running", "PULL_ERRORS"]

PULL_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                         "RegistryUnavailable"})
_CONFIG_ERRORS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})

HINTS = {
    "Unschedulable": "no node can take it now; choose a smaller profile, or wait for capacity",
    "pull": "check the environment's image: its name, tag and the registry's credentials",
    "OOMKilled": "it used more memory than its profile allows; choose a profile with more memory",
    "CrashLoopBackOff": "its command keeps failing; see the pod's log",
    "config": "the pod's configuration cannot be used (a missing secret or config map?)",
}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    status = pod.get("status") or {}
    return list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])


def is_running(pod: dict[str, Any] | None) -> bool:
    """Running with every container ready (the kernel process is up)."""
    if not pod:
        return False
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    return status.get("phase") == "Running" and bool(containers) and all(c.get("ready") for c in containers)


def start_failure(pod: dict[str, Any] | None, events: Iterable[dict[str, Any]] = ()) -> str | None:
    """The reason ``pod`` will not run, with what to do; None while it still may. A deleted pod
    (None) is a failure too."""
    if pod is None:
        return "the pod was deleted before it started"
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    for container in _containers(pod):
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason")
        if reason in PULL_ERRORS:
            return f"pod {name}: {reason}: {_short(waiting.get('message'))}; {HINTS['pull']}"
        if reason in _CONFIG_ERRORS:
            return f"pod {name}: {reason}: {_short(waiting.get('message'))}; {HINTS['config']}"
        if reason == "CrashLoopBackOff":
            return f"pod {name}: CrashLoopBackOff; {HINTS['CrashLoopBackOff']}"
        terminated = state.get("terminated") or (container.get("lastState") or {}).get("terminated") or {}
        if terminated.get("reason") == "OOMKilled":
            return f"pod {name}: OOMKilled; {HINTS['OOMKilled']}"
        if terminated and status.get("phase") in ("Failed", "Succeeded"):
            return (f"pod {name}: the container ended ({terminated.get('reason') or 'exit'} "
                    f"{terminated.get('exitCode')}) before the kernel ran; see the pod's log")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" \
                and condition.get("reason") == "Unschedulable":
            return f"pod {name}: Unschedulable: {_short(condition.get('message'))}; {HINTS['Unschedulable']}"
    if status.get("phase") == "Failed":
        return f"pod {name}: failed: {_short(status.get('message') or status.get('reason'))}"
    for event in events:
        if event.get("type") == "Warning" and event.get("reason") == "FailedScheduling":
            return f"pod {name}: Unschedulable: {_short(event.get('message'))}; {HINTS['Unschedulable']}"
    return None


def progress(events: Iterable[dict[str, Any]]) -> str | None:
    """What a starting pod is doing, from its latest telling event: pulling an image, started."""
    latest = None
    for event in events:
        if event.get("reason") in ("Scheduled", "Pulling", "Pulled", "Created", "Started"):
            latest = event
    if latest is None:
        return None
    return f"{latest['reason'].lower()}: {_short(latest.get('message'))}"


def _short(text: Any, most: int = 300) -> str:
    return " ".join(str(text or "").split())[:most]
