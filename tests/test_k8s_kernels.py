"""Kernels as pods: the mlops-kubernetes provisioner with the real kubernetes_asyncio client against
the API emulator and kubelet stand-in of tests/k8s (a pod's command runs as a local process on a
loopback address of its own, so the kernel really starts, executes, is interrupted and restarted).

Live tier: with ``KUBECONFIG`` and ``MLOPS_K8S_TEST_IMAGE`` (an image with python, ipykernel and
jupyter_mlops, a numeric non-root USER) set, the same tests run against that cluster; the ones that
need the emulator's failure injection skip. docs/kubernetes.md says how to run it on kind or k3s."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from traitlets.config import Config

from jupyter_mlops.errors import KernelStartError, KubernetesError
from jupyter_mlops.kernels.registry import KERNELS

from .k8s.emulator import running_cluster
from .k8s.kubelet import Node

pytest.importorskip("kubernetes_asyncio")

LIVE_IMAGE = os.environ.get("MLOPS_K8S_TEST_IMAGE") if os.environ.get("KUBECONFIG") else None


def emulated(kubelet: Any) -> None:
    """Skips the rest of a test on a live cluster: it needs the emulator's failure injection."""
    if kubelet is None:
        pytest.skip("needs the emulator's failure injection (live tier)")


@pytest.fixture
def k8s_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    defs = tmp_path / "environments"
    demo = LIVE_IMAGE or "registry.example/demo:1"
    for name, image in (("demo", demo), ("broken", "registry.invalid/nope:1")):
        (defs / name).mkdir(parents=True)
        (defs / name / "environment.yml").write_text(f"channels: [conda-forge]\ndependencies: [python=3.11]\n"
                                                    f"image: {image}\n")
    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(defs))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    config = Config()
    config.MlopsConfig.kernel_backend = "kubernetes"
    config.KernelProfiles.profiles = {"small": {"display_name": "Small", "cpu": 0.5, "memory": "1Gi"},
                                      "gpu-1": {"display_name": "One GPU", "cpu": 1, "memory": "1Gi", "gpus": 1}}
    config.Kubernetes.role_quotas = {"*": {"cpu": "2", "memory": "4Gi", "pods": 2}}
    if not LIVE_IMAGE:  # the emulator's pod IPs (127.x) route from here; "auto" would port-forward, as
        config.Kubernetes.connect = "pod-ip"  # outside a real cluster (tests/test_k8s_portforward.py)
    yield config
    left = KERNELS.all()
    for record in left:  # one test's leftover must not fail the tests after it
        KERNELS.remove(record.kernel_id)
    assert not left, "a kernel outlived its test"


@pytest.fixture
def cluster(k8s_config: Config) -> Any:
    """``cluster(body)``: runs ``await body(api, kubelet)`` with an emulated cluster, config pointed at it."""

    def run(body: Any, nodes: list | None = None) -> Any:
        async def live() -> Any:
            from jupyter_mlops.kernels.kernelspecs import sync_from_config

            sync_from_config(k8s_config)
            try:
                return await body(None, None)
            finally:
                from jupyter_mlops.k8s import client as k8s_client

                await k8s_client.close_clusters()

        async def go() -> Any:
            async with running_cluster(nodes=nodes or [Node("cpu-1", cpu="4", memory="16Gi")]) as (client, api, kubelet):
                k8s_config.Kubernetes.api_host = api.url
                from jupyter_mlops.kernels.kernelspecs import sync_from_config

                sync_from_config(k8s_config)
                try:
                    result = await body(api, kubelet)
                    from kubernetes_asyncio.client import CoreV1Api

                    core = CoreV1Api(client)
                    left = [p.metadata.name for p in (await core.list_pod_for_all_namespaces()).items]
                    left += [s.metadata.name for s in (await core.list_secret_for_all_namespaces()).items]
                    assert not left, f"left in the cluster: {left}"
                    return result
                finally:
                    from jupyter_mlops.k8s import client as k8s_client

                    await k8s_client.close_clusters()

        return asyncio.run(live() if LIVE_IMAGE else go())

    return run


async def _start(config: Config, kernel_name: str = "mlops-demo-small", **kw: Any) -> Any:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name, config=config)
    await km.start_kernel(**kw)
    return km


async def _run(km: Any, code: str, timeout: float = 30) -> str:
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout)
        out: list[str] = []
        reply = await client.execute_interactive(
            code, timeout=timeout,
            output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
        return "".join(out) if reply["content"]["status"] == "ok" else f"error: {reply['content'].get('ename')}"
    finally:
        client.stop_channels()


async def interrupt_a_sleeping_cell(km: Any) -> None:
    """Interrupt a cell that sleeps a minute: it must end at once with KeyboardInterrupt."""
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=30)
        sleeping = asyncio.Event()
        running = asyncio.ensure_future(client.execute_interactive(
            "import time; print('sleeping', flush=True); time.sleep(60)", timeout=60,
            output_hook=lambda m: sleeping.set() if m["msg_type"] == "stream" else None))
        await asyncio.wait_for(sleeping.wait(), 30)
        await km.interrupt_kernel()  # a message on the control channel
        reply = await asyncio.wait_for(running, 30)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        client.stop_channels()


def test_a_kernel_runs_in_a_pod_is_interrupted_restarted_and_leaves_nothing(cluster: Any, k8s_config: Config) -> None:
    async def body(api: Any, kubelet: Any) -> None:
        km = await _start(k8s_config, mlops_user="Alice.Smith")
        try:
            info = await km.provisioner.get_provisioner_info()
            assert info["namespace"].startswith("mlops-alice-smith-")  # sanitised and unique
            facts = json.loads(await _run(km, "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
                                                  "('MLOPS_POD_IP', 'MLOPS_KERNEL_PROFILE', 'MLOPS_KERNEL_ENVIRONMENT')}))"))
            from jupyter_mlops.k8s.client import cluster_for
            from jupyter_mlops.k8s.settings import KubernetesSettings

            pod = (await cluster_for(KubernetesSettings(config=k8s_config))).pods.get(info["namespace"], info["pod_name"])
            assert facts["MLOPS_POD_IP"] == pod["status"]["podIP"]  # the kernel binds its pod's own IP
            assert (facts["MLOPS_KERNEL_PROFILE"], facts["MLOPS_KERNEL_ENVIRONMENT"]) == ("small", "demo")
            await interrupt_a_sleeping_cell(km)  # a message: a signal could not reach into a pod
            await km.restart_kernel(now=True)
            assert (await _run(km, "print(1 + 1)")).strip() == "2"
        finally:
            await km.shutdown_kernel(now=True)

    cluster(body)


def test_pods_that_cannot_start_fail_at_once_with_the_reason(cluster: Any, k8s_config: Config) -> None:
    async def body(api: Any, kubelet: Any) -> None:
        emulated(kubelet)
        kubelet.image_fails("registry.invalid/nope:*")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(KernelStartError, match="ErrImagePull|ImagePullBackOff"):
            await _start(k8s_config, "mlops-broken-small", mlops_user="bob")
        with pytest.raises(KernelStartError, match="Unschedulable: 0/1 nodes are available.*nvidia.com/gpu"):
            await _start(k8s_config, "mlops-demo-gpu-1", mlops_user="bob")
        assert loop.time() - started < 20, "failures are reported when the cluster knows them, not at a timeout"
        assert not KERNELS.all()

    cluster(body)


def test_the_namespace_quota_is_enforced_with_the_apis_message(cluster: Any, k8s_config: Config) -> None:
    k8s_config.Kubernetes.role_quotas = {"*": {"cpu": "1", "memory": "4Gi", "pods": 4}}

    async def body(api: Any, kubelet: Any) -> None:
        emulated(kubelet)  # a live cluster's quotas are its own
        first = await _start(k8s_config, mlops_user="carol")
        second = await _start(k8s_config, mlops_user="carol")
        try:
            with pytest.raises(KubernetesError, match="quota is used up.*exceeded quota"):
                await _start(k8s_config, mlops_user="carol")
        finally:
            await first.shutdown_kernel(now=True)
            await second.shutdown_kernel(now=True)

    cluster(body)


def test_a_restarted_server_re_adopts_a_running_kernel_pod(cluster: Any, k8s_config: Config) -> None:
    async def body(api: Any, kubelet: Any) -> None:
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_client.provisioning import KernelProvisionerFactory

        from jupyter_mlops.k8s import client as k8s_client

        km = await _start(k8s_config, mlops_user="dave")
        await _run(km, "answer = 42")
        info = await km.provisioner.get_provisioner_info()
        # the server goes away: its watches, its records; the pod keeps running
        await k8s_client.close_clusters()
        KERNELS.remove(km.kernel_id)
        km.context.destroy(linger=0)  # what the ended process's sockets held

        adopted = AsyncKernelManager(kernel_name="mlops-demo-small", config=k8s_config)
        adopted.kernel_id = info["kernel_id"]
        provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            info["kernel_id"], adopted.kernel_spec, parent=adopted)
        await provisioner.load_provisioner_info(info)
        adopted.provisioner = provisioner
        adopted.load_connection_info(info["connection_info"])
        assert await adopted.is_alive()
        assert (await _run(adopted, "print(answer)")).strip() == "42"  # the same kernel, state intact
        assert [(r.user, r.profile) for r in KERNELS.all()] == [("dave", "small")]
        await adopted.shutdown_kernel(now=True)

    cluster(body)


def test_the_shared_watch_resumes_after_disconnects_and_relists_after_410(cluster: Any, k8s_config: Config) -> None:
    async def body(api: Any, kubelet: Any) -> None:
        from jupyter_mlops.k8s.client import cluster_for
        from jupyter_mlops.k8s.settings import KubernetesSettings

        emulated(kubelet)
        shared = await cluster_for(KubernetesSettings(config=k8s_config))
        km = await _start(k8s_config, mlops_user="erin")
        try:
            api.drop_watches()  # the watch resumes from its last resourceVersion
            await _run(km, "print(1)")
            # the cluster moves on (other objects change), its history is compacted, and the watch
            # drops: the pods' last resourceVersion is too old to resume from (410), so it relists
            from kubernetes_asyncio.client import CoreV1Api

            await CoreV1Api(shared.api).create_namespaced_config_map(
                "default", {"metadata": {"name": "unrelated"}, "data": {"a": "b"}})
            api.compact()
            api.drop_watches()
            await km.restart_kernel(now=True)  # the new pod is seen through the relisted watch
            assert (await _run(km, "print(2)")).strip() == "2"
            assert shared.pods.relists >= 1 and shared.pods.resumes >= 2
        finally:
            await km.shutdown_kernel(now=True)
            await CoreV1Api(shared.api).delete_namespaced_config_map("unrelated", "default")

    cluster(body)


@contextlib.asynccontextmanager
async def warm_pod_pool(config: Config, root: Path) -> AsyncIterator[tuple[Any, Any]]:
    """(kernel manager, WarmPools) with one demo/small kernel pod ready; the pool stopped after."""
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

    from jupyter_mlops.server.pools import WarmPools

    config.WarmPools.sizes = {"demo/small": 1}
    config.WarmPools.refill_delay = 0.0
    mkm = AsyncMappingKernelManager(config=config, root_dir=str(root))
    pools = WarmPools(mkm, config=config)
    try:
        assert await pools.wait_ready(60)
        yield mkm, pools
    finally:
        await pools.stop()


def test_a_warm_pod_pool_hands_a_running_kernel_pod_to_one_user(cluster: Any, k8s_config: Config, tmp_path: Path) -> None:
    async def body(api: Any, kubelet: Any) -> None:
        async with warm_pod_pool(k8s_config, tmp_path) as (mkm, pools):
            kernel_id = await pools.claim("demo", "small", "frank")
            assert kernel_id in mkm.list_kernel_ids()
            km = mkm.get_kernel(kernel_id)
            assert (await _run(km, "import os; print(os.environ['MLOPS_KERNEL_PROFILE'])")).strip() == "small"
            record = KERNELS.get(kernel_id)
            assert (record.user, record.pool) == ("frank", "demo/small")
            from jupyter_mlops.k8s.client import cluster_for
            from jupyter_mlops.k8s.settings import KubernetesSettings

            shared = await cluster_for(KubernetesSettings(config=k8s_config))
            labelled = await shared.pods.wait_for(
                "mlops-pool", km.provisioner.pod_name,
                lambda p: p and p["metadata"]["labels"].get("mlops.jupyter.org/user") == "frank", timeout=10)
            assert labelled["metadata"]["annotations"]["mlops.jupyter.org/user"] == "frank"
            assert await pools.wait_ready(60)  # refilled with another pod, never this one again
            assert [p["ready"] for p in pools.status()] == [1]
            await mkm.shutdown_kernel(kernel_id, now=True)

    cluster(body)


def test_a_server_restart_re_adopts_kernel_pods_and_deletes_what_serves_no_one(cluster: Any, k8s_config: Config,
                                                                               tmp_path: Path) -> None:
    async def body(api: Any, kubelet: Any) -> None:
        from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

        from jupyter_mlops.k8s import client as k8s_client
        from jupyter_mlops.k8s.settings import KubernetesSettings
        from jupyter_mlops.server.adopt import readopt_kernel_pods
        from jupyter_mlops.server.pools import WarmPools

        k8s_config.WarmPools.sizes = {"demo/small": 1}
        before = AsyncMappingKernelManager(config=k8s_config, root_dir=str(tmp_path))
        kernel_id = await before.start_kernel(kernel_name="mlops-demo-small", mlops_user="gina")
        await _run(before.get_kernel(kernel_id), "x = 7")
        pools = WarmPools(before, config=k8s_config)
        assert await pools.wait_ready(60)
        pools._stopping = True  # the process ends: its pool stops filling, its pods stay
        # the server process ends without shutting anything down: pods, secrets stay in the cluster
        await k8s_client.close_clusters()
        for record in KERNELS.all():
            KERNELS.remove(record.kernel_id)
        # what the ended process's sockets held; its activity stream first, or the event loop would
        # keep watching a closed descriptor that a new connection may reuse
        before.stop_watching_activity(kernel_id)
        before.context.destroy(linger=0)

        after = AsyncMappingKernelManager(config=k8s_config, root_dir=str(tmp_path))
        adopted, deleted = await readopt_kernel_pods(after, KubernetesSettings(config=k8s_config))
        assert adopted == [kernel_id] and len(deleted) == 1  # the pooled pod: the pool refills
        assert (await _run(after.get_kernel(kernel_id), "print(x)")).strip() == "7"
        assert [(r.user, r.environment, r.profile) for r in KERNELS.all()] == [("gina", "demo", "small")]
        assert await readopt_kernel_pods(after, KubernetesSettings(config=k8s_config)) == ([], [])  # idempotent
        await after.shutdown_kernel(kernel_id, now=True)

    cluster(body)


def test_a_slow_image_pull_is_reported_while_it_lasts(cluster: Any, k8s_config: Config,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    async def body(api: Any, kubelet: Any) -> None:
        emulated(kubelet)
        kubelet.image_slow("registry.example/demo:*", 0.5)
        with caplog.at_level("INFO", logger="jupyter_mlops.k8s"):
            km = await _start(k8s_config, mlops_user="hal")
        try:
            said = [r.getMessage() for r in caplog.records if r.name == "jupyter_mlops.k8s"]
            assert any("pulling" in m and "registry.example/demo:1" in m for m in said), said
        finally:
            await km.shutdown_kernel(now=True)

    cluster(body)


def test_servers_sharing_a_cluster_leave_each_others_kernel_pods_alone(cluster: Any, k8s_config: Config,
                                                                       tmp_path: Path) -> None:
    async def body(api: Any, kubelet: Any) -> None:
        from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

        from jupyter_mlops.k8s import client as k8s_client
        from jupyter_mlops.k8s.settings import KubernetesSettings
        from jupyter_mlops.server.adopt import readopt_kernel_pods, release_kernel_pods

        configs = {}
        for server in ("blue", "green"):
            configs[server] = c = copy.deepcopy(k8s_config)
            c.Kubernetes.server_id = server
        first = {s: AsyncMappingKernelManager(config=c, root_dir=str(tmp_path)) for s, c in configs.items()}
        kernels = {s: await mkm.start_kernel(kernel_name="mlops-demo-small", mlops_user="kim")
                   for s, mkm in first.items()}
        for server, mkm in first.items():  # both servers stop; their kernel pods go on
            assert await release_kernel_pods(mkm) == [kernels[server]]
        await k8s_client.close_clusters()
        # blue comes back first: it re-adopts its own pod and neither adopts nor deletes green's
        after = {s: AsyncMappingKernelManager(config=c, root_dir=str(tmp_path)) for s, c in configs.items()}
        for server in ("blue", "green"):
            adopted, deleted = await readopt_kernel_pods(after[server], KubernetesSettings(config=configs[server]))
            assert (adopted, deleted) == ([kernels[server]], [])
            assert (await _run(after[server].get_kernel(kernels[server]), "print('up')")).strip() == "up"
        for server, mkm in after.items():
            await mkm.shutdown_kernel(kernels[server], now=True)

    cluster(body)


@pytest.mark.parametrize("origin", ["started", "re-adopted"])
def test_a_kernel_that_cannot_be_restarted_leaves_nothing(cluster: Any, k8s_config: Config, tmp_path: Path,
                                                          origin: str) -> None:
    k8s_config.KernelRestarter.restart_limit = 0  # the first death is the last
    k8s_config.KernelRestarter.time_to_dead = 0.2

    async def body(api: Any, kubelet: Any) -> None:
        from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

        from jupyter_mlops.k8s import client as k8s_client
        from jupyter_mlops.k8s.client import cluster_for
        from jupyter_mlops.k8s.settings import KubernetesSettings
        from jupyter_mlops.server.adopt import readopt_kernel_pods, release_kernel_pods

        mkm = AsyncMappingKernelManager(config=k8s_config, root_dir=str(tmp_path))
        kernel_id = await mkm.start_kernel(kernel_name="mlops-demo-small", mlops_user="lee")
        if origin == "re-adopted":  # a server restart in between: the next one must watch it die too
            await release_kernel_pods(mkm)
            await k8s_client.close_clusters()
            mkm = AsyncMappingKernelManager(config=k8s_config, root_dir=str(tmp_path))
            assert (await readopt_kernel_pods(mkm, KubernetesSettings(config=k8s_config)))[0] == [kernel_id]
        provisioner = mkm.get_kernel(kernel_id).provisioner
        where = (provisioner.namespace, provisioner.pod_name)
        client = mkm.get_kernel(kernel_id).client()
        client.start_channels()
        await client.wait_for_ready(timeout=30)
        client.execute("import os; os._exit(3)")
        client.stop_channels()
        # jupyter_server's restarter gives up and forgets the kernel; the pod, Secret and record go too
        shared = await cluster_for(KubernetesSettings(config=k8s_config))
        await shared.pods.wait_for(*where, lambda p: p is None, timeout=60)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while KERNELS.get(kernel_id) is not None and loop.time() < deadline:
            await asyncio.sleep(0.05)  # the cleanup's last step, after the pod is gone
        assert KERNELS.get(kernel_id) is None and kernel_id not in mkm.list_kernel_ids()
        # jupyter_server forgets a dead kernel without closing its activity stream: as the server
        # process's end would, close what its manager still holds
        mkm.context.destroy(linger=0)

    cluster(body)
