"""The process's connection to the Kubernetes API (kubernetes_asyncio), and its shared watches."""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

from ..errors import KubernetesError
from .settings import KubernetesSettings
from .watch import Watcher

__all__ = ["Cluster", "cluster_for", "close_clusters", "connect", "MANAGED_SELECTOR"]

MANAGED_SELECTOR = "app.kubernetes.io/managed-by=jupyter-mlops"
_CLUSTERS: dict[tuple[int, str, str, str, str], "Cluster"] = {}


class Cluster:
    """An API client plus the two watches every kernel of this process shares: pods (ours, or those
    ``pod_selector`` picks) and their events."""

    def __init__(self, api: Any, pod_selector: str = MANAGED_SELECTOR) -> None:
        from kubernetes_asyncio import client

        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.pods = Watcher(functools.partial(self.core.list_pod_for_all_namespaces, label_selector=pod_selector),
                            what="pods")
        self.events: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (namespace, pod) -> events, for pods we watch
        self.event_watch = Watcher(functools.partial(self.core.list_event_for_all_namespaces,
                                                     field_selector="involvedObject.kind=Pod"),
                                   what="events", on_event=self._event)
        self._started: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(asyncio.gather(self.pods.start(), self.event_watch.start()))
        await asyncio.shield(self._started)

    async def close(self) -> None:
        await self.pods.stop()
        await self.event_watch.stop()
        await self.api.close()

    def events_of(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        return list(self.events.get((namespace, pod), ()))

    def _event(self, kind: str, event: dict[str, Any]) -> None:
        involved = event.get("involvedObject") or {}
        if involved.get("kind") != "Pod" or kind == "DELETED":
            return
        key = (involved.get("namespace") or "", involved.get("name") or "")
        if self.pods.get(*key) is None and key not in self.events:
            return  # not one of ours
        kept = self.events.setdefault(key, [])
        kept.append(event)
        del kept[:-50]

    def forget(self, namespace: str, pod: str) -> None:
        self.events.pop((namespace, pod), None)


async def cluster_for(settings: KubernetesSettings) -> Cluster:
    """The process's :class:`Cluster` for ``settings`` on the running loop, connected and watching
    the pods of this server (``c.Kubernetes.server_id``): another server's kernel pods are not seen,
    so never re-adopted or deleted here. Raises :class:`KubernetesError` saying how to configure one
    when there is none."""
    from .manifests import LABEL_SERVER
    from .names import label_value

    loop = asyncio.get_running_loop()
    key = (id(loop), settings.api_host, settings.kubeconfig, settings.context, settings.server_id)
    cluster = _CLUSTERS.get(key)
    if cluster is None:
        selector = f"{MANAGED_SELECTOR},{LABEL_SERVER}={label_value(settings.server_id)}"
        cluster = _CLUSTERS[key] = Cluster(await connect(settings), pod_selector=selector)
    try:
        await cluster.start()
    except Exception as e:
        _CLUSTERS.pop(key, None)
        raise KubernetesError(f"the Kubernetes API at {cluster.api.configuration.host} does not answer: "
                              f"{' '.join(str(e).split())[:200]}") from e
    return cluster


async def close_clusters() -> None:
    """Stop the watches and close the connections of this process's clusters on the running loop
    (the server extension's stop; a test's end)."""
    loop = asyncio.get_running_loop()
    for key, cluster in list(_CLUSTERS.items()):
        if key[0] == id(loop):
            _CLUSTERS.pop(key, None)
            await cluster.close()


async def connect(settings: KubernetesSettings) -> Any:
    """A ``kubernetes_asyncio`` ApiClient for ``settings`` (the caller closes it): ``api_host``,
    else the in-cluster service account, else the kubeconfig."""
    try:
        from kubernetes_asyncio import client, config
    except ImportError as e:
        raise KubernetesError("the Kubernetes backends need kubernetes_asyncio: pip install "
                              "'jupyter_mlops[kubernetes]'") from e

    configuration = client.Configuration()
    if settings.api_host:
        configuration.host = settings.api_host
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        try:
            await config.load_kube_config(config_file=settings.kubeconfig or None, context=settings.context or None,
                                          client_configuration=configuration)
        except Exception as e:
            raise KubernetesError(f"no Kubernetes cluster configured ({' '.join(str(e).split())[:160]}); set "
                                  "KUBECONFIG, c.Kubernetes.kubeconfig or c.Kubernetes.api_host") from e
    return client.ApiClient(configuration)
