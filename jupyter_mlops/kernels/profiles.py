"""Profiles: the resources a kernel may ask for, the environments it may run, who may use it.

Declared by a platform engineer in traitlets config::

    c.KernelProfiles.profiles = {
        "small": {"display_name": "Small (2 CPU, 4 GiB)", "cpu": 2, "memory": "4Gi"},
        "gpu-1": {"cpu": 8, "memory": "32Gi", "gpus": 1, "gpu_type": "H100",
                  "environments": ["pytorch-gpu"], "roles": ["gpu-users"],
                  "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }
    c.KernelProfiles.default_profile = "small"
    c.KernelProfiles.user_roles = {"alice": ["gpu-users"]}
    c.KernelProfiles.role_limits = {"gpu-users": {"max_kernels": 4, "max_gpus": 2}}

The Kubernetes fields are carried for the Kubernetes backend and ignored by local kernels.
Every value is checked when the config is read, with an error naming the profile and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from traitlets import Dict, Unicode
from traitlets.config import Configurable

from ..errors import ConfigError, NotAllowedError
from .limits import UserLimits

__all__ = ["Profile", "KernelProfiles", "parse_memory", "DEFAULT_PROFILES"]

FIELDS = {"display_name", "cpu", "memory", "gpus", "gpu_type", "gpu_resource", "environments", "roles",
          "node_selector", "tolerations", "priority_class"}
DEFAULT_PROFILES: dict[str, dict[str, Any]] = {"default": {"display_name": "Default (no limits)"}}
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


def parse_memory(value: Any, where: str) -> int:
    """Bytes from 4294967296, "4Gi", "4G", "512Mi", "512M" (Kubernetes' suffixes, a B allowed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _MEMORY.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{where}: memory {value!r} is not a size; write e.g. 4Gi, 512Mi or a number of bytes",
                          source="kernel profiles")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


@dataclass(frozen=True)
class Profile:
    name: str
    display_name: str
    cpu: float | None = None  # cores
    memory: int | None = None  # bytes
    gpus: int = 0
    gpu_type: str | None = None
    environments: tuple[str, ...] = ()  # empty: any
    roles: tuple[str, ...] = ()  # empty: everyone
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    priority_class: str | None = None
    gpu_resource: str = "nvidia.com/gpu"  # the extended resource a pod asks for (Kubernetes)

    def allows_environment(self, environment: str) -> bool:
        return not self.environments or environment in self.environments

    def allows_user(self, roles: set[str]) -> bool:
        return not self.roles or bool(roles & set(self.roles))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "display_name": self.display_name, "cpu": self.cpu, "memory": self.memory,
                "gpus": self.gpus, "gpu_type": self.gpu_type, "environments": list(self.environments),
                "roles": list(self.roles)}


def _profile(name: str, raw: Mapping[str, Any]) -> Profile:
    where = f"profile {name!r}"
    if not _NAME.match(name):
        raise ConfigError(f"{where}: names are lowercase letters, digits and '-' (they become kernel names)",
                          source="kernel profiles")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a dict of settings", source="kernel profiles")
    unknown = set(raw) - FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown setting {sorted(unknown)[0]!r}; known: {', '.join(sorted(FIELDS))}",
                          source="kernel profiles")
    cpu = raw.get("cpu")
    if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or cpu <= 0):
        raise ConfigError(f"{where}: cpu must be a number of cores above 0, got {cpu!r}", source="kernel profiles")
    gpus = raw.get("gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ConfigError(f"{where}: gpus must be a whole number of 0 or more, got {gpus!r}", source="kernel profiles")
    lists = {}
    for key in ("environments", "roles"):
        value = raw.get(key, [])
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of names", source="kernel profiles")
        lists[key] = tuple(value)
    return Profile(
        name=name, display_name=str(raw.get("display_name") or name), cpu=float(cpu) if cpu is not None else None,
        memory=parse_memory(raw["memory"], where) if raw.get("memory") is not None else None, gpus=gpus,
        gpu_type=raw.get("gpu_type"), environments=lists["environments"], roles=lists["roles"],
        node_selector=dict(raw.get("node_selector") or {}), tolerations=tuple(raw.get("tolerations") or ()),
        priority_class=raw.get("priority_class"), gpu_resource=str(raw.get("gpu_resource") or "nvidia.com/gpu"),
    )


class KernelProfiles(Configurable):
    """The profiles of this deployment and who may use which."""

    profiles = Dict(DEFAULT_PROFILES, help="name -> settings (see the module's docstring).").tag(config=True)
    default_profile = Unicode("", help="Profile used when none is asked for; empty: the first.").tag(config=True)
    user_roles = Dict({}, help="user name -> list of roles.").tag(config=True)
    role_limits = Dict({}, help="role -> {max_kernels, max_gpus}; a user gets the most generous of "
                       "their roles' limits; no role: the `*` entry, if any.").tag(config=True)

    def parsed(self) -> dict[str, Profile]:
        """All profiles, checked. Raises :class:`ConfigError` naming the profile and the field."""
        if not self.profiles:
            raise ConfigError("no kernel profiles are configured (c.KernelProfiles.profiles)", source="kernel profiles")
        return {name: _profile(name, raw) for name, raw in self.profiles.items()}

    def get(self, name: str | None, user: str, environment: str | None = None) -> Profile:
        """The profile ``user`` asked for (or the default), if they may use it with ``environment``."""
        profiles = self.parsed()
        name = name or self.default_profile or next(iter(profiles))
        if name not in profiles:
            raise ConfigError(f"no kernel profile {name!r} (known: {', '.join(profiles)})", source="kernel profiles")
        profile = profiles[name]
        if not profile.allows_user(self.roles(user)):
            raise NotAllowedError(f"{user} may not use profile {name!r}: it is for role(s) {', '.join(profile.roles)}",
                              source="kernel profiles")
        if environment and not profile.allows_environment(environment):
            raise NotAllowedError(f"profile {name!r} does not run environment {environment!r} (it runs: "
                              f"{', '.join(profile.environments)})", source="kernel profiles")
        return profile

    def roles(self, user: str) -> set[str]:
        return set(self.user_roles.get(user, []))

    def limits(self, user: str) -> UserLimits:
        """The most generous limits among the user's roles (None is unlimited)."""
        entries = [self.role_limits[r] for r in self.roles(user) if r in self.role_limits]
        if not entries and "*" in self.role_limits:
            entries = [self.role_limits["*"]]
        if not entries:
            return UserLimits()

        def most(key: str) -> int | None:
            values = [e.get(key) for e in entries]
            return None if any(v is None for v in values) else max(values)

        return UserLimits(max_kernels=most("max_kernels"), max_gpus=most("max_gpus"))
