"""Kernels started ahead of need, handed out once, never reused.

A :class:`KernelPool` keeps ``size`` kernels of one kernel spec started (with a given working
folder and environment) in a background thread with its own event loop. :meth:`KernelPool.claim`
returns a started, ready kernel at once when one is waiting and starts the next in the background;
:meth:`KernelPool.release` shuts a claimed kernel down: a kernel serves exactly one claim (a step,
later a user's session), so no state leaks from one to the next.

Readiness is checked with :class:`ReadyKernelClient`, whose ``wait_for_ready`` returns as soon as
the kernel answered ``kernel_info`` on the shell channel and its iopub messages arrive. jupyter_client's
own version waits a fixed 0.2 s on iopub per check, the largest part of a pooled step's overhead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any, Mapping

from jupyter_client.asynchronous.client import AsyncKernelClient

from ..errors import KernelStartError

__all__ = ["KernelPool", "PooledKernel", "ReadyKernelClient", "KernelStartError", "warm_up"]

log = logging.getLogger("jupyter_mlops.kernels")


class ReadyKernelClient(AsyncKernelClient):
    """An async client whose readiness check waits for the kernel, not for a fixed timeout.
    The kernel's ``kernel_info_reply`` content is kept in :attr:`kernel_info_content`."""

    kernel_info_content: dict[str, Any] | None = None

    async def _async_wait_for_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else 60.0)
        while True:
            request = self.kernel_info()
            reply = None
            while reply is None:
                try:
                    msg = await self.shell_channel.get_msg(timeout=0.5)
                except Empty:
                    break
                if msg["parent_header"].get("msg_id") == request and msg["msg_type"] == "kernel_info_reply":
                    reply = msg
            if reply is not None:
                self.kernel_info_content = reply["content"]
                # iopub is connected once the kernel's status messages for our request reach us.
                # A fresh SUB socket can miss the first ones (zmq's slow joiner): ask again.
                with contextlib.suppress(Empty):
                    while True:
                        msg = await self.iopub_channel.get_msg(timeout=0.02)
                        if msg["parent_header"].get("msg_id") == request:
                            self._handle_kernel_info_reply(reply)
                            await self._drain_iopub()
                            return
            if not await self._async_is_alive():
                raise RuntimeError("Kernel died before replying to kernel_info")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kernel didn't respond in {timeout} seconds")

    wait_for_ready = _async_wait_for_ready  # AsyncKernelClient binds the base version by name

    async def _drain_iopub(self) -> None:
        with contextlib.suppress(Empty):
            while True:
                await self.iopub_channel.get_msg(timeout=0.005)


async def warm_up(manager: Any, timeout: float) -> dict[str, Any]:
    """Wait until a started kernel answers, then pay its one-time first-execution cost. Returns
    the kernel's ``kernel_info_reply`` content.

    An IPython kernel's first execution costs ~0.2 s of set-up (history, display hooks); a pooled
    kernel pays it before anyone claims it. Silent: no state, no history, no output. Readiness is
    checked with :class:`ReadyKernelClient`, whatever client class the manager has.
    """
    client = ReadyKernelClient(parent=manager, session=manager.session)
    client.load_connection_info(manager.get_connection_info(session=True))
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout)
        request = client.execute("pass", silent=True, store_history=False)
        while True:
            reply = await client.shell_channel.get_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == request:
                break
    finally:
        client.stop_channels()
    return client.kernel_info_content or {}


@dataclass
class PooledKernel:
    """A started kernel, claimed by one user of the pool."""

    manager: Any  # jupyter_client AsyncKernelManager
    kernel_name: str
    started: float
    claimed: float = 0.0
    kernel_id: str = field(default="")
    log: str | None = None  # where the kernel process's own stdout/stderr go (None: inherited)

    @property
    def pid(self) -> int | None:
        provisioner = getattr(self.manager, "provisioner", None)
        process = getattr(provisioner, "process", None)
        return getattr(process, "pid", None)


class KernelPool:
    """``size`` ready kernels of ``kernel_name``, each started in ``cwd`` with ``env`` added.

    ``launch_kwargs`` go to every ``start_kernel`` call: a pool of the base spec ``mlops`` with
    ``{"mlops_environment": "cpu", "mlops_profile": "small"}`` keeps kernels of that environment
    and profile (see :mod:`.provisioner`).
    """

    def __init__(
        self,
        kernel_name: str = "python3",
        *,
        size: int = 1,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        max_starting: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        launch_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.kernel_name = kernel_name
        self.launch_kwargs = dict(launch_kwargs or {})
        self.size = max(0, size)
        self.cwd = str(Path(cwd).resolve()) if cwd else os.getcwd()
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        # The kernel process's own output (its warnings, "KeyboardInterrupt caught" when it is
        # shut down, a crash's last words) goes to a file per kernel, not into the caller's terminal.
        self.log_dir = Path(log_dir) if log_dir else None
        # Starting a kernel is CPU-bound (an interpreter and ipykernel's imports): starting many at
        # once on a small machine makes each later, the first one most of all.
        self.max_starting = max_starting or max(1, (os.cpu_count() or 2) // 2)
        self._ready: collections.deque[PooledKernel] = collections.deque()
        self._claimed: set[int] = set()  # id() of claimed, unreleased kernels
        self._kernels: dict[int, PooledKernel] = {}
        self._starting = 0
        self._closed = False
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._releasing: set[Any] = set()  # shutdowns in flight (release_soon)
        self._serial = 0
        self._runtime = tempfile.mkdtemp(prefix="mlops-kernels-")  # short: IPC paths are limited to ~100 bytes
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mlops-kernel-pool", daemon=True)
        self._thread.start()
        self._fill()

    # -- public -----------------------------------------------------------------------------------

    def claim(self, timeout: float | None = None) -> PooledKernel:
        """A started kernel for one use. Starts one now if none is waiting.

        Raises :class:`KernelStartError` when kernels cannot be started.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.startup_timeout + 5)
        with self._cond:
            if self._closed:
                raise KernelStartError("the kernel pool is closed")
            if not self._ready and self._starting == 0:
                self._start_one_locked()
            while not self._ready:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise KernelStartError(f"kernel {self.kernel_name!r} could not start: {error}") from error
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise KernelStartError(f"no kernel {self.kernel_name!r} ready within the timeout")
                if self._starting == 0:
                    self._start_one_locked()
                self._cond.wait(remaining)
            kernel = self._ready.popleft()
            kernel.claimed = time.monotonic()
            self._claimed.add(id(kernel))
        self._fill()
        return kernel

    def release(self, kernel: PooledKernel, *, now: bool = False) -> None:
        """Shut a claimed kernel down (kernels are never handed out twice). Waits for it."""
        with self._cond:
            self._claimed.discard(id(kernel))
        self._run(self._shutdown(kernel, now=now), timeout=30)

    def release_soon(self, kernel: PooledKernel) -> None:
        """Like :meth:`release`, without waiting: the pool thread shuts it down."""
        with self._cond:
            self._claimed.discard(id(kernel))
        if not self._loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(kernel, now=False), self._loop)
            with self._cond:
                self._releasing.add(future)
            future.add_done_callback(lambda f: self._forget(f))

    def _forget(self, future: Any) -> None:
        with self._cond:
            self._releasing.discard(future)

    def interrupt(self, kernel: PooledKernel) -> None:
        with contextlib.suppress(Exception):
            self._run(kernel.manager.interrupt_kernel(), timeout=10)

    def wait_ready(self, count: int | None = None, timeout: float = 120.0) -> bool:
        """Wait until ``count`` (default: the pool's size) kernels are started and waiting."""
        count = self.size if count is None else count
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._ready) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed or self._error is not None:
                    return False
                self._cond.wait(remaining)
        return True

    def resize(self, size: int) -> None:
        self.size = max(0, size)
        self._fill()

    def close(self) -> None:
        """Shut down every kernel this pool started (waiting or claimed) and stop its thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            kernels = list(self._kernels.values())
            releasing = list(self._releasing)
            self._ready.clear()
            self._cond.notify_all()
        for future in releasing:  # kernels already on their way down: let them finish
            with contextlib.suppress(Exception):
                future.result(timeout=30)
        if kernels:
            async def shutdown_all() -> None:
                await asyncio.gather(*(self._shutdown(k, now=True) for k in kernels), return_exceptions=True)

            try:
                self._run(shutdown_all(), timeout=30)
            except Exception as e:  # say it: a kernel may be left running
                log.warning("kernel pool: shutting kernels down failed: %s", e)
        # kernels still starting are shut down by _start when they come up (closed is set)
        deadline = time.monotonic() + 30
        with self._cond:
            while self._starting and time.monotonic() < deadline:
                self._cond.wait(0.5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
        shutil.rmtree(self._runtime, ignore_errors=True)

    def __enter__(self) -> "KernelPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ready(self) -> int:
        return len(self._ready)

    # -- inside ----------------------------------------------------------------------------------

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _fill(self) -> None:
        with self._cond:
            while (not self._closed and len(self._ready) + self._starting < self.size
                   and self._starting < self.max_starting):
                self._start_one_locked()

    def _start_one_locked(self) -> None:
        self._starting += 1
        asyncio.run_coroutine_threadsafe(self._start(), self._loop)

    async def _start(self) -> None:
        from jupyter_client.manager import AsyncKernelManager

        # IPC sockets in the pool's private folder: local only, nothing listening on TCP ports (and
        # no unencrypted-TCP warning); a name per kernel, so kernels starting at once never collide.
        with self._cond:
            self._serial += 1
            name = f"k{self._serial}"
        manager = AsyncKernelManager(kernel_name=self.kernel_name, transport="ipc",
                                     ip=os.path.join(self._runtime, name),
                                     connection_file=os.path.join(self._runtime, name + ".json"))
        manager.client_class = "jupyter_mlops.kernels.pool.ReadyKernelClient"
        manager.client_factory = ReadyKernelClient
        env = {**os.environ, **self.env}
        log_path = None
        output: dict[str, Any] = {}
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = str(self.log_dir / f"kernel-{name}.log")
            output = {"stdout": open(log_path, "ab"), "stderr": subprocess.STDOUT}  # noqa: SIM115 - closed below
        try:
            try:
                await manager.start_kernel(cwd=self.cwd, env=env, **output, **self.launch_kwargs)
            finally:
                if output:
                    output["stdout"].close()  # the kernel holds its own descriptor now
            await warm_up(manager, self.startup_timeout)
        except BaseException as e:  # a failed start is reported to the waiting claim
            with contextlib.suppress(Exception):
                await manager.shutdown_kernel(now=True)
            with self._cond:
                self._starting -= 1
                self._error = e
                self._cond.notify_all()
            if not isinstance(e, Exception):
                raise
            return
        kernel = PooledKernel(manager, self.kernel_name, time.monotonic(), kernel_id=manager.kernel_id or "",
                              log=log_path)
        with self._cond:
            closed = self._closed
            if not closed:
                self._kernels[id(kernel)] = kernel
                self._ready.append(kernel)
                self._starting -= 1
                self._cond.notify_all()
        if not closed:
            self._fill()  # the next one, now that this start is done
            return
        try:  # the pool closed while this kernel started: it never serves anyone
            await manager.shutdown_kernel(now=True)
        except Exception as e:
            log.warning("kernel %s did not shut down cleanly: %s", kernel.kernel_id, e)
        finally:
            with self._cond:
                self._starting -= 1
                self._cond.notify_all()

    async def _shutdown(self, kernel: PooledKernel, *, now: bool) -> None:
        with self._cond:
            if self._kernels.pop(id(kernel), None) is None:
                return  # already shut down
        try:
            if await kernel.manager.is_alive():
                if not now and kernel.pid:
                    # A used kernel winds down (atexit hooks, the interpreter's teardown) while the
                    # next step runs: at the lowest priority, so it takes no CPU from that step.
                    with contextlib.suppress(OSError):
                        os.setpriority(os.PRIO_PROCESS, kernel.pid, 19)
                await kernel.manager.shutdown_kernel(now=now)
            else:
                await kernel.manager.cleanup_resources()
        except Exception as e:  # a kernel that is already gone is fine; say anything else
            log.warning("kernel %s did not shut down cleanly: %s", kernel.kernel_id, e)
