"""Captured container output, as ``pods/log`` serves it (tail, timestamps, limit, follow, previous)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import TYPE_CHECKING, Optional

from ._store import ApiError

if TYPE_CHECKING:
    from ._pods import PodRun


class LogBuffer:
    """A container's captured stdout+stderr, as ``pods/log`` serves it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.times: list[float] = []  # when each line began
        self.closed = False
        self._event = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        if not chunk:
            return
        t = time.time()
        if not self.data or self.data.endswith(b"\n"):
            self.times.append(t)
        self.times.extend(t for _ in range(chunk[:-1].count(b"\n")))
        self.data += chunk
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def changed(self) -> None:
        await self._event.wait()

    def render(self, tail: Optional[int] = None, timestamps: bool = False, limit: Optional[int] = None) -> bytes:
        lines = bytes(self.data).splitlines(keepends=True)
        times = self.times[: len(lines)]
        if tail is not None:
            lines, times = lines[len(lines) - tail:] if tail else [], times[len(times) - tail:] if tail else []
        if timestamps:
            lines = [dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z ").encode() + line
                     for t, line in zip(times, lines)]
        out = b"".join(lines)
        return out[:limit] if limit is not None else out


def log_source(runs: dict[tuple[str, str], "PodRun"], namespace: str, name: str, container: Optional[str],
               previous: bool) -> LogBuffer:
    """``pods/log``: the container's buffer, or the API server's 400 when there is none yet."""
    run = runs.get((namespace, name))
    if run is None:
        raise ApiError.bad_request(f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
    c = run.container(container)
    if previous:
        if c.previous is None:
            raise ApiError.bad_request(f'previous terminated container "{c.name}" in pod "{name}" not found')
        return c.previous
    if c.proc is None:
        reason = c.state.get("waiting", {}).get("reason", "ContainerCreating")
        text = {"ErrImagePull": "trying and failing to pull image", "ImagePullBackOff": "trying and failing to pull "
                "image"}.get(reason, reason)
        raise ApiError.bad_request(f'container "{c.name}" in pod "{name}" is waiting to start: {text}')
    return c.log

