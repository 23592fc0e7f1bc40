"""The Job and CronJob controllers of the kubelet stand-in, driven by the same change queue.

Jobs: pods from the template (``<job>-xxxxx``, labels job-name/controller-uid, an owner reference),
a new pod per failure until ``backoffLimit``, ``activeDeadlineSeconds``, ``ttlSecondsAfterFinished``,
``suspend``, status counters and Complete/Failed conditions. Not emulated: Indexed completion mode,
podFailurePolicy, successPolicy, the retry back-off delay (a failed pod is replaced at once), pod
tracking finalizers. CronJobs have no clock: ``trigger()`` runs the schedule once.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from typing import TYPE_CHECKING, Any, Optional

from ._admission import is_terminal_pod
from ._pods import set_condition
from ._store import RESOURCES, ApiError, Change, Obj, now, parse_time

if TYPE_CHECKING:
    from .kubelet import Kubelet


def _finished(job: Obj) -> Optional[str]:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return cond["type"]
    return None


def _owner_ref(obj: Obj) -> Obj:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _controller_of(obj: Obj, kind: str) -> Optional[Obj]:
    return next((r for r in obj["metadata"].get("ownerReferences") or []
                 if r.get("kind") == kind and r.get("controller")), None)


class JobController:
    def __init__(self, kubelet: "Kubelet") -> None:
        self.k = kubelet
        self._counted: dict[str, set[str]] = {}  # job uid -> pod uids already in its counters
        self._lost: dict[str, int] = {}  # job uid -> pods deleted before they finished
        self._expired: set[str] = set()
        self._started: dict[str, float] = {}  # job uid -> loop.time() when this controller started it
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _later(self, key: tuple[str, str], seconds: float, fn: Any) -> None:
        if key not in self._timers:
            self._timers[key] = asyncio.get_running_loop().call_later(seconds, lambda: self.k.enqueue(fn))

    def on_job(self, change: Change) -> None:
        meta = change.obj["metadata"]
        if change.type == "DELETED":
            for key in [k for k in self._timers if k[0] == meta["uid"]]:
                self._timers.pop(key).cancel()
            return
        self.sync(meta["namespace"], meta["name"])

    def on_pod(self, change: Change) -> None:
        ref = _controller_of(change.obj, "Job")
        if ref is None:
            return
        pod = change.obj
        if change.type == "DELETED" and not is_terminal_pod(pod):
            counted = self._counted.setdefault(ref["uid"], set())
            if pod["metadata"]["uid"] not in counted:
                counted.add(pod["metadata"]["uid"])
                self._lost[ref["uid"]] = self._lost.get(ref["uid"], 0) + 1
        self.sync(pod["metadata"]["namespace"], ref["name"])

    def resync_namespace(self, namespace: str) -> None:
        """Resources were freed: unfinished Jobs that could not create pods (quota) try again."""
        for job in self.k.store.list("jobs", namespace):
            self.sync(namespace, job["metadata"]["name"])

    def sync(self, namespace: str, name: str) -> None:
        job = self.k.store.get("jobs", namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        uid, spec = job["metadata"]["uid"], job["spec"]
        status = copy.deepcopy(job.get("status") or {})
        if _finished(job):
            self._schedule_ttl(job)
            return
        pods = [p for p in self.k.store.list("pods", namespace)
                if any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences") or [])]
        counted = self._counted.setdefault(uid, set())
        for p in pods:
            phase = p["status"].get("phase")
            if p["metadata"]["uid"] not in counted and phase in ("Succeeded", "Failed"):
                counted.add(p["metadata"]["uid"])
                key = "succeeded" if phase == "Succeeded" else "failed"
                status[key] = status.get(key, 0) + 1
        if self._lost.pop(uid, 0):
            status["failed"] = status.get("failed", 0) + 1
        active = [p for p in pods if not is_terminal_pod(p) and not p["metadata"].get("deletionTimestamp")]
        restarts = sum(c.get("restartCount", 0) for p in active for c in p["status"].get("containerStatuses") or [])
        conds = status.setdefault("conditions", [])
        if spec.get("suspend"):
            self._delete_pods(active)
            set_condition(conds, "Suspended", True, "JobSuspended", "Job suspended")
            active = []
        else:
            if any(c["type"] == "Suspended" for c in conds):
                set_condition(conds, "Suspended", False, "JobResumed", "Job resumed")
            loop = asyncio.get_running_loop()
            if "startTime" not in status:
                status["startTime"] = now()
                self._started[uid] = loop.time()  # startTime has whole seconds: too coarse for a deadline
            if spec.get("activeDeadlineSeconds"):
                started = self._started.get(uid)
                elapsed = loop.time() - started if started is not None else (
                    dt.datetime.now(dt.timezone.utc) - parse_time(status["startTime"])).total_seconds()
                self._later((uid, "deadline"), max(0.0, spec["activeDeadlineSeconds"] - elapsed),
                            lambda: self._expire(uid, namespace, name))
            if uid in self._expired:
                active = self._fail(job, active, conds, "DeadlineExceeded", "Job was active longer than specified deadline")
            elif status.get("failed", 0) + restarts > spec.get("backoffLimit", 6):
                active = self._fail(job, active, conds, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            elif status.get("succeeded", 0) >= spec.get("completions", 1):
                set_condition(conds, "Complete", True)
                status["completionTime"] = now()
                self.k.record(job, "Normal", "Completed", "Job completed", component="job-controller")
            else:
                want = min(spec.get("parallelism", 1), spec.get("completions", 1) - status.get("succeeded", 0))
                for _ in range(want - len(active)):
                    pod = self._create_pod(job)
                    if pod is None:
                        break
                    active.append(pod)
        status["active"] = len(active)
        status["ready"] = sum(1 for p in active if any(c["type"] == "Ready" and c["status"] == "True"
                                                       for c in p["status"].get("conditions") or []))
        status["terminating"] = sum(1 for p in pods if p["metadata"].get("deletionTimestamp")
                                    and not is_terminal_pod(p))
        status.setdefault("uncountedTerminatedPods", {})
        if not conds:
            del status["conditions"]
        if status != job.get("status"):
            self.k.store.mutate("jobs", namespace, name, lambda j: j.__setitem__("status", status))

    def _expire(self, uid: str, namespace: str, name: str) -> None:
        self._expired.add(uid)
        self.sync(namespace, name)

    def _fail(self, job: Obj, active: list[Obj], conds: list[Obj], reason: str, message: str) -> list[Obj]:
        self._delete_pods(active)
        set_condition(conds, "Failed", True, reason, message)
        self.k.record(job, "Warning", reason, message, component="job-controller")
        return []

    def _delete_pods(self, pods: list[Obj]) -> None:
        for p in pods:
            try:
                self.k.api.delete(RESOURCES["pods"], p["metadata"]["namespace"], p["metadata"]["name"])
            except ApiError:
                pass

    def _create_pod(self, job: Obj) -> Optional[Obj]:
        template = copy.deepcopy(job["spec"].get("template") or {})
        tmeta = template.get("metadata") or {}
        name = job["metadata"]["name"]
        pod = {"metadata": {"generateName": f"{name}-", "labels": tmeta.get("labels") or {},
                            "annotations": tmeta.get("annotations") or {},
                            "ownerReferences": [_owner_ref(job)]},
               "spec": template.get("spec") or {}}
        if not pod["metadata"]["annotations"]:
            del pod["metadata"]["annotations"]
        try:
            created = self.k.api.create(RESOURCES["pods"], job["metadata"]["namespace"], pod)
        except ApiError as e:
            self.k.record(job, "Warning", "FailedCreate", f"Error creating: {e.message}", component="job-controller")
            return None
        self.k.record(job, "Normal", "SuccessfulCreate", f"Created pod: {created['metadata']['name']}",
                      component="job-controller")
        return created

    def _schedule_ttl(self, job: Obj) -> None:
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        meta = job["metadata"]

        def expire() -> None:
            try:
                self.k.api.delete(RESOURCES["jobs"], meta["namespace"], meta["name"],
                                  {"propagationPolicy": "Foreground", "preconditions": {"uid": meta["uid"]}})
            except ApiError:
                pass
        self._later((meta["uid"], "ttl"), ttl, expire)


class CronJobController:
    def __init__(self, kubelet: "Kubelet") -> None:
        self.k = kubelet

    def trigger(self, namespace: str, name: str) -> Optional[str]:
        cj = self.k.store.get("cronjobs", namespace, name)
        if cj is None:
            raise LookupError(f"cronjob {namespace}/{name} not found")
        spec, status = cj["spec"], cj.get("status") or {}
        if spec.get("suspend"):
            return None
        active = [ref for ref in status.get("active") or [] if self._unfinished(namespace, ref["name"])]
        policy = spec.get("concurrencyPolicy", "Allow")
        if active and policy == "Forbid":
            self.k.record(cj, "Normal", "JobAlreadyActive", "Not starting job because prior execution is running "
                          "and concurrency policy is Forbid", component="cronjob-controller")
            return None
        if active and policy == "Replace":
            for ref in active:
                with _ignore():
                    self.k.api.delete(RESOURCES["jobs"], namespace, ref["name"], {"propagationPolicy": "Background"})
                self.k.record(cj, "Normal", "SuccessfulDelete", f"Deleted job {ref['name']}",
                              component="cronjob-controller")
            active = []
        # No clock: each trigger is the next whole minute after the last one (names stay unique).
        last = status.get("lastScheduleTime")
        t = dt.datetime.now(dt.timezone.utc).replace(second=0, microsecond=0)
        if last and parse_time(last) >= t:
            t = parse_time(last) + dt.timedelta(minutes=1)
        stamp = t.strftime("%Y-%m-%dT%H:%M:%SZ")
        template = copy.deepcopy(spec.get("jobTemplate") or {})
        tmeta = template.get("metadata") or {}
        job_name = f"{name}-{int(t.timestamp() // 60)}"
        job = {"metadata": {"name": job_name, "labels": tmeta.get("labels") or {},
                            "annotations": {**(tmeta.get("annotations") or {}),
                                            "batch.kubernetes.io/cronjob-scheduled-timestamp": stamp},
                            "ownerReferences": [_owner_ref(cj)]},
               "spec": template.get("spec") or {}}
        try:
            created = self.k.api.create(RESOURCES["jobs"], namespace, job)
        except ApiError as e:
            self.k.record(cj, "Warning", "FailedCreate", f"Error creating job: {e.message}",
                          component="cronjob-controller")
            return None
        self.k.record(cj, "Normal", "SuccessfulCreate", f"Created job {job_name}", component="cronjob-controller")
        ref = {"kind": "Job", "namespace": namespace, "name": job_name, "uid": created["metadata"]["uid"],
               "apiVersion": "batch/v1", "resourceVersion": created["metadata"]["resourceVersion"]}

        def update(c: Obj) -> None:
            st = c.setdefault("status", {})
            st["active"] = [r for r in st.get("active") or [] if r["name"] in {a["name"] for a in active}] + [ref]
            st["lastScheduleTime"] = stamp
        self.k.store.mutate("cronjobs", namespace, name, update)
        return job_name

    def _unfinished(self, namespace: str, job_name: str) -> bool:
        job = self.k.store.get("jobs", namespace, job_name)
        return job is not None and not _finished(job)

    def on_job(self, change: Change) -> None:
        ref = _controller_of(change.obj, "CronJob")
        if ref is None:
            return
        namespace, job_name = change.namespace, change.obj["metadata"]["name"]
        cj = self.k.store.get("cronjobs", namespace, ref["name"])
        if cj is None:
            return
        result = None if change.type == "DELETED" else _finished(change.obj)
        if change.type != "DELETED" and result is None:
            return
        was_active = any(r["name"] == job_name for r in (cj.get("status") or {}).get("active") or [])

        def update(c: Obj) -> None:
            st = c.setdefault("status", {})
            st["active"] = [r for r in st.get("active") or [] if r["name"] != job_name]
            if not st["active"]:
                del st["active"]
            if result == "Complete":
                st["lastSuccessfulTime"] = change.obj["status"].get("completionTime", now())
        self.k.store.mutate("cronjobs", namespace, ref["name"], update)
        if result and was_active:
            self.k.record(cj, "Normal", "SawCompletedJob", f"Saw completed job: {job_name}, status: {result}",
                          component="cronjob-controller")
            self._prune(cj)

    def _prune(self, cj: Obj) -> None:
        """Delete the oldest finished Jobs beyond successful/failedJobsHistoryLimit."""
        namespace, uid = cj["metadata"]["namespace"], cj["metadata"]["uid"]
        owned = [j for j in self.k.store.list("jobs", namespace)
                 if any(r.get("uid") == uid for r in j["metadata"].get("ownerReferences") or [])]
        for result, limit_key, default in (("Complete", "successfulJobsHistoryLimit", 3),
                                           ("Failed", "failedJobsHistoryLimit", 1)):
            done = sorted((j for j in owned if _finished(j) == result),
                          key=lambda j: (j["metadata"]["creationTimestamp"], j["metadata"]["name"]))
            limit = cj["spec"].get(limit_key, default)
            for j in done[: max(0, len(done) - limit)]:
                with _ignore():
                    self.k.api.delete(RESOURCES["jobs"], namespace, j["metadata"]["name"],
                                      {"propagationPolicy": "Background"})
                self.k.record(cj, "Normal", "SuccessfulDelete", f"Deleted job {j['metadata']['name']}",
                              component="cronjob-controller")


class _ignore:
    """``with _ignore():`` an ApiError (the object went away meanwhile) is not our problem."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, ApiError)
