"""Kernel websockets without Nagle's delay.

One execution makes the server write several small messages back to back (status, execute_input,
execute_result, execute_reply, status). With Nagle's algorithm on, all but the first wait for the
client's delayed ACK: about 40 ms per cell on Linux, for every cell, in the browser too. Neither
jupyter_server nor tornado turns it off for this socket. Measured by bench/kernels.py: a pooled
kernel's first reply through the server, 75-91 ms with Nagle, 35-46 ms without.
"""

from __future__ import annotations

import asyncio

from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

__all__ = ["NoDelayWebsocketConnection"]


class NoDelayWebsocketConnection(ZMQChannelsWebsocketConnection):
    def connect(self) -> asyncio.Future[None] | None:
        self.websocket_handler.set_nodelay(True)
        return super().connect()
