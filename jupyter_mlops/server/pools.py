"""Warm pools of the server: kernels of (environment, profile) started ahead, each handed to one user.

``c.WarmPools.sizes = {"cpu/small": 2}`` keeps two kernels of environment ``cpu`` and profile
``small`` started (``"/small"``: the server's own interpreter). A claim takes a ready kernel, makes it
a kernel of the server's kernel manager (it then behaves exactly like one started through
``/api/kernels``: websockets, restarts, culling) and starts the next in the background. A pooled
kernel is never handed out twice; one waiting longer than ``max_idle`` is replaced, so nobody gets a
kernel whose imports are a day old. GPU profiles are not pooled unless a size says so: a waiting
kernel holds its GPUs.

Pooled kernels start one at a time per server: a kernel start is CPU-bound, and starting several at
once would slow the kernels users are waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from traitlets import Dict, Float, Int
from traitlets.config import LoggingConfigurable

from ..errors import ConfigError
from ..kernels.kernelspecs import BASE_SPEC
from ..kernels.pool import warm_up
from .adopt import adopt_kernel
from ..kernels.registry import KERNELS

__all__ = ["WarmPools", "pool_key"]


def pool_key(environment: str | None, profile: str) -> str:
    return f"{environment or ''}/{profile}"


@dataclass
class _Pool:
    environment: str | None
    profile: str
    size: int
    ready: list[tuple[float, Any, dict[str, Any]]] = field(default_factory=list)  # (started, manager, kernel_info)
    starting: int = 0
    claimed: int = 0
    error: str | None = None  # the last failed start, shown in status


class WarmPools(LoggingConfigurable):
    sizes = Dict(value_trait=Int(), default_value={}, help="'ENVIRONMENT/PROFILE' -> kernels kept started "
                 "(empty ENVIRONMENT: the server's interpreter).").tag(config=True)
    max_idle = Float(3600.0, help="Seconds a pooled kernel waits for a claim before it is replaced.").tag(config=True)
    startup_timeout = Float(60.0, help="Seconds a pooled kernel may take to start.").tag(config=True)
    refill_delay = Float(1.0, help="Seconds after a claim before the replacement kernel starts (at once "
                         "when the pool is empty): its start would slow the claimed kernel's first "
                         "cell.").tag(config=True)

    def __init__(self, kernel_manager: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mkm = kernel_manager
        self._pools: dict[str, _Pool] = {}
        for key, size in self.sizes.items():
            environment, sep, profile = key.rpartition("/")
            if not sep or not profile or size < 0:
                raise ConfigError(f"WarmPools.sizes: {key!r} must be 'ENVIRONMENT/PROFILE' with a size of 0 or more",
                                  source="warm pools")
            self._pools[key] = _Pool(environment or None, profile, size)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- public -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start filling (on the server's running event loop). Called when the server starts and
        again by every claim: a server that never ran its extensions' start hooks still fills."""
        if self._pools and self._task is None and not self._stopping:
            self._task = asyncio.get_running_loop().create_task(self._keep_filled())

    async def claim(self, environment: str | None, profile: str, user: str, path: str | None = None) -> str | None:
        """A ready kernel of (environment, profile), now ``user``'s and a kernel of the server; None
        when none is ready (the caller starts one). ``path``: the notebook's API path; the kernel's
        working folder becomes the notebook's, as for a kernel started for it."""
        self.start()
        pool = self._pools.get(pool_key(environment, profile))
        while pool is not None and pool.ready:
            _, km, info = pool.ready.pop(0)
            if not await km.is_alive():  # died while waiting: never handed out
                await self._discard(km)
                continue
            pool.claimed += 1
            self._refill_soon(pool)
            await self._hand_over(km, path)
            adopt_kernel(self.mkm, km, info)
            km.provisioner.hand_over(user)
            return str(km.kernel_id)
        return None

    def status(self) -> list[dict[str, Any]]:
        return [{"key": key, "environment": p.environment, "profile": p.profile, "size": p.size,
                 "ready": len(p.ready), "starting": p.starting, "claimed": p.claimed, "error": p.error}
                for key, p in self._pools.items()]

    async def wait_ready(self, timeout: float = 120.0) -> bool:
        """Until every pool is full (tests, benchmarks)."""
        self.start()
        deadline = time.monotonic() + timeout
        while any(len(p.ready) < p.size and not p.error for p in self._pools.values()):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return all(not p.error for p in self._pools.values())

    async def stop(self) -> None:
        """Shut down every kernel still waiting in a pool (claimed ones belong to their users)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        waiting = [km for p in self._pools.values() for _, km, _ in p.ready]
        for p in self._pools.values():
            p.ready.clear()
        await asyncio.gather(*(self._discard(km) for km in waiting), return_exceptions=True)

    # -- inside ---------------------------------------------------------------------------------

    async def _keep_filled(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._reap_idle()
            for pool in self._pools.values():
                while len(pool.ready) < pool.size and not self._stopping:
                    if not await self._start_one(pool):
                        break  # a failing start is retried at the next wake, not in a loop
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(60.0, self.max_idle / 4))

    async def _start_one(self, pool: _Pool) -> bool:
        kernel_id = str(uuid.uuid4())
        km = self.mkm.kernel_manager_factory(
            connection_file=os.path.join(self.mkm.connection_dir, f"kernel-{kernel_id}.json"),
            parent=self.mkm, log=self.mkm.log, kernel_name=BASE_SPEC)
        pool.starting += 1
        try:
            await asyncio.wait_for(km.start_kernel(
                kernel_id=kernel_id, cwd=self.mkm.root_dir, env=dict(os.environ),
                mlops_environment=pool.environment, mlops_profile=pool.profile,
                mlops_pool=pool_key(pool.environment, pool.profile)), self.startup_timeout)
            info = await warm_up(km, self.startup_timeout)
        except asyncio.CancelledError:  # the server stops: no kernel is left behind half-started
            await self._discard(km)
            raise
        except Exception as e:
            pool.error = " ".join(str(e).split())[:300] or type(e).__name__
            self.log.warning("warm pool %s: a kernel could not start: %s", pool_key(pool.environment, pool.profile),
                             pool.error)
            await self._discard(km)
            return False
        finally:
            pool.starting -= 1
        pool.error = None
        if self._stopping:
            await self._discard(km)
            return False
        pool.ready.append((time.monotonic(), km, info))
        return True

    async def _reap_idle(self) -> None:
        now = time.monotonic()
        for pool in self._pools.values():
            stale = [km for started, km, _ in pool.ready if now - started > self.max_idle]
            pool.ready = [entry for entry in pool.ready if now - entry[0] <= self.max_idle]
            for km in stale:
                await self._discard(km)

    async def _discard(self, km: Any) -> None:
        try:
            if await km.is_alive():
                await km.shutdown_kernel(now=True)
            else:
                await km.cleanup_resources()
        except Exception as e:  # say it: a kernel may be left running
            self.log.warning("warm pool: kernel %s did not shut down cleanly: %s", km.kernel_id, e)
        KERNELS.remove(km.kernel_id)

    async def _hand_over(self, km: Any, path: str | None) -> None:
        """What a kernel started for the notebook would have had: its folder and JPY_SESSION_NAME."""
        if not path:
            return
        cwd = self.mkm.cwd_for_path(path)
        full = os.path.join(self.mkm.root_dir, path)
        client = km.client()
        client.start_channels(iopub=False, stdin=False, hb=False, control=False)
        try:
            # a kernel in a pod has no such folder: it keeps its own, and still learns its notebook
            request = client.execute(f"import os as _o\ntry:\n    _o.chdir({cwd!r})\nexcept OSError:\n    pass\n"
                                     f"_o.environ['JPY_SESSION_NAME'] = {full!r}\ndel _o",
                                     silent=True, store_history=False)
            while (await client.get_shell_msg(timeout=10))["parent_header"].get("msg_id") != request:
                pass
        finally:
            client.stop_channels()

    def _refill_soon(self, pool: _Pool) -> None:
        """Start the next kernel after ``refill_delay``, or now when the pool is empty: a kernel
        start takes most of a small machine's CPU, and the user who just claimed one is about to
        connect to it and run their first cell."""
        if not pool.ready or self.refill_delay <= 0:
            self._wake.set()
        else:
            asyncio.get_running_loop().call_later(self.refill_delay, self._wake.set)
