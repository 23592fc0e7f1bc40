"""What the kernel executed, with what it showed: the notebook a run logs as ``executed.ipynb``.

The saved notebook file is whatever the user last saved (often one cell, no outputs, while
nine cells ran). The kernel sees every executed input (IPython's raw input history) and, in
ipykernel, every output it sends to the frontend: stream text, display data, results and errors
all leave through one ``Session.send``. :class:`Transcript` wraps that method, keeps the outputs
of each execute request, and builds an nbformat-v4 notebook of the executed cells in order as a
plain dict (no nbformat import in the kernel).

Bounded: outputs past :data:`MAX_OUTPUT_BYTES` in all are dropped (counted in the notebook's
``metadata.mlops.dropped_outputs``), so a loop that prints for hours cannot fill the memory.
Without ipykernel (a terminal IPython) there are inputs and no outputs.
"""

from __future__ import annotations

import json
import threading
from typing import Any

__all__ = ["Transcript", "MAX_OUTPUT_BYTES"]

MAX_OUTPUT_BYTES = 16 << 20
_OUTPUTS = frozenset({"stream", "display_data", "execute_result", "error", "clear_output"})


def _parent_id(msg_or_type: Any, parent: Any) -> str | None:
    if isinstance(msg_or_type, dict):
        header = msg_or_type.get("parent_header") or {}
    else:
        header = (parent or {}).get("header", parent) or {}
    return header.get("msg_id") if isinstance(header, dict) else None


class Transcript:
    """Executed cells and their outputs, from :meth:`install` on (inputs from the kernel's start)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._outputs: dict[str, list[dict[str, Any]]] = {}
        self._cells: dict[int, str] = {}  # execution count -> execute request id
        self._clear_pending: set[str] = set()
        self._bytes = 0
        self.dropped = 0
        self._lock = threading.Lock()  # streams are sent from ipykernel's IOPub thread
        self._session: Any = None
        self._send: Any = None

    # -- capture ----------------------------------------------------------------------------------

    def install(self) -> None:
        """Start keeping outputs (a no-op outside ipykernel). Idempotent."""
        session = getattr(getattr(self.shell, "kernel", None), "session", None)
        if session is None or self._session is not None:
            return
        original = session.send

        def send(stream: Any, msg_or_type: Any, content: Any = None, parent: Any = None, *args: Any, **kwargs: Any) -> Any:
            try:
                self._keep(msg_or_type, content, kwargs.get("parent", parent))
            except Exception:  # the transcript must never break what the user sees
                pass
            return original(stream, msg_or_type, content, parent, *args, **kwargs)

        self._session, self._send = session, original
        session.send = send

    def uninstall(self) -> None:
        if self._session is not None:
            self._session.send = self._send
            self._session = self._send = None

    def _keep(self, msg_or_type: Any, content: Any, parent: Any) -> None:
        if isinstance(msg_or_type, dict):
            kind = msg_or_type.get("header", {}).get("msg_type") or msg_or_type.get("msg_type")
            content = msg_or_type.get("content")
        else:
            kind = msg_or_type
        if kind not in _OUTPUTS or not isinstance(content, dict):
            return
        request = _parent_id(msg_or_type, parent)
        if request is None:
            return
        with self._lock:
            outputs = self._outputs.setdefault(request, [])
            if kind == "clear_output":
                if content.get("wait"):
                    self._clear_pending.add(request)  # cleared by the next output, as a frontend does
                else:
                    outputs.clear()
                return
            if request in self._clear_pending:
                self._clear_pending.discard(request)
                outputs.clear()
            output = _nbformat_output(kind, content)
            size = len(json.dumps(output, default=str))
            if self._bytes + size > MAX_OUTPUT_BYTES:
                self.dropped += 1
                return
            self._bytes += size
            if kind == "stream" and outputs and outputs[-1]["output_type"] == "stream" and outputs[-1]["name"] == output["name"]:
                outputs[-1]["text"] += output["text"]  # one stream output per run of text, as nbclient keeps it
            else:
                outputs.append(output)

    def cell_ran(self, execution_count: int | None) -> None:
        """Called after each cell (post_run_cell): ties its execution count to its request."""
        if execution_count is not None:
            request = self._current_request()
            if request is not None:
                self._cells[execution_count] = request

    def _current_request(self) -> str | None:
        kernel = getattr(self.shell, "kernel", None)
        try:
            return kernel.get_parent()["header"]["msg_id"]  # type: ignore[union-attr]
        except Exception:  # no kernel (terminal IPython) or no request being served
            return None

    # -- the notebook ---------------------------------------------------------------------------------

    def notebook(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """The executed cells so far, in order, with their outputs (the running cell's too)."""
        history = list(getattr(getattr(self.shell, "history_manager", None), "input_hist_raw", []) or [])
        current = getattr(self.shell, "execution_count", None)
        requests = dict(self._cells)
        if current is not None and current not in requests and (now := self._current_request()):
            requests[current] = now
        cells = []
        with self._lock:
            for count, source in enumerate(history):
                if count == 0 or not source.strip():
                    continue
                outputs = [dict(o) for o in self._outputs.get(requests.get(count, ""), [])]
                for output in outputs:
                    if output["output_type"] == "execute_result":
                        output["execution_count"] = count
                cells.append({
                    "cell_type": "code", "id": f"executed-{count}", "execution_count": count,
                    "metadata": {}, "source": source, "outputs": outputs,
                })
            dropped = self.dropped
        meta: dict[str, Any] = dict(metadata or {})
        info = getattr(getattr(self.shell, "kernel", None), "language_info", None)
        meta.setdefault("language_info", dict(info) if isinstance(info, dict) else {"name": "python"})
        meta["mlops"] = {"executed": True, "dropped_outputs": dropped, "output_limit_bytes": MAX_OUTPUT_BYTES}
        return {"nbformat": 4, "nbformat_minor": 5, "metadata": meta, "cells": cells}


def _nbformat_output(kind: str, content: dict[str, Any]) -> dict[str, Any]:
    """An iopub message's content as the output nbformat v4 stores."""
    if kind == "stream":
        return {"output_type": "stream", "name": content.get("name", "stdout"), "text": str(content.get("text", ""))}
    if kind == "error":
        return {"output_type": "error", "ename": str(content.get("ename", "")), "evalue": str(content.get("evalue", "")),
                "traceback": [str(line) for line in content.get("traceback", [])]}
    output = {"output_type": kind, "data": dict(content.get("data") or {}), "metadata": dict(content.get("metadata") or {})}
    if kind == "execute_result":
        output["execution_count"] = content.get("execution_count")
    return output
