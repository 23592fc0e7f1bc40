"""A Kubernetes API emulator on loopback, for the real ``kubernetes_asyncio`` client.

``async with ApiEmulator() as api:`` serves core/v1 and batch/v1 resources from memory on
``api.url`` (127.0.0.1, a free port); ``api.client()`` is an ``ApiClient`` configured for it.
``running_cluster()`` adds the kubelet stand-in (tests/k8s/kubelet.py) that schedules and runs pods.
Failure injection for tests: :meth:`ApiEmulator.fail_next`, :meth:`ApiEmulator.drop_watches`,
:meth:`ApiEmulator.compact`. See tests/k8s/README.md for what is and is not emulated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Optional

from aiohttp import web

from ._api import Api, dumps
from ._portforward import serve_portforward
from ._selectors import SelectorError, parse_field_selector, parse_label_selector
from ._routes import BATCH_GROUP, VERSION, delete_options, resource_list, target
from ._store import ABORT, CLOSE, RESOURCES, ApiError, Change, Obj, ResourceType, Store

log = logging.getLogger(__name__)
__all__ = ["ApiEmulator", "ApiError", "api_client", "running_cluster", "watch_until"]

@dataclass
class Request:
    """One request the emulator answered (``api.requests``): lets a test assert how it was called."""
    verb: str
    resource: str
    namespace: Optional[str]
    name: Optional[str]
    query: dict[str, str]
    method: str
    path: str


@dataclass
class _Failure:
    verb: str
    resource: str
    error: ApiError
    namespace: Optional[str]
    name: Optional[str]
    times: int = 1
    hits: list[Request] = field(default_factory=list)


def api_client(url: str) -> Any:
    """A ``kubernetes_asyncio.client.ApiClient`` for ``url`` (the caller closes it)."""
    from kubernetes_asyncio import client

    config = client.Configuration(host=url)
    return client.ApiClient(configuration=config)


class ApiEmulator:
    """The API server. Objects live in ``store``; ``api`` is the same verbs without HTTP."""

    def __init__(self, *, history: int = 1000, namespaces: Iterable[str] = ("default", "kube-system")) -> None:
        self.store = Store(history=history)
        self.api = Api(self.store)
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []  # exceptions inside the emulator, answered as 500
        self.url = ""
        self.logs: Optional[Callable[[str, str, Optional[str], bool], Any]] = None  # set by the kubelet
        self._namespaces = tuple(namespaces)
        self._failures: list[_Failure] = []
        self._streams: set[asyncio.Task[Any]] = set()
        self._runner: Optional[web.AppRunner] = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> "ApiEmulator":
        for ns in self._namespaces:
            self.api.create(RESOURCES["namespaces"], "", {"metadata": {"name": ns}})
        app = web.Application(client_max_size=8 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self.drop_watches()
        for task in list(self._streams):
            task.cancel()
        if self._streams:
            await asyncio.wait(list(self._streams), timeout=5)
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "ApiEmulator":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def client(self) -> Any:
        """A new ``ApiClient`` for this emulator; close it (``async with``) when done."""
        return api_client(self.url)

    # ---- failure injection -------------------------------------------------------------------

    def fail_next(self, verb: str, resource: str, code: int = 500, message: Optional[str] = None, *,
                  reason: Optional[str] = None, namespace: Optional[str] = None, name: Optional[str] = None,
                  times: int = 1, retry_after: Optional[int] = None) -> _Failure:
        """The next ``times`` requests matching ``verb`` (create, get, list, watch, update, patch,
        delete, deletecollection) on ``resource`` ("pods", "pods/status", "pods/log", "jobs") answer
        ``code`` with a Status. A 410 on "watch" arrives as an ERROR event in the stream, as the real
        API sends it. Returns a record whose ``hits`` lists the requests it answered."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        error = ApiError(code, message or f"injected failure ({code})", reason=reason, headers=headers)
        failure = _Failure(verb, resource, error, namespace, name, times)
        self._failures.append(failure)
        return failure

    def drop_watches(self, abrupt: bool = False) -> int:
        """End every open watch now: cleanly (as the API server's own timeout does, the client
        reconnects from its last resourceVersion), or ``abrupt`` (the connection is cut mid-stream)."""
        watchers = list(self.store.watchers)
        for w in watchers:
            w.close(abrupt)
        return len(watchers)

    def compact(self) -> int:
        """Forget the change history: a watch resuming from an earlier resourceVersion gets 410."""
        return self.store.compact()

    def _injected(self, req: Request) -> Optional[ApiError]:
        for f in self._failures:
            if f.verb == req.verb and f.resource == req.resource and f.namespace in (None, req.namespace) \
                    and f.name in (None, req.name) and f.times > 0:
                f.times -= 1
                f.hits.append(req)
                return f.error
        return None

    # ---- waiting (for tests; event driven) -----------------------------------------------------

    async def wait_for(self, resource: str, namespace: str, name: str,
                       predicate: Callable[[Obj], bool] = lambda o: True, timeout: float = 10.0,
                       deleted: bool = False) -> Obj:
        """The object once ``predicate`` holds (or once it is gone, with ``deleted``); TimeoutError."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Obj] = loop.create_future()

        def check(obj: Optional[Obj], gone: bool) -> None:
            if done.done():
                return
            if deleted and gone:
                done.set_result(obj or {})
            elif not deleted and obj is not None and not gone and predicate(obj):
                done.set_result(obj)

        def on_change(ch: Change) -> None:
            if ch.resource == resource and ch.namespace == namespace and ch.obj["metadata"]["name"] == name:
                check(ch.obj, ch.type == "DELETED")

        unsubscribe = self.store.subscribe(on_change)
        current = self.store.get(resource, namespace, name)
        check(current, current is None)
        try:
            return await asyncio.wait_for(done, timeout)
        finally:
            unsubscribe()

    def events_for(self, namespace: str, name: str) -> list[Obj]:
        return [e for e in self.store.list("events", namespace) if e["involvedObject"].get("name") == name]

    # ---- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request)
        except ApiError as e:
            return web.Response(status=e.code, text=dumps(e.status()), content_type="application/json",
                                headers=e.headers)
        except SelectorError as e:
            return self._error(ApiError.bad_request(f"unable to parse requirement: {e}"))
        except Exception as e:  # an emulator bug (or a request it cannot parse): a 500 that says so
            self.errors.append(e)
            log.exception("the API emulator failed on %s %s", request.method, request.path_qs)
            return self._error(ApiError(500, f"emulator error: {e!r}"))

    @staticmethod
    def _error(e: ApiError) -> web.Response:
        return web.Response(status=e.code, text=dumps(e.status()), content_type="application/json", headers=e.headers)

    @staticmethod
    def _json(obj: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, text=dumps(obj), content_type="application/json")

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts == ["version"]:
            return self._json(VERSION)
        if parts == ["api"]:
            return self._json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": self.url.removeprefix("http://")}]})
        if parts == ["apis"]:
            return self._json({"kind": "APIGroupList", "apiVersion": "v1", "groups": [BATCH_GROUP]})
        if parts == ["apis", "batch"]:
            return self._json({"kind": "APIGroup", "apiVersion": "v1", **BATCH_GROUP})
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:3] == ["apis", "batch", "v1"]:
            group, rest = "batch", parts[3:]
        else:
            raise ApiError(404, "the server could not find the requested resource", details={})
        if not rest:
            return self._json(resource_list(group))
        rt, namespace, name, sub = target(group, rest)
        req = self._record(request, rt, namespace, name, sub)
        injected = self._injected(req)
        if injected is not None and not (req.verb == "watch" and injected.code == 410):
            raise injected
        if req.verb == "watch":
            return await self._watch(request, rt, namespace, injected)
        if sub == "log":
            return await self._log(request, namespace or "", name or "")
        if sub == "portforward":
            return await self._portforward(request, namespace or "", name or "")
        return await self._verb(request, req.verb, rt, namespace, name, sub)

    def _record(self, request: web.Request, rt: ResourceType, namespace: Optional[str], name: Optional[str],
                sub: str) -> Request:
        q = dict(request.query)
        method = request.method
        if name is None:
            if method == "GET":
                verb = "watch" if q.get("watch", "").lower() in ("true", "1") else "list"
            else:
                verb = {"POST": "create", "DELETE": "deletecollection"}.get(method, "")
        else:
            verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "")
        if sub == "portforward" and (rt.plural != "pods" or name is None or method not in ("GET", "POST")):
            verb = ""  # a WebSocket port-forward is a get (as authorized before 1.35), SPDY's POST a create
        if not verb or (sub == "log" and method != "GET") or (sub not in ("", "status", "log", "portforward")):
            raise ApiError(405, f"the server does not allow this method on the requested resource ({method})")
        if verb == "create" and rt.namespaced and namespace is None:
            raise ApiError(405, "the server does not allow this method on the requested resource (post "
                           f"{rt.qualified})")
        req = Request(verb, rt.plural + (f"/{sub}" if sub else ""), namespace, name, q, method, request.path)
        self.requests.append(req)
        return req

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError.bad_request(f"the body of the request could not be decoded as JSON: {e}") from None

    async def _verb(self, request: web.Request, verb: str, rt: ResourceType, namespace: Optional[str],
                    name: Optional[str], sub: str) -> web.StreamResponse:
        ns = namespace or ""
        q = request.query
        if verb == "list":
            return self._json(self._list(rt, namespace, q))
        if verb == "get":
            return self._json(self.api.get(rt, ns, name or ""))
        if verb == "create":
            dry = q.get("dryRun") == "All"
            return self._json(self.api.create(rt, ns, await self._body(request), dry_run=dry), 201)
        if verb == "update":
            return self._json(self.api.update(rt, ns, name or "", await self._body(request), sub))
        if verb == "patch":
            return self._json(self.api.patch(rt, ns, name or "", await self._body(request),
                                             request.headers.get("Content-Type", ""), sub))
        options = delete_options(await self._body(request) or {}, q)
        if verb == "delete":
            return self._json(self.api.delete(rt, ns, name or "", options))
        for obj in self.api.list(rt, namespace, q.get("labelSelector"), q.get("fieldSelector")):
            with contextlib.suppress(ApiError):
                self.api.delete(rt, obj["metadata"].get("namespace", ""), obj["metadata"]["name"], options)
        return self._json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})

    def _list(self, rt: ResourceType, namespace: Optional[str], q: Any) -> Obj:
        items = self.api.list(rt, namespace, q.get("labelSelector"), q.get("fieldSelector"))
        meta: Obj = {"resourceVersion": self.store.resource_version}
        token = q.get("continue")
        if token:
            try:
                after = json.loads(base64.b64decode(token))["after"]
            except (ValueError, KeyError):
                raise ApiError.bad_request("continue key is not valid") from None
            items = [o for o in items if [o["metadata"].get("namespace", ""), o["metadata"]["name"]] > after]
        limit = int(q.get("limit") or 0)
        if limit and len(items) > limit:
            last = items[limit - 1]["metadata"]
            meta["continue"] = base64.b64encode(json.dumps(
                {"after": [last.get("namespace", ""), last["name"]]}).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        for item in items:  # list items carry no kind/apiVersion, as the real API's
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": meta, "items": items}

    async def _watch(self, request: web.Request, rt: ResourceType, namespace: Optional[str],
                     injected: Optional[ApiError]) -> web.StreamResponse:
        q = request.query
        labels = parse_label_selector(q.get("labelSelector"))
        fields = parse_field_selector(q.get("fieldSelector"), rt.plural)
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        bookmarks = q.get("allowWatchBookmarks", "").lower() in ("true", "1")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        try:
            if injected is not None:
                raise injected
            watcher = self.store.open_watch(rt.plural, namespace, lambda o: labels(o) and fields(o),
                                            q.get("resourceVersion"))
        except ApiError as e:
            if e.code != 410:
                raise
            await resp.prepare(request)
            await resp.write((dumps({"type": "ERROR", "object": e.status()}) + "\n").encode())
            await resp.write_eof()
            return resp
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            await resp.prepare(request)
            deadline = time.monotonic() + timeout if timeout else None
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    if bookmarks:
                        mark = {"kind": rt.kind, "apiVersion": rt.api_version,
                                "metadata": {"resourceVersion": self.store.resource_version}}
                        await resp.write((dumps({"type": "BOOKMARK", "object": mark}) + "\n").encode())
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except asyncio.TimeoutError:
                    continue
                if event == ABORT:
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                if event == CLOSE:
                    break
                kind, obj = event
                await resp.write((dumps({"type": kind, "object": obj}) + "\n").encode())
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.close_watch(watcher)
            self._streams.discard(task)
        return resp

    async def _portforward(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        pod = self.api.get(RESOURCES["pods"], namespace, name)  # a missing pod is 404 before any upgrade
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            return await serve_portforward(request, pod)
        finally:
            self._streams.discard(task)

    async def _log(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        q = request.query
        pod = self.api.get(RESOURCES["pods"], namespace, name)
        names = [c["name"] for c in pod["spec"].get("containers") or []]
        container = q.get("container")
        if not container:
            if len(names) != 1:
                raise ApiError.bad_request(f"a container name must be specified for pod {name}, choose one of: "
                                           f"[{' '.join(names)}]")
            container = names[0]
        elif container not in names + [c["name"] for c in pod["spec"].get("initContainers") or []]:
            raise ApiError.bad_request(f"container {container} is not valid for pod {name}")
        previous = q.get("previous", "").lower() in ("true", "1")
        if self.logs is None:
            raise ApiError.bad_request(f'container "{container}" in pod "{name}" is waiting to start: '
                                       "ContainerCreating")
        buffer = self.logs(namespace, name, container, previous)
        text = buffer.render(tail=int(q["tailLines"]) if q.get("tailLines") else None,
                             timestamps=q.get("timestamps", "").lower() in ("true", "1"),
                             limit=int(q["limitBytes"]) if q.get("limitBytes") else None)
        if q.get("follow", "").lower() not in ("true", "1"):
            return web.Response(status=200, body=text, content_type="text/plain")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            await resp.prepare(request)
            await resp.write(text)
            offset = len(buffer.data)
            while True:
                if len(buffer.data) > offset:
                    await resp.write(bytes(buffer.data[offset:]))
                    offset = len(buffer.data)
                elif buffer.closed:
                    break
                else:
                    await buffer.changed()
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(task)
        return resp


async def watch_until(func: Callable[..., Any], *args: Any, until: Callable[[dict[str, Any]], bool],
                      timeout: float = 10.0, **kwargs: Any) -> list[dict[str, Any]]:
    """Watch with the real client (``func`` is e.g. ``CoreV1Api.list_namespaced_pod``) until
    ``until(event)`` holds; every event seen, in order. TimeoutError after ``timeout`` seconds."""
    from kubernetes_asyncio import watch

    events: list[dict[str, Any]] = []

    async def run() -> None:
        async with watch.Watch() as w:
            async for event in w.stream(func, *args, **kwargs):
                events.append(event)
                if until(event):
                    return
        raise AssertionError(f"the watch ended before the condition held: {[e['type'] for e in events]}")

    await asyncio.wait_for(run(), timeout)
    return events


@contextlib.asynccontextmanager
async def running_cluster(nodes: Optional[Iterable[Any]] = None, **kubelet_options: Any) -> AsyncIterator[tuple[Any, ApiEmulator, Any]]:
    """``async with running_cluster(nodes=[Node("n1", cpu="4", memory="8Gi")]) as (client, api, kubelet)``:
    an emulator, a kubelet stand-in running pods on the given nodes (one 4-CPU, 16Gi node by default)
    and an ``ApiClient`` for it. Everything is stopped on exit: no process outlives the block."""
    from .kubelet import Kubelet, Node

    async with ApiEmulator() as api:
        kubelet = Kubelet(api, list(nodes) if nodes is not None else [Node("node-1", cpu="4", memory="16Gi")],
                          **kubelet_options)
        await kubelet.start()
        client = api.client()
        try:
            yield client, api, kubelet
        finally:
            try:
                await kubelet.stop()
            finally:
                await client.close()
