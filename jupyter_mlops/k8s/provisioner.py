"""``mlops-kubernetes``: a kernel in a pod of its environment's image, with its profile's resources.

The same choice as ``mlops-local`` (environment, profile, user; the ``mlops_*`` keyword arguments of
``start_kernel`` override the kernel spec's config), placed on a cluster:

* the user's namespace is made on first use, with the ResourceQuota and LimitRange of their role;
* a Secret holds the connection key; the pod binds its own IP on fixed ports (no port race, no
  callback to the server) and is followed through the process's shared pod and event watches;
* the server reaches those ports at the pod's IP, or, outside the cluster, through a port-forward
  of the API server (``c.Kubernetes.connect``, :mod:`.portforward`): local ports on 127.0.0.1 that
  last from the pod's start (not a pool claim) through restarts to the kernel's shutdown;
* a pod that cannot start fails the start as soon as the cluster says why (Unschedulable, image
  pull errors, OOMKilled, quota exceeded), never at a timeout; image pull progress is logged;
* interrupts are messages (the kernel spec says ``interrupt_mode: message``): signals do not
  cross into a pod; shutting down deletes the pod and its Secret;
* :meth:`get_provisioner_info` carries namespace, pod and key, so a restarted server re-adopts a
  running kernel pod instead of leaking it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Unicode

from ..errors import KernelStartError
from ..kernels.registry import KERNELS, KernelRecord
from .namespaces import api_error, ensure_namespace
from .portforward import wants_port_forward

__all__ = ["MlopsKubernetesProvisioner"]

log = logging.getLogger("jupyter_mlops.k8s")


class MlopsKubernetesProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    environment = Unicode("", help="Environment whose image the kernel runs.").tag(config=True)
    profile = Unicode("", help="Profile of resources; empty: the default.").tag(config=True)

    namespace: str | None = None
    pod_name: str | None = None
    secret_name: str | None = None
    _cluster: Any = None
    _settings: Any = None
    _status: str = ""  # what the start is doing now (pulling an image...), for a frontend
    _deleted = False  # kill() asked for the pod's deletion; cleanup() need not ask again
    _watching_death = False  # _died_for_good is the manager's "dead" restart callback
    _port_forward = False  # c.Kubernetes.connect resolved: reach the pod through the API server
    _forward: Any = None  # the PortForward while there is one

    @property
    def has_process(self) -> bool:
        return self.pod_name is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        from ..config import load_config
        from ..kernels.limits import check_limits
        from ..kernels.profiles import KernelProfiles
        from .names import namespace_for
        from .settings import KubernetesSettings

        choice = {k: kwargs.pop(f"mlops_{k}", None) for k in ("environment", "profile", "user", "pool")}
        config = load_config(self.config)
        self._settings = KubernetesSettings(config=config.config)
        self._port_forward = wants_port_forward(self._settings.connect)
        profiles = KernelProfiles(config=config.config)
        existing = KERNELS.get(self.kernel_id)
        if existing is not None:  # a restart keeps who and what
            environment, profile_name, user = existing.environment, existing.profile, existing.user
        else:
            environment = choice["environment"] or self.environment or None
            profile_name = choice["profile"] or self.profile or None
            user = choice["user"] or _server_user()
        profile = profiles.get(profile_name, user, environment)
        if existing is None and choice["pool"] is None:
            check_limits(user, profiles.limits(user), [r.for_limits() for r in KERNELS.all()], profile.gpus)
        self._plan = {"user": user, "environment": environment, "profile": profile,
                      "image": _image_of(environment, config), "pool": choice["pool"]}
        # a pooled pod belongs to no one until claimed: it waits in the pool's namespace
        self.namespace = self._settings.pool_namespace if choice["pool"] else \
            namespace_for(user, self._settings.namespace_template)
        kwargs = await super().pre_launch(**kwargs)
        kwargs.setdefault("cmd", [])
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        from . import manifests
        from .client import cluster_for
        from .names import object_name

        plan = self._plan
        cluster = self._cluster = await cluster_for(self._settings)
        await ensure_namespace(cluster.core, self.namespace, plan["user"], self._settings,
                               quota=not plan["pool"])
        key = self.parent.session.key.decode() if self.parent is not None else ""
        self.pod_name = object_name("kernel", self.kernel_id)
        self.secret_name = object_name("kernel", self.kernel_id, "key")
        labels = {**manifests.MANAGED_BY}
        secret = manifests.kernel_secret(self.secret_name, self.namespace, key, labels)
        pod = manifests.kernel_pod(
            name=self.pod_name, namespace=self.namespace, kernel_id=self.kernel_id, user=plan["user"],
            image=plan["image"], profile=plan["profile"], environment=plan["environment"],
            secret_name=self.secret_name, service_account=self._settings.service_account or None,
            image_pull_policy=self._settings.image_pull_policy, server=self._settings.server_id)
        await self._create(cluster.core.create_namespaced_secret, secret, replace=True)
        try:
            await self._create(cluster.core.create_namespaced_pod, pod)
        except BaseException:  # refused (quota, forbidden): the key goes too
            await self._ignore_missing(cluster.core.delete_namespaced_secret(self.secret_name, self.namespace))
            raise
        KERNELS.add(KernelRecord(self.kernel_id, "" if plan["pool"] else plan["user"], plan["environment"],
                                 plan["profile"].name, pool=plan["pool"]))
        try:
            running = await self._wait_running()
            self.connection_info = {"ip": running["status"]["podIP"], "transport": "tcp", "key": key.encode(),
                                    "signature_scheme": "hmac-sha256",
                                    **{f"{c}_port": p for c, p in manifests.KERNEL_PORTS.items()}}
            if self._port_forward:
                self.connection_info.update(await self._forwarded())
        except BaseException as failure:  # nothing of a kernel that never ran stays behind
            try:
                await self._delete(grace=0)
                await self.cleanup()
            except Exception as e:  # the start's own failure is the news; this one is said beside it
                log.warning("kernel pod %s/%s: cleaning up after a failed start: %s", self.namespace,
                            self.pod_name, e)
            raise failure
        return self.connection_info

    async def post_launch(self, **kwargs: Any) -> None:
        await super().post_launch(**kwargs)
        self.watch_for_death()

    def watch_for_death(self) -> None:
        """Clean up should the manager's restarter give up on the kernel (:meth:`_died_for_good`);
        once: the manager is the same on restarts. Its restarter must be running."""
        if not self._watching_death and self.parent is not None:
            self.parent.add_restart_callback(self._died_for_good, "dead")
            self._watching_death = True

    def _died_for_good(self) -> None:
        """The restarter gave up (every restart failed): jupyter_server forgets the kernel without a
        shutdown, so its pod, Secret, port-forward and record would stay: clean them up here."""
        log.warning("kernel %s: its pod %s/%s died and could not be restarted; deleting what is left of it",
                    self.kernel_id, self.namespace, self.pod_name)
        # the manager's cleanup closes its sockets too (open ones keep the process from exiting), then ours
        task = asyncio.ensure_future(self.parent.cleanup_resources(restart=False) if self.parent is not None
                                     else self.cleanup(restart=False))
        task.add_done_callback(lambda t: t.exception() and log.warning(
            "kernel %s: cleaning up after its death failed: %s", self.kernel_id, t.exception()))

    def hand_over(self, user: str) -> None:
        """A pooled kernel pod claimed by ``user``: theirs in the registry at once, and in the pod's
        labels shortly after (a background patch; listing by label follows it)."""
        KERNELS.hand_over(self.kernel_id, user)
        if self._cluster is not None and self.pod_name:
            task = asyncio.ensure_future(self._relabel(user))
            task.add_done_callback(lambda t: t.exception() and log.warning(
                "kernel pod %s: relabelling for %s failed: %s", self.pod_name, user, t.exception()))

    async def _relabel(self, user: str) -> None:
        from .manifests import LABEL_USER
        from .names import label_value

        # the label is sanitised; the annotation keeps the name as it is (as the builders write them)
        body = {"metadata": {"labels": {LABEL_USER: label_value(user)}, "annotations": {LABEL_USER: user}}}
        await self._cluster.core.patch_namespaced_pod(self.pod_name, self.namespace, body)

    async def poll(self) -> int | None:
        if self._cluster is None or self.pod_name is None:
            return 0
        pod = self._cluster.pods.get(self.namespace, self.pod_name)
        phase = ((pod or {}).get("status") or {}).get("phase")
        if pod is None or phase in ("Succeeded", "Failed"):
            return 0 if phase == "Succeeded" else 1
        return None

    async def wait(self) -> int | None:
        if self._cluster is None or self.pod_name is None:
            return 0
        try:
            await self._cluster.pods.wait_for(
                self.namespace, self.pod_name,
                lambda p: p is None or ((p.get("status") or {}).get("phase") in ("Succeeded", "Failed")), timeout=60)
        except asyncio.TimeoutError:
            log.warning("kernel pod %s/%s has not ended a minute after it was asked to", self.namespace, self.pod_name)
        return await self.poll()

    async def send_signal(self, signum: int) -> None:
        if signum in (signal.SIGKILL, signal.SIGTERM):
            await self._delete(grace=0 if signum == signal.SIGKILL else None)
        # other signals cannot reach a process in a pod; interrupts go as messages

    async def shutdown_requested(self, restart: bool = False) -> None:
        if self._forward is not None:  # the kernel ends itself: its port-forward's failures are no news
            self._forward.expect_down()

    async def kill(self, restart: bool = False) -> None:
        await self._delete(grace=0)
        self._deleted = True

    async def terminate(self, restart: bool = False) -> None:
        await self._delete(grace=None)

    async def cleanup(self, restart: bool = False) -> None:
        """Delete the pod (an ended pod stays in the namespace otherwise) and wait until it is gone,
        so a restart can make the next one under the same name; the Secret and the record go
        unless restarting."""
        cluster = self._cluster
        try:
            if cluster is not None and self.namespace and self.pod_name:
                if not self._deleted:  # kill() has asked already on a forced shutdown
                    await self._delete(grace=0)
                self._deleted = False
                try:
                    await cluster.pods.wait_for(self.namespace, self.pod_name, lambda p: p is None, timeout=60)
                except asyncio.TimeoutError:
                    log.warning("kernel pod %s/%s is still there a minute after its deletion", self.namespace,
                                self.pod_name)
                cluster.forget(self.namespace, self.pod_name)
                if not restart and self.secret_name:
                    await self._ignore_missing(cluster.core.delete_namespaced_secret(self.secret_name,
                                                                                     self.namespace))
        finally:  # the API failing must not leak the local listeners or the user's record
            if not restart:  # a restart re-creates the pod under the same name: the forward reaches it
                await self._close_forward()
                KERNELS.remove(self.kernel_id)

    async def release(self) -> None:
        """This server lets go of the kernel without stopping it (it stops; the next one re-adopts
        the pod): the local port-forward and the record go, the pod and its Secret stay."""
        await self._close_forward()
        KERNELS.remove(self.kernel_id)
        self.pod_name = None  # nothing of this provisioner may delete the pod now

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update({"namespace": self.namespace, "pod_name": self.pod_name, "secret_name": self.secret_name})
        record = KERNELS.get(self.kernel_id)
        if record is not None:
            info["mlops"] = record.to_json()
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Re-adopt a kernel pod a previous server started (the pod keeps running meanwhile). With
        port-forwarding, a new forward is started: ``connection_info`` then has its local ports."""
        from ..config import load_config
        from .client import cluster_for
        from .settings import KubernetesSettings

        await super().load_provisioner_info(provisioner_info)
        self.namespace = provisioner_info.get("namespace")
        self.pod_name = provisioner_info.get("pod_name")
        self.secret_name = provisioner_info.get("secret_name")
        self._settings = KubernetesSettings(config=load_config(self.config).config)
        self._port_forward = wants_port_forward(self._settings.connect)
        self._cluster = await cluster_for(self._settings)
        if self._port_forward and self.connection_info:
            self.connection_info = {**self.connection_info, **await self._forwarded()}
        saved = provisioner_info.get("mlops") or {}
        if saved and KERNELS.get(self.kernel_id) is None:
            KERNELS.add(KernelRecord(self.kernel_id, saved.get("user") or "", saved.get("environment"),
                                     saved.get("profile") or "", pool=saved.get("pool")))

    # -- inside ---------------------------------------------------------------------------------

    async def _forwarded(self) -> dict[str, Any]:
        """The connection info's address and ports through this pod's port-forward, started if need be."""
        from .manifests import KERNEL_PORTS
        from .portforward import PortForward

        target = (self.namespace, self.pod_name)
        if self._forward is not None and self._forward.target != target:
            await self._close_forward()
        if self._forward is None:
            forward = PortForward(self._cluster.api.configuration, *target, KERNEL_PORTS.values())
            await forward.start()
            self._forward = forward
        self._forward.pod_started()
        return {"ip": "127.0.0.1", **{f"{c}_port": self._forward.local_ports[p] for c, p in KERNEL_PORTS.items()}}

    async def _close_forward(self) -> None:
        forward, self._forward = self._forward, None
        if forward is not None:
            await forward.close()

    async def _wait_running(self) -> dict[str, Any]:
        from .failures import is_running, progress, start_failure

        cluster = self._cluster
        said = None
        seen = False  # the watch may deliver the new pod after the create returned: None is "not yet"

        def settled(pod: dict[str, Any] | None) -> bool:
            nonlocal said, seen
            if pod is None and not seen:
                return False
            seen = True
            events = cluster.events_of(self.namespace, self.pod_name)
            now = progress(events)
            if now and now != said:
                said = self._status = now
                log.info("kernel %s: %s", self.kernel_id, now)
            return is_running(pod) or start_failure(pod, events) is not None

        try:
            pod = await cluster.pods.wait_for(self.namespace, self.pod_name, settled,
                                              timeout=self._settings.startup_timeout)
        except asyncio.TimeoutError:
            raise KernelStartError(f"kernel pod {self.namespace}/{self.pod_name} did not start within "
                                   f"{self._settings.startup_timeout:g} s ({self._status or 'no progress reported'})"
                                   ) from None
        if not is_running(pod):
            raise KernelStartError(start_failure(pod, cluster.events_of(self.namespace, self.pod_name)) or "?")
        assert pod is not None
        return pod

    async def _create(self, create: Any, body: dict[str, Any], *, exists_ok: bool = False,
                      replace: bool = False) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        what = f"{body['kind']} {self.namespace}/{body['metadata']['name']}"
        try:
            if body["kind"] == "Namespace":
                await create(body)
            else:
                await create(self.namespace, body)
        except ApiException as e:
            if e.status == 409 and (exists_ok or replace):
                return
            raise api_error(e, f"creating {what}") from e

    async def _delete(self, grace: int | None) -> None:
        if self._cluster is None or not self.pod_name or not self.namespace:
            return
        if self._forward is not None:
            self._forward.expect_down()
        pod = self._cluster.pods.get(self.namespace, self.pod_name)
        if pod is not None and (pod.get("metadata") or {}).get("deletionTimestamp") and grace != 0:
            return  # already on its way out
        kwargs = {} if grace is None else {"grace_period_seconds": grace}
        await self._ignore_missing(self._cluster.core.delete_namespaced_pod(self.pod_name, self.namespace, **kwargs))

    @staticmethod
    async def _ignore_missing(call: Any) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            await call
        except ApiException as e:
            if e.status != 404:
                raise api_error(e, "deleting") from e


def _image_of(environment: str | None, config: Any) -> str:
    from ..environments.spec import find_environments, load_environment

    if not environment:
        raise KernelStartError("a kernel on Kubernetes runs an environment's image: choose an environment "
                               "whose environment.yml has `image:`")
    found = find_environments(config.resolved_environments_dir)
    if environment not in found:
        raise KernelStartError(f"no environment {environment!r} (known: {', '.join(found) or 'none'})")
    spec = load_environment(found[environment])
    if not spec.image:
        raise KernelStartError(f"environment {environment!r} has no `image:`; add the image built from its lock "
                               f"to {spec.file}")
    return spec.image


def _server_user() -> str:
    from ..kernels.launch import current_user

    return current_user()
