"""Culling by GPU idleness: a kernel whose GPUs sit unused is shut down, so the next user gets them.

jupyter_server's own culler (``c.MappingKernelManager.cull_idle_timeout``) goes by messages: a
kernel left open in a browser tab is never idle to it, yet its GPUs, leased exclusively, block
everyone else. :class:`GpuCuller` samples the utilisation of the GPUs running kernels hold, through
the seam of :mod:`jupyter_mlops.kernels.gpu_activity` (``c.GpuCuller.source``), every ``interval``
seconds, and shuts a kernel down through the server's kernel manager once every GPU it holds has
been seen under ``threshold`` percent at every sample for ``idle_timeout`` seconds. Kernels without
GPUs are never touched; open websockets protect no one.

The decision is :class:`IdleTracker`, a pure function of the samples, apart from the timer and the
kernel manager. Its semantics:

* A sample is *idle* when the source knows every GPU the kernel holds and all are under the
  threshold; *active* when any GPU is at or over it, or the kernel is executing a cell (unless
  ``cull_busy``); otherwise *unknown*.
* Only time known to be idle counts. The idle clock starts at an idle sample and stops at any
  other: an active one, and an unknown one too (the exporter is down, a GPU it cannot see, a
  kernel pod restarting), which never culls either. So a kernel that trained through an exporter
  outage is not culled at the first idle sample after it; its clock starts there. A kernel is
  shut down at an idle sample at least ``idle_timeout`` after its clock started.
* A kernel seen for the first time (or again after a server restart) starts with no clock.
* A sample is one moment (a utilisation gauge covers about the last second): "idle for
  ``idle_timeout``" means "under the threshold at every sample over that time".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterable

from traitlets import Bool, Float, List, Unicode
from traitlets.config import LoggingConfigurable

from ..errors import ConfigError
from ..kernels.gpu_activity import GpuActivity, GpuHolder, GpuReading, activity_from_config
from ..kernels.registry import KERNELS

__all__ = ["GpuCuller", "IdleTracker", "Observation", "Cull", "IDLE", "ACTIVE", "UNKNOWN"]

IDLE, ACTIVE, UNKNOWN = "idle", "active", "unknown"


@dataclass(frozen=True)
class Observation:
    """One kernel at one sample: the GPUs it holds, their readings, whether it executes a cell."""

    kernel_id: str
    gpus: int
    readings: tuple[GpuReading, ...] = ()
    busy: bool = False


@dataclass(frozen=True)
class Cull:
    """A kernel to shut down, how long its GPUs have been idle, and the readings that decided it."""

    kernel_id: str
    idle_for: float
    readings: tuple[GpuReading, ...]


class IdleTracker:
    """Which kernels' GPUs have been idle for ``idle_timeout`` seconds (see the module's docstring).

    Pure: time comes in as ``now`` with every :meth:`update`, nothing is read or shut down here.
    """

    def __init__(self, idle_timeout: float, threshold: float, cull_busy: bool = False) -> None:
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be above 0 (0 turns the culler off before it is made)")
        self.idle_timeout = idle_timeout
        self.threshold = threshold
        self.cull_busy = cull_busy
        self._idle_since: dict[str, float] = {}

    def classify(self, observation: Observation) -> str:
        if observation.busy and not self.cull_busy:
            return ACTIVE
        values = [r.utilisation for r in observation.readings]
        if any(v is not None and v >= self.threshold for v in values):
            return ACTIVE
        if observation.gpus <= 0 or len(values) < observation.gpus or None in values:
            return UNKNOWN
        return IDLE

    def idle_since(self, kernel_id: str) -> float | None:
        return self._idle_since.get(kernel_id)

    def update(self, now: float, observations: Iterable[Observation]) -> list[Cull]:
        """Takes one sample of every kernel that holds GPUs now (kernels left out are forgotten) and
        returns those to shut down. A kernel returned starts afresh should it still be there at the
        next sample (its shutdown failed)."""
        kept: dict[str, float] = {}
        culls = []
        for observation in observations:
            if self.classify(observation) != IDLE:  # active or unknown: its clock stops
                continue
            since = self._idle_since.get(observation.kernel_id, now)
            if now - since >= self.idle_timeout:
                culls.append(Cull(observation.kernel_id, now - since, observation.readings))
            else:
                kept[observation.kernel_id] = since
        self._idle_since = kept
        return culls


class GpuCuller(LoggingConfigurable):
    """Shuts down kernels whose GPUs stay idle (``c.GpuCuller.*``); off unless ``idle_timeout`` and
    ``source`` are both set. Made and started by the server extension."""

    idle_timeout = Float(0.0, help="Seconds every GPU of a kernel must stay under `threshold` before the "
                         "kernel is shut down; 0 turns culling by GPU idleness off.").tag(config=True)
    threshold = Float(5.0, help="Utilisation in percent below which a GPU counts as idle.").tag(config=True)
    interval = Float(60.0, help="Seconds between samples of the GPUs' utilisation.").tag(config=True)
    cull_busy = Bool(False, help="Also cull a kernel that is executing a cell (its GPUs idle all the same). "
                     "False: a busy kernel counts as active.").tag(config=True)
    source = Unicode("none", help="Where GPU utilisation comes from: dcgm (dcgm-exporter, `dcgm_urls`), nvml "
                     "(nvidia-ml-py, local kernels), none, or a jupyter_mlops.gpu_activity_sources entry "
                     "point.").tag(config=True)
    dcgm_urls = List(Unicode(), default_value=["http://127.0.0.1:9400/metrics"], help="dcgm-exporter "
                     "endpoints (one per GPU node), or a Prometheus /federate?match[]=DCGM_FI_DEV_GPU_UTIL "
                     "URL that holds them all.").tag(config=True)
    dcgm_timeout = Float(5.0, help="Seconds a dcgm-exporter scrape may take.").tag(config=True)

    def __init__(self, kernel_manager: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.idle_timeout < 0 or self.interval <= 0 or not 0 < self.threshold <= 100:
            raise ConfigError("idle_timeout must be 0 or more, interval above 0 and threshold a percentage "
                              f"above 0 (got {self.idle_timeout:g}, {self.interval:g}, {self.threshold:g})",
                              source="GpuCuller")
        self.mkm = kernel_manager
        self.activity: GpuActivity = activity_from_config(self.source, dcgm_urls=self.dcgm_urls,
                                                          timeout=self.dcgm_timeout)
        self.tracker = IdleTracker(self.idle_timeout, self.threshold, self.cull_busy) if self.enabled else None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._said: str | None = None  # the source's last reason, logged once per change

    @property
    def enabled(self) -> bool:
        return self.idle_timeout > 0 and self.source != "none"

    def start(self) -> None:
        """Start sampling on the server's running loop (the first sample one interval from now)."""
        if self.idle_timeout > 0 and not self.enabled:
            self.log.warning("mlops: c.GpuCuller.idle_timeout is set but c.GpuCuller.source is 'none': no kernel "
                             "is culled for GPU idleness (set source to dcgm or nvml)")
        if not self.enabled or self._task is not None:
            return
        self.log.info("mlops: kernels whose GPUs stay under %g%% for %g s are shut down (GPU activity from %s, "
                      "sampled every %g s)", self.threshold, self.idle_timeout, self.source, self.interval)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def tick(self, now: float | None = None) -> list[str]:
        """One sample: read the GPU holders' utilisation, shut down those idle long enough. Returns
        the ids of the kernels shut down. ``now`` is a ``time.monotonic()`` value (the timer leaves it
        out; a caller that drives the culler itself may give its own clock, consistently)."""
        if self.tracker is None:
            return []
        async with self._lock:
            now = time.monotonic() if now is None else now
            holders = {h.kernel_id: h for h in self.holders()}
            readings = await self.activity.sample(list(holders.values())) if holders else {}
            if holders:
                self._report(self.activity.reason)
            observations = [Observation(h.kernel_id, h.gpus, tuple(readings.get(h.kernel_id, ())),
                                        busy=self._busy(h.kernel_id)) for h in holders.values()]
            for observation in observations:  # once per clock lost, not once per unknown sample
                since = self.tracker.idle_since(observation.kernel_id)
                if since is not None and self.tracker.classify(observation) == UNKNOWN:
                    self.log.info("mlops: GPU culler: kernel %s's GPUs cannot be read: its idle clock (%s) stops, "
                                  "and starts again at its next idle sample", observation.kernel_id,
                                  _duration(now - since))
            culled = []
            for cull in self.tracker.update(now, observations):
                if await self._cull(holders[cull.kernel_id], cull):
                    culled.append(cull.kernel_id)
            return culled

    def holders(self) -> list[GpuHolder]:
        """The server's running kernels that hold GPUs: local kernels with their lease, kernel pods
        whose profile asks for GPUs. Pooled kernels not yet claimed are not the server's: skipped."""
        found = []
        profile_gpus: dict[str, int] | None = None
        for kernel_id in self.mkm.list_kernel_ids():
            record = KERNELS.get(kernel_id)
            if record is None:  # not started by an mlops provisioner: it holds no GPU of ours
                continue
            if record.gpus:
                uuids = tuple(str(g.get("uuid")) for g in record.gpus)
                found.append(GpuHolder(kernel_id, record.user, len(uuids), uuids=uuids))
                continue
            namespace, pod = self._pod_of(kernel_id)
            if pod is None:
                continue
            if profile_gpus is None:
                profile_gpus = self._profile_gpus()
            if profile_gpus.get(record.profile, 0) > 0:
                found.append(GpuHolder(kernel_id, record.user, profile_gpus[record.profile],
                                       namespace=namespace, pod=pod))
        return found

    # -- inside ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:  # one failed sample must not end culling for the server's lifetime
                self.log.exception("mlops: GPU culler: a sample failed")

    async def _cull(self, holder: GpuHolder, cull: Cull) -> bool:
        gpus = ", ".join(r.uuid or "?" for r in cull.readings) or f"{holder.gpus} GPU(s)"
        where = f" (pod {holder.namespace}/{holder.pod})" if holder.pod else ""
        self.log.warning("mlops: culling kernel %s of %s%s: its GPU%s %s stayed under %g%% for %s",
                         holder.kernel_id, holder.user or "no one", where, "s" if holder.gpus > 1 else "", gpus,
                         self.threshold, _duration(cull.idle_for))
        try:
            await self.mkm.shutdown_kernel(holder.kernel_id)
        except Exception as e:  # gone meanwhile, or its shutdown failed: tried again at the next sample
            self.log.warning("mlops: culling kernel %s failed: %s", holder.kernel_id, e)
            return False
        return True

    def _busy(self, kernel_id: str) -> bool:
        """As jupyter_server's culler decides it: the last status the kernel published was busy."""
        try:
            return getattr(self.mkm.get_kernel(kernel_id), "execution_state", None) == "busy"
        except KeyError:  # shut down while we sampled
            return False

    def _pod_of(self, kernel_id: str) -> tuple[str | None, str | None]:
        """A kernel pod's namespace and name, from its provisioner (mlops-kubernetes keeps them for
        re-adoption); (None, None) for a kernel that is not in a pod."""
        try:
            provisioner = getattr(self.mkm.get_kernel(kernel_id), "provisioner", None)
        except KeyError:
            return None, None
        namespace, pod = getattr(provisioner, "namespace", None), getattr(provisioner, "pod_name", None)
        if isinstance(namespace, str) and isinstance(pod, str) and namespace and pod:
            return namespace, pod
        return None, None

    def _profile_gpus(self) -> dict[str, int]:
        from ..kernels.profiles import KernelProfiles

        try:
            return {name: p.gpus for name, p in KernelProfiles(config=self.config).parsed().items()}
        except ConfigError as e:  # checked at server start; say it rather than stop culling silently
            self.log.warning("mlops: GPU culler cannot read the kernel profiles: %s", e)
            return {}

    def _report(self, reason: str | None) -> None:
        if reason != self._said:
            if reason is None:
                self.log.info("mlops: GPU culler: utilisation is readable again")
            else:
                self.log.warning("mlops: GPU culler: %s; kernels whose GPUs are unknown are not culled, and "
                                 "their idle clock starts at their next idle sample", reason)
            self._said = reason


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"

