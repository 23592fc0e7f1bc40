"""Kernel pods reached through the API server's port-forward (``c.Kubernetes.connect``), as a
server outside the cluster does: the real kubernetes_asyncio WebSocket client against the emulator's
``pods/portforward`` (tests/k8s/_portforward.py), which relays to the "pod", a local process.

The kernel tests reuse tests/test_k8s_kernels.py's fixtures and run on the live tier too (there,
through a real API server and kubelet); the PortForward tests use the emulator directly."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from jupyter_mlops.errors import ConfigError
from jupyter_mlops.kernels.registry import KERNELS
from jupyter_mlops.k8s.portforward import PortForward, wants_port_forward

from .k8s.emulator import running_cluster
from .test_k8s_kernels import (  # noqa: F401  (fixtures)
    _run, _start, cluster, interrupt_a_sleeping_cell, k8s_config, warm_pod_pool)

pytest.importorskip("kubernetes_asyncio")

ECHO_PORT, CLOSED_PORT = 52100, 52101
ECHO_SERVER = ("import os, socket, threading\n"
               f"s = socket.create_server((os.environ['POD_IP'], {ECHO_PORT}))\n"
               "print('listening', flush=True)\n"
               "def echo(c):\n"
               "    while (b := c.recv(65536)):\n"
               "        c.sendall(b)\n"
               "    c.close()\n"
               "while True:\n"
               "    c, _ = s.accept()\n"
               "    threading.Thread(target=echo, args=(c,), daemon=True).start()\n")


@pytest.fixture
def mlops_forwarded(k8s_config: Config) -> Config:  # noqa: F811
    k8s_config.Kubernetes.connect = "port-forward"
    return k8s_config


def forwards(api: Any) -> list[str]:
    """The port-forward requests the emulator answered (none to count on a live cluster)."""
    return [r.query.get("ports", "") for r in api.requests if r.resource == "pods/portforward"] if api else []


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def test_connect_auto_port_forwards_outside_a_cluster_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert wants_port_forward("auto") and wants_port_forward("port-forward") and not wants_port_forward("pod-ip")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert not wants_port_forward("auto") and wants_port_forward("port-forward")
    with pytest.raises(ConfigError, match="c.Kubernetes.connect: must be pod-ip, port-forward or auto"):
        wants_port_forward("pod-ips")


def test_a_kernel_runs_interrupts_restarts_and_shuts_down_through_a_port_forward(
        cluster: Any, mlops_forwarded: Config, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    async def body(api: Any, kubelet: Any) -> None:
        km = await _start(mlops_forwarded, mlops_user="ivy")
        provisioner = km.provisioner
        forward = provisioner._forward
        local = dict(forward.local_ports)
        try:
            info = provisioner.connection_info
            assert info["ip"] == "127.0.0.1" and info["shell_port"] == local[52001] != 52001
            pod_ip = (await _run(km, "import os; print(os.environ['MLOPS_POD_IP'])")).strip()
            assert pod_ip != "127.0.0.1"  # the kernel is in its pod, reached through the API server
            assert "52001" in forwards(api) or api is None
            await interrupt_a_sleeping_cell(km)
            await km.restart_kernel(now=True)  # a new pod of the same name, behind the same forward
            assert provisioner._forward is forward and forward.local_ports == local
            assert (await _run(km, "print(1 + 1)")).strip() == "2"
        finally:
            await km.shutdown_kernel(now=True)
        assert provisioner._forward is None
        assert all([await refused(port) for port in local.values()]), "a listener outlived its kernel"

    with caplog.at_level(logging.WARNING, logger="jupyter_mlops.k8s"):
        cluster(body)
    # ports refused while a kernel starts, pods gone while it restarts or shuts down: all expected
    assert not [r.getMessage() for r in caplog.records if "port-forward" in r.getMessage()]


def test_a_restarted_server_re_adopts_a_kernel_pod_through_a_new_forward(
        cluster: Any, mlops_forwarded: Config, tmp_path: Path) -> None:  # noqa: F811
    async def body(api: Any, kubelet: Any) -> None:
        from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

        from jupyter_mlops.k8s import client as k8s_client
        from jupyter_mlops.k8s.settings import KubernetesSettings
        from jupyter_mlops.server.adopt import readopt_kernel_pods

        before = AsyncMappingKernelManager(config=mlops_forwarded, root_dir=str(tmp_path))
        kernel_id = await before.start_kernel(kernel_name="mlops-demo-small", mlops_user="jay")
        await _run(before.get_kernel(kernel_id), "x = 7")
        old = before.get_kernel(kernel_id).provisioner._forward
        # the server process ends: its listeners, watches and records go; the pod keeps running
        await old.close()
        await k8s_client.close_clusters()
        KERNELS.remove(kernel_id)
        # what the ended process's sockets held; its activity stream first, or the event loop would
        # keep watching a closed descriptor that a new connection may reuse
        before.stop_watching_activity(kernel_id)
        before.context.destroy(linger=0)

        after = AsyncMappingKernelManager(config=mlops_forwarded, root_dir=str(tmp_path))
        adopted, _ = await readopt_kernel_pods(after, KubernetesSettings(config=mlops_forwarded))
        assert adopted == [kernel_id]
        km = after.get_kernel(kernel_id)
        new = km.provisioner._forward
        assert new is not old and (km.ip, km.shell_port) == ("127.0.0.1", new.local_ports[52001])
        assert (await _run(km, "print(x)")).strip() == "7"  # the same kernel, state intact
        await after.shutdown_kernel(kernel_id, now=True)
        assert all([await refused(port) for port in new.local_ports.values()])

    cluster(body)


def test_a_pooled_kernel_is_forwarded_when_started_not_when_claimed(
        cluster: Any, mlops_forwarded: Config, tmp_path: Path) -> None:  # noqa: F811
    async def body(api: Any, kubelet: Any) -> None:
        async with warm_pod_pool(mlops_forwarded, tmp_path) as (mkm, pools):
            [(_, pooled, _)] = pools._pools["demo/small"].ready
            forward = pooled.provisioner._forward
            assert forward is not None  # set up as the pod started; the warm-up went through it
            kernel_id = await pools.claim("demo", "small", "kim")
            km = mkm.get_kernel(kernel_id)
            assert km.provisioner._forward is forward and km.shell_port == forward.local_ports[52001]
            assert (await _run(km, "print('claimed')")).strip() == "claimed"
            assert await pools.wait_ready(60)  # refilled, its own forward
            await mkm.shutdown_kernel(kernel_id, now=True)

    cluster(body)


# ---- PortForward on its own -------------------------------------------------------------------

async def _echo_pod(client: Any, name: str) -> None:
    """A pod whose process echoes every byte on its IP's ECHO_PORT; returns once it listens."""
    from kubernetes_asyncio.client import CoreV1Api

    from .k8s.emulator import watch_until

    v1 = CoreV1Api(client)
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    await v1.create_namespaced_pod("default", {
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0, "containers": [{
            "name": "main", "image": "python:3.11", "command": ["python", "-c", ECHO_SERVER], "env": env,
            "ports": [{"containerPort": ECHO_PORT}]}]}})
    await watch_until(v1.list_namespaced_pod, "default", field_selector=f"metadata.name={name}",
                      until=lambda ev: ev["raw_object"]["status"].get("phase") == "Running")
    log = await v1.read_namespaced_pod_log(name, "default", follow=True, _preload_content=False)
    try:
        assert await log.content.readline() == b"listening\n"
    finally:
        log.release()


def test_port_forward_relays_bytes_both_ways_and_says_why_a_connection_fails(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        from kubernetes_asyncio.client import CoreV1Api

        async with running_cluster() as (client, api, kubelet):
            await _echo_pod(client, "echo")
            forward = PortForward(client.configuration, "default", "echo", [ECHO_PORT, CLOSED_PORT])
            local = await forward.start()
            try:
                # two connections at once, each its own WebSocket; more than one frame each way
                streams = [await asyncio.open_connection("127.0.0.1", local[ECHO_PORT]) for _ in range(2)]
                payloads = [bytes(range(256)) * 2048, b"second connection"]
                for (_, writer), data in zip(streams, payloads):
                    writer.write(data)
                for (reader, _), data in zip(streams, payloads):
                    assert await reader.readexactly(len(data)) == data
                assert forwards(api) == [str(ECHO_PORT)] * 2
                # nothing listens on the other port: the error channel says so, the connection closes;
                # a port that never answered may just not listen yet (a kernel starting): debug
                with caplog.at_level(logging.DEBUG, logger="jupyter_mlops.k8s"):
                    for _ in range(2):
                        reader, writer = await asyncio.open_connection("127.0.0.1", local[CLOSED_PORT])
                        assert await reader.read() == b""
                        writer.close()
                said = [(r.levelname, r.getMessage()) for r in caplog.records if "port-forward" in r.getMessage()]
                assert [level for level, _ in said] == ["DEBUG", "DEBUG"]
                assert said[0][1].startswith(f"port-forward to default/echo port {CLOSED_PORT} failed: error "
                                             f"forwarding port {CLOSED_PORT}")
                assert said[0][1].endswith("connect: connection refused") and "\n" not in said[0][1]
                # the pod goes while a connection is open: the local side sees it end; new connections
                # find no pod: news, said in one warning line, the reconnects after it at debug
                reader, writer = streams[1]
                with caplog.at_level(logging.DEBUG, logger="jupyter_mlops.k8s"):
                    await CoreV1Api(client).delete_namespaced_pod("echo", "default", grace_period_seconds=0)
                    assert await reader.read() == b""
                    await api.wait_for("pods", "default", "echo", deleted=True)
                    for _ in range(2):
                        reader, writer = await asyncio.open_connection("127.0.0.1", local[ECHO_PORT])
                        assert await reader.read() == b""
                        writer.close()
                said = [(r.levelname, r.getMessage()) for r in caplog.records if "port-forward" in r.getMessage()]
                gone = (f"port-forward to default/echo port {ECHO_PORT} failed: the API server refused the "
                        "port-forward (HTTP 404, no such pod)")
                assert said[2:] == [("WARNING", gone), ("DEBUG", gone)]
                for _, writer in streams:
                    writer.close()
            finally:
                await forward.close()
            assert all([await refused(port) for port in local.values()])

    asyncio.run(asyncio.wait_for(main(), 60))


def test_port_forward_to_a_pod_that_does_not_exist_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with running_cluster() as (client, api, kubelet):
            forward = PortForward(client.configuration, "default", "ghost", [ECHO_PORT])
            local = await forward.start()  # no pod is needed to listen
            try:
                with caplog.at_level(logging.WARNING, logger="jupyter_mlops.k8s"):
                    reader, writer = await asyncio.open_connection("127.0.0.1", local[ECHO_PORT])
                    assert await reader.read() == b""
                    writer.close()
            finally:
                await forward.close()
        assert [r.getMessage() for r in caplog.records] == [
            f"port-forward to default/ghost port {ECHO_PORT} failed: the API server refused the port-forward "
            "(HTTP 404, no such pod)"]

    asyncio.run(asyncio.wait_for(main(), 60))
