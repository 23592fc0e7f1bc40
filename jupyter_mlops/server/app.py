"""The Jupyter Server extension: REST API under /mlops/api/, kernel specs and warm pools.

Enabled on install (``jupyter-config/jupyter_server_config.d/jupyter_mlops.json``). At start it
writes the kernel specs of the installed environments x profiles, checks the profiles (a broken
profile stops the server with the reason, not the first kernel start), starts the warm pools and
the culler of kernels whose GPUs sit idle (:mod:`.gpu_culler`, off by default), and turns Nagle's
delay off on kernel websockets.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.extension.application import ExtensionApp

from ..config import load_config
from ..kernels.kernelspecs import sync_from_config
from ..kernels.profiles import KernelProfiles
from .gpu_culler import GpuCuller
from .handlers import HANDLERS
from .pools import WarmPools
from .service import KernelService

__all__ = ["MlopsExtensionApp"]


class MlopsExtensionApp(ExtensionApp):
    name = "jupyter_mlops"
    description = "jupyter_mlops: environments, profiles, GPUs and kernels of this server"
    load_other_extensions = True

    service: KernelService | None = None
    gpu_culler: GpuCuller | None = None

    def initialize_settings(self) -> None:
        settings = load_config(self.serverapp.config)
        KernelProfiles(config=settings.config).parsed()  # raises ConfigError naming profile and field
        if settings.kernel_backend == "kubernetes":
            from ..k8s.settings import KubernetesSettings

            KubernetesSettings.checked(settings.config)  # likewise for c.Kubernetes
        done = sync_from_config(settings.config)
        if done.written or done.removed:
            self.log.info("mlops: kernel specs written: %s; removed: %s", ", ".join(done.written) or "none",
                          ", ".join(done.removed) or "none")
        pools = WarmPools(self.serverapp.kernel_manager, config=settings.config, log=self.log)
        self.service = KernelService(self.serverapp.kernel_manager, settings, pools)
        self.settings["mlops_service"] = self.service
        self.gpu_culler = GpuCuller(self.serverapp.kernel_manager, config=settings.config, log=self.log)
        self.settings["mlops_gpu_culler"] = self.gpu_culler
        self._use_nodelay_websockets()

    def _use_nodelay_websockets(self) -> None:
        """Kernel websockets without Nagle's delay (see :mod:`.connection`), unless the deployment
        configured a connection class of its own."""
        from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

        from .connection import NoDelayWebsocketConnection

        if self.serverapp.kernel_websocket_connection_class is ZMQChannelsWebsocketConnection:
            self.settings["kernel_websocket_connection_class"] = NoDelayWebsocketConnection

    def initialize_handlers(self) -> None:
        self.handlers.extend(HANDLERS)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.service is None:
            return
        if self.service.settings.kernel_backend == "kubernetes":
            from ..k8s.settings import KubernetesSettings
            from .adopt import readopt_kernel_pods

            try:
                adopted, deleted = await readopt_kernel_pods(self.serverapp.kernel_manager,
                                                             KubernetesSettings(config=self.service.config))
                if adopted or deleted:
                    self.log.info("mlops: re-adopted %d kernel pod(s), deleted %d that could serve no one",
                                  len(adopted), len(deleted))
            except Exception as e:  # the cluster is down: kernels started later say so themselves
                self.log.warning("mlops: kernel pods not re-adopted: %s", e)
        self.service.pools.start()
        if self.gpu_culler is not None:
            self.gpu_culler.start()

    async def stop_extension(self) -> None:
        if self.gpu_culler is not None:
            await self.gpu_culler.stop()
        if self.service is not None:
            await self.service.pools.stop()
            if self.service.settings.kernel_backend == "kubernetes":
                await self._let_kernel_pods_go_on()

    async def _let_kernel_pods_go_on(self) -> None:
        """Before jupyter_server shuts every kernel down: kernel pods the next server re-adopts are
        let go instead (``c.Kubernetes.on_stop``)."""
        from ..k8s.client import close_clusters
        from ..k8s.settings import KubernetesSettings
        from .adopt import release_kernel_pods

        if not KubernetesSettings(config=self.service.config).keeps_kernels_on_stop():
            return
        released = await release_kernel_pods(self.serverapp.kernel_manager)
        if released:
            self.log.info("mlops: %d kernel pod(s) keep running for the next server to re-adopt "
                          "(c.Kubernetes.on_stop)", len(released))
        await close_clusters()
