"""Kubernetes benchmark: kernels as pods, on the API emulator of tests/k8s, not a cluster.

    python bench/k8s.py [--quick]

Measures (issue 6, "Kubernetes"), medians of interleaved rounds unless said:

1. ``pooled_claim_s``: ``WarmPools`` over jupyter_server's ``AsyncMappingKernelManager`` (the
   server's own pieces), ``c.WarmPools.sizes = {"demo/small": 2}``, full and idle; from
   ``pools.claim("demo", "small", user)`` to the first ``execute_reply`` of ``1+1``: the claim
   (its relabel of the pod is a background patch inside the window), ``km.client()``, its
   channels, the request and its reply. No ``wait_for_ready`` (jupyter_client's readiness check
   adds a fixed 0.2 s; a pooled kernel has already answered one). The refill is not timed
   (``c.WarmPools.refill_delay = 2``; the pool is full again before the next measure). vs
2. ``cold_start_s``, the anchor: ``AsyncKernelManager(kernel_name="mlops-demo-small")
   .start_kernel(mlops_user=...)`` (the provisioner reads the namespace, creates the Secret and the
   Pod, the shared watch sees it Running) then a client and ``1+1`` until its reply, the kernel
   booting in its pod meanwhile (the request waits in zmq's queue). ``vs_cold_start`` = cold / pooled.
3. one process managing many kernels through one shared watch: N kernel pods (2,000; 200 with
   ``--quick``) made inside the emulator, with a ``nodeName`` the kubelet stand-in does not own (it
   leaves them alone: no processes) and a Running status written through the status subresource,
   in N/20 user namespaces. While the process's shared pod ``Watcher`` holds all N: how long a pod's
   status change (a patch of ``pods/status``, as a kubelet makes) takes to reach
   ``Watcher.wait_for``, p50/p99; ``api_p99_ms``, the p99 round trip of the calls the product
   makes per kernel operation (read namespace, create Secret, create Pod, read Pod, patch Pod
   labels, delete Pod, delete Secret), made one at a time with the product's own client and
   connection; the process's RSS; the watch streams open in the emulator (``watches_open``: 2,
   pods and events, not one per kernel). The same calls with 20 pods first, for comparison.
4. ``api_calls_per_start`` / ``api_calls_per_claim``: the emulator's request log (``api.requests``)
   over one cold start up to its first reply, one claim until the pod's relabel is visible, and
   one shutdown; the shared watches' own requests are not counted.

The cluster (``ApiEmulator`` + the kubelet stand-in of tests/k8s, one node of 16 CPUs) runs in a
child process (``python bench/k8s.py --serve-cluster``, internal), so the benchmark process is what
a server is: the kernel managers, the pools, the shared watches, and nothing of the API server's
memory or CPU. The child prints its URL, answers a few ``/bench/...`` requests of the benchmark
(the request log, the open watches, making the N pods) beside the Kubernetes API, and stops
(every pod process killed) when its stdin closes. Environments, kernel specs (``JUPYTER_DATA_DIR``)
and Jupyter config live in a temporary folder, removed at the end. The last line of stdout is one
JSON object (see bench/README.md).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import math
import os
import random
import sys
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.k8s: the emulator is the only cluster here
    sys.path.insert(1, str(ROOT))

from _common import Logger, fmt, goal_met, interleave, median, quick_mode, ratio, scratch, stdout_to_stderr

log = Logger("k8s")

GOALS = {
    "pooled_claim_s": "<=0.5",
    "watches_open": "<=2",  # jupyter_mlops/k8s/watch.py: "2,000 kernels hold two watches, not 2,000"
}

ENVIRONMENT, PROFILE = "demo", "small"
KERNEL = "mlops-demo-small"  # written by sync_from_config: environment demo x profile small
IMAGE = "registry.example/demo:1"
CODE = "1+1"
POOL_NAMESPACE = "mlops-pool"
CLAIM_USER, COLD_USER = "bench-claimer", "bench-cold"
VIRTUAL_NODE = "virtual-1"  # a node the kubelet stand-in does not own: pods there run nothing
VIRTUAL_NS = "mlops-virtual-"
IDLE_PODS = 20  # the "few pods" the API calls are measured against first
REFILL_DELAY = 2.0

QUICK = {"rounds": 3, "pool_size": 2, "pods": 200, "per_user": 20, "api_rounds": 60}
DEFAULT = {"rounds": 7, "pool_size": 2, "pods": 2000, "per_user": 20, "api_rounds": 200}


# -- the cluster: a child process ----------------------------------------------------------------------


def serve_cluster(history: int) -> int:
    """The child: emulator (keeping ``history`` changes) + kubelet stand-in until stdin closes."""
    asyncio.run(_serve_cluster(history))
    return 0


async def _serve_cluster(history: int) -> None:
    from aiohttp import web

    from tests.k8s.emulator import ApiEmulator
    from tests.k8s.kubelet import Kubelet, Node

    class BenchEmulator(ApiEmulator):
        """The emulator, plus ``/bench/...`` for the benchmark (never recorded in ``requests``)."""

        async def _route(self, request: web.Request) -> web.StreamResponse:
            if not request.path.startswith("/bench/"):
                return await super()._route(request)
            what = request.path.removeprefix("/bench/")
            if what == "requests":
                since = int(request.query.get("since", "0"))
                items = [[r.verb, r.resource, r.namespace, r.name] for r in self.requests[since:]]
                return web.json_response({"total": len(self.requests), "items": items})
            if what == "watches":
                return web.json_response({"open": sorted(w.resource for w in self.store.watchers)})
            if what == "virtual":
                return web.json_response(make_virtual(self, await request.json()))
            raise web.HTTPNotFound()

    api = BenchEmulator(history=history)
    await api.start()
    kubelet = Kubelet(api, [Node("cpu-1", cpu="16", memory="64Gi")])
    await kubelet.start()
    try:
        print(api.url, flush=True)
        os.dup2(2, 1)  # nothing else on the pipe the parent stopped reading
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)  # until EOF
    finally:
        try:
            await kubelet.stop()
        finally:
            await api.stop()


def make_virtual(emulator: Any, body: dict[str, Any]) -> dict[str, Any]:
    """``body["n"]`` kernel pods like the template (a real kernel pod), on ``VIRTUAL_NODE``, Running."""
    from jupyter_mlops.k8s.manifests import LABEL_KERNEL_ID, LABEL_USER
    from tests.k8s._store import RESOURCES

    pods, api = RESOURCES["pods"], emulator.api
    template = emulator.store.get("pods", *body["template"])
    if template is None or (template.get("status") or {}).get("phase") != "Running":
        raise RuntimeError(f"template pod {body['template']} is not running")
    t0 = time.perf_counter()
    made = []
    for i in range(body["start"], body["start"] + body["n"]):
        user = f"user-{i // body['per_user']:04d}"
        ns = f"{VIRTUAL_NS}{i // body['per_user']:04d}"
        if not emulator.store.exists("namespaces", "", ns):
            api.create(RESOURCES["namespaces"], "", {"metadata": {"name": ns}})
        meta = template["metadata"]
        name = f"kernel-virtual-{i:05d}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns,
                            "labels": {**meta["labels"], LABEL_USER: user, LABEL_KERNEL_ID: str(uuid.UUID(int=i))},
                            "annotations": {**(meta.get("annotations") or {}), LABEL_USER: user}},
               "spec": {**copy.deepcopy(template["spec"]), "nodeName": VIRTUAL_NODE}}
        api.create(pods, ns, pod)
        made.append((ns, name))
    created = time.perf_counter() - t0
    for i, (ns, name) in enumerate(made, body["start"]):
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        status = {**copy.deepcopy(template["status"]), "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.0.0.1"}
        api.patch(pods, ns, name, {"status": status}, "application/merge-patch+json", "status")
    return {"create_s": created, "total_s": time.perf_counter() - t0, "pods": made}


class ClusterProcess:
    """The child process, from the benchmark's side."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.session: Any = None

    async def start(self, history: int) -> str:
        import aiohttp

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--serve-cluster", str(history), cwd=str(ROOT),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        self.url = line.decode().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the cluster process did not start (it said {line!r})")
        self.session = aiohttp.ClientSession()
        return self.url

    async def _get(self, what: str, **query: Any) -> Any:
        async with self.session.get(f"{self.url}/bench/{what}", params=query) as r:
            r.raise_for_status()
            return await r.json()

    async def requests(self, since: int = 0) -> tuple[int, list[list[Any]]]:
        got = await self._get("requests", since=since)
        return got["total"], got["items"]

    async def watches(self) -> list[str]:
        return (await self._get("watches"))["open"]

    async def virtual(self, **body: Any) -> dict[str, Any]:
        import aiohttp

        async with self.session.post(f"{self.url}/bench/virtual", json=body,
                                     timeout=aiohttp.ClientTimeout(total=600)) as r:
            r.raise_for_status()
            return await r.json()

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the child kills every pod process and exits
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except asyncio.TimeoutError:
            self.proc.kill()  # our own child, by its pid
            await self.proc.wait()
            raise RuntimeError("the cluster process did not stop within 30 s; killed") from None


# -- kernels ----------------------------------------------------------------------------------------------


async def first_reply(kc: Any, code: str = CODE, timeout: float = 60.0) -> dict[str, Any]:
    """Send ``code`` on the shell channel; the content of its ``execute_reply``."""
    msg_id = kc.execute(code)
    deadline = time.monotonic() + timeout
    while True:
        msg = await kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_reply":
            content = msg["content"]
            if content.get("status") != "ok":
                raise RuntimeError(f"{code!r} -> {content.get('ename')}: {content.get('evalue')}")
            return content


def write_environment(tmp: Path) -> Path:
    defs = tmp / "environments"
    (defs / ENVIRONMENT).mkdir(parents=True)
    (defs / ENVIRONMENT / "environment.yml").write_text(
        f"channels: [conda-forge]\ndependencies: [python=3.11]\nimage: {IMAGE}\n")
    return defs


def make_config(url: str, pool_size: int) -> Any:
    from traitlets.config import Config

    config = Config()
    config.MlopsConfig.kernel_backend = "kubernetes"
    config.Kubernetes.api_host = url
    config.Kubernetes.connect = "pod-ip"  # the emulator's pod IPs (127.x) route from here
    config.KernelProfiles.profiles = {PROFILE: {"display_name": "Small", "cpu": 0.5, "memory": "1Gi"}}
    config.WarmPools.sizes = {f"{ENVIRONMENT}/{PROFILE}": pool_size}
    config.WarmPools.refill_delay = REFILL_DELAY
    return config


def label_of(pod: dict[str, Any] | None) -> str | None:
    from jupyter_mlops.k8s.manifests import LABEL_USER

    return ((pod or {}).get("metadata") or {}).get("labels", {}).get(LABEL_USER)


def summarize(items: list[list[Any]]) -> tuple[int, str]:
    """API requests other than watches: how many, and "verb resource x" by kind."""
    kinds = Counter(f"{verb} {resource}" for verb, resource, *_ in items if verb != "watch")
    return sum(kinds.values()), ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none"


class Bench:
    def __init__(self, tmp: Path, p: dict[str, Any], ctl: ClusterProcess) -> None:
        self.tmp, self.p, self.ctl = tmp, p, ctl
        self.config: Any = None
        self.cluster: Any = None
        self.mkm: Any = None
        self.pools: Any = None
        self.kubelet_api: Any = None  # a client of its own, as a kubelet has, for status patches
        self.phases: dict[str, list[tuple[float, ...]]] = {"cold": [], "pooled": []}
        self.virtual: list[tuple[str, str]] = []
        self.calls: dict[str, str] = {}
        self.watch_resources: list[str] = []
        self.models: dict[str, str] = {}

    async def setup(self, url: str) -> float:
        from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
        from kubernetes_asyncio.client import CoreV1Api

        from jupyter_mlops.k8s.client import cluster_for
        from jupyter_mlops.k8s.settings import KubernetesSettings
        from jupyter_mlops.kernels.kernelspecs import sync_from_config
        from jupyter_mlops.server.pools import WarmPools
        from tests.k8s.emulator import api_client

        self.config = make_config(url, self.p["pool_size"])
        synced = sync_from_config(self.config)
        if KERNEL not in synced.written:
            raise RuntimeError(f"sync_from_config() wrote {synced.written}, not {KERNEL}")
        self.cluster = await cluster_for(KubernetesSettings(config=self.config))
        self.kubelet_api = CoreV1Api(api_client(url))
        work = self.tmp / "work"
        self.mkm = AsyncMappingKernelManager(config=self.config, root_dir=str(work))
        self.pools = WarmPools(self.mkm, config=self.config)
        t0 = time.perf_counter()
        await self.wait_pool()
        return time.perf_counter() - t0

    async def wait_pool(self) -> None:
        if not await self.pools.wait_ready(180):
            raise RuntimeError(f"the warm pool did not fill: {self.pools.status()}")

    async def cold(self) -> float:
        """The anchor: start_kernel of a pod kernel, a client, ``1+1`` until its reply."""
        from jupyter_client.manager import AsyncKernelManager

        km = AsyncKernelManager(kernel_name=KERNEL, config=self.config)
        kc = None
        try:
            t0 = time.perf_counter()
            await km.start_kernel(mlops_user=COLD_USER)
            t1 = time.perf_counter()
            kc = km.client()
            kc.start_channels()
            t2 = time.perf_counter()
            await first_reply(kc, timeout=120)
            t3 = time.perf_counter()
        finally:
            if kc is not None:
                kc.stop_channels()
            if km.has_kernel:  # untimed: the pod goes (cleanup waits until it is gone)
                await km.shutdown_kernel(now=True)
        self.phases["cold"].append((t1 - t0, t2 - t1, t3 - t2))
        return t3 - t0

    async def pooled(self) -> float:
        """Ours: claim a ready kernel pod, a client from its manager, ``1+1`` until its reply."""
        await self.wait_pool()  # untimed: full, nothing starting
        relabelled: asyncio.Future[Any] | None = None
        kc = None
        t0 = time.perf_counter()
        kernel_id = await self.pools.claim(ENVIRONMENT, PROFILE, CLAIM_USER)
        t1 = time.perf_counter()
        if kernel_id is None:
            raise RuntimeError("the pool was full, yet the claim got no kernel")
        try:
            km = self.mkm.get_kernel(kernel_id)
            pod = km.provisioner.pod_name
            relabelled = asyncio.ensure_future(self._seen_relabelled(pod))
            kc = km.client()
            kc.start_channels()
            t2 = time.perf_counter()
            await first_reply(kc)
            t3 = time.perf_counter()
            seen = await relabelled  # untimed: checks the product relabelled the pod
        finally:
            if kc is not None:
                kc.stop_channels()
            if relabelled is not None and not relabelled.done():
                relabelled.cancel()
            await self.mkm.shutdown_kernel(kernel_id, now=True)  # untimed, as the refill below
        self.phases["pooled"].append((t1 - t0, t2 - t1, t3 - t2, seen - t0))
        if t3 - t0 > REFILL_DELAY:
            log(f"  the claim took {t3 - t0:.2f} s, longer than refill_delay: the refill overlapped it")
        await self.wait_pool()
        return t3 - t0

    async def _seen_relabelled(self, pod: str) -> float:
        from jupyter_mlops.k8s.names import label_value

        want = label_value(CLAIM_USER)
        await self.cluster.pods.wait_for(POOL_NAMESPACE, pod, lambda p: label_of(p) == want, timeout=30)
        return time.perf_counter()

    async def count_calls(self) -> dict[str, float]:
        """The emulator's requests (watches excluded) of one cold start up to its first reply, its
        shutdown, and one claim until the pod's relabel is visible. Steady state: the cold user's
        namespace exists (the warm-up made it), the pool is full and not refilling."""
        from jupyter_client.manager import AsyncKernelManager

        await self.wait_pool()
        km = AsyncKernelManager(kernel_name=KERNEL, config=self.config)
        mark, _ = await self.ctl.requests()
        await km.start_kernel(mlops_user=COLD_USER)
        kc = km.client()
        kc.start_channels()
        await first_reply(kc, timeout=120)
        kc.stop_channels()
        mark2, start_items = await self.ctl.requests(mark)
        await km.shutdown_kernel(now=True)
        mark3, stop_items = await self.ctl.requests(mark2)
        kernel_id = await self.pools.claim(ENVIRONMENT, PROFILE, CLAIM_USER)
        if kernel_id is None:
            raise RuntimeError("no kernel to claim while counting")
        await self._seen_relabelled(self.mkm.get_kernel(kernel_id).provisioner.pod_name)
        _, claim_items = await self.ctl.requests(mark3)
        await self.mkm.shutdown_kernel(kernel_id, now=True)
        await self.wait_pool()
        m: dict[str, float] = {}
        for key, items in (("start", start_items), ("shutdown", stop_items), ("claim", claim_items)):
            count, detail = summarize(items)
            m[f"api_calls_per_{key}"] = count
            self.calls[key] = detail
        return m

    # -- many kernels ---------------------------------------------------------------------------------

    async def add_virtual(self, n: int) -> dict[str, float]:
        """n more kernel pods in the emulator; the seconds until the watcher holds them all Running."""
        template = next((key for key, pod in self.cluster.pods.objects.items() if key[0] == POOL_NAMESPACE
                         and (pod.get("status") or {}).get("phase") == "Running"), None)
        if template is None:
            raise RuntimeError("no running pool pod to copy")
        t0 = time.perf_counter()
        made = await self.ctl.virtual(n=n, start=len(self.virtual), per_user=self.p["per_user"],
                                      template=list(template))
        ns, name = made["pods"][-1]
        await self.cluster.pods.wait_for(
            ns, name, lambda p: p is not None and (p.get("status") or {}).get("phase") == "Running", timeout=600)
        ingest = time.perf_counter() - t0
        self.virtual += [tuple(x) for x in made["pods"]]  # type: ignore[misc]
        held = sum(1 for key in self.cluster.pods.objects if key[0].startswith(VIRTUAL_NS))
        if held != len(self.virtual):
            raise RuntimeError(f"the watcher holds {held} virtual pods, {len(self.virtual)} were made")
        return {"create_s": made["create_s"], "emulator_s": made["total_s"], "ingest_s": ingest}

    async def api_rounds(self, rounds: int) -> dict[str, list[float]]:
        """Per round, on a random virtual pod: a status patch until the watcher sees it, then the
        product's per-kernel calls one at a time (a new pod and Secret made and deleted again)."""
        from jupyter_mlops.k8s import manifests
        from jupyter_mlops.k8s.names import label_value, object_name
        from jupyter_mlops.kernels.profiles import KernelProfiles

        core, pods = self.cluster.core, self.cluster.pods
        profile = KernelProfiles(config=self.config).get(PROFILE, CLAIM_USER, ENVIRONMENT)
        out: dict[str, list[float]] = {}
        rng = random.Random(rounds)  # the same pods in every run of a mode

        async def timed(what: str, call: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await call
            finally:
                out.setdefault(what, []).append(time.perf_counter() - t0)

        for i in range(rounds):
            ns, name = rng.choice(self.virtual)
            token = f"bench {uuid.uuid4().hex[:8]}"
            seen = asyncio.ensure_future(pods.wait_for(
                ns, name, lambda p, t=token: p is not None and (p.get("status") or {}).get("message") == t,
                timeout=30))
            await asyncio.sleep(0)  # the waiter waits before the change is made
            t0 = time.perf_counter()
            await self.kubelet_api.patch_namespaced_pod_status(name, ns, {"status": {"message": token}})
            await seen
            out.setdefault("watch", []).append(time.perf_counter() - t0)

            kernel_id = str(uuid.uuid4())
            pod_name, secret_name = object_name("kernel", kernel_id), object_name("kernel", kernel_id, "key")
            secret = manifests.kernel_secret(secret_name, ns, uuid.uuid4().hex, dict(manifests.MANAGED_BY))
            pod = manifests.kernel_pod(name=pod_name, namespace=ns, kernel_id=kernel_id, user=CLAIM_USER,
                                       image=IMAGE, profile=profile, environment=ENVIRONMENT,
                                       secret_name=secret_name)
            pod["spec"]["nodeName"] = VIRTUAL_NODE  # nothing runs it: the call is what is measured
            await timed("read namespace", core.read_namespace(ns))
            await timed("create secret", core.create_namespaced_secret(ns, secret))
            await timed("create pod", core.create_namespaced_pod(ns, pod))
            await timed("read pod", core.read_namespaced_pod(name, ns))
            await timed("patch pod", core.patch_namespaced_pod(
                name, ns, {"metadata": {"labels": {manifests.LABEL_USER: label_value(f"user-r{i}")}}}))
            await timed("delete pod", core.delete_namespaced_pod(pod_name, ns, grace_period_seconds=0))
            await timed("delete secret", core.delete_namespaced_secret(secret_name, ns))
            await pods.wait_for(ns, pod_name, lambda p: p is None, timeout=30)  # untimed: N stays N
        return out

    async def relist_s(self) -> float:
        """What a restarted server pays to list every pod it manages (a second Watcher, stopped after)."""
        import functools

        from jupyter_mlops.k8s.client import MANAGED_SELECTOR
        from jupyter_mlops.k8s.watch import Watcher

        w = Watcher(functools.partial(self.cluster.core.list_pod_for_all_namespaces, label_selector=MANAGED_SELECTOR),
                    what="pods (relist)")
        t0 = time.perf_counter()
        await w.start()
        took = time.perf_counter() - t0
        held = len(w.objects)
        await w.stop()
        if held < len(self.virtual):
            raise RuntimeError(f"the relist found {held} pods, wanted {len(self.virtual)} or more")
        return took

    async def decode_us(self) -> dict[str, float]:
        """kubernetes_asyncio's cost per watch event, as each of the product's two streams decodes
        it: ``Watch`` builds a model of the return type named in the list function's docstring
        (none for the pods stream: its list function is a ``functools.partial``, whose docstring
        names none; ``CoreV1Event`` for the events stream), beside the dict the product reads."""
        from kubernetes_asyncio import watch

        events = [e for kept in self.cluster.events.values() for e in kept]
        if not events:
            raise RuntimeError("the events watch holds no event of a kernel pod")
        samples = {"pod": (self.cluster.pods.list_func, self.cluster.pods.get(*self.virtual[0])),
                   "event": (self.cluster.event_watch.list_func, events[-1])}
        w = watch.Watch()
        out: dict[str, float] = {}
        try:
            for what, (func, obj) in samples.items():
                line = json.dumps({"type": "MODIFIED", "object": obj})
                for suffix, kind in (("", w.get_return_type(func)), ("_dict", None)):
                    n = 300
                    t0 = time.perf_counter()
                    for _ in range(n):
                        w.unmarshal_event(line, kind)
                    out[f"watch_decode_{what}{suffix}_us"] = (time.perf_counter() - t0) / n * 1e6
                out[f"watch_decode_{what}_model"] = w.get_return_type(func) or "none"  # type: ignore[assignment]
            return out
        finally:
            await w.close()

    async def close(self) -> None:
        from jupyter_mlops.k8s import client as k8s_client

        if self.pools is not None:
            await self.pools.stop()
        if self.mkm is not None:
            await self.mkm.shutdown_all(now=True)
        if self.kubelet_api is not None:
            await self.kubelet_api.api_client.close()
        await k8s_client.close_clusters()


# -- the run ----------------------------------------------------------------------------------------------


def memory_mib(field: str) -> float:
    """VmRSS / VmHWM of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def api_figures(m: dict[str, float | None], rounds: dict[str, list[float]], suffix: str) -> None:
    calls = [t for what, ts in rounds.items() if what != "watch" for t in ts]
    m[f"watch_latency_p50_ms{suffix}"] = pct(rounds["watch"], 50) * 1000
    m[f"watch_latency_p99_ms{suffix}"] = pct(rounds["watch"], 99) * 1000
    m[f"api_p50_ms{suffix}"] = pct(calls, 50) * 1000
    m[f"api_p99_ms{suffix}"] = pct(calls, 99) * 1000
    if not suffix:
        for what, ts in rounds.items():
            if what != "watch":
                m[f"api_{what.replace(' ', '_')}_p99_ms"] = pct(ts, 99) * 1000


def main(argv: list[str] | None = None) -> int:
    quick = quick_mode(__doc__, "fewer rounds, 200 kernel pods (< 60 s on 2 cores)", argv)
    p = QUICK if quick else DEFAULT
    started = time.perf_counter()
    with scratch("bench-k8s-") as tmp, stdout_to_stderr():
        os.environ.update({
            "MLOPS_ENVIRONMENTS_DIR": str(write_environment(tmp)),
            "JUPYTER_DATA_DIR": str(tmp / "jupyter-data"),  # kernel specs, runtime (connection files)
            "JUPYTER_CONFIG_DIR": str(tmp / "jupyter-config"),  # not the user's ~/.jupyter
        })
        os.environ.pop("JUPYTER_RUNTIME_DIR", None)
        os.environ.pop("JUPYTER_PATH", None)
        (tmp / "work").mkdir()
        os.chdir(tmp / "work")
        log(f"temp folder {tmp}; {'quick' if quick else 'default'} mode: {p}")
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        run = loop.run_until_complete
        ctl = ClusterProcess()
        b = Bench(tmp, p, ctl)
        try:
            url = run(ctl.start(history=max(1000, 3 * p["pods"] + 1000)))
            pid = ctl.proc.pid if ctl.proc else "?"
            log(f"API emulator + kubelet stand-in (tests/k8s) in child process {pid} at {url}")
            m = measure(b, p, run, url)
        finally:
            try:
                run(b.close())
            finally:
                run(ctl.stop())
                loop.close()
                asyncio.set_event_loop(None)
    wall = time.perf_counter() - started
    report(m, p, wall, quick, b)
    return 0


def measure(b: Bench, p: dict[str, Any], run: Any, url: str) -> dict[str, float | None]:
    m: dict[str, float | None] = {"pool_fill_s": run(b.setup(url))}
    log(f"pool of {p['pool_size']} x {ENVIRONMENT}/{PROFILE} kernel pods full in {m['pool_fill_s']:.2f} s")
    # 1-2. pooled claim vs cold start ---------------------------------------------------------------
    log(f"kernels: {p['rounds']} x (cold start, pooled claim) after a warm-up of each")
    res = interleave(log, p["rounds"],
                     [("cold_start", lambda: run(b.cold())), ("pooled_claim", lambda: run(b.pooled()))],
                     warmup=[lambda: run(b.cold()), lambda: run(b.pooled())])
    m["cold_start_s"] = median(res["cold_start"])
    m["pooled_claim_s"] = median(res["pooled_claim"])
    for kind, prefix, parts in (("cold", "cold", ("start_kernel", "connect", "reply")),
                                ("pooled", "claim", ("call", "connect", "reply", "relabel_seen"))):
        timed = b.phases[kind][1:]  # the warm-up is the first entry
        for i, part in enumerate(parts):
            m[f"{prefix}_{part}_s"] = median([t[i] for t in timed])

    # 4. API calls per start / claim / shutdown -----------------------------------------------------
    m.update(run(b.count_calls()))
    log(f"API calls: cold start {b.calls['start']}; claim {b.calls['claim']}; shutdown {b.calls['shutdown']}")

    # 3. many kernels, one watch ---------------------------------------------------------------------
    n = p["pods"]
    first = run(b.add_virtual(IDLE_PODS))
    log(f"{IDLE_PODS} kernel pods on {VIRTUAL_NODE} held by the watcher {first['ingest_s']:.2f} s after asked; "
        f"{p['api_rounds']} rounds of API calls")
    api_figures(m, run(b.api_rounds(p["api_rounds"])), "_idle")
    gc.collect()
    rss_before = memory_mib("VmRSS")
    more = run(b.add_virtual(n - IDLE_PODS))
    m["kernels_managed"] = len(b.virtual)
    m["emulator_make_pods_s"] = more["emulator_s"]
    m["watch_ingest_s"] = more["ingest_s"]
    # the watcher's own part: the child's loop streams nothing while it makes the pods (one request)
    m["watch_catch_up_s"] = max(more["ingest_s"] - more["emulator_s"], 1e-4)
    gc.collect()
    m["rss_mib"] = memory_mib("VmRSS")
    m["rss_growth_mib"] = max(m["rss_mib"] - rss_before, 0.01)  # > 0: the JSON's figures are positive
    log(f"{n} kernel pods held by the watcher: the emulator made them in {more['emulator_s']:.2f} s, the watcher "
        f"held all {more['ingest_s']:.2f} s after asked; RSS {m['rss_mib']:.1f} MiB (+{m['rss_growth_mib']:.1f}); "
        f"{p['api_rounds']} rounds of API calls")
    api_figures(m, run(b.api_rounds(p["api_rounds"])), "")
    watches = run(b.ctl.watches())
    b.watch_resources = watches
    m["watches_open"] = len(watches)
    m["rss_peak_mib"] = memory_mib("VmHWM")  # before the relist below holds a second copy
    m["relist_s"] = run(b.relist_s())
    decoded = run(b.decode_us())
    b.models = {k: str(decoded.pop(k)) for k in list(decoded) if k.endswith("_model")}
    m.update(decoded)
    return m


def secs(value: float | None) -> str:
    if value is not None and not math.isnan(value) and value < 0.01:
        return f"{value * 1000:.2f} ms"
    return fmt(value, "s")


def report(m: dict[str, float | None], p: dict[str, Any], wall: float, quick: bool, b: Bench) -> None:
    ratios = {"vs_cold_start": ratio(m, "cold_start_s", "pooled_claim_s")}
    n = int(m["kernels_managed"] or 0)
    print()
    print(f"k8s benchmark ({'--quick' if quick else 'default'}), on the API emulator of tests/k8s, not a cluster: "
          "medians; ratio = anchor / ours, bigger is better")
    print(f"  kernels x{p['rounds']} (pool of {p['pool_size']} x {ENVIRONMENT}/{PROFILE}); {n} kernel pods held by "
          f"one watch, {p['api_rounds']} rounds of API calls with {IDLE_PODS} and with {n}; total {wall:.0f} s")
    header = f"{'measure':<30} {'anchor':<18} {'anchor':>9} {'ours':>9} {'ratio':>9}  {'goal':<22} met"
    print(header)
    print("-" * len(header))
    r = ratios["vs_cold_start"]
    g = GOALS["pooled_claim_s"]
    r_txt = f"{r:>8.2f}x" if r is not None else f"{'-':>9}"
    print(f"{'first reply, pooled claim':<30} {'cold start':<18} {secs(m['cold_start_s']):>9} "
          f"{secs(m['pooled_claim_s']):>9} {r_txt}  {'pooled_claim_s ' + g:<22} {goal_met(m['pooled_claim_s'], g)}")
    g = GOALS["watches_open"]
    print(f"{'watches open, N kernel pods':<30} {'one per kernel':<18} {n:>9} {m['watches_open']:>9.0f} {'':>9}  "
          f"{'watches_open ' + g:<22} {goal_met(m['watches_open'], g)}")
    print()
    print("where the time goes (medians):")
    print(f"  cold start:   start_kernel {m['cold_start_kernel_s']:.3f} s (plan, namespace read, Secret + Pod created, "
          f"Running seen by the watch); client + channels {m['cold_connect_s'] * 1000:.1f} ms; 1+1 "
          f"{m['cold_reply_s']:.3f} s (the kernel boots in its pod meanwhile)")
    print(f"  pooled claim: claim {m['claim_call_s'] * 1000:.2f} ms; client + channels "
          f"{m['claim_connect_s'] * 1000:.2f} ms; "
          f"1+1 {m['claim_reply_s'] * 1000:.2f} ms; the pod's relabel seen by the watch "
          f"{m['claim_relabel_seen_s'] * 1000:.1f} ms after the claim began")
    print(f"  pool of {p['pool_size']} filled in {m['pool_fill_s']:.2f} s")
    print()
    print(f"one process, {n} kernel pods (on a node the kubelet stand-in does not run, status Running), "
          f"{len({ns for ns, _ in b.virtual})} namespaces:")
    print(f"  watches open in the emulator: {m['watches_open']:.0f} ({', '.join(b.watch_resources)}), not {n}")
    print(f"  the emulator made them in {m['emulator_make_pods_s']:.2f} s (one request, its loop busy meanwhile); "
          f"the watcher held all of them Running {m['watch_catch_up_s']:.2f} s after that "
          f"({2 * (n - IDLE_PODS)} watch events); a fresh list of them (a restarted server) {m['relist_s']:.2f} s")
    print(f"  decoding one watch event in kubernetes_asyncio, as the product's streams do: a pod "
          f"{m['watch_decode_pod_us']:,.0f} us (model: {b.models['watch_decode_pod_model']}; dict only "
          f"{m['watch_decode_pod_dict_us']:,.0f} us), an Event {m['watch_decode_event_us']:,.0f} us (model: "
          f"{b.models['watch_decode_event_model']}; dict only {m['watch_decode_event_dict_us']:,.0f} us)")
    print(f"  RSS of this process: {m['rss_mib']:.1f} MiB holding them ({m['rss_growth_mib']:.1f} MiB more than with "
          f"{IDLE_PODS}: {m['rss_growth_mib'] * 1024 / max(n - IDLE_PODS, 1):.1f} KiB a pod); peak "
          f"{m['rss_peak_mib']:.1f} MiB (before the relist)")
    print("  a pod's status patch (pods/status, a client of its own) until Watcher.wait_for sees it, ms:")
    print(f"    with {n}: p50 {m['watch_latency_p50_ms']:.2f}, p99 {m['watch_latency_p99_ms']:.2f};  "
          f"with {IDLE_PODS}: p50 {m['watch_latency_p50_ms_idle']:.2f}, p99 {m['watch_latency_p99_ms_idle']:.2f}")
    print("  api_p99_ms: p99 round trip, through the product's client (kubernetes_asyncio, its connection and")
    print("  event loop, the shared watch streaming meanwhile), of the calls the product makes per kernel")
    print("  (read namespace, create Secret, create Pod, read Pod, patch Pod labels, delete Pod, delete Secret),")
    print("  one at a time; the emulator runs in another process, so this is its handling + the client's, ms:")
    print(f"    with {n}: p50 {m['api_p50_ms']:.2f}, p99 {m['api_p99_ms']:.2f};  with {IDLE_PODS}: p50 "
          f"{m['api_p50_ms_idle']:.2f}, p99 {m['api_p99_ms_idle']:.2f}")
    per = [(k[4:-7].replace("_", " "), v) for k, v in m.items() if k.startswith("api_") and k.endswith("_p99_ms")
           and k not in ("api_p99_ms",)]
    print("    p99 by call with " + str(n) + ": " + ", ".join(f"{k} {v:.2f}" for k, v in per))
    print()
    print("API requests per kernel operation (the emulator's request log, the two shared watches excluded):")
    print(f"  cold start (to its first reply): {m['api_calls_per_start']:.0f} ({b.calls['start']})")
    print(f"  pooled claim (to the relabel):   {m['api_calls_per_claim']:.0f} ({b.calls['claim']})")
    print(f"  shutdown:                        {m['api_calls_per_shutdown']:.0f} ({b.calls['shutdown']})")
    print()
    metrics = {key: (float(f"{v:.4g}") if v is not None else None) for key, v in m.items()}
    print(json.dumps({"bench": "k8s", "metrics": metrics, "ratios": ratios, "goals": GOALS}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-cluster"]:  # internal: the cluster's child process
        sys.exit(serve_cluster(int(sys.argv[2])))
    sys.exit(main())
