"""The GPUs of this machine, as a seam chosen by configuration (:func:`inventory_from_config`):
``nvml`` reads them through nvidia-ml-py, ``static`` takes them from configuration (tests, and
machines where a platform engineer declares them), ``none`` has no GPU; other kinds are
:class:`GpuInventory` classes in the ``jupyter_mlops.gpu_inventories`` entry points.
"""

from __future__ import annotations

import contextlib
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

__all__ = ["GpuDevice", "GpuInventory", "NvmlInventory", "StaticInventory", "NoGpuInventory",
           "inventory_from_config", "INVENTORY_GROUP", "BUILT_IN_INVENTORIES"]

INVENTORY_GROUP = "jupyter_mlops.gpu_inventories"
BUILT_IN_INVENTORIES = ("nvml", "static", "none")


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    memory_total: int = 0  # bytes

    @property
    def visible_id(self) -> str:
        """How ``CUDA_VISIBLE_DEVICES`` names this device: its UUID (``GPU-…``, ``MIG-…``), which
        stays right whatever order CUDA enumerates devices in; the index only for a declared device
        without a real UUID."""
        return self.uuid if self.uuid.startswith(("GPU-", "MIG-")) else str(self.index)

    def matches(self, gpu_type: str | None) -> bool:
        """``gpu_type`` is a case-insensitive part of the name ("a100", "T4"); None matches all."""
        return gpu_type is None or gpu_type.casefold() in self.name.casefold()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GpuInventory(ABC):
    """The GPUs of this machine that kernels may be given. Subclasses implement :meth:`devices`."""

    @abstractmethod
    def devices(self) -> list[GpuDevice]:
        """Every device, by index. Never raises: lists none and says why in :attr:`reason`."""

    @property
    def reason(self) -> str | None:
        """Why no devices could be listed (shown in errors and by the REST API); None when they were."""
        return None

    @property
    def available(self) -> bool:
        return self.reason is None


class StaticInventory(GpuInventory):
    """Devices declared up front: in tests, or in config where NVML cannot be used."""

    def __init__(self, devices: Sequence[GpuDevice]) -> None:
        uuids = [d.uuid for d in devices]
        twice = sorted({u for u in uuids if uuids.count(u) > 1})
        if twice:
            raise ConfigError(f"GPU uuid declared twice: {', '.join(twice)}", source="GPU inventory")
        self._devices = tuple(sorted(devices, key=lambda d: d.index))

    def devices(self) -> list[GpuDevice]:
        return list(self._devices)


class NoGpuInventory(GpuInventory):
    """No GPU is handed out on this server (inventory ``none``)."""

    def devices(self) -> list[GpuDevice]:
        return []

    @property
    def reason(self) -> str | None:
        return "GPUs are turned off on this server (GPU inventory 'none')"


class NvmlInventory(GpuInventory):
    """The devices NVML reports (needs nvidia-ml-py, ``pip install 'jupyter_mlops[gpu]'``, and a driver).

    Read once, on first use, and kept: GPUs do not come and go under a running server (restart it
    after installing a driver). When the server's own ``CUDA_VISIBLE_DEVICES`` is set, only the
    devices it names are listed, so a server given a subset hands out that subset. MIG instances
    are not listed yet: a GPU is handed out whole.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: tuple[list[GpuDevice], str | None] | None = None

    def devices(self) -> list[GpuDevice]:
        return list(self._load()[0])

    @property
    def reason(self) -> str | None:
        return self._load()[1]

    def _load(self) -> tuple[list[GpuDevice], str | None]:
        with self._lock:
            if self._read is None:
                self._read = _read_nvml()
            return self._read


def _read_nvml() -> tuple[list[GpuDevice], str | None]:
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py; imported here, never at import time
    except ImportError:
        return [], "nvidia-ml-py is not installed: pip install 'jupyter_mlops[gpu]'"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no GPU to hand out
        return [], f"NVML cannot start ({e}): no NVIDIA driver on this machine?"
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            found.append(GpuDevice(index, _text(pynvml.nvmlDeviceGetUUID(handle)),
                                   _text(pynvml.nvmlDeviceGetName(handle)),
                                   int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
    except Exception as e:  # any NVMLError: a half-read inventory would hand out the wrong GPUs
        return [], f"NVML cannot list the GPUs ({e})"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found, None
    allowed = {v.strip() for v in visible.split(",") if v.strip()}
    shown = [d for d in found if {str(d.index), d.uuid, d.uuid.removeprefix("GPU-")} & allowed]
    if found and not shown:
        return [], f"this server's CUDA_VISIBLE_DEVICES={visible!r} hides all {len(found)} GPUs"
    return shown, None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older nvidia-ml-py returns bytes


def inventory_from_config(name: str, devices: Sequence[Mapping[str, Any]] | None = None) -> GpuInventory:
    """The inventory called ``name``: ``nvml``, ``static`` (of ``devices``), ``none``, or an entry point.

    ``devices`` are dicts with ``name`` and optionally ``index`` (default: the position), ``uuid``
    (from ``nvidia-smi -L``; without one the device is named by index) and ``memory_total`` in
    bytes. Raises :class:`ConfigError` for an unknown name or a device that cannot be used.
    """
    if devices and name != "static":
        raise ConfigError(f"GPU devices are declared but the GPU inventory is {name!r}: "
                          "declared devices are used only by the 'static' inventory", source="GPU inventory")
    if name == "nvml":
        return NvmlInventory()
    if name == "none":
        return NoGpuInventory()
    if name == "static":
        return StaticInventory([_device_from_config(i, d) for i, d in enumerate(devices or [])])
    from ..plugins import plugin_class

    return plugin_class(INVENTORY_GROUP, name, GpuInventory, built_in=BUILT_IN_INVENTORIES, what="GPU inventory",
                        fail=lambda message: ConfigError(message, source="GPU inventory"))()


def _device_from_config(position: int, entry: Mapping[str, Any]) -> GpuDevice:
    where = f"GPU device {position}"
    unknown = sorted(set(entry) - {"index", "uuid", "name", "memory_total"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; a device has name, index, uuid, memory_total",
                          source=where)
    index, name = entry.get("index", position), entry.get("name")
    memory, uuid = entry.get("memory_total", 0), entry.get("uuid", f"static-{index}")
    for key, value, kind in (("index", index, int), ("name", name, str), ("uuid", uuid, str),
                             ("memory_total", memory, int)):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{key} must be {'an int' if kind is int else 'a string'}, not {value!r}",
                              source=where)
    return GpuDevice(index, uuid, name, memory)
