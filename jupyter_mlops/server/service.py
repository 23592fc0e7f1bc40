"""What the REST API does, without HTTP: environments, profiles, GPUs and each user's kernels.

The handlers (:mod:`.handlers`) only translate requests and errors; everything a test or another
face needs is here. One :class:`KernelService` per server, built by the extension app.
"""

from __future__ import annotations

from typing import Any

from traitlets.config import Config

from ..config import MlopsConfig
from ..errors import MlopsError
from ..kernels.kernelspecs import BASE_SPEC
from ..kernels.registry import KERNELS
from .pools import WarmPools

__all__ = ["KernelService", "NotFound"]


class NotFound(MlopsError):
    """A kernel that does not exist, or is not the caller's (the same answer, so ids do not leak)."""


class KernelService:
    def __init__(self, kernel_manager: Any, settings: MlopsConfig, pools: WarmPools) -> None:
        self.mkm = kernel_manager
        self.settings = settings
        self.pools = pools

    @property
    def config(self) -> Config:
        return self.settings.config

    def profiles(self) -> Any:
        from ..kernels.profiles import KernelProfiles

        return KernelProfiles(config=self.config)

    # -- reading ----------------------------------------------------------------------------------

    def environments(self) -> list[dict[str, Any]]:
        """Definitions with their lock and install state, and environments installed without one here."""
        from ..environments.install import installed
        from ..environments.spec import describe, find_environments, load_environment

        prefixes: dict[str, list[str]] = {}
        for env in installed(self.settings.resolved_envs_dir):
            prefixes.setdefault(env.name, []).append(str(env.prefix))
        found = []
        for name, folder in find_environments(self.settings.resolved_environments_dir).items():
            try:
                info = describe(load_environment(folder))
            except MlopsError as e:  # one broken definition must not hide the others
                info = {"name": name, "folder": str(folder), "error": str(e)}
            found.append({**info, "installed": prefixes.pop(name, [])})
        found.extend({"name": name, "folder": None, "installed": paths} for name, paths in sorted(prefixes.items()))
        return found

    def profiles_for(self, user: str) -> dict[str, Any]:
        profiles = self.profiles()
        parsed = profiles.parsed()
        roles = profiles.roles(user)
        default = profiles.default_profile or next(iter(parsed))
        limits = profiles.limits(user)
        return {"default": default, "limits": {"max_kernels": limits.max_kernels, "max_gpus": limits.max_gpus},
                "profiles": [p.to_json() for p in parsed.values() if p.allows_user(roles)]}

    def gpus(self) -> dict[str, Any]:
        from ..kernels.launch import LocalKernels
        from ..kernels.provisioner import gpu_allocator

        allocator = gpu_allocator(LocalKernels(config=self.config))
        return {"devices": [d.to_dict() for d in allocator.inventory.devices()],
                "reason": allocator.inventory.reason, "holders": allocator.holders(),
                "waiting": allocator.waiting()}

    def kernels_of(self, user: str) -> list[dict[str, Any]]:
        running = set(self.mkm.list_kernel_ids())
        return [self._describe(r.kernel_id) for r in KERNELS.all(user) if r.kernel_id in running]

    def kernel_of(self, user: str, kernel_id: str) -> dict[str, Any]:
        record = KERNELS.get(kernel_id)
        if record is None or record.user != user or kernel_id not in self.mkm:
            raise NotFound(f"no kernel {kernel_id} of yours")
        return self._describe(kernel_id)

    # -- changing ---------------------------------------------------------------------------------

    async def start(self, user: str, environment: str | None, profile: str | None,
                    path: str | None = None) -> dict[str, Any]:
        """A kernel of ``environment`` x ``profile`` for ``user``: a pooled one when one is ready,
        else started now. Raises NotAllowedError, ConfigError, LimitExceededError,
        GpuUnavailableError, KernelStartError (all :class:`MlopsError`) with the reason."""
        from ..kernels.limits import check_limits

        profiles = self.profiles()
        chosen = profiles.get(profile, user, environment)
        check_limits(user, profiles.limits(user), [r.for_limits() for r in KERNELS.all()], chosen.gpus)
        kernel_id = await self.pools.claim(environment or None, chosen.name, user, path)
        if kernel_id is None:
            kernel_id = await self.mkm.start_kernel(kernel_name=BASE_SPEC, path=path, mlops_environment=environment,
                                                    mlops_profile=chosen.name, mlops_user=user)
        return self._describe(kernel_id)

    async def shutdown(self, user: str, kernel_id: str) -> None:
        self.kernel_of(user, kernel_id)
        await self.mkm.shutdown_kernel(kernel_id)

    def _describe(self, kernel_id: str) -> dict[str, Any]:
        record = KERNELS.get(kernel_id)
        info = record.to_json() if record else {"id": kernel_id}
        km = self.mkm.get_kernel(kernel_id)
        info["execution_state"] = getattr(km, "execution_state", None)
        info["kernel_name"] = km.kernel_name
        info["origin"] = "pool" if info.get("pool") else "started"
        return info
