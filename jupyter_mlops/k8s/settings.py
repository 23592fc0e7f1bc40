"""``c.Kubernetes.*``: where kernels, steps and schedules go on a cluster, and with what."""

from __future__ import annotations

import os
from typing import Any

from traitlets import Dict, Enum, Float, Unicode, default
from traitlets.config import Configurable

from ..errors import ConfigError

__all__ = ["KubernetesSettings"]


class KubernetesSettings(Configurable):
    """Settings of the Kubernetes backends (config section ``Kubernetes``)."""

    # traitlets names the config section after the class; keep the short one users write
    @classmethod
    def section_names(cls) -> list[str]:  # pragma: no cover - traitlets hook
        return ["Kubernetes"]

    api_host = Unicode("", help="URL of the API server. Empty: in-cluster when running in a pod, else "
                       "the kubeconfig (KUBECONFIG or ~/.kube/config).").tag(config=True)
    kubeconfig = Unicode("", help="Path of a kubeconfig file; empty: KUBECONFIG or ~/.kube/config.").tag(config=True)
    context = Unicode("", help="kubeconfig context; empty: the current one.").tag(config=True)
    namespace_template = Unicode("mlops-{user}", help="Namespace of a user's kernels and steps; {user} is "
                                 "sanitised into a valid, unique name.").tag(config=True)
    pool_namespace = Unicode("mlops-pool", help="Namespace of warm-pool kernel pods (c.WarmPools.sizes); a "
                             "claimed pod stays there, relabelled as its user's.").tag(config=True)
    role_quotas = Dict({}, help="role -> {cpu, memory, gpus, gpu_resource, pods}: the ResourceQuota of a "
                       "user's namespace, the most generous of their roles' ('*': users with none).").tag(config=True)
    default_cpu = Unicode("1", help="LimitRange default CPU for containers that ask for none.").tag(config=True)
    default_memory = Unicode("2Gi", help="LimitRange default memory for containers that ask for none.").tag(config=True)
    image_pull_policy = Unicode("IfNotPresent", help="imagePullPolicy of kernel and step pods.").tag(config=True)
    service_account = Unicode("", help="Service account of kernel and step pods; empty: none mounted "
                              "(a kernel needs no API access).").tag(config=True)
    startup_timeout = Float(300.0, help="Seconds a kernel pod may take to start (pulling a large image "
                            "counts; a failure is reported as soon as it is known, not at this limit).").tag(config=True)
    connect = Enum(("auto", "pod-ip", "port-forward"), "auto", help="How the server reaches kernel pods: pod-ip (their IPs must route from "
                      "the server), port-forward (local ports on 127.0.0.1 relayed through the API server's "
                      "pods/portforward, as kubectl port-forward does; needs create on pods/portforward), or auto: "
                      "pod-ip when the server runs in a pod (KUBERNETES_SERVICE_HOST set), port-forward otherwise."
                      ).tag(config=True)
    server_id = Unicode(help="Which server this is, where several share a cluster (replicas, or a staging and "
                        "a production server): its kernel pods carry it as a label, and it follows, re-adopts "
                        "and deletes only pods with its own id. Stable across restarts (a StatefulSet's pod "
                        "name, not a Deployment's). Default: MLOPS_SERVER_ID, else 'default'.").tag(config=True)
    on_stop = Enum(("auto", "keep", "shut-down"), "auto", help="What a stopping server does with its users' "
                   "kernel pods: keep them running (the next server, after a restart or a rolling update, "
                   "re-adopts them), shut them down (as jupyter_server does with local kernels), or auto: keep "
                   "in a cluster, shut down outside one (a laptop's server leaves nothing running).").tag(config=True)
    pipeline_image = Unicode("", help="Image the CronJobs of schedules run `jupyter mlops pipeline run` in "
                             "(`jupyter mlops schedule export --kubernetes`): one with jupyter_mlops installed and "
                             "the project (pipeline.yaml, its notebooks, environments/) at pipeline_project_dir, "
                             "copied in at build time (COPY . /project in its Dockerfile) or checked out by the "
                             "image's entry point. Empty: export refuses, saying to set it.").tag(config=True)
    pipeline_project_dir = Unicode("/project", help="Where the project is inside pipeline_image; a schedule's "
                                   "pipeline file is found there by its path relative to the project root here."
                                   ).tag(config=True)

    @classmethod
    def checked(cls, config: Any) -> "KubernetesSettings":
        """The settings of ``config``, or :class:`ConfigError` naming the setting that is wrong (the
        server checks them at start, not at the first kernel)."""
        from traitlets import TraitError

        try:
            return cls(config=config)
        except TraitError as e:
            raise ConfigError(" ".join(str(e).split()), source="c.Kubernetes") from None

    @default("server_id")
    def _server_id_default(self) -> str:
        return os.environ.get("MLOPS_SERVER_ID") or "default"

    def keeps_kernels_on_stop(self) -> bool:
        """:attr:`on_stop` resolved: whether a stopping server leaves its kernel pods running."""
        if self.on_stop == "auto":
            return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        return self.on_stop == "keep"
