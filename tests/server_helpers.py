"""What the server tests share: identities from a header, REST calls checked against openapi.yaml,
and code executed in a kernel through the server's websocket."""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

import tornado.httpclient
from jupyter_server.auth.identity import IdentityProvider, User

from .openapi import check_response

USERS = ("alice", "bob", "carol")


class HeaderUsers(IdentityProvider):
    """The server's token authenticates the request (as for any API client); who is asking comes from
    a header, so the tests speak as alice, bob or carol."""

    async def get_user(self, handler: Any) -> User | None:
        user = super().get_user(handler)
        if inspect.isawaitable(user):
            user = await user
        name = handler.request.headers.get("X-Test-User")
        return User(username=name) if user is not None and name in USERS else None


def rest_caller(jp_fetch: Any, loop: Any) -> Callable[..., tuple[int, Any]]:
    """``call(user, method, *path, body=None) -> (status, json)`` on /mlops/api; an error status is
    returned, not raised, and every answer is checked against the OpenAPI document."""

    def call(user: str, method: str, *path: str, body: Any = None) -> tuple[int, Any]:
        kw: dict[str, Any] = {"method": method, "headers": {"X-Test-User": user}}
        if body is not None:
            kw["body"] = json.dumps(body)
        try:
            response = loop.run_until_complete(jp_fetch("mlops", "api", *path, **kw))
        except tornado.httpclient.HTTPClientError as e:
            response = e.response
        text = response.body.decode() if response.body else ""
        body = json.loads(text) if text else None
        if response.code != 403 or user in USERS:  # jupyter_server's own refusal is not ours to describe
            check_response("/mlops/api/" + "/".join(path), method, response.code, body)
        return response.code, body

    return call


async def execute(ws_fetch: Any, kernel_id: str, code: str, user: str = "bob") -> str:
    """Run ``code`` in a kernel through ``/api/kernels/ID/channels``; returns its stream output."""
    from jupyter_client.session import Session

    ws = await ws_fetch("api", "kernels", kernel_id, "channels", headers={"X-Test-User": user})
    session = Session()
    msg = session.msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                          "user_expressions": {}, "allow_stdin": False})
    msg["channel"] = "shell"
    await ws.write_message(json.dumps(msg, default=str))
    out = []
    try:
        while True:
            reply = json.loads(await ws.read_message())
            if reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                continue
            if reply["msg_type"] == "stream":
                out.append(reply["content"]["text"])
            if reply["msg_type"] == "status" and reply["content"]["execution_state"] == "idle":
                return "".join(out)
    finally:
        ws.close()
