"""The API emulator and kubelet stand-in, driven by the real ``kubernetes_asyncio`` client.

Every wait is on a watch event (or an emulator-side change), with a timeout; no sleeps stand in for
synchronisation. Pods are real local processes: each test checks that none outlives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import psutil
import pytest

from tests.k8s import ApiEmulator, Node, running_cluster, watch_until

pytest.importorskip("kubernetes_asyncio")
from kubernetes_asyncio import client, watch  # noqa: E402
from kubernetes_asyncio.client.exceptions import ApiException  # noqa: E402


@pytest.fixture(autouse=True)
def mlops_no_stray_processes() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, f"processes outlived the test: {[p.cmdline() for p in left]}"


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 40))


def py(code: str) -> list[str]:
    return ["python", "-c", code]


def pod(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": spec.pop("image", "python:3.11"), "command": command,
                 "env": spec.pop("env", []), "resources": spec.pop("resources", {})}
    for key in ("workingDir", "ports"):
        if key in spec:
            container[key] = spec.pop(key)
    return {"metadata": {"name": name, "labels": spec.pop("labels", {"app": "test"})},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0, "containers": [container],
                     **spec}}


def phase_is(*phases: str) -> Callable[[dict[str, Any]], bool]:
    return lambda ev: ev["type"] != "DELETED" and ev["raw_object"]["status"].get("phase") in phases


def status_body(e: ApiException) -> dict[str, Any]:
    body = json.loads(e.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["code"] == e.status
    return body


# ---- pods that run ------------------------------------------------------------------------

def test_pod_prints_secret_and_pod_ip_then_succeeds() -> None:
    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet):
            v1 = client.CoreV1Api(api)
            await v1.create_namespace({"metadata": {"name": "alice"}})
            await v1.create_namespaced_secret("alice", {"metadata": {"name": "kernel-key"},
                                                        "stringData": {"key": "s3cr3t"}})
            env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "kernel-key", "key": "key"}}},
                   {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                   {"name": "GREETING", "value": "key=$(KEY)"}]
            created = await v1.create_namespaced_pod("alice", pod("k1", py(
                "import os; print(os.environ['GREETING'], os.environ['POD_IP'], os.getcwd().endswith('work'))"),
                env=env, workingDir="/home/jovyan/work"))
            assert created.status.phase == "Pending" and created.metadata.uid and created.metadata.creation_timestamp
            events = await watch_until(v1.list_namespaced_pod, "alice", until=phase_is("Succeeded", "Failed"),
                                       resource_version=created.metadata.resource_version)
            final = events[-1]["object"]
            assert final.status.phase == "Succeeded", final.status
            state = final.status.container_statuses[0].state.terminated
            assert (state.exit_code, state.reason) == (0, "Completed")
            assert final.status.pod_ip.startswith("127.") and final.spec.node_name == "node-1"
            log = await v1.read_namespaced_pod_log("k1", "alice")
            assert log == f"key=s3cr3t {final.status.pod_ip} True\n"
            reasons = {e.reason for e in (await v1.list_namespaced_event(
                "alice", field_selector="involvedObject.name=k1")).items}
            assert {"Scheduled", "Pulled", "Created", "Started"} <= reasons

            listed = await v1.list_namespaced_pod("alice", field_selector="status.phase=Succeeded")
            assert [p.metadata.name for p in listed.items] == ["k1"] and int(listed.metadata.resource_version) > 0
            with pytest.raises(ApiException) as e:
                await v1.create_namespaced_pod("alice", pod("k1", py("pass")))
            assert status_body(e.value)["reason"] == "AlreadyExists" and e.value.status == 409
            with pytest.raises(ApiException) as e:
                await v1.create_namespaced_pod("nobody", pod("k2", py("pass")))
            assert status_body(e.value)["message"] == 'namespaces "nobody" not found'
            await v1.delete_namespaced_pod("k1", "alice")  # terminal: removed at once
            assert not (await v1.list_namespaced_pod("alice")).items
    run(main)


def test_pod_serves_on_its_own_ip_and_is_stopped_by_delete() -> None:
    server = ("import os, signal, socket, sys\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('bye', flush=True), sys.exit(0)))\n"
              "s = socket.create_server((os.environ['POD_IP'], 52001))\n"
              "print('listening', flush=True)\n"
              "while True:\n"
              "    c, _ = s.accept(); c.sendall(b'hello from ' + os.environ['POD_IP'].encode()); c.close()\n")
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]

    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet):
            v1 = client.CoreV1Api(api)
            for name in ("a", "b"):
                await v1.create_namespaced_pod("default", pod(name, py(server), env=env, ports=[{"containerPort": 52001}],
                                                              terminationGracePeriodSeconds=5))
            ips = []
            for name in ("a", "b"):
                p = (await watch_until(v1.list_namespaced_pod, "default", field_selector=f"metadata.name={name}",
                                       until=phase_is("Running")))[-1]["object"]
                assert p.status.conditions and {c.type: c.status for c in p.status.conditions}["Ready"] == "True"
                resp = await v1.read_namespaced_pod_log(name, "default", follow=True, _preload_content=False)
                assert (await resp.content.readline()) == b"listening\n"
                resp.release()
                reader, writer = await asyncio.open_connection(p.status.pod_ip, 52001)
                assert await reader.read() == f"hello from {p.status.pod_ip}".encode()
                writer.close()
                await writer.wait_closed()
                ips.append(p.status.pod_ip)
            assert len(set(ips)) == 2
            proc = kubelet.process("a")
            deleted = await v1.delete_namespaced_pod("a", "default")
            assert deleted.metadata.deletion_timestamp is not None  # graceful: still there, terminating
            await emu.wait_for("pods", "default", "a", deleted=True)
            assert proc.returncode == 0 and (await v1.list_namespaced_pod("default")).items[0].metadata.name == "b"
            # deleting the namespace takes its pods (and their processes) with it
            await v1.delete_namespace("default")
            await emu.wait_for("namespaces", "", "default", deleted=True)
            assert kubelet.process("b") is None
    run(main)


def test_portforward_speaks_the_websocket_channel_protocol() -> None:
    """Raw frames, as the kubelet sends them: port prefixes, data, the error channel, the closes."""
    import aiohttp

    echo = ("import os, socket\n"
            "s = socket.create_server((os.environ['POD_IP'], 52001))\n"
            "print('listening', flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept()\n"
            "    while (b := c.recv(65536)):\n"
            "        c.sendall(b.upper())\n"
            "    c.close()\n")
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]

    async def frames(ws: Any) -> list[bytes]:
        return [m.data async for m in ws if m.type == aiohttp.WSMsgType.BINARY]

    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet), aiohttp.ClientSession() as http:
            v1 = client.CoreV1Api(api)
            await v1.create_namespaced_pod("default", pod("e", py(echo), env=env, ports=[{"containerPort": 52001}]))
            await watch_until(v1.list_namespaced_pod, "default", until=phase_is("Running"))
            log = await v1.read_namespaced_pod_log("e", "default", follow=True, _preload_content=False)
            assert (await log.content.readline()) == b"listening\n"
            log.release()
            url = emu.url.replace("http", "ws") + "/api/v1/namespaces/default/pods/e/portforward"
            async with http.ws_connect(f"{url}?ports=52001", protocols=["v4.channel.k8s.io"]) as ws:
                assert ws.protocol == "v4.channel.k8s.io"
                assert [await ws.receive_bytes(), await ws.receive_bytes()] == [b"\x00\x21\xcb", b"\x01\x21\xcb"]
                await ws.send_bytes(b"\x00hello")
                assert await ws.receive_bytes() == b"\x00HELLO"
                await ws.send_bytes(b"\x00")  # an empty frame is nothing, not an end
                await ws.send_bytes(b"\x00!")
                assert await ws.receive_bytes() == b"\x00!"
            # a port nothing listens on: the port prefixes, then the kubelet's message, then the close
            async with http.ws_connect(f"{url}?ports=52001,52002", protocols=["v4.channel.k8s.io"]) as ws:
                got = await frames(ws)
            assert got[:4] == [b"\x00\x21\xcb", b"\x01\x21\xcb", b"\x02\x22\xcb", b"\x03\x22\xcb"]
            assert len(got) == 5 and got[4].startswith(b"\x03error forwarding port 52002 to pod ")
            assert got[4].endswith(b"dial tcp4 %s:52002: connect: connection refused"
                                   % pod_ip_of(emu, "e").encode())
            assert [(r.verb, r.resource, r.query) for r in emu.requests if r.resource == "pods/portforward"] == [
                ("get", "pods/portforward", {"ports": "52001"}), ("get", "pods/portforward", {"ports": "52001,52002"})]
            # refused before any upgrade: no such pod (404), no WebSocket (400), no port (400)
            for path, code in (("pods/ghost/portforward?ports=1", 404), ("pods/e/portforward?ports=52001", 400),
                               ("pods/e/portforward", 400)):
                async with http.get(f"{emu.url}/api/v1/namespaces/default/{path}") as resp:
                    assert (resp.status, (await resp.json())["code"]) == (code, code)
            await v1.delete_namespaced_pod("e", "default")
            await emu.wait_for("pods", "default", "e", deleted=True)
    run(main)


def pod_ip_of(emu: ApiEmulator, name: str) -> str:
    return emu.store.get("pods", "default", name)["status"]["podIP"]


def test_oom_killed() -> None:
    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet):
            v1 = client.CoreV1Api(api)
            await v1.create_namespaced_pod("default", pod("hog", py("import time; time.sleep(600)")))
            await watch_until(v1.list_namespaced_pod, "default", until=phase_is("Running"))
            kubelet.oom("hog")
            final = (await watch_until(v1.list_namespaced_pod, "default", until=phase_is("Failed")))[-1]["object"]
            term = final.status.container_statuses[0].state.terminated
            assert (term.reason, term.exit_code) == ("OOMKilled", 137)
    run(main)


def test_restart_policy_always_gives_crash_loop_back_off() -> None:
    async def main() -> None:
        async with running_cluster(restart_backoff=0.05) as (api, emu, kubelet):
            v1 = client.CoreV1Api(api)
            await v1.create_namespaced_pod("default", pod("crash", py("print('boom'); raise SystemExit(3)"),
                                                          restartPolicy="Always"))

            def backing_off(ev: dict[str, Any]) -> bool:
                cs = ev["raw_object"]["status"].get("containerStatuses") or [{}]
                return cs[0].get("restartCount", 0) >= 2 and "waiting" in cs[0].get("state", {})
            p = (await watch_until(v1.list_namespaced_pod, "default", until=backing_off))[-1]["raw_object"]
            cs = p["status"]["containerStatuses"][0]
            assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff" and p["status"]["phase"] == "Running"
            assert cs["lastState"]["terminated"]["exitCode"] == 3
            assert await v1.read_namespaced_pod_log("crash", "default", previous=True) == "boom\n"
    run(main)


def test_missing_secret_holds_the_container_until_it_exists() -> None:
    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet):
            v1 = client.CoreV1Api(api)
            env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}}]
            await v1.create_namespaced_pod("default", pod("w", py("import os; print(os.environ['TOKEN'])"), env=env))

            def config_error(ev: dict[str, Any]) -> bool:
                cs = ev["raw_object"]["status"].get("containerStatuses") or [{}]
                return cs[0].get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"
            ev = (await watch_until(v1.list_namespaced_pod, "default", until=config_error))[-1]["raw_object"]
            assert ev["status"]["containerStatuses"][0]["state"]["waiting"]["message"] == 'secret "late" not found'
            await v1.create_namespaced_secret("default", {"metadata": {"name": "late"}, "data": {"token": "dG9r"}})
            await watch_until(v1.list_namespaced_pod, "default", until=phase_is("Succeeded"))
            assert await v1.read_namespaced_pod_log("w", "default") == "tok\n"
    run(main)


def test_finalizers_and_owner_references() -> None:
    async def main() -> None:
        async with ApiEmulator() as emu, emu.client() as api:
            v1 = client.CoreV1Api(api)
            owner = await v1.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
            ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
            for name in ("dep", "held"):
                meta: dict[str, Any] = {"name": name, "ownerReferences": [ref]}
                if name == "held":
                    meta["finalizers"] = ["example.com/keep"]
                await v1.create_namespaced_config_map("default", {"metadata": meta})
            await v1.delete_namespaced_config_map("owner", "default", propagation_policy="Foreground")
            # the owner waits for its dependents; the finalizer holds one of them
            assert (await v1.read_namespaced_config_map("owner", "default")).metadata.deletion_timestamp
            held = await v1.read_namespaced_config_map("held", "default")
            assert held.metadata.deletion_timestamp and not await _exists(v1, "dep")
            await v1.patch_namespaced_config_map("held", "default", {"metadata": {"finalizers": None}},
                                                 _content_type="application/merge-patch+json")
            assert not await _exists(v1, "held") and not await _exists(v1, "owner")
            # Orphan keeps the dependents and drops the reference
            owner = await v1.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
            ref["uid"] = owner.metadata.uid
            await v1.create_namespaced_config_map("default", {"metadata": {"name": "kept", "ownerReferences": [ref]}})
            await v1.delete_namespaced_config_map("owner", "default", propagation_policy="Orphan")
            assert (await v1.read_namespaced_config_map("kept", "default")).metadata.owner_references is None
    run(main)


async def _exists(v1: Any, name: str) -> bool:
    try:
        await v1.read_namespaced_config_map(name, "default")
    except ApiException as e:
        assert e.status == 404
        return False
    return True


# ---- watches --------------------------------------------------------------------------------

def test_watch_in_order_and_resumes_after_drop_without_missing_events() -> None:
    async def main() -> None:
        async with ApiEmulator() as emu, emu.client() as api:
            v1 = client.CoreV1Api(api)
            start = (await v1.list_namespaced_config_map("default")).metadata.resource_version
            seen: list[tuple[str, str, str]] = []
            got: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()

            async def consume() -> None:
                async with watch.Watch() as w:  # no timeout: the client reconnects by itself
                    async for ev in w.stream(v1.list_config_map_for_all_namespaces, label_selector="team=ml",
                                             resource_version=start):
                        item = (ev["type"], ev["object"].metadata.name, ev["object"].metadata.resource_version)
                        seen.append(item)
                        got.put_nowait(item)

            task = asyncio.ensure_future(consume())
            try:
                cm = {"metadata": {"name": "c1", "labels": {"team": "ml"}}, "data": {"v": "1"}}
                await v1.create_namespaced_config_map("default", cm)
                await v1.create_namespaced_config_map("default", {"metadata": {"name": "other"}})  # not selected
                await v1.patch_namespaced_config_map("c1", "default", {"data": {"v": "2"}})
                for _ in range(2):
                    await asyncio.wait_for(got.get(), 10)
                assert emu.drop_watches() == 1
                # changes while the client reconnects: it resumes from the last resourceVersion it saw
                await v1.patch_namespaced_config_map("c1", "default", {"data": {"v": "3"}})
                await v1.patch_namespaced_config_map("c1", "default", {"metadata": {"labels": {"team": "x"}}})
                await v1.create_namespaced_config_map("default", {"metadata": {"name": "c2", "labels": {"team": "ml"}}})
                await v1.delete_namespaced_config_map("c2", "default")
                for _ in range(4):
                    await asyncio.wait_for(got.get(), 10)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            assert [(t, n) for t, n, _ in seen] == [("ADDED", "c1"), ("MODIFIED", "c1"), ("MODIFIED", "c1"),
                                                     ("DELETED", "c1"), ("ADDED", "c2"), ("DELETED", "c2")]
            versions = [int(rv) for _, _, rv in seen]
            assert versions == sorted(versions) and len(set(versions)) == len(versions)
            watches = [r for r in emu.requests if r.verb == "watch"]
            assert len(watches) == 2 and watches[1].query["resourceVersion"] == seen[1][2]
    run(main)


def test_watch_from_compacted_history_gets_410() -> None:
    async def main() -> None:
        async with ApiEmulator() as emu, emu.client() as api:
            v1 = client.CoreV1Api(api)
            rv = (await v1.list_namespaced_pod("default")).metadata.resource_version
            await v1.create_namespaced_config_map("default", {"metadata": {"name": "c"}})
            emu.compact()
            with pytest.raises(ApiException) as e:
                async with watch.Watch() as w:
                    async for _ in w.stream(v1.list_namespaced_config_map, "default", resource_version=rv,
                                            timeout_seconds=5):
                        pass
            assert e.value.status == 410 and "too old resource version" in e.value.reason
            # an injected 410 arrives the same way: an ERROR event in the stream
            emu.fail_next("watch", "configmaps", 410, "too old resource version: 1 (2)")
            with pytest.raises(ApiException) as e:
                async with watch.Watch() as w:
                    async for _ in w.stream(v1.list_namespaced_config_map, "default", timeout_seconds=5):
                        pass
            assert e.value.status == 410
    run(main)


# ---- API errors -----------------------------------------------------------------------------

def test_errors_are_real_status_objects_and_injected_failures() -> None:
    async def main() -> None:
        async with ApiEmulator() as emu, emu.client() as api:
            v1 = client.CoreV1Api(api)
            with pytest.raises(ApiException) as e:
                await v1.read_namespaced_pod("ghost", "default")
            body = status_body(e.value)
            assert (body["reason"], body["message"], body["details"]) == (
                "NotFound", 'pods "ghost" not found', {"name": "ghost", "kind": "pods"})
            with pytest.raises(ApiException) as e:
                await v1.create_namespaced_pod("default", pod("bad", py("pass"), labels={"user": "Ann Lee!"}))
            body = status_body(e.value)
            assert e.value.status == 422 and body["reason"] == "Invalid"
            assert body["details"]["causes"][0]["field"] == "metadata.labels"
            emu.fail_next("create", "pods", 429, "slow down", retry_after=1)
            with pytest.raises(ApiException) as e:
                await v1.create_namespaced_pod("default", pod("p", py("pass")))
            assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
            created = await v1.create_namespaced_pod("default", pod("p", py("pass")))  # only the next one failed
            await v1.patch_namespaced_pod("p", "default", {"metadata": {"labels": {"a": "b"}}})
            with pytest.raises(ApiException) as e:
                await v1.replace_namespaced_pod("p", "default", api.sanitize_for_serialization(created))
            assert status_body(e.value)["reason"] == "Conflict"
            await v1.patch_namespaced_pod("p", "default", [{"op": "add", "path": "/metadata/labels/c", "value": "d"}])
            labels = (await v1.read_namespaced_pod("p", "default")).metadata.labels
            assert labels == {"app": "test", "a": "b", "c": "d"}
            selected = await v1.list_namespaced_pod("default", label_selector="a in (b,x),c,!missing,app!=web")
            assert [p.metadata.name for p in selected.items] == ["p"]
            assert not (await v1.list_namespaced_pod("default", label_selector="a notin (b)")).items
            version = await client.VersionApi(api).get_code()
            assert version.major == "1"
    run(main)


def test_quota_exceeded_is_403_with_the_real_message() -> None:
    async def main() -> None:
        async with ApiEmulator() as emu, emu.client() as api:
            v1 = client.CoreV1Api(api)
            await v1.create_namespace({"metadata": {"name": "bob"}})
            await v1.create_namespaced_resource_quota("bob", {"metadata": {"name": "mlops-quota"}, "spec": {
                "hard": {"requests.nvidia.com/gpu": "1", "limits.memory": "4Gi", "pods": "10"}}})
            await v1.create_namespaced_limit_range("bob", {"metadata": {"name": "defaults"}, "spec": {"limits": [
                {"type": "Container", "default": {"memory": "1Gi"}, "defaultRequest": {"memory": "512Mi"}}]}})
            gpu = {"limits": {"nvidia.com/gpu": "1"}}
            first = await v1.create_namespaced_pod("bob", pod("g1", py("pass"), resources=gpu))
            assert first.spec.containers[0].resources.limits == {"nvidia.com/gpu": "1", "memory": "1Gi"}
            assert first.spec.containers[0].resources.requests == {"nvidia.com/gpu": "1", "memory": "512Mi"}
            with pytest.raises(ApiException) as e:
                await v1.create_namespaced_pod("bob", pod("g2", py("pass"), resources=gpu))
            body = status_body(e.value)
            assert e.value.status == 403 and body["reason"] == "Forbidden"
            assert body["message"] == ('pods "g2" is forbidden: exceeded quota: mlops-quota, requested: '
                                       'requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=1, '
                                       'limited: requests.nvidia.com/gpu=1')
            quota = await emu.wait_for("resourcequotas", "bob", "mlops-quota",
                                       lambda q: q.get("status", {}).get("used", {}).get("pods") == "1")
            assert quota["status"]["used"]["limits.memory"] == "1Gi"
    run(main)


# ---- scheduling and images --------------------------------------------------------------------

def test_unschedulable_then_scheduled_when_the_gpu_frees() -> None:
    nodes = [Node("cpu-1", cpu="8", memory="32Gi", labels={"pool": "cpu"}),
             Node("gpu-1", cpu="8", memory="32Gi", extended={"nvidia.com/gpu": 1}, labels={"pool": "gpu"},
                  taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])]
    gpu_pod = dict(resources={"limits": {"nvidia.com/gpu": "1"}}, nodeSelector={"pool": "gpu"},
                   tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])

    def unschedulable(ev: dict[str, Any]) -> bool:
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                   for c in ev["raw_object"]["status"].get("conditions") or [])

    async def main() -> None:
        async with running_cluster(nodes=nodes) as (api, emu, kubelet):
            v1 = client.CoreV1Api(api)
            await v1.create_namespaced_pod("default", pod("holder", py("import time; time.sleep(600)"), **gpu_pod))
            await watch_until(v1.list_namespaced_pod, "default", field_selector="metadata.name=holder",
                              until=phase_is("Running"))
            await v1.create_namespaced_pod("default", pod("waiter", py("print('got it')"), **gpu_pod))
            ev = (await watch_until(v1.list_namespaced_pod, "default", field_selector="metadata.name=waiter",
                                    until=unschedulable))[-1]
            cond = next(c for c in ev["raw_object"]["status"]["conditions"] if c["type"] == "PodScheduled")
            assert cond["message"].startswith("0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) "
                                              "didn't match Pod's node affinity/selector.")
            events = (await v1.list_namespaced_event("default", field_selector="involvedObject.name=waiter")).items
            failed = [e for e in events if e.reason == "FailedScheduling"]
            assert failed and failed[0].type == "Warning" and failed[0].message == cond["message"]
            assert failed[0].involved_object.kind == "Pod"
            untolerated = pod("no-toleration", py("pass"), resources={"limits": {"nvidia.com/gpu": "1"}})
            await v1.create_namespaced_pod("default", untolerated)
            ev = (await watch_until(v1.list_namespaced_pod, "default", field_selector="metadata.name=no-toleration",
                                    until=unschedulable))[-1]
            assert "1 node(s) had untolerated taint {nvidia.com/gpu: present}" in str(ev["raw_object"]["status"])
            await v1.delete_namespaced_pod("holder", "default")  # frees the GPU: the waiter is retried
            done = await watch_until(v1.list_namespaced_pod, "default", field_selector="metadata.name=waiter",
                                     until=phase_is("Succeeded"))
            assert done[-1]["object"].spec.node_name == "gpu-1"
    run(main)


def test_image_pull_failure_and_slow_pull() -> None:
    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet):
            kubelet.image_fails("registry.example/missing:*")
            kubelet.image_slow("registry.example/big:*", 0.3)
            v1 = client.CoreV1Api(api)
            await v1.create_namespaced_pod("default", pod("bad", py("pass"), image="registry.example/missing:1"))

            def waiting(reason: str) -> Callable[[dict[str, Any]], bool]:
                return lambda ev: any(cs.get("state", {}).get("waiting", {}).get("reason") == reason
                                      for cs in ev["raw_object"]["status"].get("containerStatuses") or [])
            events = await watch_until(v1.list_namespaced_pod, "default", until=waiting("ImagePullBackOff"))
            assert any(waiting("ErrImagePull")(e) for e in events) and events[-1]["object"].status.phase == "Pending"
            reasons = [(e.type, e.reason) for e in (await v1.list_namespaced_event(
                "default", field_selector="involvedObject.name=bad")).items]
            assert ("Warning", "Failed") in reasons and ("Normal", "BackOff") in reasons
            with pytest.raises(ApiException) as e:
                await v1.read_namespaced_pod_log("bad", "default")
            assert e.value.status == 400

            await v1.create_namespaced_pod("default", pod("slow", py("pass"), image="registry.example/big:2"))
            await watch_until(v1.list_namespaced_pod, "default", field_selector="metadata.name=slow",
                              until=phase_is("Succeeded"))
            pulls = [e.reason for e in sorted((await v1.list_namespaced_event(
                "default", field_selector="involvedObject.name=slow")).items, key=lambda e: int(
                e.metadata.resource_version))]
            assert pulls.index("Pulling") < pulls.index("Pulled") < pulls.index("Started")
    run(main)


# ---- Jobs and CronJobs ------------------------------------------------------------------------

def job(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "step", "image": "python:3.11", "command": command}]}}, **spec}}


def condition(*types: str) -> Callable[[dict[str, Any]], bool]:
    return lambda ev: any(c["type"] in types and c["status"] == "True"
                          for c in (ev["raw_object"].get("status") or {}).get("conditions") or [])


def test_job_retried_up_to_backoff_limit_then_failed() -> None:
    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet):
            batch, v1 = client.BatchV1Api(api), client.CoreV1Api(api)
            with pytest.raises(ApiException) as e:  # a Job must say Never or OnFailure
                bad = job("bad", py("pass"))
                del bad["spec"]["template"]["spec"]["restartPolicy"]
                await batch.create_namespaced_job("default", bad)
            assert e.value.status == 422
            await batch.create_namespaced_job("default", job("flaky", py("raise SystemExit(2)"), backoffLimit=2))
            final = (await watch_until(batch.list_namespaced_job, "default", until=condition("Failed")))[-1]["object"]
            assert final.status.failed == 3 and final.status.active == 0
            assert next(c for c in final.status.conditions if c.type == "Failed").reason == "BackoffLimitExceeded"
            pods = (await v1.list_namespaced_pod("default", label_selector="job-name=flaky")).items
            assert len(pods) == 3 and all(p.status.phase == "Failed" for p in pods)
            assert all(p.metadata.name.startswith("flaky-") and p.metadata.owner_references[0].kind == "Job"
                       for p in pods)
            # deleting with Background propagation takes the pods too
            await batch.delete_namespaced_job("flaky", "default", propagation_policy="Background")
            assert not (await v1.list_namespaced_pod("default")).items
    run(main)


def test_job_active_deadline_exceeded() -> None:
    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet):
            batch = client.BatchV1Api(api)
            await batch.create_namespaced_job("default", job("slow", py("import time; time.sleep(600)"),
                                                             activeDeadlineSeconds=1))
            final = (await watch_until(batch.list_namespaced_job, "default", until=condition("Failed")))[-1]["object"]
            assert next(c for c in final.status.conditions if c.type == "Failed").reason == "DeadlineExceeded"
            pod_name = (await client.CoreV1Api(api).list_namespaced_pod("default")).items
            for p in pod_name:  # the running pod was killed and removed
                await emu.wait_for("pods", "default", p.metadata.name, deleted=True)
    run(main)


def test_cronjob_trigger_honours_forbid_and_history(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    step = py(f"print(open({str(gate)!r}).read())")  # blocks until the test writes the gate

    async def release() -> None:
        await asyncio.to_thread(gate.write_text, "go")

    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet):
            batch = client.BatchV1Api(api)
            await batch.create_namespaced_cron_job("default", {"metadata": {"name": "nightly"}, "spec": {
                "schedule": "0 3 * * *", "concurrencyPolicy": "Forbid", "successfulJobsHistoryLimit": 1,
                "jobTemplate": {"spec": job("x", step)["spec"]}}})
            first = await kubelet.trigger_cronjob("default", "nightly")
            assert first and first.startswith("nightly-")
            assert await kubelet.trigger_cronjob("default", "nightly") is None  # Forbid: the first still runs
            assert any(e["reason"] == "JobAlreadyActive" for e in emu.events_for("default", "nightly"))
            cj = await batch.read_namespaced_cron_job("nightly", "default")
            assert [r.name for r in cj.status.active] == [first] and cj.status.last_schedule_time
            await release()
            await watch_until(batch.list_namespaced_job, "default", field_selector=f"metadata.name={first}",
                              until=condition("Complete"))
            await emu.wait_for("cronjobs", "default", "nightly", lambda c: not c["status"].get("active"))
            second = await kubelet.trigger_cronjob("default", "nightly")
            assert second and second != first
            await release()
            await emu.wait_for("jobs", "default", first, deleted=True)  # history limit 1: the older goes
            cj = await emu.wait_for("cronjobs", "default", "nightly", lambda c: "lastSuccessfulTime" in c["status"]
                                    and not c["status"].get("active"))
            assert [j.metadata.name for j in (await batch.list_namespaced_job("default")).items] == [second]
    run(main)


def test_images_map_to_interpreters() -> None:
    """``python`` in a container's command becomes the interpreter the test mapped to its image."""
    async def main() -> None:
        async with running_cluster() as (api, emu, kubelet):
            kubelet.images["env/*"] = sys.executable
            v1 = client.CoreV1Api(api)
            await v1.create_namespaced_pod("default", pod("which", ["python3", "-c", "import sys; print(sys.executable)"],
                                                          image="env/pytorch:1"))
            await watch_until(v1.list_namespaced_pod, "default", until=phase_is("Succeeded"))
            assert (await v1.read_namespaced_pod_log("which", "default")).strip() == sys.executable
    run(main)
