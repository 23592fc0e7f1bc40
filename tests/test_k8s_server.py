"""The server extension with ``kernel_backend = "kubernetes"``, end to end: a real Jupyter Server
whose REST API starts kernels as pods in the API emulator (tests/k8s), reached through the
server's own websocket, stopped through the API; failures come back as the API's statuses."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import pytest
from traitlets.config import Config

# pytest-jupyter's fixtures, for this module only (its autouse loop fixture would touch every test)
from pytest_jupyter.jupyter_core import *  # noqa: F403
from pytest_jupyter.jupyter_server import *  # noqa: F403
from pytest_jupyter.pytest_tornasync import *  # noqa: F403

from jupyter_mlops.kernels.registry import KERNELS

from .server_helpers import HeaderUsers, execute, rest_caller

pytest.importorskip("kubernetes_asyncio")


@pytest.fixture
def emulated(jp_asyncio_loop: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(client, api, kubelet) of an emulated one-node cluster on the server's loop."""
    from .k8s.emulator import running_cluster
    from .k8s.kubelet import Node

    asyncio.set_event_loop(jp_asyncio_loop)
    cluster = running_cluster(nodes=[Node("cpu-1", cpu="4", memory="16Gi")])
    entered = jp_asyncio_loop.run_until_complete(cluster.__aenter__())
    try:
        yield entered
    finally:
        from jupyter_mlops.k8s import client as k8s_client

        jp_asyncio_loop.run_until_complete(k8s_client.close_clusters())
        jp_asyncio_loop.run_until_complete(cluster.__aexit__(None, None, None))


@pytest.fixture
def jp_server_config(emulated: tuple[Any, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    defs = tmp_path / "environments"
    for name, image in (("demo", "registry.example/demo:1"), ("broken", "registry.invalid/nope:1")):
        (defs / name).mkdir(parents=True)
        (defs / name / "environment.yml").write_text(f"channels: [conda-forge]\ndependencies: [python=3.11]\n"
                                                    f"image: {image}\n")
    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(defs))
    monkeypatch.chdir(tmp_path)
    config = Config()
    config.ServerApp.jpserver_extensions = {"jupyter_mlops": True}
    config.ServerApp.identity_provider_class = HeaderUsers
    config.MlopsConfig.kernel_backend = "kubernetes"
    config.KernelProfiles.profiles = {"small": {"display_name": "Small", "cpu": 0.5, "memory": "1Gi"}}
    config.Kubernetes.api_host = emulated[1].url
    config.Kubernetes.connect = "pod-ip"  # the emulator's pod IPs (127.x) route from here
    config.Kubernetes.role_quotas = {"*": {"cpu": "2", "memory": "4Gi", "pods": 2}}
    config.WarmPools.sizes = {"demo/small": 1}
    config.WarmPools.refill_delay = 0.0
    return config


@pytest.fixture
def api(jp_serverapp: Any, jp_fetch: Any, jp_asyncio_loop: Any, emulated: tuple[Any, Any, Any]) -> Iterator[Any]:
    asyncio.set_event_loop(jp_asyncio_loop)
    yield rest_caller(jp_fetch, jp_asyncio_loop)
    for kernel_id in list(jp_serverapp.kernel_manager.list_kernel_ids()):
        jp_asyncio_loop.run_until_complete(jp_serverapp.kernel_manager.shutdown_kernel(kernel_id, now=True))
    jp_asyncio_loop.run_until_complete(jp_serverapp.web_app.settings["mlops_service"].pools.stop())
    left = KERNELS.all()
    for record in left:
        KERNELS.remove(record.kernel_id)
    assert not left, "a kernel outlived its test"


def _pods(loop: Any, client: Any, namespace: str | None = None) -> dict[str, dict[str, str]]:
    """Name -> labels of the cluster's pods (in ``namespace``, or all)."""
    from kubernetes_asyncio.client import CoreV1Api

    core = CoreV1Api(client)
    found = loop.run_until_complete(core.list_namespaced_pod(namespace) if namespace else
                                    core.list_pod_for_all_namespaces())
    return {p.metadata.name: p.metadata.labels or {} for p in found.items}


def test_the_rest_api_runs_kernels_as_pods(api: Any, jp_serverapp: Any, jp_asyncio_loop: Any, jp_ws_fetch: Any,
                                          emulated: tuple[Any, Any, Any]) -> None:
    client = emulated[0]
    pools = jp_serverapp.web_app.settings["mlops_service"].pools
    assert jp_asyncio_loop.run_until_complete(pools.wait_ready(60))
    status, pooled = api("bob", "POST", "kernels", body={"environment": "demo", "profile": "small"})
    assert status == 201 and pooled["origin"] == "pool" and pooled["user"] == "bob", pooled
    status, started = api("bob", "POST", "kernels", body={"environment": "demo", "profile": "small"})
    assert status == 201 and started["user"] == "bob", started
    # a started kernel's pod is in bob's namespace, labelled as his
    mine = {name: labels for name, labels in _pods(jp_asyncio_loop, client).items()
            if labels.get("mlops.jupyter.org/kernel-id") == started["id"]}
    assert [labels.get("mlops.jupyter.org/user") for labels in mine.values()] == ["bob"]
    for kernel in (pooled, started):
        out = jp_asyncio_loop.run_until_complete(execute(
            jp_ws_fetch, kernel["id"], "import os; print(os.environ['MLOPS_KERNEL_PROFILE'], os.environ['MLOPS_POD_IP'])"))
        profile, pod_ip = out.split()
        assert profile == "small" and pod_ip.startswith("127.") and pod_ip != "127.0.0.1"
    assert {k["id"] for k in api("bob", "GET", "kernels")[1]["kernels"]} == {pooled["id"], started["id"]}
    assert api("alice", "GET", "kernels", started["id"])[0] == 404
    assert api("bob", "DELETE", "kernels", started["id"])[0] == 204
    assert started["id"] not in jp_serverapp.kernel_manager.list_kernel_ids()
    assert not [n for n, labels in _pods(jp_asyncio_loop, client).items()
                if labels.get("mlops.jupyter.org/kernel-id") == started["id"]], "the pod outlived its kernel"
    # jupyter_server's idle culler (its own code, called as its timer would) culls a kernel pod,
    # here the one adopted from the pool, and its pod goes with it
    mkm = jp_serverapp.kernel_manager
    mkm.cull_idle_timeout = 0  # idle for any time at all
    jp_asyncio_loop.run_until_complete(mkm.cull_kernel_if_idle(pooled["id"]))
    assert pooled["id"] not in mkm.list_kernel_ids() and api("bob", "GET", "kernels")[1]["kernels"] == []
    assert not [n for n, labels in _pods(jp_asyncio_loop, client).items()
                if labels.get("mlops.jupyter.org/kernel-id") == pooled["id"]], "a culled kernel's pod stayed"


def test_cluster_refusals_come_back_as_statuses_with_the_reason(api: Any, jp_serverapp: Any, jp_asyncio_loop: Any,
                                                                emulated: tuple[Any, Any, Any]) -> None:
    _client, emulator, kubelet = emulated
    # no warm pool here: a claimed pooled pod stays in the pool's namespace, outside the user's quota
    jp_asyncio_loop.run_until_complete(jp_serverapp.web_app.settings["mlops_service"].pools.stop())
    kubelet.image_fails("registry.invalid/nope:*")
    status, body = api("carol", "POST", "kernels", body={"environment": "broken", "profile": "small"})
    assert status == 400 and ("ErrImagePull" in body["message"] or "ImagePullBackOff" in body["message"]), body
    # carol's namespace's quota holds two pods: the third start is refused by it
    for _ in range(2):
        status, body = api("carol", "POST", "kernels", body={"environment": "demo", "profile": "small"})
        assert status == 201, body
    status, body = api("carol", "POST", "kernels", body={"environment": "demo", "profile": "small"})
    assert status == 429 and "quota is used up" in body["message"], body
    emulator.fail_next("create", "pods", 500, "etcdserver: request timed out")
    status, body = api("alice", "POST", "kernels", body={"environment": "demo", "profile": "small"})
    assert status == 502 and "etcdserver: request timed out" in body["message"], body
    assert {r.user for r in KERNELS.all() if r.user} == {"carol"}


def test_a_stopping_server_leaves_kernel_pods_to_the_next_one(api: Any, jp_serverapp: Any, jp_asyncio_loop: Any,
                                                              jp_ws_fetch: Any, emulated: tuple[Any, Any, Any],
                                                              tmp_path: Path) -> None:
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

    from jupyter_mlops.k8s.settings import KubernetesSettings
    from jupyter_mlops.server.adopt import readopt_kernel_pods

    client = emulated[0]
    config = jp_serverapp.config
    config.Kubernetes.on_stop = "keep"  # what "auto" is in a cluster
    jp_asyncio_loop.run_until_complete(jp_serverapp.web_app.settings["mlops_service"].pools.stop())
    status, kernel = api("bob", "POST", "kernels", body={"environment": "demo", "profile": "small"})
    assert status == 201 and kernel["origin"] == "started", kernel
    jp_asyncio_loop.run_until_complete(execute(jp_ws_fetch, kernel["id"], "x = 41"))
    # the server stops as jupyter_server stops it: extensions first, then every kernel it still has
    jp_asyncio_loop.run_until_complete(jp_serverapp.cleanup_extensions())
    jp_asyncio_loop.run_until_complete(jp_serverapp.cleanup_kernels())
    assert kernel["id"] not in jp_serverapp.kernel_manager.list_kernel_ids() and not KERNELS.all()
    assert [labels.get("mlops.jupyter.org/kernel-id") for labels in _pods(jp_asyncio_loop, client).values()] \
        == [kernel["id"]], "the kernel pod was not left running"

    async def next_server() -> str:
        after = AsyncMappingKernelManager(config=config, root_dir=str(tmp_path))
        adopted, deleted = await readopt_kernel_pods(after, KubernetesSettings(config=config))
        assert (adopted, deleted) == ([kernel["id"]], [])
        km = after.get_kernel(kernel["id"])
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=30)
            reply = await kc.execute_interactive("print(x + 1)", timeout=30, output_hook=lambda m: out.append(
                m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
            await after.shutdown_kernel(kernel["id"], now=True)
        return "".join(out)

    out: list[str] = []
    assert jp_asyncio_loop.run_until_complete(next_server()).strip() == "42"
    assert _pods(jp_asyncio_loop, client) == {}
