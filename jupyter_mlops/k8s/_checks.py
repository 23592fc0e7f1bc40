"""Our own checks on a manifest, the ones the OpenAPI schemas cannot say (re-exported by :mod:`.manifests`).

The schemas (``kubernetes-validate --strict`` in the tests) check structure and types; the API
server checks much more, at create time, on a live cluster. What falls between is checked here so
it fails at build time with the field named: quantities (``2x`` CPUs, a request above its limit, a
fractional GPU), enums (restartPolicy, imagePullPolicy, concurrencyPolicy, toleration operator and
effect), cron schedules and time zones (:mod:`jupyter_mlops.pipelines.cron`), names (DNS-1123),
label keys and values, env and port names.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping, NoReturn

from ..errors import ManifestError
from .names import DNS_LABEL, LABEL_VALUE

__all__ = ["check", "parse_quantity"]

_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|[numkMGTPE])?$")
_SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
           "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_STANDARD_RESOURCES = {"cpu", "memory", "ephemeral-storage"}
_ENUMS = {
    "imagePullPolicy": ("Always", "IfNotPresent", "Never"),
    "concurrencyPolicy": ("Allow", "Forbid", "Replace"),
    "operator": ("Exists", "Equal"),
    "effect": ("", "NoSchedule", "PreferNoSchedule", "NoExecute"),
    "protocol": ("TCP", "UDP", "SCTP"),
}
_RESTART = {"Pod": ("Always", "OnFailure", "Never"), "Job": ("OnFailure", "Never"), "Deployment": ("Always",)}
#: kinds whose names are DNS-1123 labels (the rest: subdomains); a CronJob's leaves 11 characters for
#: the Job names its controller makes from it
_LABEL_NAMED = {"Namespace": 63, "Pod": 63, "Service": 63, "Job": 63, "CronJob": 52, "Deployment": 63,
                "Secret": 63, "ResourceQuota": 63, "LimitRange": 63}


def parse_quantity(text: Any) -> Decimal | None:
    """The value of a Kubernetes quantity (``500m``, ``4Gi``, ``1e3``, 2), or None if it is not one."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return Decimal(str(text))
    match = _QUANTITY.match(text) if isinstance(text, str) else None
    if not match:
        return None
    number, suffix = match.group(1), match.group(2) or ""
    try:
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            return Decimal(number) * Decimal(10) ** int(suffix[1:])
        return Decimal(number) * _SUFFIX[suffix]
    except (InvalidOperation, OverflowError):
        return None


class _Check:
    def __init__(self, manifest: Mapping[str, Any]) -> None:
        self.kind = str(manifest.get("kind") or "?")
        self.name = str((manifest.get("metadata") or {}).get("name") or "")

    def fail(self, field: str, problem: str) -> NoReturn:
        raise ManifestError(self.kind, self.name, field, problem)

    def enum(self, value: Any, key: str, field: str, allowed: tuple[str, ...] | None = None) -> None:
        allowed = allowed or _ENUMS[key]
        if value is not None and value not in allowed:
            self.fail(field, f"{value!r} is not one of {', '.join(repr(a) for a in allowed)}")

    def dns_label(self, value: Any, field: str, max_len: int = 63) -> None:
        if not isinstance(value, str) or len(value) > max_len or not DNS_LABEL.match(value):
            self.fail(field, f"{value!r} is not a DNS-1123 label (at most {max_len} of a-z, 0-9, '-', "
                      "a letter or digit at each end)")

    def subdomain(self, value: Any, field: str) -> None:
        if not isinstance(value, str) or len(value) > 253 or not _SUBDOMAIN.match(value):
            self.fail(field, f"{value!r} is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')")

    def label_key(self, key: Any, field: str) -> None:
        prefix, slash, name = key.rpartition("/") if isinstance(key, str) else ("", "", "")
        if not isinstance(key, str) or len(name) > 63 or not _LABEL_NAME.match(name) or (slash and not prefix):
            self.fail(field, f"{key!r} is not a label key ([prefix/]name, name at most 63 of A-Z a-z 0-9 - _ .)")
        if prefix:
            self.subdomain(prefix, field)

    def labels(self, labels: Any, field: str) -> None:
        for key, value in (labels or {}).items():
            self.label_key(key, f"{field}[{key}]")
            self.label_value(value, f"{field}[{key}]")

    def label_value(self, value: Any, field: str) -> None:
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            self.fail(field, f"{value!r} is not a label value (at most 63 of A-Z a-z 0-9 - _ ., a letter or "
                      "digit at each end); build it with names.label_value()")

    def quantity(self, value: Any, field: str, *, whole: bool = False, positive: bool = False) -> Decimal:
        amount = parse_quantity(value)
        if amount is None:
            self.fail(field, f"{value!r} is not a quantity; write e.g. 500m, 2, 512Mi, 4Gi")
        if amount < 0 or (positive and amount == 0):
            self.fail(field, f"{value!r} must be {'above' if positive else 'at least'} 0")
        if whole and amount != amount.to_integral_value():
            self.fail(field, f"{value!r} must be a whole number (extended resources cannot be split)")
        return amount

    def count(self, value: Any, field: str, least: int = 0) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            self.fail(field, f"{value!r} must be a whole number of {least} or more")


def check(manifest: Mapping[str, Any]) -> Any:
    """Raise :class:`ManifestError` (one line: kind, name, field, problem) for what the schemas let
    through and the API server would refuse; return ``manifest`` unchanged otherwise."""
    c = _Check(manifest)
    meta = manifest.get("metadata") or {}
    if c.kind in _LABEL_NAMED:
        c.dns_label(meta.get("name"), "metadata.name", _LABEL_NAMED[c.kind])
    elif meta.get("name") is not None and ":" not in str(meta.get("name")):  # RBAC names may hold ':'
        c.subdomain(meta.get("name"), "metadata.name")
    if meta.get("namespace") is not None:
        c.dns_label(meta["namespace"], "metadata.namespace")
    c.labels(meta.get("labels"), "metadata.labels")
    for key in meta.get("annotations") or {}:
        c.label_key(key, f"metadata.annotations[{key}]")
    spec = manifest.get("spec") or {}
    if c.kind == "Pod":
        _pod(c, spec, "spec", "Pod")
    elif c.kind in ("Job", "Deployment"):
        _workload(c, spec, "spec", c.kind)
    elif c.kind == "CronJob":
        _cronjob(c, spec)
    elif c.kind == "ResourceQuota":
        for key, value in (spec.get("hard") or {}).items():
            c.quantity(value, f"spec.hard[{key}]", whole=_extended(key.partition(".")[2] or key))
    elif c.kind == "LimitRange":
        for i, item in enumerate(spec.get("limits") or []):
            c.enum(item.get("type"), "type", f"spec.limits[{i}].type", ("Container", "Pod", "PersistentVolumeClaim"))
            for part in ("default", "defaultRequest", "max", "min", "maxLimitRequestRatio"):
                for key, value in (item.get(part) or {}).items():
                    c.quantity(value, f"spec.limits[{i}].{part}[{key}]")
    elif c.kind == "Service":
        for i, port in enumerate(spec.get("ports") or []):
            _port(c, port, f"spec.ports[{i}]", "port")
    return manifest


def _workload(c: _Check, spec: Mapping[str, Any], field: str, kind: str) -> None:
    c.count(spec.get("backoffLimit"), f"{field}.backoffLimit")
    c.count(spec.get("activeDeadlineSeconds"), f"{field}.activeDeadlineSeconds", least=1)
    c.count(spec.get("ttlSecondsAfterFinished"), f"{field}.ttlSecondsAfterFinished")
    template = spec.get("template") or {}
    c.labels((template.get("metadata") or {}).get("labels"), f"{field}.template.metadata.labels")
    _pod(c, template.get("spec") or {}, f"{field}.template.spec", kind)


def _cronjob(c: _Check, spec: Mapping[str, Any]) -> None:
    from ..pipelines import cron

    schedule = spec.get("schedule")
    if not isinstance(schedule, str) or schedule.strip().upper().startswith(("CRON_TZ=", "TZ=")):
        c.fail("spec.schedule", f"{schedule!r}: give five cron fields; the zone goes in spec.timeZone")
    try:
        cron.parse(schedule)
    except cron.CronError as e:
        c.fail("spec.schedule", str(e))
    zone = spec.get("timeZone")
    if zone is not None:
        try:
            cron.zone(zone)
        except cron.CronError as e:
            c.fail("spec.timeZone", str(e))
        if zone.upper() in ("UTC", "Z", "ETC/UTC") and zone not in ("UTC", "Etc/UTC"):
            c.fail("spec.timeZone", f"{zone!r}: write UTC (the cluster reads IANA names, case and all)")
    c.enum(spec.get("concurrencyPolicy"), "concurrencyPolicy", "spec.concurrencyPolicy")
    for key in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit", "startingDeadlineSeconds"):
        c.count(spec.get(key), f"spec.{key}")
    template = spec.get("jobTemplate") or {}
    c.labels((template.get("metadata") or {}).get("labels"), "spec.jobTemplate.metadata.labels")
    _workload(c, template.get("spec") or {}, "spec.jobTemplate.spec", "Job")


def _pod(c: _Check, spec: Mapping[str, Any], field: str, kind: str) -> None:
    c.enum(spec.get("restartPolicy"), "restartPolicy", f"{field}.restartPolicy", _RESTART[kind])
    for key in ("serviceAccountName", "priorityClassName"):
        if spec.get(key) is not None:
            c.subdomain(spec[key], f"{field}.{key}")
    c.labels(spec.get("nodeSelector"), f"{field}.nodeSelector")
    for i, toleration in enumerate(spec.get("tolerations") or []):
        _toleration(c, toleration, f"{field}.tolerations[{i}]")
    containers = spec.get("containers") or []
    if not containers:
        c.fail(f"{field}.containers", "a pod needs at least one container")
    for i, container in enumerate([*containers, *(spec.get("initContainers") or [])]):
        _container(c, container, f"{field}.containers[{i}]")


def _toleration(c: _Check, toleration: Mapping[str, Any], field: str) -> None:
    operator = toleration.get("operator", "Equal")
    c.enum(operator, "operator", f"{field}.operator")
    c.enum(toleration.get("effect"), "effect", f"{field}.effect")
    if toleration.get("key"):
        c.label_key(toleration["key"], f"{field}.key")
    elif operator != "Exists":
        c.fail(f"{field}.key", "an empty key needs operator Exists")
    if operator == "Exists" and toleration.get("value"):
        c.fail(f"{field}.value", "operator Exists takes no value")
    if operator == "Equal":
        c.label_value(toleration.get("value") or "", f"{field}.value")


def _container(c: _Check, container: Mapping[str, Any], field: str) -> None:
    c.dns_label(container.get("name"), f"{field}.name")
    image = container.get("image")
    if not isinstance(image, str) or not image or any(ch.isspace() or ord(ch) < 32 for ch in image):
        c.fail(f"{field}.image", f"{image!r} is not an image reference; the environment's `image:` names one")
    c.enum(container.get("imagePullPolicy"), "imagePullPolicy", f"{field}.imagePullPolicy")
    for key in ("command", "args"):
        if key in container and not all(isinstance(part, str) for part in container[key]):
            c.fail(f"{field}.{key}", "must be a list of strings")
    for j, var in enumerate(container.get("env") or []):
        name = var.get("name")
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            c.fail(f"{field}.env[{j}].name", f"{name!r} is not an environment variable name")
        if "value" in var and not isinstance(var["value"], str):
            c.fail(f"{field}.env[{j}].value", f"{var['value']!r} must be a string")
    for j, port in enumerate(container.get("ports") or []):
        _port(c, port, f"{field}.ports[{j}]", "containerPort")
    _resources(c, container.get("resources") or {}, f"{field}.resources")


def _port(c: _Check, port: Mapping[str, Any], field: str, number_key: str) -> None:
    name = port.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 15 or not _PORT_NAME.match(name)
                             or "--" in name or not re.search("[a-z]", name)):
        c.fail(f"{field}.name", f"{name!r} is not a port name (at most 15 of a-z, 0-9, '-', with a letter)")
    number = port.get(number_key)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
        c.fail(f"{field}.{number_key}", f"{number!r} is not a port number 1-65535")
    c.enum(port.get("protocol"), "protocol", f"{field}.protocol")


def _resources(c: _Check, resources: Mapping[str, Any], field: str) -> None:
    amounts: dict[str, dict[str, Decimal]] = {}
    for part in ("requests", "limits"):
        amounts[part] = {}
        for key, value in (resources.get(part) or {}).items():
            where = f"{field}.{part}[{key}]"
            if key not in _STANDARD_RESOURCES and not key.startswith("hugepages-") and not _extended(key):
                c.fail(where, f"{key!r} is not a resource name (cpu, memory, or an extended one like nvidia.com/gpu)")
            amounts[part][key] = c.quantity(value, where, whole=_extended(key), positive=key == "cpu")
    for key, request in amounts["requests"].items():
        limit = amounts["limits"].get(key)
        if _extended(key) and limit is not None and request != limit:
            c.fail(f"{field}.requests[{key}]", f"must equal the limit {limit} (extended resources are not overcommitted)")
        if limit is not None and request > limit:
            c.fail(f"{field}.requests[{key}]", f"{request} is above the limit {limit}")


def _extended(key: str) -> bool:
    """An extended resource: a domain-qualified name outside kubernetes.io (``nvidia.com/gpu``)."""
    prefix, slash, _ = key.partition("/")
    return bool(slash) and "." in prefix and not prefix.endswith("kubernetes.io")
