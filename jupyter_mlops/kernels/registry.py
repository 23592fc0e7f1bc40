"""The kernels this process started through the mlops provisioners, and who they belong to.

One registry per process (:data:`KERNELS`): the provisioner adds a kernel when it launches and
removes it when the kernel is shut down; the per-user limits are checked against it and the
server's REST API lists it. A kernel's record outlives a restart (same kernel id, same place).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KernelRecord", "KernelRegistry", "KERNELS"]


@dataclass
class KernelRecord:
    kernel_id: str
    user: str
    environment: str | None
    profile: str
    gpus: list[dict[str, Any]] = field(default_factory=list)  # the leased devices
    pool: str | None = None  # the warm pool it came from; None: started for its user
    pid: int | None = None
    memory_limit: int | None = None
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.kernel_id, "user": self.user, "environment": self.environment, "profile": self.profile,
                "gpus": list(self.gpus), "pool": self.pool, "pid": self.pid, "memory_limit": self.memory_limit,
                "started": self.started}

    def for_limits(self) -> dict[str, Any]:
        return {"user": self.user, "kernel_id": self.kernel_id, "gpus": len(self.gpus)}


class KernelRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, KernelRecord] = {}

    def add(self, record: KernelRecord) -> None:
        with self._lock:
            self._records[record.kernel_id] = record

    def get(self, kernel_id: str) -> KernelRecord | None:
        with self._lock:
            return self._records.get(kernel_id)

    def remove(self, kernel_id: str) -> KernelRecord | None:
        with self._lock:
            return self._records.pop(kernel_id, None)

    def all(self, user: str | None = None) -> list[KernelRecord]:
        with self._lock:
            return [r for r in self._records.values() if user is None or r.user == user]

    def hand_over(self, kernel_id: str, user: str) -> KernelRecord | None:
        """A pooled kernel claimed by ``user``: it is theirs from now on."""
        with self._lock:
            record = self._records.get(kernel_id)
            if record is not None:
                record.user = user
            return record


KERNELS = KernelRegistry()
