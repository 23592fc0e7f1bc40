"""URL paths of the Kubernetes REST API -> (resource, namespace, name, subresource), and discovery."""

from __future__ import annotations

from typing import Any, Optional

from ._store import RESOURCES, ApiError, Obj, ResourceType

VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0-emulated", "gitCommit": "0" * 40,
           "gitTreeState": "clean", "buildDate": "2024-08-13T00:00:00Z", "goVersion": "go1.22.5",
           "compiler": "gc", "platform": "linux/amd64"}
_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

BATCH_GROUP = {"name": "batch", "versions": [{"groupVersion": "batch/v1", "version": "v1"}],
               "preferredVersion": {"groupVersion": "batch/v1", "version": "v1"}}


def resource_list(group: str) -> Obj:
    resources = []
    for rt in RESOURCES.values():
        if rt.group != group:
            continue
        resources.append({"name": rt.plural, "singularName": rt.kind.lower(), "namespaced": rt.namespaced,
                          "kind": rt.kind, "verbs": _VERBS, "shortNames": list(rt.short_names)})
        if rt.status_subresource:
            resources.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                              "kind": rt.kind, "verbs": ["get", "patch", "update"]})
    if not group:
        resources.append({"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]})
        resources.append({"name": "pods/portforward", "singularName": "", "namespaced": True, "kind": "PodPortForwardOptions",
                          "verbs": ["create", "get"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/v1" if group else "v1",
            "resources": resources}


def _resource(group: str, plural: str) -> ResourceType:
    rt = RESOURCES.get(plural)
    if rt is None or rt.group != group:
        raise ApiError(404, "the server could not find the requested resource", details={})
    return rt


def target(group: str, rest: list[str]) -> tuple[ResourceType, Optional[str], Optional[str], str]:
    """URL path after /api/v1 or /apis/batch/v1 -> (resource, namespace, name, subresource)."""
    if rest[0] == "namespaces" and not group and len(rest) <= 2:
        return RESOURCES["namespaces"], None, rest[1] if len(rest) == 2 else None, ""
    if rest[0] == "namespaces" and not group and len(rest) == 3 and rest[2] in ("status", "finalize"):
        return RESOURCES["namespaces"], None, rest[1], rest[2]
    if rest[0] == "namespaces" and 3 <= len(rest) <= 5:
        rt = _resource(group, rest[2])
        if not rt.namespaced:
            raise ApiError(404, "the server could not find the requested resource", details={})
        return rt, rest[1], rest[3] if len(rest) > 3 else None, rest[4] if len(rest) > 4 else ""
    if len(rest) <= 3:
        rt = _resource(group, rest[0])
        if rt.namespaced and len(rest) > 1:
            raise ApiError(404, "the server could not find the requested resource", details={})
        return rt, None, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else ""
    raise ApiError(404, "the server could not find the requested resource", details={})


def delete_options(body: Obj, q: Any) -> Obj:
    options = dict(body) if isinstance(body, dict) else {}
    if q.get("gracePeriodSeconds") is not None:
        options["gracePeriodSeconds"] = int(q["gracePeriodSeconds"])
    if q.get("propagationPolicy"):
        options["propagationPolicy"] = q["propagationPolicy"]
    if q.get("orphanDependents"):
        options["orphanDependents"] = q["orphanDependents"].lower() == "true"
    return options
