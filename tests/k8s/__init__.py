"""A Kubernetes API emulator and kubelet stand-in for tests: the real ``kubernetes_asyncio`` client
against core/v1 and batch/v1 on loopback, pods run as local processes. See README.md here."""

from .emulator import ApiEmulator, ApiError, api_client, running_cluster, watch_until
from .kubelet import Kubelet, Node

__all__ = ["ApiEmulator", "ApiError", "Kubelet", "Node", "api_client", "running_cluster", "watch_until"]
