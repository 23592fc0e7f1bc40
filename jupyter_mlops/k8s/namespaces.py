"""A user's namespace on first use (with their role's quota and the limit range), and the API's
refusals said in one line: shared by kernel pods and step Jobs."""

from __future__ import annotations

import functools
from typing import Any

from ..errors import KubernetesError, QuotaExceededError

__all__ = ["api_message", "api_error", "ensure_namespace", "quota_for"]


def api_message(e: Any, doing: str) -> str:
    """One line from an ApiException: the API's own message (a quota says what and how much)."""
    import json

    message = getattr(e, "reason", "") or ""
    try:
        message = json.loads(e.body).get("message") or message
    except (TypeError, ValueError, AttributeError):
        pass
    return f"{doing}: {e.status} {' '.join(str(message).split())[:300]}"


async def ensure_namespace(core: Any, namespace: str, user: str, settings: Any, *, quota: bool = True) -> None:
    """The user's namespace with their role's ResourceQuota (unless ``quota`` is False: the warm
    pool's namespace is bounded by its sizes) and the LimitRange, made if missing. Kernels and
    steps both call it on first use; whichever comes first makes it."""
    from kubernetes_asyncio.client.exceptions import ApiException

    from . import manifests

    try:
        await core.read_namespace(namespace)
        return
    except ApiException as e:
        if e.status != 404:
            raise KubernetesError(api_message(e, f"reading namespace {namespace}")) from e
    hard = quota_for(user, settings) if quota else None
    made = [(core.create_namespace, manifests.namespace(namespace, user))]
    if hard:
        made.append((functools.partial(core.create_namespaced_resource_quota, namespace),
                     manifests.resource_quota(namespace, hard)))
    made.append((functools.partial(core.create_namespaced_limit_range, namespace),
                 manifests.limit_range(namespace, settings.default_cpu, settings.default_memory)))
    for create, body in made:
        try:
            await create(body)
        except ApiException as e:
            if e.status != 409:
                raise KubernetesError(api_message(e, f"creating {body['kind']} {namespace}")) from e


def quota_for(user: str, settings: Any) -> dict[str, Any] | None:
    """The most generous quota of the user's roles, field by field (as the kernel provisioner does)."""
    from ..kernels.profiles import KernelProfiles, parse_memory

    quotas = settings.role_quotas
    roles = KernelProfiles(config=settings.config).roles(user)
    found = [quotas[r] for r in sorted(roles) if r in quotas] or ([quotas["*"]] if "*" in quotas else [])
    if not found:
        return None
    merged: dict[str, Any] = {}
    for quota in found:
        for key, value in quota.items():
            if key not in merged or key == "gpu_resource":
                merged[key] = value
            else:
                try:
                    merged[key] = max(merged[key], value, key=lambda v: parse_memory(v, "quota"))
                except Exception:
                    merged[key] = max(merged[key], value)
    return merged


def api_error(e: Any, doing: str) -> KubernetesError:
    """:func:`api_message` as an error; a quota refusal says what to do about it."""
    message = api_message(e, doing)
    if getattr(e, "status", None) == 403 and "exceeded quota" in message:
        return QuotaExceededError(f"{doing}: the namespace's quota is used up ({message.split(': ', 1)[-1]}); "
                               "shut down a kernel or ask for a smaller profile")
    return KubernetesError(message)
