"""Quantities, LimitRange defaulting and ResourceQuota admission, as the API server's admission plugins.

``LimitRanger`` fills in a container's missing requests/limits from the namespace's LimitRanges and
enforces their min/max; ``ResourceQuota`` refuses a create that would take a namespace past a
quota's ``spec.hard``. Both raise :class:`ApiError` 403 with the real messages' shape. Not emulated:
quota scopes and scopeSelector, LimitRange ``maxLimitRequestRatio`` and PersistentVolumeClaim limits.
"""

from __future__ import annotations

import re
import time
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Iterable

from ._store import ApiError, parse_time

_SUFFIXES: dict[str, Fraction] = {
    "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
    "P": Fraction(10**15), "E": Fraction(10**18),
    "Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40),
    "Pi": Fraction(2**50), "Ei": Fraction(2**60),
}
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_BINARY_RESOURCES = ("memory", "ephemeral-storage", "storage")
_NATIVE = {"cpu", "memory", "ephemeral-storage", "storage", "pods"}
QUANTITY_HELP = ("quantities must match the regular expression "
                 "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")


def parse_quantity(value: Any) -> Fraction:
    """``"500m"`` -> 1/2, ``"1Gi"`` -> 2**30, ``2`` -> 2; ValueError when it is not a quantity."""
    text = str(value).strip()
    m = _QUANTITY.match(text)
    if not m:
        raise ValueError(text)
    try:
        number = Fraction(Decimal(m[1]))
    except InvalidOperation as e:
        raise ValueError(text) from e
    suffix = m[2] or ""
    if suffix[:1] in ("e", "E"):
        return number * Fraction(10) ** int(suffix[1:])
    return number * _SUFFIXES[suffix]


def format_quantity(value: Fraction, resource: str = "") -> str:
    """The canonical form the API server prints: ``1536Mi``, ``500m``, ``2``, ``1k``."""
    if value == 0:
        return "0"
    if resource.split(".")[-1] in _BINARY_RESOURCES and value.denominator == 1 and value >= 1024:
        for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
            mantissa = value / _SUFFIXES[suffix]
            if mantissa.denominator == 1:
                return f"{mantissa}{suffix}"
    for suffix in ("E", "P", "T", "G", "M", "k", "", "m", "u", "n"):
        mantissa = value / _SUFFIXES[suffix]
        if mantissa.denominator == 1:
            return f"{mantissa}{suffix}"
    return f"{-(-value * 10**9 // 1)}n"


def is_extended(resource: str) -> bool:
    """Extended resources (``nvidia.com/gpu``) may not be overcommitted: requests must equal limits."""
    return "/" in resource and not resource.startswith("kubernetes.io/")


def pod_usage(pod: dict[str, Any]) -> dict[str, Fraction]:
    """``requests.cpu``, ``limits.memory``, ``requests.nvidia.com/gpu``...: the pod's effective
    resources, the sum over its containers or the largest init container, whichever is more."""
    spec = pod.get("spec") or {}
    total: dict[str, Fraction] = {}
    for c in spec.get("containers") or []:
        for key, q in _container_usage(c).items():
            total[key] = total.get(key, Fraction(0)) + q
    for c in spec.get("initContainers") or []:
        for key, q in _container_usage(c).items():
            total[key] = max(total.get(key, Fraction(0)), q)
    return total


def _container_usage(container: dict[str, Any]) -> dict[str, Fraction]:
    resources = container.get("resources") or {}
    out = {}
    for kind in ("requests", "limits"):
        for name, q in (resources.get(kind) or {}).items():
            out[f"{kind}.{name}"] = parse_quantity(q)
    return out


def apply_limit_ranges(pod: dict[str, Any], limit_ranges: Iterable[dict[str, Any]]) -> None:
    """LimitRanger: default missing limits (``default``) and requests (``defaultRequest``), then check
    ``min``/``max`` per Container. Mutates ``pod``; raises 403 Forbidden as the real plugin does."""
    problems: list[str] = []
    for lr in limit_ranges:
        for item in (lr.get("spec") or {}).get("limits") or []:
            if item.get("type") != "Container":
                continue
            default = item.get("default") or {}
            default_request = item.get("defaultRequest") or default
            for c in (pod["spec"].get("containers") or []) + (pod["spec"].get("initContainers") or []):
                res = c.setdefault("resources", {})
                limits, requests = res.setdefault("limits", {}), res.setdefault("requests", {})
                for name, q in default.items():
                    limits.setdefault(name, q)
                for name, q in default_request.items():
                    requests.setdefault(name, q)
                for name, q in (item.get("max") or {}).items():
                    if name in limits and parse_quantity(limits[name]) > parse_quantity(q):
                        problems.append(f"maximum {name} usage per Container is {q}, but limit is {limits[name]}")
                    elif name not in limits:
                        problems.append(f"maximum {name} usage per Container is {q}.  No limit is specified")
                for name, q in (item.get("min") or {}).items():
                    if name in requests and parse_quantity(requests[name]) < parse_quantity(q):
                        problems.append(f"minimum {name} usage per Container is {q}, but request is {requests[name]}")
                if not limits:
                    del res["limits"]
                if not requests:
                    del res["requests"]
    if problems:
        msg = problems[0] if len(problems) == 1 else "[" + ", ".join(problems) + "]"
        raise ApiError.forbidden("pods", pod["metadata"].get("name", ""), msg)


# ---- ResourceQuota ---------------------------------------------------------------------------

_OBJECT_COUNTS = {"pods": "pods", "secrets": "secrets", "configmaps": "configmaps", "services": "services",
                  "persistentvolumeclaims": "persistentvolumeclaims", "resourcequotas": "resourcequotas"}


def usage_key(hard_key: str) -> str:
    """A quota's hard key -> the pod usage key it limits (``cpu`` and ``requests.cpu`` are the same)."""
    if hard_key.startswith(("requests.", "limits.")):
        return hard_key
    return f"requests.{hard_key}"  # cpu, memory, ephemeral-storage and bare extended resource names


def counts_resource(hard_key: str, resource: str, group: str) -> bool:
    """Whether ``hard_key`` (``pods``, ``count/jobs.batch``, ``secrets``) counts objects of ``resource``."""
    if _OBJECT_COUNTS.get(hard_key) == resource:
        return True
    return hard_key == ("count/" + resource + (f".{group}" if group else ""))


def is_terminal_pod(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def counts_against_quota(pod: dict[str, Any]) -> bool:
    """Terminal pods, and deleted ones past their grace period, no longer count."""
    deadline = pod["metadata"].get("deletionTimestamp")
    return not is_terminal_pod(pod) and not (deadline and parse_time(deadline).timestamp() <= time.time())


def namespace_usage(resource_objects: dict[str, list[dict[str, Any]]], quota: dict[str, Any]) -> dict[str, Fraction]:
    """What ``quota`` counts as used now: non-terminal pods' resources, and object counts."""
    hard = (quota.get("spec") or {}).get("hard") or {}
    pods = [p for p in resource_objects.get("pods", []) if counts_against_quota(p)]
    per_pod = [pod_usage(p) for p in pods]
    used: dict[str, Fraction] = {}
    for key in hard:
        if key in ("pods", "count/pods"):
            used[key] = Fraction(len(pods))
        elif key in _OBJECT_COUNTS or key.startswith("count/"):
            res, _, group = key.removeprefix("count/").partition(".")
            objs = resource_objects.get(res, [])
            used[key] = Fraction(len(objs))
        else:
            used[key] = sum((u.get(usage_key(key), Fraction(0)) for u in per_pod), Fraction(0))
    return used


def quota_status(quota: dict[str, Any], used: dict[str, Fraction]) -> dict[str, Any]:
    hard = (quota.get("spec") or {}).get("hard") or {}
    return {"hard": {k: format_quantity(parse_quantity(v), k) for k, v in hard.items()},
            "used": {k: format_quantity(used.get(k, Fraction(0)), k) for k in hard}}


def check_quota(resource: str, group: str, obj: dict[str, Any], quotas: list[dict[str, Any]],
                usage_of: Any) -> None:
    """ResourceQuota admission for creating ``obj``: first "must specify", then "exceeded quota"."""
    name = obj["metadata"].get("name") or obj["metadata"].get("generateName", "")
    requested_pod = pod_usage(obj) if resource == "pods" else {}
    for quota in quotas:
        hard = (quota.get("spec") or {}).get("hard") or {}
        qname = quota["metadata"]["name"]
        if resource == "pods":
            _must_specify(obj, hard, qname, name)
        requested: dict[str, Fraction] = {}
        for key in hard:
            if counts_resource(key, resource, group) or (resource == "pods" and key == "count/pods"):
                requested[key] = Fraction(1)
            elif resource == "pods" and not key.startswith("count/") and key not in _OBJECT_COUNTS:
                if usage_key(key) in requested_pod:
                    requested[key] = requested_pod[usage_key(key)]
        if not requested:
            continue
        used = usage_of(quota)
        exceeded = sorted(k for k, q in requested.items() if used.get(k, Fraction(0)) + q > parse_quantity(hard[k]))
        if exceeded:
            def pretty(values: dict[str, Any]) -> str:
                return ",".join(f"{k}={format_quantity(Fraction(values.get(k, 0)), k)}" for k in exceeded)
            hard_q = {k: parse_quantity(v) for k, v in hard.items()}
            msg = (f"exceeded quota: {qname}, requested: {pretty(requested)}, used: {pretty(used)}, "
                   f"limited: {pretty(hard_q)}")
            raise ApiError.forbidden(resource, name, msg, group=group)


_MUST_SPECIFY = {"cpu": "requests.cpu", "memory": "requests.memory", "requests.cpu": "requests.cpu",
                 "requests.memory": "requests.memory", "limits.cpu": "limits.cpu", "limits.memory": "limits.memory"}


def _must_specify(pod: dict[str, Any], hard: dict[str, Any], qname: str, name: str) -> None:
    missing: dict[str, list[str]] = {}
    for key in hard:
        if key not in _MUST_SPECIFY:
            continue
        kind, _, res = _MUST_SPECIFY[key].partition(".")
        for c in pod["spec"].get("containers") or []:
            if res not in ((c.get("resources") or {}).get(kind) or {}):
                missing.setdefault(key, []).append(c["name"])
    if missing:
        errs = [f"must specify {k} for: {','.join(sorted(v))}" for k, v in sorted(missing.items())]
        detail = errs[0] if len(errs) == 1 else "[" + ", ".join(errs) + "]"
        raise ApiError.forbidden("pods", name, f"failed quota: {qname}: {detail}")
