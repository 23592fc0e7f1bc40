"""Kubernetes manifests as plain dicts: namespace, quota, limit range, kernel secret and pod, step Job, CronJob.

Pure functions, no cluster and no ``kubernetes`` import: the client module sends what they return.
Each builder runs :func:`check` on its result, so a manifest that leaves here is one the API server
would accept (the tests validate them against the Kubernetes schemas too).

What a user chose (their name, an environment, a profile, env values) reaches a manifest only as
data: label values through :func:`~.names.label_value`, the original in annotations and env values,
names through :mod:`.names`. Commands are exec lists, never a shell line, and every ``$`` in a
command or env value is doubled, so Kubernetes' ``$(VAR)`` expansion never rewrites a user's text.
"""

from __future__ import annotations

import copy
import json
import math
from datetime import timezone
from typing import Any, Mapping

from ..errors import ConfigError, ManifestError
from ..kernels.profiles import Profile, parse_memory
from ._checks import check, parse_quantity
from .names import label_value

__all__ = [
    "KERNEL_PORTS", "MANAGED_BY", "COMPONENT", "LABEL_USER", "LABEL_KERNEL_ID", "LABEL_ENVIRONMENT",
    "LABEL_PROFILE", "LABEL_SERVER", "QUOTA_NAME", "LIMIT_RANGE_NAME", "KERNEL_COMMAND", "quantity_cpu", "quantity_memory",
    "namespace", "resource_quota", "limit_range", "kernel_secret", "kernel_pod", "step_job",
    "schedule_cronjob", "check",
]

#: fixed ports: no port race in the pod, and the server knows them without asking the kernel
KERNEL_PORTS = {"shell": 52001, "iopub": 52002, "stdin": 52003, "control": 52004, "hb": 52005}
MANAGED_BY = {"app.kubernetes.io/managed-by": "jupyter-mlops"}
COMPONENT = "app.kubernetes.io/component"
LABEL_USER = "mlops.jupyter.org/user"
LABEL_KERNEL_ID = "mlops.jupyter.org/kernel-id"
LABEL_ENVIRONMENT = "mlops.jupyter.org/environment"
LABEL_PROFILE = "mlops.jupyter.org/profile"
LABEL_SERVER = "mlops.jupyter.org/server"
QUOTA_NAME = "mlops-quota"
LIMIT_RANGE_NAME = "mlops-limits"
KERNEL_COMMAND = ["python", "-m", "jupyter_mlops.k8s.kernel_entry"]
#: what every container runs under: the Pod Security Standard "restricted" asks exactly this
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
_KERNEL_ENV = ("MLOPS_KERNEL_KEY", "MLOPS_POD_IP", "MLOPS_KERNEL_PORTS", "MLOPS_KERNEL_PROFILE",
               "MLOPS_KERNEL_ENVIRONMENT")
_QUOTA_KEYS = ("cpu", "memory", "gpus", "gpu_resource", "pods")


def quantity_cpu(cores: float) -> str:
    """Cores as a Kubernetes quantity: 0.5 -> ``500m``, 2 -> ``2``. :class:`ConfigError` below 1m."""
    if isinstance(cores, bool) or not isinstance(cores, (int, float)) or not math.isfinite(cores) or cores <= 0:
        raise ConfigError(f"cpu {cores!r} is not a number of cores above 0", source="kubernetes")
    milli = round(cores * 1000)
    if milli < 1:
        raise ConfigError(f"cpu {cores!r} is below 0.001 cores (1m), the least Kubernetes counts", source="kubernetes")
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def quantity_memory(size: int) -> str:
    """Bytes as a Kubernetes quantity: ``4Gi``, ``512Mi``, else the plain number of bytes."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"memory {size!r} is not a number of bytes above 0", source="kubernetes")
    for suffix, unit in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def namespace(name: str, user: str) -> dict[str, Any]:
    """A user's namespace. Pods in it must meet the "restricted" Pod Security Standard (ours do)."""
    return check({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name,
                     "labels": {**MANAGED_BY, LABEL_USER: label_value(user),
                                "pod-security.kubernetes.io/enforce": "restricted"},
                     "annotations": {LABEL_USER: user}},
    })


def resource_quota(namespace: str, quota: Mapping[str, Any]) -> dict[str, Any]:
    """The ResourceQuota of a role (``c.Kubernetes.role_quotas``): keys cpu (cores or a quantity),
    memory (bytes or "16Gi"), gpus, gpu_resource (default nvidia.com/gpu), pods; each optional.
    Unknown keys raise :class:`ConfigError` naming them."""
    unknown = sorted(set(quota) - set(_QUOTA_KEYS))
    if unknown:
        raise ConfigError(f"unknown quota setting {unknown[0]!r}; known: {', '.join(_QUOTA_KEYS)}",
                          source="c.Kubernetes.role_quotas")
    hard: dict[str, str] = {}
    if quota.get("cpu") is not None:
        hard["requests.cpu"] = hard["limits.cpu"] = _cpu(quota["cpu"])
    if quota.get("memory") is not None:
        hard["requests.memory"] = hard["limits.memory"] = _memory(quota["memory"])
    if quota.get("gpus") is not None:
        # extended resources are quota'd by request only (they cannot be overcommitted)
        hard[f"requests.{quota.get('gpu_resource') or 'nvidia.com/gpu'}"] = _count(quota["gpus"], "gpus")
    if quota.get("pods") is not None:
        hard["pods"] = _count(quota["pods"], "pods")
    return check({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": QUOTA_NAME, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "spec": {"hard": hard},
    })


def limit_range(namespace: str, default_cpu: float | str, default_memory: int | str) -> dict[str, Any]:
    """Defaults for containers that ask for nothing: a quota on cpu/memory rejects such pods otherwise."""
    defaults = {"cpu": _cpu(default_cpu), "memory": _memory(default_memory)}
    return check({
        "apiVersion": "v1", "kind": "LimitRange",
        "metadata": {"name": LIMIT_RANGE_NAME, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "spec": {"limits": [{"type": "Container", "default": dict(defaults), "defaultRequest": dict(defaults)}]},
    })


def kernel_secret(name: str, namespace: str, key: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """The kernel's HMAC key, read by the pod through ``secretKeyRef`` (never in the pod spec)."""
    return check({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "stringData": {"key": key},
    })


def kernel_pod(*, name: str, namespace: str, kernel_id: str, user: str, image: str, profile: Profile,
               environment: str | None, secret_name: str, command: list[str] | None = None,
               env: Mapping[str, str] | None = None, service_account: str | None = None,
               image_pull_policy: str = "IfNotPresent", server: str = "default") -> dict[str, Any]:
    """One kernel in one pod of ``server`` (``c.Kubernetes.server_id``): the environment's image, the
    profile's resources, fixed ports.

    The entry point (``KERNEL_COMMAND``) builds its connection file from MLOPS_KERNEL_KEY (from the
    Secret ``secret_name``), MLOPS_POD_IP (the downward API) and MLOPS_KERNEL_PORTS. ``env`` may not
    set those names (:class:`ConfigError`).
    """
    env = dict(env or {})
    taken = sorted(set(env) & set(_KERNEL_ENV))
    if taken:
        raise ConfigError(f"env {taken[0]} is set by jupyter_mlops for the kernel; use another name",
                          source="kubernetes")
    labels = {**MANAGED_BY, COMPONENT: "kernel", LABEL_USER: label_value(user),
              LABEL_KERNEL_ID: label_value(kernel_id), LABEL_PROFILE: label_value(profile.name),
              LABEL_SERVER: label_value(server)}
    annotations = {LABEL_USER: user, LABEL_PROFILE: profile.name}
    if environment is not None:
        labels[LABEL_ENVIRONMENT] = label_value(environment)
        annotations[LABEL_ENVIRONMENT] = environment
    kernel_env = _env(env) + [
        {"name": "MLOPS_KERNEL_KEY", "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "key"}}},
        {"name": "MLOPS_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "MLOPS_KERNEL_PORTS", "value": json.dumps(KERNEL_PORTS, separators=(",", ":"))},
        {"name": "MLOPS_KERNEL_PROFILE", "value": _literal(profile.name)},
        {"name": "MLOPS_KERNEL_ENVIRONMENT", "value": _literal(environment or "")},
    ]
    spec = _pod_spec("kernel", image, command or KERNEL_COMMAND, kernel_env, profile, service_account,
                     image_pull_policy)
    spec["containers"][0]["ports"] = [{"name": port, "containerPort": number, "protocol": "TCP"}
                                      for port, number in KERNEL_PORTS.items()]
    return check({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": spec,
    })


def step_job(*, name: str, namespace: str, image: str, command: list[str], env: Mapping[str, str],
             profile: Profile, labels: Mapping[str, str], backoff_limit: int = 0,
             active_deadline_seconds: int | None = None, ttl_seconds_after_finished: int = 3600,
             service_account: str | None = None, image_pull_policy: str = "IfNotPresent") -> dict[str, Any]:
    """A pipeline step as a Job: one pod, never restarted in place (``backoff_limit`` new pods at most).

    ``labels`` must already be valid (:func:`~.names.label_value` the values); they go on the Job and
    its pod, with managed-by, component ``step`` and the profile.
    """
    all_labels = {**MANAGED_BY, COMPONENT: "step", LABEL_PROFILE: label_value(profile.name), **labels}
    spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "ttlSecondsAfterFinished": ttl_seconds_after_finished,
        "template": {"metadata": {"labels": dict(all_labels)},
                     "spec": _pod_spec("step", image, command, _env(env), profile, service_account,
                                       image_pull_policy)},
    }
    if active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    return check({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": all_labels},
        "spec": spec,
    })


def schedule_cronjob(*, name: str, namespace: str, schedule: str, time_zone: str | None, job: Mapping[str, Any],
                     concurrency_policy: str = "Forbid", successful_jobs_history_limit: int = 3,
                     failed_jobs_history_limit: int = 3, starting_deadline_seconds: int | None = None,
                     suspend: bool = False) -> dict[str, Any]:
    """A schedule as a CronJob running ``job`` (a :func:`step_job` result or any Job dict).

    ``schedule`` is parsed by :mod:`jupyter_mlops.pipelines.cron` (macros and ``CRON_TZ=`` work, the
    CronJob gets the canonical five fields); the zone is always written out, UTC by default, because
    a CronJob without ``timeZone`` runs in the controller manager's local time.
    """
    from ..pipelines import cron

    try:
        parsed = cron.parse(schedule, time_zone)
    except cron.CronError as e:
        raise ManifestError("CronJob", name, "spec.schedule", str(e)) from e
    labels = {**job.get("metadata", {}).get("labels", {}), COMPONENT: "schedule"}
    spec: dict[str, Any] = {
        "schedule": parsed.text,
        "timeZone": "UTC" if parsed.zone is timezone.utc else parsed.tz,
        "concurrencyPolicy": concurrency_policy,
        "successfulJobsHistoryLimit": successful_jobs_history_limit,
        "failedJobsHistoryLimit": failed_jobs_history_limit,
        "suspend": suspend,
        "jobTemplate": {"metadata": {"labels": dict(job.get("metadata", {}).get("labels", {}))},
                        "spec": copy.deepcopy(job["spec"])},
    }
    if starting_deadline_seconds is not None:
        spec["startingDeadlineSeconds"] = starting_deadline_seconds
    return check({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    })


def _pod_spec(container: str, image: str, command: list[str], env: list[dict[str, Any]], profile: Profile,
              service_account: str | None, image_pull_policy: str) -> dict[str, Any]:
    """The pod spec kernels and steps share: resources and placement from the profile, locked down."""
    spec: dict[str, Any] = {
        "containers": [{
            "name": container, "image": image, "imagePullPolicy": image_pull_policy,
            "command": [_literal(str(part)) for part in command], "env": env,
            "resources": _resources(profile), "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        }],
        "restartPolicy": "Never",  # a crash is reported, not hidden by a kubelet restart
        # no API token unless asked for: a kernel runs user code and needs no cluster access
        "automountServiceAccountToken": bool(service_account),
        "enableServiceLinks": False,  # the namespace's Services stay out of the user's environment
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    if profile.node_selector:
        spec["nodeSelector"] = {str(k): str(v) for k, v in profile.node_selector.items()}
    if profile.tolerations:
        spec["tolerations"] = [dict(t) for t in profile.tolerations]
    if profile.priority_class:
        spec["priorityClassName"] = profile.priority_class
    return spec


def _resources(profile: Profile) -> dict[str, Any]:
    """Requests = limits (Guaranteed QoS when cpu and memory are both given); GPUs as the extended resource."""
    limits: dict[str, str] = {}
    if profile.cpu is not None:
        limits["cpu"] = quantity_cpu(profile.cpu)
    if profile.memory is not None:
        limits["memory"] = quantity_memory(profile.memory)
    if profile.gpus:
        limits[profile.gpu_resource] = str(profile.gpus)
    return {"requests": dict(limits), "limits": limits} if limits else {}


def _env(env: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, value in env.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"env {key}: value {value!r} is not a string or number", source="kubernetes")
        out.append({"name": str(key), "value": _literal(str(value))})
    return out


def _literal(text: str) -> str:
    """``text`` as Kubernetes will pass it: ``$$`` is its escape for ``$`` in commands and env values."""
    return text.replace("$", "$$")


def _cpu(value: Any) -> str:
    if isinstance(value, str):
        if parse_quantity(value) is None or parse_quantity(value) <= 0:
            raise ConfigError(f"cpu {value!r} is not a quantity above 0; write e.g. 2 or 500m", source="kubernetes")
        return value
    return quantity_cpu(value)


def _memory(value: Any) -> str:
    if isinstance(value, str):
        amount = parse_quantity(value)
        if amount is not None and amount > 0:
            return value
    return quantity_memory(parse_memory(value, "memory"))


def _count(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be a whole number of 0 or more, got {value!r}", source="c.Kubernetes.role_quotas")
    return str(value)
