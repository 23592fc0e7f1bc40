"""A kubelet, scheduler and Job/CronJob controller stand-in, in the emulator's event loop.

``Kubelet(api, nodes=[Node("gpu-1", cpu="8", memory="32Gi", extended={"nvidia.com/gpu": 1})])``
reacts to every pod change the store reports (a queue fed by the store, no polling): it schedules
pods onto the declared nodes (requests vs free capacity, nodeSelector/node affinity, taints vs
tolerations), "pulls" images (instantly, slowly or failing, as the test says), runs each container's
command as a local process bound to a pod IP of its own (127.0.0.N), reports phases, conditions and
events, and stops processes on deletion (SIGTERM, SIGKILL after the grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import heapq
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Coroutine, Optional

from ._admission import is_terminal_pod, parse_quantity, pod_usage
from ._controllers import CronJobController, JobController
from ._logs import log_source
from ._pods import PodRun, set_condition
from ._scheduler import fit_error, unfit
from ._store import RESOURCES, ApiError, Change, Obj, now
from .emulator import ApiEmulator

__all__ = ["Kubelet", "Node"]
log = logging.getLogger(__name__)


@dataclass
class Node:
    """A node the test declares: capacity, extended resources (GPUs), labels and taints."""
    name: str
    cpu: str | int = "4"
    memory: str = "16Gi"
    extended: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)
    max_pods: int = 110

    def allocatable(self) -> dict[str, Fraction]:
        out = {"cpu": parse_quantity(self.cpu), "memory": parse_quantity(self.memory),
               "ephemeral-storage": parse_quantity("100Gi")}
        out.update({k: parse_quantity(v) for k, v in self.extended.items()})
        return out

    def all_labels(self) -> dict[str, str]:
        return {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                **self.labels}

    def manifest(self) -> Obj:
        resources = {"cpu": str(self.cpu), "memory": str(self.memory), "ephemeral-storage": "100Gi",
                     "pods": str(self.max_pods), **{k: str(v) for k, v in self.extended.items()}}
        info = {k: "emulated" for k in ("bootID", "containerRuntimeVersion", "kernelVersion", "kubeProxyVersion",
                                         "machineID", "osImage", "systemUUID")}
        info.update({"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.31.0-emulated"})
        return {"metadata": {"name": self.name, "labels": self.all_labels()},
                "spec": {"taints": list(self.taints)} if self.taints else {},
                "status": {"capacity": resources, "allocatable": resources, "nodeInfo": info,
                           "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                         {"type": "Hostname", "address": self.name}],
                           "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                           "message": "kubelet is posting ready status"}]}}


class Kubelet:
    """The stand-in. ``images`` maps an image pattern (fnmatch) to the interpreter that replaces a
    container command's ``python``; unmapped images use ``interpreter`` (this machine's Python)."""

    def __init__(self, emulator: ApiEmulator, nodes: list[Node], *, interpreter: Optional[str] = None,
                 base_env: Optional[dict[str, str]] = None, pull_backoff: float = 0.05,
                 restart_backoff: float = 1.0, restart_backoff_max: float = 10.0,
                 ip_prefix: Optional[str] = None) -> None:
        self.emulator, self.api, self.store = emulator, emulator.api, emulator.store
        self.nodes = {n.name: n for n in nodes}
        self.interpreter = interpreter or sys.executable
        self.images: dict[str, str] = {}
        path = os.path.dirname(self.interpreter) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
        self.base_env = dict(base_env) if base_env is not None else {"PATH": path, "LANG": "C.UTF-8"}
        self.pull_backoff, self.restart_backoff, self.restart_backoff_max = pull_backoff, restart_backoff, restart_backoff_max
        self.errors: list[BaseException] = []
        self.sandbox = Path()
        self.jobs = JobController(self)
        self.cronjobs = CronJobController(self)
        self._failing: list[tuple[str, str]] = []
        self._slow: list[tuple[str, float]] = []
        self._runs: dict[tuple[str, str], PodRun] = {}
        self._pending: dict[str, tuple[str, str]] = {}  # unschedulable pods by uid, in creation order
        # Pod IPs are <ip_prefix>.N, N from 2. The prefix (127.B.C) is random per kubelet: test
        # sessions running side by side each have a kubelet, and pods with fixed ports (kernels use
        # 52001-52005) must not meet on one address. All of 127/8 is loopback on Linux.
        self.ip_prefix = ip_prefix or f"127.{random.randint(1, 254)}.{random.randint(0, 255)}"
        self._free_ips: list[int] = []
        self._next_ip = 2
        self._event_names: dict[tuple[Any, ...], str] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._queue: Optional[asyncio.Queue[Any]] = None
        self._dispatcher: Optional[asyncio.Task[None]] = None
        self._unsubscribe: Callable[[], None] = lambda: None
        self._stopping = False

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> "Kubelet":
        self.sandbox = Path(tempfile.mkdtemp(prefix="k8s-kubelet-"))
        self._queue = asyncio.Queue()
        for node in self.nodes.values():
            self._register(node)
        self._unsubscribe = self.store.subscribe(self._queue.put_nowait)
        self.api.kubelet_attached = True
        self.emulator.logs = lambda ns, name, c, prev: log_source(self._runs, ns, name, c, prev)
        self._dispatcher = asyncio.ensure_future(self._dispatch())
        self._queue.put_nowait(self._resync_all)
        return self

    async def stop(self) -> None:
        """Stop every process (SIGKILL) and task; raise if anything failed inside the stand-in."""
        self._stopping = True
        self._unsubscribe()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        self.jobs.stop()
        await asyncio.gather(*(run.terminate(0) for run in list(self._runs.values())), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.api.kubelet_attached = False
        self.emulator.logs = None
        shutil.rmtree(self.sandbox, ignore_errors=True)
        if self.errors:
            raise RuntimeError(f"the kubelet stand-in failed: {self.errors!r}") from self.errors[0]

    async def __aenter__(self) -> "Kubelet":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def _register(self, node: Node) -> None:
        with contextlib.suppress(ApiError):
            self.api.create(RESOURCES["nodes"], "", node.manifest())

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.errors.append(t.exception())  # type: ignore[arg-type]
                log.error("kubelet task failed", exc_info=t.exception())
        task.add_done_callback(done)
        return task

    def enqueue(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the dispatcher, after the changes already queued (timers use this)."""
        if self._queue is not None and not self._stopping:
            self._queue.put_nowait(fn)

    async def _dispatch(self) -> None:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            try:
                item() if callable(item) else self._handle(item)
            except Exception as e:  # recorded, raised by stop(): a broken stand-in must fail the test
                self.errors.append(e)
                log.exception("kubelet dispatch failed")

    # ---- test controls -------------------------------------------------------------------------

    def add_node(self, node: Node) -> None:
        self.nodes[node.name] = node
        self._register(node)
        self.enqueue(self._retry_pending)

    def image_fails(self, pattern: str, message: Optional[str] = None) -> None:
        """Pulls of images matching ``pattern`` fail: ErrImagePull, then ImagePullBackOff."""
        self._failing.append((pattern, message or "rpc error: code = NotFound desc = failed to pull and unpack "
                              f'image "{pattern}": failed to resolve reference "{pattern}": not found'))

    def image_slow(self, pattern: str, seconds: float) -> None:
        """Pulls of images matching ``pattern`` take ``seconds`` (events Pulling, then Pulled)."""
        self._slow.append((pattern, seconds))

    def pull_failure(self, image: str) -> Optional[str]:
        return next((m for p, m in self._failing if fnmatch.fnmatchcase(image, p)), None)

    def pull_delay(self, image: str) -> float:
        return next((s for p, s in self._slow if fnmatch.fnmatchcase(image, p)), 0.0)

    def interpreter_for(self, image: str) -> str:
        return next((i for p, i in self.images.items() if fnmatch.fnmatchcase(image, p)), self.interpreter)

    def oom(self, name: str, namespace: str = "default", container: Optional[str] = None) -> None:
        """Kill the container as the kernel's OOM killer would: terminated, OOMKilled, exit code 137."""
        run = self._runs.get((namespace, name))
        if run is None:
            raise LookupError(f"pod {namespace}/{name} is not running here")
        c = next(c for c in run.all_containers() if container in (None, c.name) and c.running)
        c.oom = True
        run.signal(c, 9)

    def process(self, name: str, namespace: str = "default", container: Optional[str] = None) -> Any:
        """The container's ``asyncio.subprocess.Process`` (None before it started)."""
        run = self._runs.get((namespace, name))
        return run.container(container).proc if run else None

    async def trigger_cronjob(self, namespace: str, name: str) -> Optional[str]:
        """Run the CronJob's schedule once, now: the created Job's name, or None if it was skipped."""
        return self.cronjobs.trigger(namespace, name)

    # ---- events --------------------------------------------------------------------------------

    def record(self, obj: Obj, etype: str, reason: str, message: str, component: str = "kubelet",
               host: Optional[str] = None, field_path: Optional[str] = None) -> None:
        """An Event about ``obj``; a repeat of the same one counts up, as the event recorder does."""
        meta = obj["metadata"]
        ns = meta.get("namespace") or "default"
        key = (meta["uid"], etype, reason, message, field_path)
        name = self._event_names.get(key)
        stamp = now()
        if name and self.store.exists("events", ns, name):
            def bump(e: Obj) -> None:
                e["count"] = e.get("count", 1) + 1
                e["lastTimestamp"] = stamp
            self.store.mutate("events", ns, name, bump)
            return
        involved = {"kind": obj.get("kind"), "namespace": ns, "name": meta["name"], "uid": meta["uid"],
                    "apiVersion": obj.get("apiVersion"), "resourceVersion": meta.get("resourceVersion")}
        if field_path:
            involved["fieldPath"] = field_path
        name = f"{meta['name']}.{uuid.uuid4().hex[:16]}"
        source = {"component": component, **({"host": host} if host else {})}
        event = {"metadata": {"name": name, "namespace": ns}, "involvedObject": involved, "reason": reason,
                 "message": message, "type": etype, "source": source, "firstTimestamp": stamp,
                 "lastTimestamp": stamp, "count": 1, "reportingComponent": component,
                 "reportingInstance": host or ""}
        try:
            self.api.create(RESOURCES["events"], ns, event)
        except ApiError:
            return  # e.g. the namespace is terminating: the real recorder drops it too
        self._event_names[key] = name

    # ---- reacting to changes -------------------------------------------------------------------

    def _handle(self, change: Change) -> None:
        if change.resource == "pods":
            self._on_pod(change)
            self.jobs.on_pod(change)
        elif change.resource == "jobs":
            self.jobs.on_job(change)
            self.cronjobs.on_job(change)
        elif change.resource in ("secrets", "configmaps"):
            for run in self._runs.values():
                if run.namespace == change.namespace:
                    run.config_changed.set()

    def _on_pod(self, change: Change) -> None:
        pod, meta = change.obj, change.obj["metadata"]
        key = (meta["namespace"], meta["name"])
        if change.type == "DELETED":
            self._pending.pop(meta["uid"], None)
            run = self._runs.pop(key, None)
            if run is not None:
                if run.task is not None and not run.task.done():
                    self.spawn(run.terminate(0))  # removed without waiting for us (e.g. grace 0 elsewhere)
                self._release_ip(run.ip)
            self._retry_pending()
            return
        run = self._runs.get(key)
        if meta.get("deletionTimestamp"):
            grace = int(meta.get("deletionGracePeriodSeconds") or 0)
            if run is None:
                self.api.pod_gone(*key)
            elif run.deleting is None or grace < run.deleting:
                self.spawn(self._delete(run, grace))
            return
        node = pod["spec"].get("nodeName")
        if not node:
            if pod["spec"].get("schedulerName", "default-scheduler") == "default-scheduler" \
                    and meta["uid"] not in self._pending and not is_terminal_pod(pod):
                self._schedule(pod)
        elif run is None and node in self.nodes and not is_terminal_pod(pod):
            self._start_run(pod, node)
        if change.old is not None and is_terminal_pod(pod) and not is_terminal_pod(change.old):
            self._retry_pending()  # its resources are free again
            self.jobs.resync_namespace(meta["namespace"])

    async def _delete(self, run: PodRun, grace: int) -> None:
        await run.terminate(grace)
        if not self._stopping:
            self.api.pod_gone(run.namespace, run.name)

    def _resync_all(self) -> None:
        for pod in self.store.list("pods"):
            self._on_pod(Change(0, "ADDED", "pods", pod["metadata"]["namespace"], pod, None))
        for job in self.store.list("jobs"):
            self.jobs.sync(job["metadata"]["namespace"], job["metadata"]["name"])

    # ---- scheduling ----------------------------------------------------------------------------

    def _node_usage(self, node: str) -> tuple[dict[str, Fraction], int]:
        used: dict[str, Fraction] = {}
        pods = [p for p in self.store.list("pods") if p["spec"].get("nodeName") == node and not is_terminal_pod(p)]
        for p in pods:
            for key, q in pod_usage(p).items():
                if key.startswith("requests."):
                    used[key[9:]] = used.get(key[9:], Fraction(0)) + q
        return used, len(pods)

    def _unfit(self, pod: Obj, node: Node) -> list[str]:
        used, count = self._node_usage(node.name)
        return unfit(pod, node, used, count)

    def _schedule(self, pod: Obj) -> None:
        per_node = []
        for node in sorted(self.nodes.values(), key=lambda n: n.name):
            why = self._unfit(pod, node)
            if not why:
                self._bind(pod, node)
                return
            per_node.append(why)
        message = fit_error(len(self.nodes), per_node)
        meta = pod["metadata"]
        self._pending[meta["uid"]] = (meta["namespace"], meta["name"])
        previous = next((c.get("message") for c in (pod.get("status") or {}).get("conditions") or []
                         if c["type"] == "PodScheduled"), None)

        def unschedulable(p: Obj) -> None:
            set_condition(p.setdefault("status", {}).setdefault("conditions", []), "PodScheduled", False,
                          "Unschedulable", message)
        updated = self.store.mutate("pods", meta["namespace"], meta["name"], unschedulable)
        if previous != message and updated is not None:
            self.record(updated, "Warning", "FailedScheduling", message, component="default-scheduler")

    def _bind(self, pod: Obj, node: Node) -> None:
        meta = pod["metadata"]
        self._pending.pop(meta["uid"], None)

        def bind(p: Obj) -> None:
            p["spec"]["nodeName"] = node.name
            set_condition(p.setdefault("status", {}).setdefault("conditions", []), "PodScheduled", True)
        bound = self.store.mutate("pods", meta["namespace"], meta["name"], bind)
        if bound is None:
            return
        self.record(bound, "Normal", "Scheduled", f"Successfully assigned {meta['namespace']}/{meta['name']} to "
                    f"{node.name}", component="default-scheduler")
        self._start_run(bound, node.name)

    def _retry_pending(self) -> None:
        for uid, (ns, name) in list(self._pending.items()):
            pod = self.store.get("pods", ns, name)
            self._pending.pop(uid, None)
            if pod and pod["metadata"]["uid"] == uid and not pod["spec"].get("nodeName") \
                    and not pod["metadata"].get("deletionTimestamp"):
                self._schedule(pod)

    # ---- running -------------------------------------------------------------------------------

    def _start_run(self, pod: Obj, node: str) -> None:
        run = PodRun(self, pod, node, self._allocate_ip(pod))
        self._runs[(run.namespace, run.name)] = run
        run.task = self.spawn(run.main())  # type: ignore[assignment]

    def _allocate_ip(self, pod: Obj) -> str:
        """The lowest free address whose declared container ports are bindable (something outside
        this kubelet may hold one: that address is skipped for good)."""
        ports = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []
                 if p.get("protocol", "TCP") == "TCP" and p.get("containerPort")]
        while True:
            if self._free_ips:
                n = heapq.heappop(self._free_ips)
            elif self._next_ip < 255:
                n, self._next_ip = self._next_ip, self._next_ip + 1
            else:
                raise RuntimeError(f"no pod IP left in {self.ip_prefix}.0/24: delete finished pods")
            ip = f"{self.ip_prefix}.{n}"
            if all(_bindable(ip, port) for port in ports):
                return ip

    def _release_ip(self, ip: str) -> None:
        heapq.heappush(self._free_ips, int(ip.rsplit(".", 1)[1]))


def _bindable(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True
