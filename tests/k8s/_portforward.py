"""``pods/{name}/portforward``: the WebSocket (``v4.channel.k8s.io``) that the API server proxies to
the kubelet, which connects to the pod's port and relays.

The protocol, as the kubelet speaks it: for the i-th port of ``?ports=``, channel 2i carries data and
2i+1 errors; every frame starts with its channel byte; the server's first frame on each channel is
the port, 2 bytes little-endian. A pod that is not running, or a port nothing listens on, is a
message on that port's error channel (the kubelet's wording, shortened), and then the WebSocket
closes. Here the "pod" is a local process on its pod IP, so the relay is a TCP connection to
(podIP, port). The WebSocket closes as soon as any port's pod-side connection ends (the product
forwards one port per WebSocket, as kubectl does). SPDY (kubectl before 1.31) is not emulated: a
request without a WebSocket upgrade is 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Optional

from aiohttp import WSMsgType, web

from ._store import ApiError, Obj

PROTOCOL = "v4.channel.k8s.io"


async def serve_portforward(request: web.Request, pod: Obj) -> web.StreamResponse:
    """Answer a port-forward request for ``pod`` (already read: a missing one is the caller's 404)."""
    ports = _ports(request.query.getall("ports", []))
    if not pod["spec"].get("nodeName"):
        raise ApiError.bad_request(f"pod {pod['metadata']['name']} does not have a host assigned")
    ws = web.WebSocketResponse(protocols=(PROTOCOL,))
    if not ws.can_prepare(request).ok:
        raise ApiError.bad_request("Upgrade request required (only WebSocket port-forwarding is emulated)")
    await ws.prepare(request)
    for i, port in enumerate(ports):
        for channel in (2 * i, 2 * i + 1):
            await ws.send_bytes(bytes([channel]) + struct.pack("<H", port))
    writers: dict[int, asyncio.StreamWriter] = {}
    pumps: list[asyncio.Task[None]] = []
    try:
        for i, port in enumerate(ports):
            connected = await _connect(pod, port)
            if isinstance(connected, str):
                await ws.send_bytes(bytes([2 * i + 1]) + connected.encode())
                return ws
            reader, writers[i] = connected
            pumps.append(asyncio.ensure_future(_pump(reader, ws, 2 * i)))
        async for msg in ws:
            if msg.type == WSMsgType.BINARY and msg.data and msg.data[0] % 2 == 0 and msg.data[0] // 2 in writers:
                writer = writers[msg.data[0] // 2]
                writer.write(msg.data[1:])
                await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        for pump in pumps:
            pump.cancel()
        for writer in writers.values():
            writer.close()
        with contextlib.suppress(Exception):
            await ws.close()
    return ws


def _ports(values: list[str]) -> list[int]:
    ports = [p for value in values for p in value.split(",") if p]
    if not ports:
        raise ApiError.bad_request('query parameter "ports" is required')
    if not all(p.isdigit() and 0 < int(p) < 65536 for p in ports):
        raise ApiError.bad_request(f"invalid port in {','.join(ports)}: ports must be 1-65535")
    return [int(p) for p in ports]


async def _connect(pod: Obj, port: int) -> "tuple[asyncio.StreamReader, asyncio.StreamWriter] | str":
    """A connection to the pod's port, or the error-channel message saying why there is none."""
    status, uid = pod.get("status") or {}, pod["metadata"].get("uid", "")
    ip: Optional[str] = status.get("podIP")
    if status.get("phase") != "Running" or not ip:
        return (f"error forwarding port {port} to pod {uid}, uid : pod {pod['metadata']['name']} is not running "
                f"(phase {status.get('phase')})")
    try:
        return await asyncio.open_connection(ip, port)
    except OSError as e:
        return (f"error forwarding port {port} to pod {uid}, uid : failed to connect to localhost:{port} inside "
                f"namespace of pod {pod['metadata']['name']}: dial tcp4 {ip}:{port}: connect: "
                f"{'connection refused' if isinstance(e, ConnectionRefusedError) else e}")


async def _pump(reader: asyncio.StreamReader, ws: web.WebSocketResponse, channel: int) -> None:
    """Pod -> client until the pod closes its side; then the WebSocket closes."""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(64 * 1024):
            await ws.send_bytes(bytes([channel]) + chunk)
    await ws.close()
