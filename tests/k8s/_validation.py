"""What the API server fills in (defaulting) and refuses (validation, 422 Invalid) on create/update.

A subset of the real rules, the ones a manifest builder gets wrong: names (DNS-1123), label keys and
values, container names/images, env var names, quantities and requests <= limits, extended resources
(requests must equal limits), restartPolicy, a Job's restartPolicy (Never/OnFailure) and generated
selector, a CronJob's schedule and name length, Secret data (base64) and keys, immutability of a
pod's spec. Everything else is accepted as sent.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Callable

from ._admission import QUANTITY_HELP, is_extended, parse_quantity
from ._store import ApiError, Obj, ResourceType

Causes = list[tuple[str, str, str]]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_LABEL_MSG = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
              "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
              "'12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")
_SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                  "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                  "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
_LABEL_NAME_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                   "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                   "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
_LABEL_NAMESPACED = {"namespaces", "services"}  # names that must be a DNS-1123 label, not a subdomain


def _invalid(field: str, value: Any, msg: str) -> tuple[str, str, str]:
    return field, "FieldValueInvalid", f'Invalid value: "{value}": {msg}'


def _required(field: str, msg: str = "") -> tuple[str, str, str]:
    return field, "FieldValueRequired", "Required value" + (f": {msg}" if msg else "")


# ---- defaulting ------------------------------------------------------------------------------

def default(rt: ResourceType, obj: Obj) -> None:
    fn = _DEFAULTS.get(rt.plural)
    if fn:
        fn(obj)


def _default_namespace(ns: Obj) -> None:
    ns["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = ns["metadata"]["name"]
    ns.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    ns["status"] = {"phase": "Active"}


def default_pod_spec(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("serviceAccountName", spec.get("serviceAccount", "default"))
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        if not isinstance(c, dict):
            continue
        image = str(c.get("image", ""))
        c.setdefault("imagePullPolicy", "Always" if ":" not in image.rsplit("/", 1)[-1]
                     or image.endswith(":latest") else "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        res = c.setdefault("resources", {})
        for name, q in (res.get("limits") or {}).items():  # a limit alone is also the request
            res.setdefault("requests", {}).setdefault(name, q)
        for p in c.get("ports") or []:
            p.setdefault("protocol", "TCP")


def qos_class(pod: Obj) -> str:
    containers = pod["spec"].get("containers") or []
    res = [c.get("resources") or {} for c in containers]
    if all(not r.get("requests") and not r.get("limits") for r in res):
        return "BestEffort"
    for r in res:
        lim, req = r.get("limits") or {}, r.get("requests") or {}
        for name in ("cpu", "memory"):
            if name not in lim or parse_quantity(lim[name]) != parse_quantity(req.get(name, lim[name])):
                return "Burstable"
    return "Guaranteed"


def _default_pod(pod: Obj) -> None:
    spec = pod.setdefault("spec", {})
    default_pod_spec(spec)
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tolerations if isinstance(t, dict)):
            tolerations.append({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
    pod["status"] = {"phase": "Pending"}


def _default_secret(secret: Obj) -> None:
    secret.setdefault("type", "Opaque")
    string_data = secret.pop("stringData", None) or {}
    data = secret.setdefault("data", {}) if (string_data or "data" in secret) else None
    for k, v in string_data.items():
        data[k] = base64.b64encode(str(v).encode()).decode()  # type: ignore[index]


def _default_service(svc: Obj) -> None:
    spec = svc.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for p in spec.get("ports") or []:
        p.setdefault("protocol", "TCP")
        p.setdefault("targetPort", p.get("port"))
    svc["status"] = {"loadBalancer": {}}


def _default_job(job: Obj) -> None:
    spec = job.setdefault("spec", {})
    for k, v in (("parallelism", 1), ("completions", 1), ("backoffLimit", 6), ("completionMode", "NonIndexed"),
                 ("suspend", False)):
        spec.setdefault(k, v)
    template = spec.setdefault("template", {})
    template.setdefault("metadata", {})
    template_spec = template.setdefault("spec", {})
    restart = template_spec.get("restartPolicy")
    default_pod_spec(template_spec)
    if restart is None:
        template_spec.pop("restartPolicy")  # a Job's template must say Never or OnFailure itself
    if not spec.get("manualSelector"):
        uid, name = job["metadata"]["uid"], job["metadata"]["name"]
        if "selector" not in spec:
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        labels = template["metadata"].setdefault("labels", {})
        labels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                       "controller-uid": uid, "job-name": name})
    job["status"] = {}


def _default_cronjob(cj: Obj) -> None:
    spec = cj.setdefault("spec", {})
    for k, v in (("concurrencyPolicy", "Allow"), ("suspend", False), ("successfulJobsHistoryLimit", 3),
                 ("failedJobsHistoryLimit", 1)):
        spec.setdefault(k, v)
    tspec = spec.setdefault("jobTemplate", {}).setdefault("spec", {})
    for k, v in (("backoffLimit", 6), ("completionMode", "NonIndexed"), ("suspend", False)):
        tspec.setdefault(k, v)
    restart = tspec.setdefault("template", {}).setdefault("spec", {}).get("restartPolicy")
    default_pod_spec(tspec["template"]["spec"])
    if restart is None:
        tspec["template"]["spec"].pop("restartPolicy")
    cj["status"] = {}


_DEFAULTS: dict[str, Callable[[Obj], None]] = {
    "namespaces": _default_namespace, "pods": _default_pod, "secrets": _default_secret,
    "services": _default_service, "jobs": _default_job, "cronjobs": _default_cronjob,
}


# ---- validation ------------------------------------------------------------------------------

def validate(rt: ResourceType, obj: Obj, old: Obj | None = None) -> None:
    """Raise 422 Invalid listing every problem found, as the API server does."""
    causes: Causes = []
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    _validate_name(rt, name, causes)
    _validate_labels(meta.get("labels"), "metadata.labels", causes)
    for key in meta.get("annotations") or {}:
        _validate_label_key(key, "metadata.annotations", causes)
    fn = _VALIDATORS.get(rt.plural)
    if fn:
        fn(obj, causes)
    if old is not None and rt.plural == "pods":
        _validate_pod_update(obj, old, causes)
    if causes:
        raise ApiError.invalid(rt, name, causes)


def _validate_name(rt: ResourceType, name: str, causes: Causes) -> None:
    if not name:
        causes.append(_required("metadata.name", "name or generateName is required"))
    elif rt.plural in _LABEL_NAMESPACED:
        if len(name) > 63:
            causes.append(_invalid("metadata.name", name, "must be no more than 63 characters"))
        elif not DNS1123_LABEL.match(name):
            causes.append(_invalid("metadata.name", name, _LABEL_NAME_MSG))
    elif rt.plural != "events":  # events are named <object>.<hex>, any subdomain
        if len(name) > 253:
            causes.append(_invalid("metadata.name", name, "must be no more than 253 characters"))
        elif not DNS1123_SUBDOMAIN.match(name):
            causes.append(_invalid("metadata.name", name, _SUBDOMAIN_MSG))
    if rt.plural == "cronjobs" and len(name) > 52:
        causes.append(_invalid("metadata.name", name, "must be no more than 52 characters"))


def _validate_label_key(key: str, field: str, causes: Causes) -> None:
    prefix, _, base = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        causes.append(_invalid(field, key, "prefix part " + _SUBDOMAIN_MSG))
    if not base or len(base) > 63 or not LABEL_NAME.match(base):
        causes.append(_invalid(field, key, "name part must consist of alphanumeric characters, '-', '_' or '.', "
                               "and must start and end with an alphanumeric character (e.g. 'MyName',  or "
                               "'my.name',  or '123-abc', regex used for validation is "
                               "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') and must be no more than 63 characters"))


def _validate_labels(labels: Any, field: str, causes: Causes) -> None:
    for key, value in (labels or {}).items():
        _validate_label_key(key, field, causes)
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            msg = "must be no more than 63 characters" if isinstance(value, str) and len(value) > 63 else _LABEL_MSG
            causes.append(_invalid(field, value, msg))


def validate_pod_spec(spec: Obj, path: str, causes: Causes, job: bool = False) -> None:
    containers = spec.get("containers")
    if not containers:
        causes.append(_required(f"{path}.containers"))
    seen: set[str] = set()
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(kind) or []):
            _validate_container(c, f"{path}.{kind}[{i}]", seen, causes)
    policy = spec.get("restartPolicy")
    if job:
        if policy not in ("Never", "OnFailure"):
            causes.append(("spec.template.spec.restartPolicy", "FieldValueRequired" if policy is None else
                           "FieldValueNotSupported", 'Required value: valid values: "OnFailure", "Never"'
                           if policy is None else f'Unsupported value: "{policy}": supported values: '
                           '"OnFailure", "Never"'))
    elif policy not in ("Always", "OnFailure", "Never"):
        causes.append((f"{path}.restartPolicy", "FieldValueNotSupported", f'Unsupported value: "{policy}": '
                       'supported values: "Always", "OnFailure", "Never"'))
    _validate_labels(spec.get("nodeSelector"), f"{path}.nodeSelector", causes)


def _validate_container(c: Any, path: str, seen: set[str], causes: Causes) -> None:
    if not isinstance(c, dict):
        causes.append(_invalid(path, c, "must be an object"))
        return
    name = c.get("name")
    if not name:
        causes.append(_required(f"{path}.name"))
    elif not DNS1123_LABEL.match(name) or len(name) > 63:
        causes.append(_invalid(f"{path}.name", name, _LABEL_NAME_MSG))
    elif name in seen:
        causes.append((f"{path}.name", "FieldValueDuplicate", f'Duplicate value: "{name}"'))
    seen.add(name or "")
    if not c.get("image"):
        causes.append(_required(f"{path}.image"))
    for j, e in enumerate(c.get("env") or []):
        if not ENV_NAME.match(str(e.get("name", ""))):
            causes.append(_invalid(f"{path}.env[{j}].name", e.get("name", ""),
                                   "a valid environment variable name must consist of alphabetic characters, "
                                   "digits, '_', '-', or '.', and must not start with a digit (e.g. 'my.env-name', "
                                   " or 'MY_ENV.NAME',  or 'MyEnvName1', regex used for validation is "
                                   "'[-._a-zA-Z][-._a-zA-Z0-9]*')"))
    _validate_resources(c.get("resources") or {}, f"{path}.resources", causes)


def _validate_resources(res: Obj, path: str, causes: Causes) -> None:
    parsed: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    for kind in ("requests", "limits"):
        for name, q in (res.get(kind) or {}).items():
            try:
                parsed[kind][name] = parse_quantity(q)
            except ValueError:
                causes.append(_invalid(f"{path}.{kind}[{name}]", q, QUANTITY_HELP))
    for name, req in parsed["requests"].items():
        lim = parsed["limits"].get(name)
        if is_extended(name):
            if lim is None:
                causes.append(_required(f"{path}.limits", "Limit must be set for non overcommitable resources"))
            elif lim != req:
                causes.append(_invalid(f"{path}.requests", res["requests"][name],
                                       f"must be equal to {name} limit of {res['limits'][name]}"))
        elif lim is not None and req > lim:
            causes.append(_invalid(f"{path}.requests", res["requests"][name],
                                   f"must be less than or equal to {name} limit of {res['limits'][name]}"))


def _validate_pod(pod: Obj, causes: Causes) -> None:
    validate_pod_spec(pod.get("spec") or {}, "spec", causes)


def _validate_pod_update(pod: Obj, old: Obj, causes: Causes) -> None:
    """Only images, activeDeadlineSeconds and added tolerations may change in a pod's spec."""
    def mutable_stripped(spec: Obj) -> Obj:
        s = {k: v for k, v in spec.items() if k not in ("activeDeadlineSeconds", "tolerations")}
        s["containers"] = [{k: v for k, v in c.items() if k != "image"} for c in s.get("containers") or []]
        return s
    if mutable_stripped(pod.get("spec") or {}) != mutable_stripped(old.get("spec") or {}):
        causes.append(("spec", "FieldValueForbidden", "Forbidden: pod updates may not change fields other than "
                       "`spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
                       "`spec.tolerations` (only additions to existing tolerations),"
                       "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"))


def _validate_secret(secret: Obj, causes: Causes) -> None:
    for key, value in (secret.get("data") or {}).items():
        if not SECRET_KEY.match(key):
            causes.append(_invalid(f"data[{key}]", key, "a valid config key must consist of alphanumeric "
                                   "characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or "
                                   "'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"))
        try:
            base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError.bad_request("illegal base64 data in Secret data") from None


def _validate_job(job: Obj, causes: Causes) -> None:
    spec = job.get("spec") or {}
    validate_pod_spec((spec.get("template") or {}).get("spec") or {}, "spec.template.spec", causes, job=True)
    for k in ("parallelism", "completions", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if k in spec and spec[k] is not None and (not isinstance(spec[k], int) or spec[k] < (1 if k ==
                                                  "activeDeadlineSeconds" else 0)):
            causes.append(_invalid(f"spec.{k}", spec[k], "must be greater than or equal to 0"))
    uid = job["metadata"].get("uid")
    generated = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    if not spec.get("manualSelector") and spec.get("selector") != generated:
        causes.append(_invalid("spec.selector", spec.get("selector"), "`selector` not auto-generated"))
    name = job["metadata"].get("name", "")
    if len(name) > 63:
        causes.append(_invalid("spec.template.labels", name, "must be no more than 63 characters"))


def _validate_cronjob(cj: Obj, causes: Causes) -> None:
    spec = cj.get("spec") or {}
    schedule = spec.get("schedule")
    if not schedule:
        causes.append(_required("spec.schedule"))
    else:
        problem = cron_problem(str(schedule))
        if problem:
            causes.append(_invalid("spec.schedule", schedule, problem))
    if spec.get("concurrencyPolicy") not in ("Allow", "Forbid", "Replace"):
        causes.append(("spec.concurrencyPolicy", "FieldValueNotSupported", f'Unsupported value: '
                       f'"{spec.get("concurrencyPolicy")}": supported values: "Allow", "Forbid", "Replace"'))
    tspec = ((spec.get("jobTemplate") or {}).get("spec") or {})
    validate_pod_spec((tspec.get("template") or {}).get("spec") or {}, "spec.jobTemplate.spec.template.spec",
                      causes, job=True)


_VALIDATORS: dict[str, Callable[[Obj, Causes], None]] = {
    "pods": _validate_pod, "secrets": _validate_secret, "jobs": _validate_job, "cronjobs": _validate_cronjob,
}

_CRON_FIELDS = ((0, 59, {}), (0, 23, {}), (1, 31, {}),
                (1, 12, {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}),
                (0, 7, {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}))
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_problem(schedule: str) -> str | None:
    """What the CronJob validation (robfig/cron's standard parser) would say, or None."""
    if "TZ" in schedule:
        return "cannot use TZ or CRON_TZ in schedule, use timeZone field instead"
    if schedule.startswith("@"):
        return None if schedule in _CRON_MACROS or schedule.startswith("@every ") else \
            f"unrecognized descriptor: {schedule}"
    fields = schedule.split()
    if len(fields) != 5:
        return f"expected exactly 5 fields, found {len(fields)}: {schedule}"
    for text, (low, high, names) in zip(fields, _CRON_FIELDS):
        for part in text.split(","):
            rng, _, step = part.partition("/")
            if step and not step.isdigit():
                return f"failed to parse int from {step}: strconv.Atoi: parsing {step!r}: invalid syntax"
            if rng in ("*", "?"):
                continue
            for bound in rng.split("-", 1):
                value = names.get(bound.upper(), bound)
                if not str(value).isdigit():
                    return f"failed to parse int from {bound}: strconv.Atoi: parsing {bound!r}: invalid syntax"
                if not low <= int(value) <= high:
                    return f"end of range ({value}) above maximum ({high}): {part}" if int(value) > high else \
                        f"beginning of range ({value}) below minimum ({low}): {part}"
    return None
