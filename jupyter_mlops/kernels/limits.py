"""What one user may run at once, and the check made before a kernel starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import ConfigError, LimitExceededError

__all__ = ["UserLimits", "check_limits"]


@dataclass(frozen=True)
class UserLimits:
    """What one user may run at once; None is no limit."""

    max_kernels: int | None = None
    max_gpus: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_kernels", "max_gpus"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be a whole number of 0 or more, or None; got {value!r}",
                                  source="user limits")


def check_limits(user: str, limits: UserLimits, running: Sequence[Mapping[str, Any]], want_gpus: int) -> None:
    """Raises :class:`LimitExceededError` when ``user`` may not start one more kernel with
    ``want_gpus`` GPUs. ``running`` is the server's running kernels (any user's), dicts with
    ``user``, ``kernel_id`` and ``gpus`` (a count, 0 when absent). Call it before a start, not
    before a restart: a restarted kernel keeps its place."""
    mine = [dict(r) for r in running if r.get("user") == user]
    if limits.max_kernels is not None and len(mine) + 1 > limits.max_kernels:
        raise LimitExceededError(user, "kernels", limits.max_kernels, mine)
    held = sum(int(r.get("gpus") or 0) for r in mine)
    if limits.max_gpus is not None and want_gpus > 0 and held + want_gpus > limits.max_gpus:
        raise LimitExceededError(user, "gpus", limits.max_gpus, [r for r in mine if r.get("gpus")],
                                 asked=want_gpus)
