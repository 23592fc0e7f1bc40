"""GPUs handed to kernels exclusively: an inventory of the machine's devices and leases on them.

The inventory is a seam chosen by configuration (:func:`inventory_from_config`): ``nvml`` reads
the devices through nvidia-ml-py, ``static`` takes them from configuration (tests, and machines
where a platform engineer declares them), ``none`` has no GPU; other kinds are
:class:`GpuInventory` classes in the ``jupyter_mlops.gpu_inventories`` entry points.

A :class:`GpuAllocator` leases devices across every process that shares its lease folder (all the
Jupyter servers of a machine must share one). The folder holds:

* ``<uuid>.lock``, locked with ``flock`` by the :class:`Lease` that holds the device. The OS drops
  the lock when the holder releases it or dies, so a crashed server gives its GPUs back by itself.
  Lock files are never deleted: deleting a file that others may be locking splits the lock.
* ``<uuid>.json``: who holds the device (user, kernel id, pid, since). Believed only while the lock
  is held; a dead holder's file is ignored, then overwritten.
* ``registry.lock``: serializes taking devices, reading holders and the queue. Telling whether a
  device is free means taking its lock for an instant; doing that only under this lock keeps such a
  probe from failing someone else's allocation.
* ``queue.json`` and ``queue-<ticket>.lock``: waiting requests in arrival order. Each waiter holds
  its ticket's lock, so the entry of a waiter that died is dropped by the next reader.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from ..errors import GpuError, GpuUnavailableError, LimitExceededError, UsageError
from .gpu_inventory import (
    GpuDevice,
    GpuInventory,
    NoGpuInventory,
    NvmlInventory,
    StaticInventory,
    inventory_from_config,
)
from .limits import UserLimits, check_limits

if TYPE_CHECKING:
    import asyncio  # imported where used: a CLI that lists GPUs needs no event loop

__all__ = [
    "GpuDevice", "GpuInventory", "NvmlInventory", "StaticInventory", "NoGpuInventory",
    "inventory_from_config", "GpuAllocator", "Lease", "UserLimits", "check_limits",
    "GpuError", "GpuUnavailableError", "LimitExceededError",
]

# Waiters in this process are woken at once by a release or a queue change in this process. A
# release in another process (or its death) sends no notification flock can deliver to a waiter
# that must watch several devices, so waiters also look again every POLL_INTERVAL seconds.
POLL_INTERVAL = 0.5


class _Wakeup:
    """Wakes this process's waiters on a lease folder when a lease is released or the queue changes."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.generation = 0

    def notify(self) -> None:
        with self._changed:
            self.generation += 1
            self._changed.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Returns when something changed since ``seen`` was read, or after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self.generation != seen, timeout)


_wakeups: dict[str, _Wakeup] = {}
_wakeups_lock = threading.Lock()


def _wakeup_for(lease_dir: Path) -> _Wakeup:
    with _wakeups_lock:
        return _wakeups.setdefault(os.path.realpath(lease_dir), _Wakeup())


class Lease:
    """GPUs held exclusively until :meth:`release` (or until this process ends).

    Made by :meth:`GpuAllocator.allocate`. A lease that is never released keeps its GPUs until the
    process exits: nothing else could know that the kernel using them is gone.
    """

    def __init__(self, devices: Sequence[GpuDevice], owner: Mapping[str, Any],
                 held: Sequence[tuple[Path, int]] = (), wakeup: _Wakeup | None = None) -> None:
        self.devices = tuple(devices)
        self.owner = dict(owner)
        self._held = list(held)  # (holder JSON, locked fd) per device
        self._wakeup = wakeup
        self._lock = threading.Lock()
        self._released = False

    def env(self) -> dict[str, str]:
        """The variables a kernel gets: its GPUs by UUID (see :attr:`GpuDevice.visible_id`), none
        (``""``) for an empty lease, so a CPU kernel on a GPU machine sees no GPU."""
        ids = ",".join(d.visible_id for d in self.devices)
        env = {"CUDA_VISIBLE_DEVICES": ids, "NVIDIA_VISIBLE_DEVICES": ids}
        if any(d.visible_id == str(d.index) for d in self.devices):
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indexes as nvidia-smi numbers them, not fastest first
        return env

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Gives the GPUs back. Safe to call more than once and from any thread."""
        with self._lock:
            if self._released:
                return
            self._released = True
            for record, fd in self._held:
                with contextlib.suppress(FileNotFoundError):
                    record.unlink()  # before unlocking: a new holder's record is never removed
                _unlock(fd)
        if self._wakeup is not None and self._held:
            self._wakeup.notify()

    def hand_over(self, user: str) -> None:
        """The GPUs now serve ``user`` (a pooled kernel claimed): holders show them from now on."""
        with self._lock:
            if self._released:
                return
            self.owner["user"] = user
            for record, _ in self._held:
                data = _read_json(record)
                if isinstance(data, dict):
                    _write_json(record, {**data, "user": user})

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Lease {[d.index for d in self.devices]} {state} by {self.owner.get('user')}>"


class GpuAllocator:
    """Hands GPUs of ``inventory`` out exclusively to processes sharing ``lease_dir``.

    With ``wait`` False an allocation that cannot be met raises :class:`GpuUnavailableError` at
    once; with ``wait`` True it queues (first come, first served among requests that want the same
    GPUs; a request for other GPUs is not held up) for at most ``timeout`` seconds (None: no limit).
    """

    def __init__(self, inventory: GpuInventory, lease_dir: Path, *, wait: bool = False,
                 timeout: float | None = None, poll_interval: float = POLL_INTERVAL) -> None:
        self.inventory = inventory
        self.lease_dir = Path(lease_dir)
        self.wait = wait
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._wakeup = _wakeup_for(self.lease_dir)

    def allocate(self, count: int, owner: Mapping[str, Any], gpu_type: str | None = None, *,
                 on_queue: Callable[[int], None] | None = None) -> Lease:
        """Takes ``count`` GPUs (whose names contain ``gpu_type``) for ``owner``, all or none.

        ``owner`` says who holds them: ``user`` and ``kernel_id``; ``pid`` and ``since`` are filled
        in. While waiting, ``on_queue(position)`` is called with 1 for "next in line" and again each
        time the position changes. Blocks while waiting: the server calls :meth:`allocate_async`.
        Raises :class:`GpuUnavailableError` (at once when the GPUs do not exist, whatever ``wait``
        says), :class:`GpuError` when the lease folder cannot be used.
        """
        lease = self._allocate(count, owner, gpu_type, on_queue, None)
        assert lease is not None  # only a cancelled wait gives none
        return lease

    async def allocate_async(self, count: int, owner: Mapping[str, Any], gpu_type: str | None = None, *,
                             on_queue: Callable[[int], None] | None = None) -> Lease:
        """:meth:`allocate` for an event loop: waits in a thread of its own (a long wait would starve
        the loop's default executor) and calls ``on_queue`` on the loop. When cancelled, it returns
        only once the request has left the queue and any GPU it took in the meantime is given back."""
        import asyncio

        loop = asyncio.get_running_loop()
        done: asyncio.Future[Lease | None] = loop.create_future()
        cancel = threading.Event()

        def report(position: int) -> None:
            loop.call_soon_threadsafe(on_queue, position)  # type: ignore[arg-type]

        def work() -> None:
            try:
                outcome: tuple[Lease | None, BaseException | None] = (
                    self._allocate(count, owner, gpu_type, report if on_queue else None, cancel), None)
            except BaseException as e:  # handed to the awaiting task, raised there
                outcome = (None, e)
            try:
                loop.call_soon_threadsafe(_settle, done, *outcome)
            except RuntimeError:  # the loop is closed: no one will ever use this lease
                if outcome[0] is not None:
                    outcome[0].release()

        threading.Thread(target=work, name="mlops-gpu-allocate", daemon=True).start()
        try:
            lease = await asyncio.shield(done)
        except asyncio.CancelledError:
            cancel.set()
            self._wakeup.notify()
            with contextlib.suppress(Exception):
                late = await done
                if late is not None:
                    late.release()
            raise
        assert lease is not None
        return lease

    def holders(self) -> list[dict[str, Any]]:
        """Who holds which GPU now: device (index), uuid, name, user, kernel_id, pid, since."""
        devices = self.inventory.devices()
        if not devices:
            return []
        with self._registry():
            return self._holders(devices)

    def waiting(self) -> list[dict[str, Any]]:
        """The queued requests in order: user, kernel_id, pid, since, count, gpu_type."""
        with self._registry():
            return [{k: v for k, v in e.items() if k != "ticket"} for e in self._live_queue()]

    def _allocate(self, count: int, owner: Mapping[str, Any], gpu_type: str | None,
                  on_queue: Callable[[int], None] | None, cancel: threading.Event | None) -> Lease | None:
        if count < 0:
            raise UsageError(f"cannot allocate {count} GPUs: ask for 0 or more")
        record = {"user": None, "kernel_id": None, **owner, "pid": os.getpid(),
                  "since": owner.get("since") or _now()}
        if count == 0:
            return Lease([], record)
        wanted = [d for d in self.inventory.devices() if d.matches(gpu_type)]
        if len(wanted) < count:
            raise GpuUnavailableError(count, existing=len(wanted), gpu_type=gpu_type, reason=self.inventory.reason)
        with self._registry():
            lease, ahead = self._attempt(wanted, count, record, None)
            if lease is not None:
                return lease
            if not self.wait:
                raise GpuUnavailableError(count, existing=len(wanted), gpu_type=gpu_type,
                                          busy=self._holders(wanted), waiting=ahead)
            ticket = self._enqueue(record, count, gpu_type)
        try:
            return self._wait(wanted, count, gpu_type, record, ticket[0], on_queue, cancel)
        finally:
            self._dequeue(*ticket)

    def _wait(self, wanted: list[GpuDevice], count: int, gpu_type: str | None, record: dict[str, Any],
              ticket: str, on_queue: Callable[[int], None] | None,
              cancel: threading.Event | None) -> Lease | None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        reported = None
        while True:
            seen = self._wakeup.generation  # read before looking: a change after it ends the wait below
            if cancel is not None and cancel.is_set():
                return None
            with self._registry():
                lease, ahead = self._attempt(wanted, count, record, ticket)
                busy = self._holders(wanted) if lease is None else []
            if lease is not None:
                return lease
            if on_queue is not None and ahead + 1 != reported:
                reported = ahead + 1
                on_queue(reported)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise GpuUnavailableError(count, existing=len(wanted), gpu_type=gpu_type,
                                          busy=busy, waiting=ahead, timed_out=self.timeout)
            self._wakeup.wait(seen, self.poll_interval if left is None else min(left, self.poll_interval))

    def _attempt(self, wanted: list[GpuDevice], count: int, record: dict[str, Any],
                 ticket: str | None) -> tuple[Lease | None, int]:
        """Under the registry lock: the lease, or None and how many competing requests queue ahead."""
        ahead = self._competitors_ahead(wanted, ticket)
        if ahead:
            return None, ahead
        taken: list[tuple[GpuDevice, int]] = []
        for device in wanted:
            fd = self._try_lock(self._lock_path(device))
            if fd is not None:
                taken.append((device, fd))
                if len(taken) == count:
                    break
        if len(taken) < count:
            for _, fd in taken:
                _unlock(fd)
            return None, 0
        held = []
        try:
            for device, fd in taken:
                path = self._record_path(device)
                _write_json(path, {**record, "device": device.index, "uuid": device.uuid})
                held.append((path, fd))
        except OSError as e:  # a full disk: give the devices back rather than hold them unrecorded
            for _, fd in taken:
                _unlock(fd)
            raise GpuError(f"cannot write to the GPU lease folder {self.lease_dir}: {e.strerror}") from e
        return Lease([d for d, _ in taken], record, held, self._wakeup), 0

    def _competitors_ahead(self, wanted: list[GpuDevice], ticket: str | None) -> int:
        """Queued requests before ``ticket`` (all of them for None) that want any of ``wanted``."""
        mine = {d.uuid for d in wanted}
        devices = self.inventory.devices()
        ahead = 0
        for entry in self._live_queue():
            if entry["ticket"] == ticket:
                break
            if any(d.uuid in mine and d.matches(entry.get("gpu_type")) for d in devices):
                ahead += 1
        return ahead

    def _holders(self, devices: list[GpuDevice]) -> list[dict[str, Any]]:
        found = []
        for device in devices:
            fd = self._try_lock(self._lock_path(device))
            if fd is not None:  # free: whatever record is left belongs to a holder that died
                _unlock(fd)
                continue
            record = _read_json(self._record_path(device)) or {}
            found.append({"device": device.index, "uuid": device.uuid, "name": device.name,
                          **{k: record.get(k) for k in ("user", "kernel_id", "pid", "since")}})
        return found

    def _enqueue(self, record: dict[str, Any], count: int, gpu_type: str | None) -> tuple[str, int]:
        ticket = uuidlib.uuid4().hex
        fd = self._try_lock(self._ticket_path(ticket))
        assert fd is not None  # a new file nobody else knows
        entries = self._live_queue()
        entries.append({"ticket": ticket, **{k: record.get(k) for k in ("user", "kernel_id", "pid")},
                        "since": _now(), "count": count, "gpu_type": gpu_type})
        _write_json(self._queue_path, entries)
        return ticket, fd

    def _dequeue(self, ticket: str, fd: int) -> None:
        with self._registry():
            entries = [e for e in self._live_queue() if e["ticket"] != ticket]
            _write_json(self._queue_path, entries)
            self._ticket_path(ticket).unlink(missing_ok=True)
            _unlock(fd)
        self._wakeup.notify()  # the waiters behind move up

    def _live_queue(self) -> list[dict[str, Any]]:
        """The queue without the entries of waiters that died (their ticket lock is free)."""
        entries = _read_json(self._queue_path) or []
        live = []
        for entry in entries:
            path = self._ticket_path(entry["ticket"])
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.append(entry)
            else:
                path.unlink(missing_ok=True)  # under the registry lock: no one is opening it now
            finally:
                _unlock(fd)
        if len(live) != len(entries):
            _write_json(self._queue_path, live)
        return live

    @contextlib.contextmanager
    def _registry(self) -> Iterator[None]:
        try:
            self.lease_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lease_dir / "registry.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise GpuError(f"cannot use the GPU lease folder {self.lease_dir}: {e.strerror}. Point it at a "
                           "folder every Jupyter server on this machine can write.") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for microseconds, never while waiting or calling back
            yield
        finally:
            _unlock(fd)

    @staticmethod
    def _try_lock(path: Path) -> int | None:
        """An fd holding ``path``'s exclusive lock, or None when someone else holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _lock_path(self, device: GpuDevice) -> Path:
        return self.lease_dir / f"{_safe(device.uuid)}.lock"

    def _record_path(self, device: GpuDevice) -> Path:
        return self.lease_dir / f"{_safe(device.uuid)}.json"

    def _ticket_path(self, ticket: str) -> Path:
        return self.lease_dir / f"queue-{_safe(ticket)}.lock"

    @property
    def _queue_path(self) -> Path:
        return self.lease_dir / "queue.json"


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a child forked meanwhile shares the fd, not the lock
    os.close(fd)


def _settle(done: asyncio.Future[Lease | None], lease: Lease | None, error: BaseException | None) -> None:
    if done.done():  # allocate_async was cancelled twice and stopped waiting: nobody will release it
        if lease is not None:
            lease.release()
    elif error is not None:
        done.set_exception(error)
    else:
        done.set_result(lease)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)  # old MIG uuids hold slashes


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    """Atomically: readers see the old file or the new one, never half of one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    partial.write_text(json.dumps(data, default=str), encoding="utf-8")
    os.replace(partial, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
