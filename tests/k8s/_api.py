"""The API server's verbs over the store: create, get, list, update, patch, delete, with defaulting,
validation, admission (LimitRanger, ResourceQuota, NamespaceLifecycle), finalizers, owner-reference
garbage collection and graceful pod deletion. The HTTP layer (emulator.py) and the in-process
controllers (kubelet.py) both go through here, as the real kubelet and controllers go through the API.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import uuid
from typing import Any, Optional

from . import _validation
from ._admission import apply_limit_ranges, check_quota, is_terminal_pod, namespace_usage, quota_status
from ._selectors import parse_field_selector, parse_label_selector
from ._store import RESOURCES, ApiError, Obj, ResourceType, Store, later, now

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what the API server's generateName suffix uses
_RETURNS_OBJECT = {"pods", "services"}  # the others answer a deleted object with a Status
_QUOTA_COUNTED = {"pods", "secrets", "configmaps", "services", "persistentvolumeclaims", "resourcequotas",
                  "jobs", "cronjobs"}


def random_suffix(n: int = 5) -> str:
    return "".join(random.choice(_NAME_CHARS) for _ in range(n))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge patch: lists are replaced whole)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):  # strategic-merge directives ($patch, $setElementOrder...) are ignored
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(ops, list):
        raise ApiError.bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(doc)

    def walk(path: str) -> tuple[Any, Any]:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
        parent: Any = doc
        for t in tokens[:-1]:
            parent = parent[int(t)] if isinstance(parent, list) else parent[t]
        last: Any = tokens[-1] if tokens else ""
        if isinstance(parent, list) and last != "-":
            last = int(last)
        return parent, last

    try:
        for op in ops:
            kind, path = op["op"], op["path"]
            if kind in ("move", "copy"):
                src, key = walk(op["from"])
                value = src[key] if kind == "copy" else src.pop(key)
                op = {"op": "add", "path": path, "value": copy.deepcopy(value)}
                kind = "add"
            parent, key = walk(path)
            if kind == "add":
                if isinstance(parent, list):
                    parent.insert(len(parent) if key == "-" else key, op["value"])
                else:
                    parent[key] = op["value"]
            elif kind == "remove":
                del parent[key]
            elif kind == "replace":
                parent[key]  # noqa: B018 - must exist
                parent[key] = op["value"]
            elif kind == "test":
                if parent[key] != op["value"]:
                    raise ApiError(422, f"testing value {path} failed")
            else:
                raise ApiError.bad_request(f"Unexpected kind: {kind}")
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ApiError(422, f"the server rejected our request due to an error in our request: {e!r}") from None
    return doc


class Api:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.kubelet_attached = False  # set by the kubelet: it then finishes graceful pod deletions
        self._quota_dirty: set[str] = set()
        store.subscribe(self._on_change)

    # ---- reads ---------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        obj = self.store.get(rt.plural, namespace, name)
        if obj is None:
            raise ApiError.not_found(rt, name)
        return obj

    def list(self, rt: ResourceType, namespace: Optional[str], label_selector: str | None = None,
             field_selector: str | None = None) -> list[Obj]:
        labels, fields = parse_label_selector(label_selector), parse_field_selector(field_selector, rt.plural)
        return [o for o in self.store.list(rt.plural, namespace) if labels(o) and fields(o)]

    # ---- create --------------------------------------------------------------------------

    def create(self, rt: ResourceType, namespace: str, body: Any, dry_run: bool = False) -> Obj:
        obj = self._check_body(rt, namespace, body)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            for _ in range(10):
                meta["name"] = meta["generateName"] + random_suffix()
                if not self.store.exists(rt.plural, namespace, meta["name"]):
                    break
        name = meta.get("name", "")
        if rt.namespaced:
            self._check_namespace(rt, namespace, name)
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            meta.pop(k, None)
        if rt.plural in ("jobs", "cronjobs"):
            meta["generation"] = 1
        _validation.default(rt, obj)
        if rt.plural == "pods":
            apply_limit_ranges(obj, self.store.list("limitranges", namespace))
            obj["status"]["qosClass"] = _validation.qos_class(obj)
        _validation.validate(rt, obj)
        if rt.namespaced and rt.plural in _QUOTA_COUNTED:
            check_quota(rt.plural, rt.group, obj, self.store.list("resourcequotas", namespace),
                        lambda q: self._usage(namespace, q))
        if self.store.exists(rt.plural, namespace if rt.namespaced else "", name):
            raise ApiError.already_exists(rt, name)
        if rt.plural == "services" and obj["spec"].get("clusterIP") in (None, ""):
            obj["spec"]["clusterIP"] = f"10.96.{random.randint(1, 254)}.{random.randint(1, 254)}"
            obj["spec"]["clusterIPs"] = [obj["spec"]["clusterIP"]]
        if dry_run:
            return obj
        return self.store.add(rt.plural, obj)

    def _check_body(self, rt: ResourceType, namespace: str, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise ApiError.bad_request(f"the body of the request was in an unknown format: expected a {rt.kind}")
        obj = copy.deepcopy(body)
        if obj.setdefault("apiVersion", rt.api_version) != rt.api_version or obj.setdefault("kind", rt.kind) != rt.kind:
            raise ApiError.bad_request(f"the API version in the data ({obj['apiVersion']}) does not match the "
                                       f"expected API version ({rt.api_version})" if obj["apiVersion"] !=
                                       rt.api_version else f"the kind in the data ({obj['kind']}) does not match "
                                       f"the expected kind ({rt.kind})")
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError.bad_request("metadata must be an object")
        if rt.namespaced and meta.get("namespace") not in (None, "", namespace):
            raise ApiError.bad_request("the namespace of the provided object does not match the namespace sent on "
                                       "the request")
        return obj

    def _check_namespace(self, rt: ResourceType, namespace: str, name: str) -> None:
        ns = self.store.get("namespaces", "", namespace)
        if ns is None:
            raise ApiError.not_found("namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError.forbidden(rt, name, f"unable to create new content in namespace {namespace} because "
                                     "it is being terminated")

    def _usage(self, namespace: str, quota: Obj) -> dict[str, Any]:
        objs = {r: self.store.list(r, namespace) for r in _QUOTA_COUNTED}
        return namespace_usage(objs, quota)

    # ---- update / patch ------------------------------------------------------------------

    def update(self, rt: ResourceType, namespace: str, name: str, body: Any, subresource: str = "") -> Obj:
        old = self.get(rt, namespace, name)
        if not isinstance(body, dict):
            raise ApiError.bad_request("the body of the request was in an unknown format")
        meta = body.get("metadata") or {}
        if meta.get("name", name) != name:
            raise ApiError.bad_request(f"the name of the object ({meta.get('name')}) does not match the name on "
                                       f"the URL ({name})")
        if meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise ApiError.conflict(rt, name)
        if subresource == "status":
            new = copy.deepcopy(old)
            new["status"] = copy.deepcopy(body.get("status", {}))
        else:
            new = copy.deepcopy(body)
            new.setdefault("metadata", {})
            new["apiVersion"], new["kind"] = rt.api_version, rt.kind
            for k in ("uid", "creationTimestamp", "namespace", "deletionTimestamp", "deletionGracePeriodSeconds",
                      "generation"):
                if k in old["metadata"]:
                    new["metadata"][k] = old["metadata"][k]
                else:
                    new["metadata"].pop(k, None)
            new["metadata"]["name"] = name
            if rt.status_subresource:
                new["status"] = copy.deepcopy(old.get("status", {}))
            if rt.plural == "secrets":
                _validation.default(rt, new)
            if old.get("immutable") and ({k: new.get(k) for k in ("data", "stringData", "binaryData")} !=
                                         {k: old.get(k) for k in ("data", "stringData", "binaryData")}):
                raise ApiError.invalid(rt, name, [("data", "FieldValueForbidden",
                                                   "Forbidden: field is immutable when `immutable` is set")])
            if new.get("spec") != old.get("spec") and "generation" in old["metadata"]:
                new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        _validation.validate(rt, new, old=old)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old
        stored = self.store.replace(rt.plural, new)
        if stored["metadata"].get("deletionTimestamp") and not stored["metadata"].get("finalizers"):
            if rt.plural != "pods" or not self.kubelet_attached or not stored["spec"].get("nodeName"):
                self.remove_now(rt, namespace, name)
        return stored

    def patch(self, rt: ResourceType, namespace: str, name: str, patch: Any, content_type: str,
              subresource: str = "") -> Obj:
        old = self.get(rt, namespace, name)
        kind = content_type.split(";")[0].strip().lower()
        if kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(patch, dict):
                raise ApiError.bad_request("the body of the request was in an unknown format: expected an object")
            new = merge_patch(old, patch)
        elif kind == "application/json-patch+json":
            new = json_patch(old, patch)
        else:
            raise ApiError(415, f"the body of the request was in an unknown format - accepted media types include: "
                           f"application/json-patch+json, application/merge-patch+json, "
                           f"application/strategic-merge-patch+json (got {kind})")
        new.setdefault("metadata", {})
        patched_rv = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
        new["metadata"]["resourceVersion"] = patched_rv or old["metadata"]["resourceVersion"]
        if subresource != "status" and rt.status_subresource:
            new["status"] = old.get("status", {})
        return self.update(rt, namespace, name, new, subresource)

    # ---- delete --------------------------------------------------------------------------

    def delete(self, rt: ResourceType, namespace: str, name: str, options: Optional[Obj] = None) -> Obj:
        options = options or {}
        obj = self.get(rt, namespace, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
            raise ApiError.conflict(rt, name, f"Precondition failed: UID in precondition: {pre['uid']}, UID in "
                                    f"object meta: {obj['metadata']['uid']}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise ApiError.conflict(rt, name, "Precondition failed: ResourceVersion in precondition: "
                                    f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                                    f"{obj['metadata']['resourceVersion']}")
        propagation = options.get("propagationPolicy") or (
            "Orphan" if options.get("orphanDependents") else
            "Orphan" if rt.plural == "jobs" else "Background")  # batch/v1 Jobs orphan their pods by default
        if rt.plural == "namespaces":
            return self._delete_namespace(name)
        if rt.plural == "pods":
            grace = options.get("gracePeriodSeconds")
            if grace is None:
                grace = obj["spec"].get("terminationGracePeriodSeconds", 30)
            if self.kubelet_attached and obj["spec"].get("nodeName") and not is_terminal_pod(obj):
                return self._delete_pod_gracefully(obj, int(grace))
        if obj["metadata"].get("finalizers") or propagation == "Foreground":
            def mark(o: Obj) -> None:
                o["metadata"].setdefault("deletionTimestamp", now())
                o["metadata"].setdefault("deletionGracePeriodSeconds", 0)
                if propagation == "Foreground" and "foregroundDeletion" not in o["metadata"].get("finalizers", []):
                    o["metadata"].setdefault("finalizers", []).append("foregroundDeletion")
            marked = self.store.mutate(rt.plural, namespace, name, mark)
            if propagation == "Foreground":
                self._collect_dependents(obj, "Background")
                self._finish_foreground(rt, namespace, name)
            return self.store.get(rt.plural, namespace, name) or marked or obj
        gone = self.remove_now(rt, namespace, name, propagation)
        if rt.plural in _RETURNS_OBJECT:
            return gone or obj
        details = {"name": name, "kind": rt.plural, "uid": obj["metadata"]["uid"]}
        if rt.group:
            details["group"] = rt.group
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def _delete_pod_gracefully(self, pod: Obj, grace: int) -> Obj:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and meta.get("deletionGracePeriodSeconds", 0) <= grace:
            return pod

        def mark(p: Obj) -> None:
            p["metadata"]["deletionTimestamp"] = later(grace)
            p["metadata"]["deletionGracePeriodSeconds"] = grace
        return self.store.mutate("pods", meta["namespace"], meta["name"], mark) or pod

    def _delete_namespace(self, name: str) -> Obj:
        def mark(ns: Obj) -> None:
            ns["metadata"].setdefault("deletionTimestamp", now())
            ns["status"] = {"phase": "Terminating"}
        obj = self.store.mutate("namespaces", "", name, mark)
        for resource, child in list(self.store.namespaced_objects(name)):
            try:
                self.delete(RESOURCES[resource], name, child["metadata"]["name"], {"propagationPolicy": "Background"})
            except ApiError:
                pass
        self._maybe_finalize_namespace(name)
        return self.store.get("namespaces", "", name) or obj or {}

    def remove_now(self, rt: ResourceType, namespace: str, name: str, propagation: str = "Background") -> Optional[Obj]:
        """Take the object out of storage, then garbage-collect (or orphan) what it owns."""
        gone = self.store.remove(rt.plural, namespace, name)
        if gone is None:
            return None
        self._collect_dependents(gone, propagation)
        for ref in gone["metadata"].get("ownerReferences") or []:
            owner_rt = next((r for r in RESOURCES.values() if r.kind == ref.get("kind")), None)
            if owner_rt:
                self._finish_foreground(owner_rt, namespace, ref["name"])
        if namespace:
            self._maybe_finalize_namespace(namespace)
        return gone

    def _dependents(self, owner: Obj) -> list[tuple[str, Obj]]:
        uid, ns = owner["metadata"]["uid"], owner["metadata"].get("namespace", "")
        if not ns:
            return []
        return [(r, o) for r, o in self.store.namespaced_objects(ns)
                if any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or [])]

    def _collect_dependents(self, owner: Obj, propagation: str) -> None:
        uid = owner["metadata"]["uid"]
        for resource, dep in self._dependents(owner):
            dep_ns, dep_name = dep["metadata"]["namespace"], dep["metadata"]["name"]
            if propagation == "Orphan":
                def strip(o: Obj) -> None:
                    refs = [r for r in o["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
                    if refs:
                        o["metadata"]["ownerReferences"] = refs
                    else:
                        o["metadata"].pop("ownerReferences", None)
                self.store.mutate(resource, dep_ns, dep_name, strip)
            else:
                try:
                    self.delete(RESOURCES[resource], dep_ns, dep_name, {"propagationPolicy": "Background"})
                except ApiError:
                    pass

    def _finish_foreground(self, rt: ResourceType, namespace: str, name: str) -> None:
        owner = self.store.get(rt.plural, namespace, name)
        if not owner or "foregroundDeletion" not in owner["metadata"].get("finalizers", []):
            return
        if self._dependents(owner):
            return
        finalizers = [f for f in owner["metadata"]["finalizers"] if f != "foregroundDeletion"]
        if finalizers:
            self.store.mutate(rt.plural, namespace, name, lambda o: o["metadata"].__setitem__("finalizers", finalizers))
        else:
            self.remove_now(rt, namespace, name)

    def _maybe_finalize_namespace(self, namespace: str) -> None:
        ns = self.store.get("namespaces", "", namespace)
        if ns and ns["metadata"].get("deletionTimestamp") and not any(True for _ in self.store.namespaced_objects(namespace)):
            self.store.remove("namespaces", "", namespace)

    def pod_gone(self, namespace: str, name: str) -> None:
        """Called by the kubelet once a deleted pod's containers stopped: the object goes."""
        pod = self.store.get("pods", namespace, name)
        if pod and pod["metadata"].get("deletionTimestamp") and not pod["metadata"].get("finalizers"):
            self.remove_now(RESOURCES["pods"], namespace, name)

    # ---- the quota controller: keeps status.used current, soon after each change -----------

    def _on_change(self, change: Any) -> None:
        if change.namespace and (change.resource in _QUOTA_COUNTED) and change.resource != "events":
            if not self._quota_dirty:
                asyncio.get_running_loop().call_soon(self._update_quotas)
            self._quota_dirty.add(change.namespace)

    def _update_quotas(self) -> None:
        dirty, self._quota_dirty = self._quota_dirty, set()
        for namespace in dirty:
            for quota in self.store.list("resourcequotas", namespace):
                status = quota_status(quota, self._usage(namespace, quota))
                self.store.mutate("resourcequotas", namespace, quota["metadata"]["name"],
                                  lambda q, s=status: q.__setitem__("status", s))


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
