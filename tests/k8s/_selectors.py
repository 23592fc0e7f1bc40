"""Label and field selectors as the API server parses them (``?labelSelector=`` / ``?fieldSelector=``).

A selector that does not parse is the caller's error: :class:`SelectorError` becomes a 400 BadRequest.
"""

from __future__ import annotations

import re
from typing import Any, Callable

Matcher = Callable[[dict[str, Any]], bool]


class SelectorError(ValueError):
    """The selector string is malformed or names a field the resource does not index."""


_LABEL_REQ = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)"
    r"|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$")

# Fields each resource lets a fieldSelector use, as the real API server does; others are a 400.
_COMMON_FIELDS = {"metadata.name", "metadata.namespace"}
FIELDS: dict[str, set[str]] = {
    "pods": {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
             "status.phase", "status.podIP", "status.nominatedNodeName", "spec.hostNetwork"},
    "events": {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
               "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
               "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"},
    "secrets": {"type"},
    "namespaces": {"status.phase"},
    "jobs": {"status.successful"},
    "nodes": {"spec.unschedulable"},
}


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``in (...)`` parentheses."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> Matcher:
    """``a=b,c!=d,e in (f,g),h notin (i),j,!k`` -> a predicate over an object's labels."""
    if not text:
        return lambda obj: True
    reqs: list[Callable[[dict[str, str]], bool]] = []
    for part in _split_top_level(text):
        m = _LABEL_REQ.match(part)
        if not m:
            raise SelectorError(f"unable to parse requirement: {part.strip()!r}")
        key = m["key"]
        if m["neg"]:
            if m["op"] or m["setop"]:
                raise SelectorError(f"unable to parse requirement: {part.strip()!r}")
            reqs.append(lambda labels, k=key: k not in labels)
        elif m["op"] in ("=", "=="):
            reqs.append(lambda labels, k=key, v=m["value"]: labels.get(k) == v)
        elif m["op"] == "!=":
            reqs.append(lambda labels, k=key, v=m["value"]: labels.get(k) != v)
        elif m["setop"]:
            values = {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["setop"] == "in":
                reqs.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                reqs.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        else:
            reqs.append(lambda labels, k=key: k in labels)

    def match(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(r(labels) for r in reqs)

    return match


def field_value(obj: dict[str, Any], path: str) -> str:
    """The string a field selector compares against (missing fields compare as "")."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_field_selector(text: str | None, resource: str) -> Matcher:
    """``metadata.name=x,status.phase!=Failed`` -> a predicate; unknown fields raise SelectorError."""
    if not text:
        return lambda obj: True
    reqs: list[tuple[str, bool, str]] = []
    allowed = _COMMON_FIELDS | FIELDS.get(resource, set())
    for part in _split_top_level(text):
        m = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise SelectorError(f"invalid selector: {part.strip()!r}; can't understand '{part.strip()}'")
        if m[1] not in allowed:
            raise SelectorError(f'field label not supported: {m[1]}')
        reqs.append((m[1], m[2] != "!=", m[3]))

    def match(obj: dict[str, Any]) -> bool:
        return all((field_value(obj, path) == value) == equal for path, equal, value in reqs)

    return match


def match_label_selector_object(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector object (``matchLabels`` / ``matchExpressions``), as in a Job's spec.selector."""
    if not selector:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], set(expr.get("values") or [])
        ok = {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
              "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[op]()
        if not ok:
            return False
    return True
