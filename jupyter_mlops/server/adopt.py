"""Kernels the server's kernel manager did not start, made its own: pooled kernels when claimed,
and kernel pods a previous server process left running (re-adopted at start, none leaked).

:func:`adopt_kernel` is the one place that knows jupyter_server's bookkeeping of a started kernel
(2.x): the kernel table, connection count, activity markers, ports, activity watch, the callback for
a failed auto-restart and the running-kernels metric.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

__all__ = ["adopt_kernel", "readopt_kernel_pods", "release_kernel_pods"]

log = logging.getLogger("jupyter_mlops.server")


def adopt_kernel(mkm: Any, km: Any, kernel_info: dict[str, Any] | None = None) -> None:
    """Make the started ``km`` a kernel of ``mkm``, as its ``start_kernel`` would have. A known
    ``kernel_info`` is handed over, so the first websocket does not ask the kernel again."""
    from jupyter_server._tz import utcnow
    from jupyter_server.prometheus.metrics import KERNEL_CURRENTLY_RUNNING_TOTAL

    kernel_id = km.kernel_id
    if not km.ready.done():  # started elsewhere (a previous server): ready as far as we are concerned
        km.ready.set_result(None)
    mkm._kernels[kernel_id] = km
    mkm._kernel_connections[kernel_id] = 0
    km.execution_state = "idle"
    km.reason = ""
    km.last_activity = utcnow()
    mkm._kernel_ports[kernel_id] = km.ports
    mkm.start_watching_activity(kernel_id)
    mkm.add_restart_callback(kernel_id, lambda: mkm._handle_kernel_died(kernel_id), "dead")
    KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).inc()  # its shutdown decrements it
    if kernel_info and kernel_info.get("protocol_version"):
        known: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        known.set_result(kernel_info)
        km._kernel_info_future = known


async def readopt_kernel_pods(mkm: Any, settings: Any) -> tuple[list[str], list[str]]:
    """After a server restart: every running kernel pod of ours becomes a kernel of ``mkm`` again
    (its connection from the pod's IP, the fixed ports and its Secret's key, or a new port-forward's
    local ports when ``c.Kubernetes.connect`` says so; its user, environment and profile from its
    annotations); pods that cannot serve anyone (ended, or waiting in the warm pool, which refills)
    are deleted. Returns (adopted kernel ids, deleted pod names)."""
    from jupyter_client.provisioning import KernelProvisionerFactory

    from ..k8s import manifests
    from ..k8s.client import cluster_for
    from ..k8s.failures import is_running
    from ..kernels.kernelspecs import BASE_SPEC

    cluster = await cluster_for(settings)
    adopted, deleted = [], []
    for (namespace, name), pod in list(cluster.pods.objects.items()):
        meta = pod.get("metadata") or {}
        labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
        kernel_id = labels.get(manifests.LABEL_KERNEL_ID)
        if labels.get(manifests.COMPONENT) != "kernel" or not kernel_id or kernel_id in mkm:
            continue
        secret_name = next((e["valueFrom"]["secretKeyRef"]["name"] for e in pod["spec"]["containers"][0].get("env", [])
                            if e.get("name") == "MLOPS_KERNEL_KEY" and "valueFrom" in e), None)
        if namespace == settings.pool_namespace or not is_running(pod) or secret_name is None:
            await _delete(cluster, namespace, name, secret_name)
            deleted.append(name)
            continue
        key = await _secret_key(cluster, namespace, secret_name)
        connection = {"ip": pod["status"]["podIP"], "transport": "tcp", "key": key.encode(),
                      "signature_scheme": "hmac-sha256",
                      **{f"{c}_port": p for c, p in manifests.KERNEL_PORTS.items()}}
        km = mkm.kernel_manager_factory(connection_file=os.path.join(mkm.connection_dir, f"kernel-{kernel_id}.json"),
                                        parent=mkm, log=mkm.log, kernel_name=BASE_SPEC)
        km.kernel_id = kernel_id
        provisioner = KernelProvisionerFactory.instance(parent=mkm).create_provisioner_instance(
            kernel_id, km.kernel_spec, parent=km)
        await provisioner.load_provisioner_info({
            "kernel_id": kernel_id, "connection_info": connection, "namespace": namespace, "pod_name": name,
            "secret_name": secret_name,
            "mlops": {"user": notes.get(manifests.LABEL_USER, ""), "environment": notes.get(manifests.LABEL_ENVIRONMENT),
                      "profile": notes.get(manifests.LABEL_PROFILE, "")}})
        km.provisioner = provisioner
        km.load_connection_info(provisioner.connection_info)  # the pod's, or its new port-forward's
        km.start_restarter()  # a pod that dies is restarted, as one this server started would be; first,
        adopt_kernel(mkm, km)  # or the manager's callback for a kernel that cannot be is dropped
        provisioner.watch_for_death()
        adopted.append(kernel_id)
        log.info("re-adopted kernel %s of %s (pod %s/%s)", kernel_id, notes.get(manifests.LABEL_USER), namespace, name)
    return adopted, deleted


async def release_kernel_pods(mkm: Any) -> list[str]:
    """The server stops, its users' kernel pods go on (``c.Kubernetes.on_stop``): every kernel in a
    pod leaves ``mkm`` without being shut down, so jupyter_server's ``shutdown_all`` that follows
    does not delete it and the next server re-adopts it. Returns the kernel ids let go."""
    from jupyter_server.prometheus.metrics import KERNEL_CURRENTLY_RUNNING_TOTAL

    from ..k8s.provisioner import MlopsKubernetesProvisioner

    released = []
    for kernel_id in list(mkm.list_kernel_ids()):
        km = mkm.get_kernel(kernel_id)
        provisioner = getattr(km, "provisioner", None)
        if not isinstance(provisioner, MlopsKubernetesProvisioner) or not provisioner.has_process:
            continue
        mkm.stop_watching_activity(kernel_id)
        km.stop_restarter()
        await provisioner.release()  # from here its cleanup leaves the pod alone
        await km.cleanup_resources(restart=False)  # its sockets: open ones keep the process from exiting
        mkm.remove_kernel(kernel_id)
        mkm._kernel_connections.pop(kernel_id, None)
        mkm._kernel_ports.pop(kernel_id, None)
        KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).dec()
        released.append(kernel_id)
    return released


async def _secret_key(cluster: Any, namespace: str, name: str) -> str:
    import base64

    secret = await cluster.core.read_namespaced_secret(name, namespace)
    data = secret.data or {}
    return base64.b64decode(data["key"]).decode() if "key" in data else (secret.string_data or {}).get("key", "")


async def _delete(cluster: Any, namespace: str, pod: str, secret: str | None) -> None:
    from kubernetes_asyncio.client.exceptions import ApiException

    for call in (cluster.core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0),
                 cluster.core.delete_namespaced_secret(secret, namespace) if secret else None):
        if call is None:
            continue
        try:
            await call
        except ApiException as e:
            if e.status != 404:
                log.warning("could not delete %s/%s: %s", namespace, pod, e.reason)
