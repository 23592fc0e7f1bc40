"""One pod on the kubelet stand-in: image "pulls", env resolution, container processes, status.

A container is a local process (``command`` + ``args``, the image ignored; ``python`` replaced by
the interpreter the test mapped to the image), in its own process group so stopping it stops
everything it started. Every wait (slow pull, image back-off, a missing Secret, restart back-off)
ends early when the pod is deleted; nothing polls.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import uuid
from typing import TYPE_CHECKING, Optional

from ._logs import LogBuffer
from ._store import Obj, now

if TYPE_CHECKING:
    from .kubelet import Kubelet

_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class ConfigError(Exception):
    """The container cannot be created yet (CreateContainerConfigError): a Secret or key is missing."""


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` is ``$``, others stay."""
    return _VAR_REF.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


class ContainerRun:
    def __init__(self, spec: Obj, init: bool = False) -> None:
        self.spec, self.name, self.init = spec, spec["name"], init
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.reader: Optional[asyncio.Task[None]] = None
        self.log = LogBuffer()
        self.previous: Optional[LogBuffer] = None
        self.restarts = 0
        self.oom = False
        self.exit_code: Optional[int] = None
        self.last_state: Obj = {}
        self.state: Obj = {"waiting": {"reason": "PodInitializing" if not init else "ContainerCreating"}}
        self.ready = False
        self.image_id = ""
        self.container_id = ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def status(self) -> Obj:
        s: Obj = {"name": self.name, "image": self.spec.get("image", ""), "imageID": self.image_id,
                  "ready": self.ready, "restartCount": self.restarts, "started": "running" in self.state,
                  "state": self.state, "lastState": self.last_state}
        if self.container_id:
            s["containerID"] = self.container_id
        return s


class PodRun:
    """The kubelet's side of one pod bound to a node: its IP, sandbox, containers and task."""

    def __init__(self, kubelet: "Kubelet", pod: Obj, node: str, ip: str) -> None:
        self.kubelet = kubelet
        meta = pod["metadata"]
        self.uid, self.namespace, self.name = meta["uid"], meta["namespace"], meta["name"]
        self.node, self.ip = node, ip
        self.restart_policy = pod["spec"].get("restartPolicy", "Always")
        self.init = [ContainerRun(c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.containers = [ContainerRun(c) for c in pod["spec"]["containers"]]
        if not self.init:
            for c in self.containers:
                c.state = {"waiting": {"reason": "ContainerCreating"}}
        self.sandbox = kubelet.sandbox / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.sandbox.mkdir(parents=True, exist_ok=True)
        self.stopping = asyncio.Event()
        self.config_changed = asyncio.Event()
        self.deleting: Optional[int] = None
        self.task: Optional[asyncio.Task[None]] = None

    def all_containers(self) -> list[ContainerRun]:
        return self.init + self.containers

    def container(self, name: Optional[str]) -> ContainerRun:
        for c in self.all_containers():
            if name in (None, c.name):
                return c
        raise KeyError(name)

    def pod(self) -> Optional[Obj]:
        return self.kubelet.store.get("pods", self.namespace, self.name)

    # ---- the pod's life ----------------------------------------------------------------------

    async def main(self) -> None:
        self.publish()
        for c in self.init:
            await self._container_loop(c)
            if c.exit_code != 0 or self.stopping.is_set():
                self.publish()
                return
        await asyncio.gather(*(self._container_loop(c) for c in self.containers))
        self.publish()

    async def _pause(self, seconds: Optional[float] = None, event: Optional[asyncio.Event] = None) -> bool:
        """Wait ``seconds`` or for ``event`` (forever if neither), or until the pod is deleted.
        False when the pod is being deleted."""
        waits = [asyncio.ensure_future(self.stopping.wait())]
        if seconds is not None:
            waits.append(asyncio.ensure_future(asyncio.sleep(seconds)))
        if event is not None:
            waits.append(asyncio.ensure_future(event.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        return not self.stopping.is_set()

    async def _container_loop(self, c: ContainerRun) -> None:
        if not await self._pull(c):
            return
        backoff = self.kubelet.restart_backoff
        while not self.stopping.is_set():
            env = await self._env_when_ready(c)
            if env is None:
                return
            if await self._start(c, env):
                await self._wait(c)
            if self.stopping.is_set() or not self._restarts(c):
                return
            c.restarts += 1
            c.last_state, c.ready = c.state, False
            c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off {backoff:g}s restarting "
                                   f"failed container={c.name} pod={self.name}_{self.namespace}({self.uid})"}}
            self.event("Warning", "BackOff", f"Back-off restarting failed container {c.name} in pod "
                       f"{self.name}_{self.namespace}({self.uid})", c)
            self.publish()
            if not await self._pause(backoff):
                return
            backoff = min(backoff * 2, self.kubelet.restart_backoff_max)

    def _restarts(self, c: ContainerRun) -> bool:
        if c.init:
            return self.restart_policy != "Never" and c.exit_code != 0
        return self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and c.exit_code != 0)

    async def _pull(self, c: ContainerRun) -> bool:
        image = c.spec.get("image", "")
        failure = self.kubelet.pull_failure(image)
        delay = self.kubelet.pull_delay(image)
        if failure is None and not delay:
            self.event("Normal", "Pulled", f'Container image "{image}" already present on machine', c)
        else:
            self.event("Normal", "Pulling", f'Pulling image "{image}"', c)
        if failure is not None:
            c.state = {"waiting": {"reason": "ErrImagePull", "message": failure}}
            self.event("Warning", "Failed", f'Failed to pull image "{image}": {failure}', c)
            self.event("Warning", "Failed", "Error: ErrImagePull", c)
            self.publish()
            if not await self._pause(self.kubelet.pull_backoff):
                return False
            c.state = {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}}
            self.event("Normal", "BackOff", f'Back-off pulling image "{image}"', c)
            self.event("Warning", "Failed", "Error: ImagePullBackOff", c)
            self.publish()
            await self._pause()  # stays in back-off until the pod is deleted (no re-pull)
            return False
        if delay:
            if not await self._pause(delay):
                return False
            self.event("Normal", "Pulled", f'Successfully pulled image "{image}" in {delay:g}s ({delay:g}s including '
                       "waiting). Image size: 0 bytes.", c)
        c.image_id = f"{image}@sha256:{uuid.uuid5(uuid.NAMESPACE_URL, image).hex * 2}"
        return True

    async def _env_when_ready(self, c: ContainerRun) -> Optional[dict[str, str]]:
        while True:
            try:
                return self._env(c)
            except ConfigError as e:
                if c.state.get("waiting", {}).get("message") != str(e):
                    c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                    self.event("Warning", "Failed", f"Error: {e}", c)
                    self.publish()
            self.config_changed.clear()
            if not await self._pause(event=self.config_changed):
                return None

    def _env(self, c: ContainerRun) -> dict[str, str]:
        pod = self.pod()
        if pod is None:
            raise ConfigError("pod is gone")
        env = dict(self.kubelet.base_env)
        env["HOSTNAME"] = self.name
        # no network namespace per pod here: a kernel pod binds its pod IP, not every address (see
        # jupyter_mlops/k8s/kernel_entry.py); the pod IP is then also its "localhost" for port-forward
        env["MLOPS_KERNEL_BIND"] = self.ip
        env.setdefault("HOME", str(self.sandbox))
        for source in c.spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, resource in (("secretRef", "secrets"), ("configMapRef", "configmaps")):
                ref = source.get(kind)
                if ref:
                    for key, value in self._data(resource, ref["name"], ref.get("optional", False)).items():
                        env[prefix + key] = value
        for item in c.spec.get("env") or []:
            value = self._env_value(pod, item, env)
            if value is not None:
                env[item["name"]] = value
        return env

    def _data(self, resource: str, name: str, optional: bool) -> dict[str, str]:
        obj = self.kubelet.store.get(resource, self.namespace, name)
        if obj is None:
            if optional:
                return {}
            raise ConfigError(f'{"secret" if resource == "secrets" else "configmap"} "{name}" not found')
        if resource == "secrets":
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    def _env_value(self, pod: Obj, item: Obj, env: dict[str, str]) -> Optional[str]:
        if "valueFrom" not in item:
            return _expand(str(item.get("value", "")), env)
        source = item["valueFrom"]
        for kind, resource, label in (("secretKeyRef", "secrets", "Secret"), ("configMapKeyRef", "configmaps",
                                                                                 "ConfigMap")):
            ref = source.get(kind)
            if ref:
                data = self._data(resource, ref["name"], ref.get("optional", False))
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ConfigError(f"couldn't find key {ref['key']} in {label} {self.namespace}/{ref['name']}")
                return data[ref["key"]]
        if "fieldRef" in source:
            return self._field(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return self._resource_field(pod, source["resourceFieldRef"])
        return ""

    def _field(self, pod: Obj, path: str) -> str:
        meta = pod["metadata"]
        m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
        if m:
            return (meta.get(m[1]) or {}).get(m[2], "")
        values = {"metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
                  "spec.nodeName": self.node, "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
                  "status.podIP": self.ip, "status.podIPs": self.ip, "status.hostIP": "127.0.0.1",
                  "status.hostIPs": "127.0.0.1"}
        return values.get(path, "")

    def _resource_field(self, pod: Obj, ref: Obj) -> str:
        from ._admission import parse_quantity

        kind, _, res = ref["resource"].partition(".")
        container = ref.get("containerName")
        spec = next((c for c in pod["spec"]["containers"] if container in (None, c["name"])), {})
        value = ((spec.get("resources") or {}).get(kind) or {}).get(res)
        if value is None:
            return "0"
        q = parse_quantity(value) / parse_quantity(ref.get("divisor", "1"))
        return str(-(-q.numerator // q.denominator))  # rounded up, as the kubelet does

    def _argv(self, c: ContainerRun, env: dict[str, str]) -> list[str]:
        argv = [_expand(str(a), env) for a in (c.spec.get("command") or []) + (c.spec.get("args") or [])]
        if argv and _PYTHON.match(os.path.basename(argv[0])):
            argv[0] = self.kubelet.interpreter_for(c.spec.get("image", ""))
        return argv

    def _workdir(self, c: ContainerRun) -> str:
        wd = c.spec.get("workingDir")
        if not wd:
            return str(self.sandbox)
        if os.path.isdir(wd):
            return wd
        path = self.sandbox / "rootfs" / wd.lstrip("/")  # the image's directories do not exist here
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    async def _start(self, c: ContainerRun, env: dict[str, str]) -> bool:
        argv = self._argv(c, env)
        if c.restarts:
            c.previous, c.log = c.log, LogBuffer()
        try:
            if not argv:
                raise FileNotFoundError("no command specified (the emulated kubelet runs the container's command)")
            c.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, cwd=self._workdir(c), env=env, start_new_session=True)
        except OSError as e:
            msg = (f"failed to create containerd task: failed to create shim task: OCI runtime create failed: "
                   f"exec: {argv[0] if argv else ''!r}: {e.strerror or e}: unknown")
            c.exit_code = 128
            c.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": msg,
                                      "startedAt": "1970-01-01T00:00:00Z", "finishedAt": now()}}
            self.event("Warning", "Failed", f"Error: {msg}", c)
            self.publish()
            return False
        c.container_id = f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}"
        c.reader = asyncio.ensure_future(self._read(c.proc, c.log))
        c.state, c.ready, c.oom = {"running": {"startedAt": now()}}, True, False
        self.event("Normal", "Created", f"Created container {c.name}", c)
        self.event("Normal", "Started", f"Started container {c.name}", c)
        if self.stopping.is_set():
            self.signal(c, signal.SIGKILL if not self.deleting else signal.SIGTERM)
        self.publish()
        return True

    @staticmethod
    async def _read(proc: asyncio.subprocess.Process, log: LogBuffer) -> None:
        assert proc.stdout is not None
        while True:
            chunk = await proc.stdout.read(65536)
            if not chunk:
                break
            log.append(chunk)

    async def _wait(self, c: ContainerRun) -> None:
        assert c.proc is not None and c.reader is not None
        code = await c.proc.wait()
        self.signal(c, signal.SIGKILL)  # whatever it left behind in its process group
        await c.reader
        c.log.close()
        c.exit_code = 128 - code if code < 0 else code
        reason = "OOMKilled" if c.oom else "Completed" if c.exit_code == 0 else "Error"
        started = c.state.get("running", {}).get("startedAt", now())
        c.state = {"terminated": {"exitCode": c.exit_code, "reason": reason, "startedAt": started,
                                  "finishedAt": now(), "containerID": c.container_id}}
        c.ready = False
        self.publish()

    def signal(self, c: ContainerRun, sig: int) -> None:
        if c.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, sig)

    async def terminate(self, grace: int) -> None:
        """SIGTERM every container, SIGKILL after ``grace`` seconds, and wait for the pod task."""
        self.deleting = grace if self.deleting is None else min(self.deleting, grace)
        self.stopping.set()
        running = [c for c in self.all_containers() if c.running]
        for c in running:
            self.signal(c, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        if running and grace > 0:
            waits = asyncio.gather(*(c.proc.wait() for c in running if c.proc is not None))
            try:
                await asyncio.wait_for(waits, grace)
            except asyncio.TimeoutError:
                for c in running:
                    self.signal(c, signal.SIGKILL)
        if self.task is not None:
            await asyncio.shield(self.task)

    # ---- status ------------------------------------------------------------------------------

    def _phase(self) -> str:
        init_failed = any(c.exit_code not in (None, 0) and not self._restarts(c) for c in self.init)
        cs = self.containers
        done = all("terminated" in c.state and (self.stopping.is_set() or not self._restarts(c)) for c in cs)
        if init_failed:
            return "Failed"
        if done and all(c.exit_code is not None for c in cs):
            return "Succeeded" if all(c.exit_code == 0 for c in cs) else "Failed"
        if any("running" in c.state or c.restarts or "terminated" in c.state for c in cs):
            return "Running"
        return "Pending"

    def publish(self) -> None:
        phase = self._phase()
        initialized = all(c.exit_code == 0 for c in self.init)
        unready = [c.name for c in self.containers if not c.ready]
        stamp = now()

        def update(pod: Obj) -> None:
            st = pod.setdefault("status", {})
            st.update({"phase": phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
                       "podIP": self.ip, "podIPs": [{"ip": self.ip}]})
            st.setdefault("startTime", stamp)
            if self.init:
                st["initContainerStatuses"] = [c.status() for c in self.init]
            st["containerStatuses"] = [c.status() for c in self.containers]
            conds = st.setdefault("conditions", [])
            set_condition(conds, "Initialized", initialized, None if initialized else "ContainersNotInitialized",
                          None if initialized else f"containers with incomplete status: {[c.name for c in self.init if c.exit_code != 0]}")
            terminal = phase in ("Succeeded", "Failed")
            reason = "PodCompleted" if terminal else None if not unready else "ContainersNotReady"
            message = None if terminal or not unready else f"containers with unready status: [{' '.join(unready)}]"
            set_condition(conds, "Ready", not unready, reason, message)
            set_condition(conds, "ContainersReady", not unready, reason, message)
            set_condition(conds, "PodScheduled", True)
            order = ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
            conds.sort(key=lambda cd: order.index(cd["type"]) if cd["type"] in order else len(order))

        self.kubelet.store.mutate("pods", self.namespace, self.name, update)

    def event(self, etype: str, reason: str, message: str, c: Optional[ContainerRun] = None) -> None:
        pod = self.pod()
        if pod is not None:
            field = None
            if c is not None:
                kind = "initContainers" if c.init else "containers"
                field = f"spec.{kind}{{{c.name}}}"
            self.kubelet.record(pod, etype, reason, message, component="kubelet", host=self.node, field_path=field)


def set_condition(conds: list[Obj], ctype: str, status: bool, reason: Optional[str] = None,
                  message: Optional[str] = None) -> None:
    """Set a condition, keeping lastTransitionTime when its status did not change."""
    value = "True" if status else "False"
    for cond in conds:
        if cond["type"] == ctype:
            if cond["status"] != value:
                cond["lastTransitionTime"] = now()
            cond["status"] = value
            for k, v in (("reason", reason), ("message", message)):
                if v is None:
                    cond.pop(k, None)
                else:
                    cond[k] = v
            return
    cond: Obj = {"type": ctype, "status": value, "lastProbeTime": None, "lastTransitionTime": now()}
    if reason is not None:
        cond["reason"] = reason
    if message is not None:
        cond["message"] = message
    conds.append(cond)
