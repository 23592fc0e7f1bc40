"""How busy the GPUs of running kernels are, as a seam chosen by configuration (:func:`activity_from_config`).

``dcgm`` scrapes NVIDIA dcgm-exporter (its Prometheus text, gauge ``DCGM_FI_DEV_GPU_UTIL``) and finds
a local kernel's GPUs by the UUIDs of its lease and a kernel pod's by the ``namespace``/``pod``
labels the exporter adds on Kubernetes; ``nvml`` reads the local kernels' leased devices through
nvidia-ml-py; ``none`` reads nothing (culling by GPU idleness is off). Other kinds are
:class:`GpuActivity` classes in the ``jupyter_mlops.gpu_activity_sources`` entry points.

A source never guesses: a GPU it cannot see, a scrape that failed, a value outside 0-100 (DCGM's
"blank" values are huge numbers) is ``None``, unknown, and the culler never counts unknown as idle.
Why is in :attr:`GpuActivity.reason`, including kernels a source cannot see at all (a kernel pod
whose node's exporter is not among the URLs, a kernel pod asked of ``nvml``), so that a kernel
never culled is never a silent one.

A reading is one moment: ``DCGM_FI_DEV_GPU_UTIL`` and NVML's utilisation cover about the last
second, not the time since the previous sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

__all__ = ["GpuHolder", "GpuReading", "GpuActivity", "DcgmActivity", "NvmlActivity", "NoGpuActivity",
           "activity_from_config", "parse_utilisation", "readings_of", "ACTIVITY_GROUP", "BUILT_IN_ACTIVITY",
           "DCGM_METRIC"]

ACTIVITY_GROUP = "jupyter_mlops.gpu_activity_sources"
BUILT_IN_ACTIVITY = ("dcgm", "nvml", "none")
DCGM_METRIC = "DCGM_FI_DEV_GPU_UTIL"  # percent, 0-100, per GPU (not reported for MIG instances)
MAX_SCRAPE = 64 * 2**20  # bytes; a node's exporter serves tens of KiB, a federating Prometheus more

# dcgm-exporter labels a series with the pod using the GPU as pod/namespace (pod_name/pod_namespace
# with --use-old-namespace); scraped through a Prometheus that keeps its own target labels, they
# arrive as exported_pod/exported_namespace. The first present wins.
_POD_LABELS = ("exported_pod", "pod", "pod_name")
_NAMESPACE_LABELS = ("exported_namespace", "namespace", "pod_namespace")


@dataclass(frozen=True)
class GpuHolder:
    """A running kernel holding GPUs, with what a source needs to find them."""

    kernel_id: str
    user: str
    gpus: int  # how many it holds
    uuids: tuple[str, ...] = ()  # a local kernel: the devices of its lease
    namespace: str | None = None  # a kernel pod: where it runs
    pod: str | None = None


@dataclass(frozen=True)
class GpuReading:
    """One GPU of a kernel at one moment."""

    uuid: str | None  # None: a GPU the source could not name
    utilisation: float | None  # percent 0-100; None: unknown


class GpuActivity(ABC):
    """Reads the utilisation of the GPUs that running kernels hold. Subclasses implement :meth:`sample`."""

    @abstractmethod
    async def sample(self, holders: Sequence[GpuHolder]) -> dict[str, tuple[GpuReading, ...]]:
        """Kernel id -> one reading per GPU it holds, now. Never raises: a kernel left out, or given
        fewer readings than it holds GPUs, is unknown for the rest; why is in :attr:`reason`."""

    @property
    def reason(self) -> str | None:
        """Why (some) utilisation could not be read at the last sample; None when it could."""
        return None


class NoGpuActivity(GpuActivity):
    """Source ``none``: nothing is read, so no kernel is ever culled for GPU idleness."""

    async def sample(self, holders: Sequence[GpuHolder]) -> dict[str, tuple[GpuReading, ...]]:
        return {}

    @property
    def reason(self) -> str | None:
        return "no GPU activity source is configured (source 'none')"


class DcgmActivity(GpuActivity):
    """Scrapes dcgm-exporter endpoints (``http://HOST:9400/metrics``; one per node, or a Prometheus
    ``/federate?match[]=DCGM_FI_DEV_GPU_UTIL`` that holds them all). Endpoints are fetched
    concurrently; the series of those that answered are used, and a failed one is named in
    :attr:`reason`."""

    def __init__(self, urls: Sequence[str] = ("http://127.0.0.1:9400/metrics",), timeout: float = 5.0) -> None:
        if not urls:
            raise ConfigError("the dcgm GPU activity source needs at least one dcgm-exporter URL",
                              source="GPU activity")
        self.urls = tuple(urls)
        self.timeout = timeout
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        return self._reason

    async def sample(self, holders: Sequence[GpuHolder]) -> dict[str, tuple[GpuReading, ...]]:
        read = await asyncio.gather(*(self._read(url) for url in self.urls))
        series: list[tuple[dict[str, str], float | None]] = []
        failed, empty = [], []
        for url, (found, error) in zip(self.urls, read):
            if error is not None:
                failed.append(f"{url}: {error}")
            elif not found:
                empty.append(url)
            series.extend(found)
        readings = {h.kernel_id: readings_of(h, series) for h in holders}
        exported = {labels.get("UUID") for labels, _ in series}
        unseen = [u for u in (_unseen(h, readings[h.kernel_id], exported) for h in holders) if u]
        reasons = []
        if failed:
            reasons.append("cannot read dcgm-exporter at " + "; ".join(failed))
        if empty:
            reasons.append(f"no {DCGM_METRIC} series at " + ", ".join(empty)
                           + " (not a dcgm-exporter, or MIG instances only?)")
        if unseen:
            reasons.append(f"no {DCGM_METRIC} series of " + "; ".join(unseen) + " at the endpoints that answered "
                           "(is its node's dcgm-exporter among c.GpuCuller.dcgm_urls? a MIG instance?)")
        self._reason = "; ".join(reasons) or None
        return readings

    async def _read(self, url: str) -> tuple[list[tuple[dict[str, str], float | None]], str | None]:
        """The utilisation series of one endpoint, or why there are none. Decoded and parsed in a
        thread: a federating Prometheus serves megabytes, which must not stall the server's loop."""
        body, error = await self._scrape(url)
        if error is not None:
            return [], error
        try:
            return await asyncio.to_thread(_parse_body, body), None
        except Exception as e:  # ValueError from the parser; anything else it raises on odd text too
            return [], f"its {DCGM_METRIC} lines are not Prometheus text ({str(e) or 'a line cannot be parsed'})"

    async def _scrape(self, url: str) -> tuple[bytes, str | None]:
        """The body, or why there is none. tornado's client: no proxy variables reroute a
        node-local exporter, and no thread is held while waiting."""
        from tornado.httpclient import AsyncHTTPClient

        client = AsyncHTTPClient(force_instance=True, max_body_size=MAX_SCRAPE)  # its own: closed below
        try:
            response = await client.fetch(url, request_timeout=self.timeout, raise_error=True)
        except Exception as e:  # refused, timed out, an HTTP error status: this endpoint is unknown
            return b"", str(e) or type(e).__name__
        finally:
            client.close()
        return response.body, None


def _parse_body(body: bytes) -> list[tuple[dict[str, str], float | None]]:
    return parse_utilisation(body.decode("utf-8", "replace"))


def _unseen(holder: GpuHolder, readings: Sequence[GpuReading], exported: set[str | None]) -> str | None:
    """What of ``holder`` no series names (None: each of its GPUs is in one): a local kernel's
    UUIDs not exported, a kernel pod that fewer series name than it holds GPUs."""
    if holder.uuids:
        missing = [uuid for uuid in holder.uuids if uuid not in exported]
        return f"kernel {holder.kernel_id}'s GPU {', '.join(missing)}" if missing else None
    if holder.pod is not None and len(readings) < holder.gpus:
        found = f", {len(readings)} of its {holder.gpus} GPUs found" if readings else ""
        return f"kernel pod {holder.namespace}/{holder.pod} (kernel {holder.kernel_id}{found})"
    return None


def parse_utilisation(text: str) -> list[tuple[dict[str, str], float | None]]:
    """The ``DCGM_FI_DEV_GPU_UTIL`` series of a Prometheus text exposition: (labels, percent or None).

    Only the metric's own lines (its samples, its ``# TYPE`` and ``# HELP``) are parsed: a damaged
    line of another metric changes nothing, and a page of megabytes costs a scan, not a parse in
    Python. Raises ValueError when one of those lines is not the exposition format (the whole
    endpoint is then unknown: reading half of a damaged series could call a busy GPU idle).
    prometheus_client comes with jupyter_server, which exports its own metrics with it.
    """
    from prometheus_client.parser import text_string_to_metric_families

    found = []
    for family in text_string_to_metric_families("\n".join(_lines_of(text, DCGM_METRIC))):
        for sample in family.samples:
            if sample.name == DCGM_METRIC:
                found.append((dict(sample.labels), _percent(sample.value)))
    return found


def _lines_of(text: str, metric: str) -> list[str]:
    """The lines of ``text`` that belong to ``metric``: its samples (damaged or not) and its
    ``# TYPE``/``# HELP`` comments. Found with ``str.find``, so a long page is never walked line
    by line."""
    kept = []
    at = text.find(metric)
    while at != -1:
        start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
        end = len(text) if end == -1 else end
        line = text[start:end].strip()
        if line.startswith("#"):
            words = line.split(None, 3)  # as the parser splits a comment: "#", TYPE or HELP, the name, the rest
            if len(words) >= 3 and words[1] in ("TYPE", "HELP") and words[2] == metric:
                kept.append(line)
        elif line.startswith(metric) and line[len(metric):len(metric) + 1] in ("{", " ", "\t", ""):
            kept.append(line)  # not DCGM_FI_DEV_GPU_UTIL_SOMETHING, nor the name inside a label value
        at = text.find(metric, end)
    return kept


def readings_of(holder: GpuHolder, series: Sequence[tuple[Mapping[str, str], float | None]]
                ) -> tuple[GpuReading, ...]:
    """The readings of ``holder``'s GPUs among ``series``: a local kernel's by UUID, a pod's by its
    labels. One GPU reported twice (a GPU shared by time-slicing is listed once per pod) counts at
    its highest value: busy wins."""
    by_gpu: dict[str, list[float | None]] = {}
    if holder.uuids:
        for labels, value in series:
            if labels.get("UUID") in holder.uuids:
                by_gpu.setdefault(labels["UUID"], []).append(value)
        return tuple(GpuReading(uuid, _highest(by_gpu.get(uuid, [None]))) for uuid in holder.uuids)
    if holder.pod is None:
        return ()
    for labels, value in series:
        if _first(labels, _POD_LABELS) == holder.pod and _first(labels, _NAMESPACE_LABELS) == holder.namespace:
            device = labels.get("UUID") or f"gpu {labels.get('gpu', '?')} of {labels.get('Hostname', '?')}"
            by_gpu.setdefault(device, []).append(value)
    return tuple(GpuReading(device, _highest(values)) for device, values in sorted(by_gpu.items()))


class NvmlActivity(GpuActivity):
    """The leased devices of local kernels through NVML (needs nvidia-ml-py, ``pip install
    'jupyter_mlops[gpu]'``, and a driver). Kernel pods run on other machines: unknown here. A
    reading is NVML's utilisation over its last sample period (1/6 s to 1 s), not an average since
    the previous sample."""

    def __init__(self) -> None:
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        return self._reason

    async def sample(self, holders: Sequence[GpuHolder]) -> dict[str, tuple[GpuReading, ...]]:
        local = [h for h in holders if h.uuids]
        elsewhere = [f"{h.namespace}/{h.pod}" if h.pod else h.kernel_id for h in holders if not h.uuids]
        found, reason = await asyncio.to_thread(_read_nvml, local) if local else ({}, None)
        reasons = [reason] if reason else []
        if elsewhere:
            reasons.append("nvml reads this machine's GPUs only, not those of kernel pod " + ", ".join(elsewhere)
                           + " (source dcgm reads them)")
        self._reason = "; ".join(reasons) or None
        return found


def _read_nvml(holders: Sequence[GpuHolder]) -> tuple[dict[str, tuple[GpuReading, ...]], str | None]:
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py; imported here, never at import time
    except ImportError:
        return {}, "nvidia-ml-py is not installed: pip install 'jupyter_mlops[gpu]'"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return {}, f"NVML cannot start ({e}): no NVIDIA driver on this machine?"
    failed: list[str] = []
    try:
        found = {h.kernel_id: tuple(GpuReading(uuid, _nvml_utilisation(pynvml, uuid, failed)) for uuid in h.uuids)
                 for h in holders}
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return found, ("NVML cannot read " + "; ".join(failed)) if failed else None


def _nvml_utilisation(pynvml: Any, uuid: str, failed: list[str]) -> float | None:
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return _percent(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception as e:  # NVMLError_NotFound (a declared device NVML does not know), _NotSupported, ...
        failed.append(f"{uuid} ({e})")
        return None


def _percent(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 100.0 else None


def _highest(values: Sequence[float | None]) -> float | None:
    """Unknown if any is unknown: a GPU half seen is not seen."""
    return None if any(v is None for v in values) else max(values)  # type: ignore[type-var]


def _first(labels: Mapping[str, str], names: Sequence[str]) -> str | None:
    return next((labels[n] for n in names if labels.get(n)), None)


def activity_from_config(name: str, *, dcgm_urls: Sequence[str] = ("http://127.0.0.1:9400/metrics",),
                         timeout: float = 5.0) -> GpuActivity:
    """The source called ``name``: ``dcgm`` (of ``dcgm_urls``), ``nvml``, ``none``, or an entry point
    of :data:`ACTIVITY_GROUP` (made with no arguments). Raises :class:`ConfigError` for an unknown
    name or a class that is not a :class:`GpuActivity`."""
    if name == "none":
        return NoGpuActivity()
    if name == "dcgm":
        return DcgmActivity(dcgm_urls, timeout)
    if name == "nvml":
        return NvmlActivity()
    from ..plugins import plugin_class

    return plugin_class(ACTIVITY_GROUP, name, GpuActivity, built_in=BUILT_IN_ACTIVITY, what="GPU activity source",
                        fail=lambda message: ConfigError(message, source="GPU activity"))()
