"""The emulator's storage: objects in memory, one global resourceVersion, a bounded change history.

Every write takes the next resourceVersion (a counter, as etcd's revision) and is recorded as a
change. Watchers get changes pushed to their queue (no polling); in-process listeners (the kubelet
stand-in, the quota updater) are called synchronously in write order. A watch may resume from any
resourceVersion still in the history; older ones are "too old" (410 Expired), as after etcd compaction.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

Obj = dict[str, Any]
Listener = Callable[["Change"], None]


@dataclass(frozen=True)
class ResourceType:
    plural: str
    kind: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True
    status_subresource: bool = False
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``pods``, ``jobs.batch``: how the API server names the resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """``Pod``, ``Job.batch``: how validation messages name the kind."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


RESOURCES: dict[str, ResourceType] = {rt.plural: rt for rt in (
    ResourceType("namespaces", "Namespace", namespaced=False, status_subresource=True, short_names=("ns",)),
    ResourceType("nodes", "Node", namespaced=False, status_subresource=True, short_names=("no",)),
    ResourceType("pods", "Pod", status_subresource=True, short_names=("po",)),
    ResourceType("secrets", "Secret"),
    ResourceType("configmaps", "ConfigMap", short_names=("cm",)),
    ResourceType("events", "Event", short_names=("ev",)),
    ResourceType("resourcequotas", "ResourceQuota", status_subresource=True, short_names=("quota",)),
    ResourceType("limitranges", "LimitRange", short_names=("limits",)),
    ResourceType("services", "Service", status_subresource=True, short_names=("svc",)),
    ResourceType("serviceaccounts", "ServiceAccount", short_names=("sa",)),
    ResourceType("persistentvolumeclaims", "PersistentVolumeClaim", status_subresource=True, short_names=("pvc",)),
    ResourceType("jobs", "Job", group="batch", status_subresource=True),
    ResourceType("cronjobs", "CronJob", group="batch", status_subresource=True, short_names=("cj",)),
)}


def now() -> str:
    """RFC 3339 with seconds, as metadata.creationTimestamp is written."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def later(seconds: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)


class ApiError(Exception):
    """An API failure, carried to the client as a real ``Status`` object with its HTTP code."""

    REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
               409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
               429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}

    def __init__(self, code: int, message: str, reason: Optional[str] = None,
                 details: Optional[dict[str, Any]] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.reason = reason or self.REASONS.get(code, "Unknown")
        self.details, self.headers = details, headers or {}

    def status(self) -> Obj:
        s: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            s["details"] = self.details
        return s

    @staticmethod
    def _details(rt: ResourceType | str, name: str, group: str = "") -> tuple[str, Obj]:
        plural = rt.plural if isinstance(rt, ResourceType) else rt
        group = rt.group if isinstance(rt, ResourceType) else group
        details: Obj = {"name": name, "kind": plural}
        if group:
            details["group"] = group
        return (f"{plural}.{group}" if group else plural), details

    @classmethod
    def not_found(cls, rt: ResourceType | str, name: str) -> "ApiError":
        q, d = cls._details(rt, name)
        return cls(404, f'{q} "{name}" not found', details=d)

    @classmethod
    def already_exists(cls, rt: ResourceType, name: str) -> "ApiError":
        q, d = cls._details(rt, name)
        return cls(409, f'{q} "{name}" already exists', reason="AlreadyExists", details=d)

    @classmethod
    def conflict(cls, rt: ResourceType, name: str, why: str = "the object has been modified; please apply "
                 "your changes to the latest version and try again") -> "ApiError":
        q, d = cls._details(rt, name)
        return cls(409, f'Operation cannot be fulfilled on {q} "{name}": {why}', details=d)

    @classmethod
    def forbidden(cls, rt: ResourceType | str, name: str, why: str, group: str = "") -> "ApiError":
        q, d = cls._details(rt, name, group)
        return cls(403, f'{q} "{name}" is forbidden: {why}', details=d)

    @classmethod
    def invalid(cls, rt: ResourceType, name: str, causes: list[tuple[str, str, str]]) -> "ApiError":
        """causes: (field, reason such as FieldValueRequired, message such as 'Required value')."""
        parts = [f"{field}: {msg}" for field, _, msg in causes]
        text = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
        details: Obj = {"name": name, "kind": rt.kind,
                        "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes]}
        if rt.group:
            details["group"] = rt.group
        return cls(422, f'{rt.qualified_kind} "{name}" is invalid: {text}', details=details)

    @classmethod
    def bad_request(cls, message: str) -> "ApiError":
        return cls(400, message)


@dataclass(frozen=True)
class Change:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    resource: str
    namespace: str
    obj: Obj
    old: Optional[Obj]


CLOSE, ABORT = "close", "abort"


class Watcher:
    """One open watch: changes that pass its selectors, translated as the API server's cacher does
    (an object that stops matching is DELETED for this watcher, one that starts matching ADDED)."""

    def __init__(self, resource: str, namespace: Optional[str], match: Callable[[Obj], bool]) -> None:
        self.resource, self.namespace, self.match = resource, namespace, match
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def wants(self, change: Change) -> bool:
        return change.resource == self.resource and self.namespace in (None, change.namespace)

    def translate(self, change: Change) -> Optional[tuple[str, Obj]]:
        new = self.match(change.obj)
        if change.type == "MODIFIED":
            old = change.old is not None and self.match(change.old)
            if new and old:
                return "MODIFIED", change.obj
            if new:
                return "ADDED", change.obj
            return ("DELETED", change.obj) if old else None
        return (change.type, change.obj) if new else None

    def offer(self, change: Change) -> None:
        if self.wants(change):
            event = self.translate(change)
            if event:
                self.queue.put_nowait(event)

    def close(self, abrupt: bool = False) -> None:
        self.queue.put_nowait(ABORT if abrupt else CLOSE)


class Store:
    def __init__(self, history: int = 1000) -> None:
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {r: {} for r in RESOURCES}
        self._rv = 1
        self._history: deque[Change] = deque()
        self._history_limit = history
        self.floor = 0  # changes with rv <= floor are forgotten
        self.watchers: set[Watcher] = set()
        self._listeners: list[Listener] = []

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    # ---- reads (copies: nobody outside mutates the store's objects) ------------------------

    def get(self, resource: str, namespace: str, name: str) -> Optional[Obj]:
        obj = self._objects[resource].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def exists(self, resource: str, namespace: str, name: str) -> bool:
        return (namespace, name) in self._objects[resource]

    def list(self, resource: str, namespace: Optional[str] = None) -> list[Obj]:
        items = [o for (ns, _), o in self._objects[resource].items() if namespace is None or ns == namespace]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return copy.deepcopy(items)

    def count(self, resource: str, namespace: Optional[str] = None) -> int:
        return sum(1 for ns, _ in self._objects[resource] if namespace is None or ns == namespace)

    # ---- writes ----------------------------------------------------------------------------

    def _commit(self, kind: str, resource: str, obj: Obj, old: Optional[Obj]) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        ns, name = obj["metadata"].get("namespace", ""), obj["metadata"]["name"]
        if kind == "DELETED":
            self._objects[resource].pop((ns, name), None)
        else:
            self._objects[resource][(ns, name)] = obj
        change = Change(self._rv, kind, resource, ns, copy.deepcopy(obj), old)
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self.floor = self._history.popleft().rv
        for w in list(self.watchers):
            w.offer(change)
        for listener in list(self._listeners):
            listener(change)
        return copy.deepcopy(obj)

    def add(self, resource: str, obj: Obj) -> Obj:
        return self._commit("ADDED", resource, copy.deepcopy(obj), None)

    def replace(self, resource: str, obj: Obj) -> Obj:
        ns, name = obj["metadata"].get("namespace", ""), obj["metadata"]["name"]
        old = copy.deepcopy(self._objects[resource][(ns, name)])
        return self._commit("MODIFIED", resource, copy.deepcopy(obj), old)

    def remove(self, resource: str, namespace: str, name: str) -> Optional[Obj]:
        obj = self._objects[resource].get((namespace, name))
        if obj is None:
            return None
        return self._commit("DELETED", resource, copy.deepcopy(obj), copy.deepcopy(obj))

    def mutate(self, resource: str, namespace: str, name: str, fn: Callable[[Obj], Any]) -> Optional[Obj]:
        """Apply ``fn`` to a copy and write it back if it changed (no-op writes keep the version)."""
        obj = self.get(resource, namespace, name)
        if obj is None:
            return None
        before = copy.deepcopy(obj)
        fn(obj)
        return self.replace(resource, obj) if obj != before else obj

    # ---- watch -----------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def open_watch(self, resource: str, namespace: Optional[str], match: Callable[[Obj], bool],
                   since: Optional[str]) -> Watcher:
        """Register a watcher and queue what it must see first, atomically (no await in between, so
        nothing is missed or doubled). ``since`` empty or "0": synthetic ADDED for what exists now;
        a number: every change after it, or ApiError 410 when the history no longer reaches back."""
        watcher = Watcher(resource, namespace, match)
        if since in (None, "", "0"):
            for obj in sorted(self.list(resource, namespace), key=lambda o: int(o["metadata"]["resourceVersion"])):
                if match(obj):
                    watcher.queue.put_nowait(("ADDED", obj))
        else:
            try:
                start = int(str(since))
            except ValueError:
                raise ApiError.bad_request(f"resourceVersion: Invalid value: {since!r}: must be an integer") from None
            if start < self.floor:
                raise ApiError(410, f"too old resource version: {start} ({self.floor + 1})", reason="Expired")
            for change in self._history:
                if change.rv > start:
                    watcher.offer(change)
        self.watchers.add(watcher)
        return watcher

    def close_watch(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def compact(self) -> int:
        """Forget the whole history, as etcd compaction does: resuming from before now gives 410."""
        self._history.clear()
        self.floor = self._rv
        return self._rv

    def namespaced_objects(self, namespace: str) -> Iterable[tuple[str, Obj]]:
        for resource, objs in self._objects.items():
            for (ns, _), obj in list(objs.items()):
                if ns == namespace and ns:
                    yield resource, copy.deepcopy(obj)
