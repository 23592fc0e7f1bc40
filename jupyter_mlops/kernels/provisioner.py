"""``mlops-local``: a kernel on this machine in an environment prefix, with its profile's resources.

A kernel spec names this provisioner (``metadata.kernel_provisioner.provisioner_name``) and its
``config`` the ``environment`` and ``profile``; a launch may override both, and say whose kernel it
is, with ``mlops_environment``, ``mlops_profile`` and ``mlops_user`` keyword arguments of
``start_kernel`` (what the server's ``POST /mlops/api/kernels`` does)::

    await km.start_kernel(mlops_environment="cpu", mlops_profile="small", mlops_user="alice")

Before the process starts: the user's limits are checked, GPUs leased (``CUDA_VISIBLE_DEVICES`` set
to exactly those; a CPU profile on a GPU machine sees none), the environment's activation applied
and its interpreter put in place of the spec's. After: the data memory is capped (RLIMIT_DATA). The
GPUs go back when the kernel shuts down, restarts (leased again for the new process) or dies.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Unicode

from .registry import KERNELS, KernelRecord

__all__ = ["MlopsLocalProvisioner", "gpu_allocator"]

log = logging.getLogger("jupyter_mlops.kernels")
_ALLOCATORS: dict[tuple[str, str, str], Any] = {}


def gpu_allocator(settings: Any) -> Any:
    """The process's allocator for ``settings`` (:class:`~.launch.LocalKernels`): one per lease folder
    and inventory, so waiters in one server wake each other."""
    from .gpus import GpuAllocator, inventory_from_config

    key = (str(settings.lease_dir), settings.gpu_inventory, repr(settings.gpu_devices))
    allocator = _ALLOCATORS.get(key)
    if allocator is None:
        inventory = inventory_from_config(settings.gpu_inventory, settings.gpu_devices)
        allocator = _ALLOCATORS[key] = GpuAllocator(inventory, settings.lease_dir)
    allocator.wait = settings.gpu_wait
    allocator.timeout = settings.gpu_wait_timeout
    return allocator


class MlopsLocalProvisioner(LocalProvisioner):  # type: ignore[misc]
    environment = Unicode("", help="Environment the kernel runs in; empty: the kernel spec's own "
                          "interpreter.").tag(config=True)
    profile = Unicode("", help="Profile of resources; empty: the deployment's default.").tag(config=True)

    _lease: Any = None
    _launch: dict[str, Any] | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        from ..config import load_config
        from .launch import LocalKernels, plan_launch
        from .limits import check_limits
        from .profiles import KernelProfiles

        choice = {k: kwargs.pop(f"mlops_{k}", None) for k in ("environment", "profile", "user", "pool")}
        config = load_config(self.config)  # the server's own config (from the parent chain) wins
        profiles = KernelProfiles(config=config.config)
        settings = LocalKernels(config=config.config)
        existing = KERNELS.get(self.kernel_id)
        restarting = existing is not None
        if restarting:  # a restart keeps who and what, and its place under the limits
            environment, profile_name, user, pool = existing.environment, existing.profile, existing.user, existing.pool
        else:
            environment = choice["environment"] or self.environment or None
            profile_name = choice["profile"] or self.profile or None
            user, pool = choice["user"], choice["pool"]
        plan = plan_launch(environment, profile_name, user, config=config, profiles=profiles)
        if not restarting and pool is None:
            check_limits(plan.user, profiles.limits(plan.user), [r.for_limits() for r in KERNELS.all()],
                         plan.profile.gpus)
        env = dict(kwargs.get("env") or os.environ)
        env.update(plan.env)
        allocator = gpu_allocator(settings)
        if plan.profile.gpus or allocator.inventory.devices():
            holder = f"pool:{pool}" if pool else plan.user  # a pooled kernel is its claimer's once claimed
            owner = {"user": holder, "kernel_id": self.kernel_id}
            self._lease = await allocator.allocate_async(
                plan.profile.gpus, owner, plan.profile.gpu_type,
                on_queue=lambda position: log.info("kernel %s waits for %d GPU(s): place %d in the queue",
                                                   self.kernel_id, plan.profile.gpus, position))
            env.update(self._lease.env())
        kwargs["env"] = env
        try:
            kwargs = await super().pre_launch(**kwargs)
        except BaseException:
            self._release()
            raise
        if plan.python:
            kwargs["cmd"] = [_interpreter(kwargs["cmd"][0], plan.python), *kwargs["cmd"][1:]]
        self._launch = {"memory": plan.memory if settings.limit_memory else None}
        record = existing or KernelRecord(self.kernel_id, plan.user, plan.environment, plan.profile.name, pool=pool)
        record.gpus = [d.to_dict() for d in self._lease.devices] if self._lease else []
        record.memory_limit = self._launch["memory"]
        KERNELS.add(record)
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        try:
            info = await super().launch_kernel(cmd, **kwargs)
        except BaseException:
            self._release()
            KERNELS.remove(self.kernel_id)
            raise
        memory = (self._launch or {}).get("memory")
        if memory and self.pid:
            _cap_memory(self.pid, memory)
        record = KERNELS.get(self.kernel_id)
        if record is not None:
            record.pid = self.pid
        return info

    async def poll(self) -> int | None:
        status = await super().poll()
        if status is not None:
            self._release()  # died: its GPUs are free at once, not when someone notices
        return status

    async def cleanup(self, restart: bool = False) -> None:
        self._release()
        if not restart:
            KERNELS.remove(self.kernel_id)
        await super().cleanup(restart=restart)

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        record = KERNELS.get(self.kernel_id)
        if record is not None:
            info["mlops"] = record.to_json()
        return info

    def hand_over(self, user: str) -> None:
        """A pooled kernel claimed by ``user``: theirs in the registry and as the holder of its GPUs."""
        KERNELS.hand_over(self.kernel_id, user)
        if self._lease is not None:
            self._lease.hand_over(user)

    def _release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()


def _interpreter(spec_python: str, prefix_python: str) -> str:
    """The prefix's interpreter in place of the spec's ``python``/``{sys.executable}`` argument; a
    spec that runs something else (a wrapper script) keeps it."""
    name = Path(spec_python).name
    if spec_python == sys.executable or name == "python" or name.startswith("python3"):
        return prefix_python
    return spec_python


def _cap_memory(pid: int, limit: int) -> None:
    """RLIMIT_DATA (heap and anonymous mappings) on the started process: what a kernel allocates
    past ``limit`` fails with MemoryError instead of taking the machine down."""
    import resource

    try:
        resource.prlimit(pid, resource.RLIMIT_DATA, (limit, limit))
    except (OSError, ValueError) as e:  # not allowed here (another user's process, a container)
        log.warning("kernel %d: memory limit of %d bytes not applied: %s", pid, limit, e)
