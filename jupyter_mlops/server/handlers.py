"""REST handlers under ``/mlops/api/``: thin over :class:`~.service.KernelService`.

Every handler is authenticated and authorized through jupyter_server's identity provider and
authorizer (resource ``mlops``: GET needs ``read``, starting and stopping kernels ``write``).
Errors come back as ``{"message": ...}`` with the status below; the message is the product's own
one-line explanation.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from ..errors import (
    ConfigError,
    GpuUnavailableError,
    KernelStartError,
    KubernetesError,
    LimitExceededError,
    MlopsError,
    NotAllowedError,
    QuotaExceededError,
)
from .service import KernelService, NotFound

__all__ = ["HANDLERS", "API"]

API = "/mlops/api"
AUTH_RESOURCE = "mlops"

#: error -> HTTP status; the first match wins (subclasses before their bases). The cluster refusing
#: or failing a request other than for quota is the upstream's failure: 502.
STATUS = ((NotFound, 404), (NotAllowedError, 403), (LimitExceededError, 429), (QuotaExceededError, 429),
          (GpuUnavailableError, 409), (KubernetesError, 502), (KernelStartError, 400), (ConfigError, 400),
          (MlopsError, 400))


class MlopsHandler(ExtensionHandlerMixin, APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def service(self) -> KernelService:
        return self.settings["mlops_service"]

    @property
    def user_name(self) -> str:
        return self.current_user.username

    def reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def fail(self, error: MlopsError) -> None:
        status = next(code for kind, code in STATUS if isinstance(error, kind))
        raise web.HTTPError(status, str(error), reason=type(error).__name__) from error


class EnvironmentsHandler(MlopsHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply({"environments": self.service.environments()})


class ProfilesHandler(MlopsHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        try:
            self.reply(self.service.profiles_for(self.user_name))
        except MlopsError as e:
            self.fail(e)


class GpusHandler(MlopsHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        try:
            self.reply(self.service.gpus())
        except MlopsError as e:
            self.fail(e)


class PoolsHandler(MlopsHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply({"pools": self.service.pools.status()})


class KernelsHandler(MlopsHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply({"kernels": self.service.kernels_of(self.user_name)})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.get_json_body() or {}
        if not isinstance(body, dict) or set(body) - {"environment", "profile", "path"} or not all(
                v is None or isinstance(v, str) for v in body.values()):
            raise web.HTTPError(400, "the body is a JSON object with optional strings environment, profile, path")
        try:
            kernel = await self.service.start(self.user_name, body.get("environment"), body.get("profile"),
                                              body.get("path"))
        except MlopsError as e:
            self.fail(e)
        self.set_header("Location", f"{self.base_url.rstrip('/')}/api/kernels/{kernel['id']}")
        self.reply(kernel, 201)


class KernelHandler(MlopsHandler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        try:
            self.reply(self.service.kernel_of(self.user_name, kernel_id))
        except MlopsError as e:
            self.fail(e)

    @web.authenticated
    @authorized
    async def delete(self, kernel_id: str) -> None:
        try:
            await self.service.shutdown(self.user_name, kernel_id)
        except MlopsError as e:
            self.fail(e)
        self.set_status(204)
        self.finish()


HANDLERS = [
    (f"{API}/environments", EnvironmentsHandler),
    (f"{API}/profiles", ProfilesHandler),
    (f"{API}/gpus", GpusHandler),
    (f"{API}/pools", PoolsHandler),
    (f"{API}/kernels", KernelsHandler),
    (f"{API}/kernels/(?P<kernel_id>[0-9a-f-]+)", KernelHandler),
]
