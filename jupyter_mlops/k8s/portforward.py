"""Kernel pods reached through the API server, for a server outside the cluster (``c.Kubernetes.connect``).

Outside the cluster, pod IPs do not route. ``kubectl port-forward`` gets around that with the API's
``pods/portforward`` subresource; :class:`PortForward` does the same inside the server's event loop,
with the same client configuration (auth, TLS) as every other API call: one listener on 127.0.0.1
per remote port, one WebSocket per accepted connection. Because each connection gets a WebSocket
of its own, a kernel's ZeroMQ sockets that reconnect after its pod was re-created under the same
name (a restart) simply reach the new pod: the forward outlives restarts.

The protocol (``v4.channel.k8s.io``, one port per WebSocket, so its channels are 0 and 1): every
frame starts with its channel byte, data on channel 0, errors on channel 1; the server's first frame
on each channel is the port, 2 bytes little-endian. Anything on the error channel means the
connection failed (the pod is gone, the port refused): the local connection is closed, and the
outage is said in one warning line; ZeroMQ reconnects every 100 ms, so the rest go to debug until
the pod answers again. What is expected goes to debug as well: a port refused before the kernel in a
new pod listens on it, and anything between :meth:`PortForward.expect_down` (a shutdown or restart)
and :meth:`PortForward.pod_started`.

While the pod is away (gone, restarting, the API failing), each further connection waits before it
asks the API again, 0.1 s doubling up to 5 s, and :meth:`PortForward.pod_started` ends the wait:
ZeroMQ's own reconnects would otherwise cost the API server ten WebSocket upgrades a second per
socket. The WebSockets send pings every 30 s, so a connection an idle load balancer dropped is
noticed and reconnected instead of silently losing a kernel's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import struct
from typing import Any, Iterable

from ..errors import ConfigError

__all__ = ["PortForward", "wants_port_forward"]

log = logging.getLogger("jupyter_mlops.k8s")

DATA, ERROR = 0, 1  # the channels of a WebSocket's one port
CHUNK = 64 * 1024
HEARTBEAT = 30.0  # seconds between WebSocket pings
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0  # seconds a connection waits after a failure, doubling


def wants_port_forward(connect: str) -> bool:
    """``c.Kubernetes.connect`` resolved: "auto" port-forwards unless this process runs in a pod
    (``KUBERNETES_SERVICE_HOST`` set), where pod IPs route. :class:`ConfigError` for another value."""
    if connect not in ("auto", "pod-ip", "port-forward"):
        raise ConfigError(f"must be pod-ip, port-forward or auto, not {connect!r}", source="c.Kubernetes.connect")
    return connect == "port-forward" or (connect == "auto" and not os.environ.get("KUBERNETES_SERVICE_HOST"))


class PortForward:
    """Local ports on 127.0.0.1 relaying to ``ports`` of pod ``namespace/pod`` through the API server.

    ``configuration`` is the ``kubernetes_asyncio`` Configuration of the process's ApiClient.
    :meth:`start` binds the listeners (``local_ports`` maps remote -> local); nothing reaches the
    pod until a connection is accepted, so a forward can be set up for a pod not running yet.
    :meth:`close` stops the listeners and every open relay."""

    def __init__(self, configuration: Any, namespace: str, pod: str, ports: Iterable[int]) -> None:
        self.configuration = configuration
        self.target = (namespace, pod)
        self.remote_ports = list(ports)
        self.local_ports: dict[int, int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._relays: set[asyncio.Task[Any]] = set()
        self._ws_api: Any = None
        self._closing = False
        self._answered: set[int] = set()  # ports the pod sent data on since it started: its kernel listens
        self._going = False  # from expect_down() to pod_started(): the pod is away on purpose
        self._warned = False  # this outage has been said; the rest of it goes to debug
        self._backoff = 0.0  # seconds the next connection waits before asking the API (0: none)
        self._wake = asyncio.Event()  # set (and replaced) by pod_started(): waiting connections go at once

    async def start(self) -> dict[int, int]:
        from kubernetes_asyncio.stream import WsApiClient

        self._ws_api = WsApiClient(configuration=self.configuration, heartbeat=HEARTBEAT)
        try:
            for port in self.remote_ports:
                server = await asyncio.start_server(functools.partial(self._accepted, port), "127.0.0.1", 0)
                self._servers.append(server)
                self.local_ports[port] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.close()
            raise
        return dict(self.local_ports)

    def expect_down(self) -> None:
        """The pod is going away on purpose (shut down, deleted, restarted): failures until
        :meth:`pod_started` are no news."""
        self._going = True

    def pod_started(self) -> None:
        """A pod of this name runs (again): its kernel may not listen yet, but a pod gone is news."""
        self._answered.clear()
        self._going = self._warned = False
        self._backoff = 0.0
        self._wake.set()
        self._wake = asyncio.Event()

    async def close(self) -> None:
        self._closing = True  # a connection accepted from now on is closed at once
        for server in self._servers:
            server.close()
        relays = list(self._relays)
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._ws_api is not None:
            await self._ws_api.close()
            self._ws_api = None

    async def _accepted(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:
            writer.close()
            return
        self._relays.add(task)
        try:
            if self._backoff:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._backoff)
            failure = await self._relay(port, reader, writer)
        except asyncio.CancelledError:  # close(): ending quietly, as asyncio logs a cancelled handler as an error
            failure = None
        except Exception as e:  # a bug here must not become an unhandled-exception storm per reconnect
            failure = f"{type(e).__name__}: {e}", False
        finally:
            self._relays.discard(task)
            writer.close()  # ZeroMQ sees the connection drop and reconnects
        if failure:
            self._say(port, *failure)
            if not self._booting(port, failure[1]):
                self._backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff * 2))

    async def _relay(self, port: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> tuple[str, bool] | None:
        """One local connection relayed through one WebSocket; the failure, if there was one, and
        whether it came from the pod's side (the error channel) rather than the API server."""
        from aiohttp import ClientError, WSServerHandshakeError
        from kubernetes_asyncio.client import CoreV1Api

        namespace, pod = self.target
        try:
            connecting = await CoreV1Api(self._ws_api).connect_get_namespaced_pod_portforward(
                pod, namespace, ports=port, _preload_content=False)
            async with connecting as ws:
                upstream = asyncio.ensure_future(self._upstream(reader, ws))
                try:
                    return await self._downstream(port, ws, writer)
                finally:
                    upstream.cancel()
                    await asyncio.gather(upstream, return_exceptions=True)
        except WSServerHandshakeError as e:
            return f"the API server refused the port-forward (HTTP {e.status}{', no such pod' if e.status == 404 else ''})", False
        except (ClientError, OSError) as e:
            return f"the API server could not be reached: {' '.join(str(e).split()) or type(e).__name__}", False

    @staticmethod
    async def _upstream(reader: asyncio.StreamReader, ws: Any) -> None:
        """Local -> pod until the local side closes; then the WebSocket goes too (whatever ended it)."""
        try:
            while chunk := await reader.read(CHUNK):
                await ws.send_bytes(bytes([DATA]) + chunk)
        except ConnectionError:
            pass
        finally:
            await ws.close()

    async def _downstream(self, port: int, ws: Any, writer: asyncio.StreamWriter) -> tuple[str, bool] | None:
        """Pod -> local until the WebSocket ends; a failure as :meth:`_relay` says it."""
        from aiohttp import WSMsgType

        prefixed: set[int] = set()  # channels whose leading port number was read
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:  # no pong within a heartbeat, a frame over the limit
                return f"the WebSocket failed: {ws.exception() or 'no reason given'}", False
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            channel, payload = msg.data[0], msg.data[1:]
            if channel not in prefixed:
                prefixed.add(channel)
                if payload[:2] != struct.pack("<H", port):
                    return f"the API server answered for another port ({payload[:2].hex()})", False
                payload = payload[2:]
            if channel == ERROR and payload:
                return " ".join(payload.decode(errors="replace").split()), True
            if channel == DATA and payload:
                self._answered.add(port)
                self._warned = False
                self._backoff = 0.0
                try:
                    writer.write(payload)
                    await writer.drain()
                except ConnectionError:  # the local side went: not a failure
                    return None
        return None

    def _booting(self, port: int, by_pod: bool) -> bool:
        """A refusal by a running pod whose kernel has not listened on ``port`` yet: it starts."""
        return by_pod and not self._going and port not in self._answered

    def _say(self, port: int, failure: str, by_pod: bool) -> None:
        namespace, pod = self.target
        expected = self._going or self._booting(port, by_pod)  # away, or not listening yet
        level = logging.DEBUG if expected or self._warned else logging.WARNING
        self._warned = self._warned or level == logging.WARNING
        log.log(level, "port-forward to %s/%s port %d failed: %s", namespace, pod, port, failure)
