"""Kernels benchmark: what a pooled kernel, a kernel in an environment prefix and `env create` cost.

    python bench/kernels.py [--quick]

Measures (issue 5, "Environments and kernels"), interleaved, medians:

1. first reply on a pooled kernel: a ``KernelPool`` of kernels ``mlops-demo-default`` (the
   ``mlops-local`` provisioner, environment ``demo``, profile ``default``), started and ready;
   the time from ``pool.claim()`` to the first ``execute_reply`` of ``1+1``: the claim, a
   ``BlockingKernelClient`` made from the kernel's connection info and its channels started, the
   request and its reply (what a user of the pool pays; no readiness round trip: the pool hands
   out kernels that already answered one), vs
2. the anchor, a plain ``jupyter_client`` cold start: what ``jupyter_client.manager.start_new_kernel
   (kernel_name="python3")`` does (``KernelManager.start_kernel``, a client, ``wait_for_ready``)
   then ``execute("1+1")`` until its reply; for context also without ``wait_for_ready`` (the request
   queued until the kernel is up), since jupyter_client's check spends 0.2 s or more flushing iopub;
3. the same cold starts (with and without the wait) of ``mlops-demo-default``: the provisioner
   plans the launch, applies the prefix's activation and runs the prefix's interpreter;
4. ``env create``: ``create_environment`` of a locked definition of N small packages (30; the
   default run 100) into a fresh prefix with an empty package cache; the same call again (no-op:
   the prefix of that lock exists); and a second definition with the same dependencies (another
   name, so another lock and prefix) sharing the now full package cache;
5. through a real ``jupyter server`` (a subprocess on a free loopback port with a token; our
   extension is enabled on install; ``c.WarmPools.sizes = {"demo/default": 2}``), what a JupyterLab
   user pays: ``POST /mlops/api/kernels`` (a claim from the server's pool), the kernel's websocket,
   ``1+1`` until its ``execute_reply``, vs the anchor on the same server, ``POST /api/kernels``
   ``{"name": "python3"}`` (jupyter_server's own start), websocket, ``1+1``; with the parts of each
   (POST, websocket open, to the kernel, exec, delivery; see bench/README.md).

No conda channel is reachable here, so the benchmark builds one with py-rattler-build in its
temporary folder with tests/channels.py: a stand-in ``python`` whose ``bin/python`` is a
shell script running this interpreter (which has ipykernel) with the prefix's site-packages
first on the path, ``mlops-demo`` (a noarch: python module), ``mlops-act`` (an activation script)
and N ``mlops-pad-NN`` (noarch: generic, a few small files each). ``MLOPS_ENVIRONMENTS_DIR``,
``MLOPS_ENVS_DIR``, ``MLOPS_PKGS_DIR``, ``JUPYTER_DATA_DIR`` (so kernel specs, connection files
and GPU leases) and ``JUPYTER_CONFIG_DIR`` point into that folder, the working folder is there
too (no ``jupyter_server_config.py`` of the repository's is read), and all of it is removed at the
end. The last line of stdout is one JSON object (see bench/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")

from _common import Logger, fmt, goal_met, interleave, median, quick_mode, scratch, stdout_to_stderr, ratio  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.channels: the channel the tests build, with pads
    sys.path.insert(1, str(ROOT))

log = Logger("kernels")

GOALS = {
    "pooled_first_reply_s": "<=0.05",
    "vs_cold_jupyter_client": ">=12",
    "cold_vs_jupyter_client": ">=0.91",
    "server_pooled_first_reply_s": "<=0.05",
    "server_vs_cold": ">=12",
}

ENVIRONMENT = "demo"
SECOND = "demo2"  # the same dependencies under another name: another lock, another prefix
KERNEL = "mlops-demo-default"  # written by sync_from_config: environment demo x profile default
ANCHOR_KERNEL = "python3"
CODE = "1+1"

# the kernel's own view, checked once per kind of kernel (untimed): it runs in the prefix
CHECK = ("import os, sys, mlops_demo\n"
         "value = [os.environ.get('CONDA_PREFIX', ''), os.environ.get('MLOPS_ACT', ''), mlops_demo.VERSION]")


# -- the channel and the environments -------------------------------------------------------------------


def build_channel(root: Path, pads: int) -> Path:
    """tests/channels.py's channel (a stand-in python, mlops-demo, mlops-act) plus ``pads`` small
    packages, built fast; its stage folder removed."""
    from tests.channels import build_channel as build

    channel = build(root, pads, compression_level=1)
    shutil.rmtree(root / "stage", ignore_errors=True)
    return channel


def define(folder: Path, channel: Path, deps: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "environment.yml").write_text(f"channels: ['{channel.as_uri()}']\nplatforms: [linux-64]\n"
                                            f"dependencies: {json.dumps(deps)}\n")
    return folder


# -- kernels ----------------------------------------------------------------------------------------------


def first_reply(kc: Any, code: str = CODE, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
    """Send ``code`` on the shell channel; the content of its ``execute_reply``."""
    msg_id = kc.execute(code, **kw)
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_reply":
            content = msg["content"]
            if content.get("status") != "ok":
                raise RuntimeError(f"{code!r} -> {content.get('ename')}: {content.get('evalue')}")
            return content


def check_in_prefix(kc: Any, prefix: Path, what: str) -> None:
    """The kernel runs in the prefix: activation applied, the prefix's package importable."""
    content = first_reply(kc, CHECK, user_expressions={"v": "value"}, store_history=False)
    got = content["user_expressions"]["v"]["data"]["text/plain"]
    want = repr([str(prefix), "on", "1.0"])
    if got != want:
        raise RuntimeError(f"{what}: the kernel is not in the prefix: {got} (wanted {want})")


class Bench:
    def __init__(self, tmp: Path, p: dict[str, Any]) -> None:
        self.tmp = tmp
        self.p = p
        self.work = tmp / "work"
        self.kernel_logs = tmp / "kernel-logs"
        self.prefix: Path | None = None
        self.pool: Any = None
        self.rounds = 0
        self.phases: dict[str, list[tuple[float, ...]]] = {}
        self.server_misses = 0

    # environments ---------------------------------------------------------------------------------

    def setup_environments(self) -> dict[str, float]:
        """Channel, two definitions, their locks, ``demo`` installed where the product looks and
        the kernel specs written; returns context timings."""
        from jupyter_mlops.config import load_config
        from jupyter_mlops.environments.install import create_environment
        from jupyter_mlops.environments.solve import lock_environment
        from jupyter_mlops.environments.spec import current_platform, load_environment
        from jupyter_mlops.kernels.kernelspecs import sync_from_config

        if current_platform() != "linux-64":
            raise RuntimeError("the stand-in python of the benchmark's channel is built for linux-64")
        t0 = time.perf_counter()
        channel = build_channel(self.tmp, self.p["pads"])
        built = time.perf_counter() - t0
        deps = ["python", "mlops-demo=1.0", "mlops-act", *(f"mlops-pad-{i:02d}" for i in range(self.p["pads"]))]
        defs = Path(os.environ["MLOPS_ENVIRONMENTS_DIR"])
        t0 = time.perf_counter()
        self.specs = {}
        for name in (ENVIRONMENT, SECOND):
            define(defs / name, channel, deps)
            spec = load_environment(defs / name)
            lock_environment(spec)
            self.specs[name] = load_environment(defs / name)
        locked = (time.perf_counter() - t0) / 2
        self.packages = len(deps)
        log(f"channel of {self.packages} packages built in {built:.1f} s; a lock takes {locked:.2f} s")
        config = load_config()
        env = create_environment(self.specs[ENVIRONMENT], config.resolved_envs_dir, config.resolved_pkgs_dir)
        self.prefix = env.prefix
        synced = sync_from_config()
        if KERNEL not in synced.written:
            raise RuntimeError(f"sync_from_config() wrote {synced.written}, not {KERNEL}")
        log(f"{ENVIRONMENT} installed in {env.prefix}; kernel specs written: {', '.join(synced.written)}")
        return {"channel_build_s": built, "env_lock_s": locked}

    def env_round(self) -> tuple[float, float, float]:
        """A fresh envs dir and an empty package cache: create ``demo``; again (no-op); ``demo2``
        with the same packages, sharing the cache. Seconds of each."""
        from jupyter_mlops.environments.install import create_environment

        self.rounds += 1
        base = self.tmp / "create" / f"r{self.rounds}"
        envs, pkgs = base / "envs", base / "pkgs"
        try:
            t0 = time.perf_counter()
            first = create_environment(self.specs[ENVIRONMENT], envs, pkgs)
            t1 = time.perf_counter()
            again = create_environment(self.specs[ENVIRONMENT], envs, pkgs)
            t2 = time.perf_counter()
            second = create_environment(self.specs[SECOND], envs, pkgs)
            t3 = time.perf_counter()
            if not first.created or again.created or not second.created or again.prefix != first.prefix:
                raise RuntimeError(f"unexpected creates: {first}, {again}, {second}")
            for env in (first, second):
                if env.packages != self.packages or not (env.prefix / "lib").is_dir():
                    raise RuntimeError(f"{env.prefix}: {env.packages} packages, wanted {self.packages}")
            return t1 - t0, t2 - t1, t3 - t2
        finally:
            shutil.rmtree(base, ignore_errors=True)

    # kernels ----------------------------------------------------------------------------------------

    def start_pool(self) -> float:
        from jupyter_mlops.kernels.pool import KernelPool

        t0 = time.perf_counter()
        self.pool = KernelPool(KERNEL, size=self.p["pool_size"], cwd=self.work, log_dir=self.kernel_logs)
        if not self.pool.wait_ready(timeout=180):
            raise RuntimeError(f"the pool of {KERNEL} did not fill ({self.pool.ready} of {self.pool.size})")
        return time.perf_counter() - t0

    def cold(self, kernel_name: str, check: bool = False, wait: bool = True) -> float:
        """``start_new_kernel`` + ``execute("1+1")``: launch, ready, first reply. ``wait=False``:
        no ``wait_for_ready`` (the request waits in zmq's queue until the kernel is up), for context:
        jupyter_client's readiness check spends a fixed 0.2 s or more flushing iopub."""
        from jupyter_client.manager import KernelManager

        self.kernel_logs.mkdir(exist_ok=True)
        out = open(self.kernel_logs / f"cold-{kernel_name}.log", "ab")  # noqa: SIM115 - closed below
        km = KernelManager(kernel_name=kernel_name)
        kc = None
        try:
            t0 = time.perf_counter()
            km.start_kernel(cwd=str(self.work), stdout=out, stderr=out)
            t1 = time.perf_counter()
            kc = km.client()
            kc.start_channels()
            if wait:
                kc.wait_for_ready(timeout=60)
            t2 = time.perf_counter()
            first_reply(kc)
            t3 = time.perf_counter()
            if check and kernel_name == KERNEL:
                check_in_prefix(kc, self.prefix, kernel_name)  # type: ignore[arg-type]
        finally:
            out.close()
            if kc is not None:
                kc.stop_channels()
            with contextlib.suppress(Exception):
                km.shutdown_kernel(now=True)
        if wait:
            self.phases.setdefault(kernel_name, []).append((t1 - t0, t2 - t1, t3 - t2))
        return t3 - t0

    def pooled(self, check: bool = False) -> float:
        """Claim a ready kernel, connect a blocking client, ``1+1`` until its reply."""
        from jupyter_client.blocking import BlockingKernelClient

        pool = self.pool
        if not pool.wait_ready(timeout=180):  # untimed: the pool is full, nothing else starting
            raise RuntimeError("the pool did not refill")
        kc = None
        t0 = time.perf_counter()
        kernel = pool.claim()
        try:
            t1 = time.perf_counter()
            kc = BlockingKernelClient()
            kc.load_connection_info(kernel.manager.get_connection_info())  # key and signature scheme
            kc.start_channels()
            t2 = time.perf_counter()
            first_reply(kc)
            t3 = time.perf_counter()
            if check:
                check_in_prefix(kc, self.prefix, "pooled kernel")  # type: ignore[arg-type]
        finally:
            if kc is not None:
                kc.stop_channels()
            pool.release(kernel)  # untimed: a kernel serves one claim
            # untimed: the kernel the claim started in its place is up before the next measure, so
            # no cold start shares the CPU with it
            pool.wait_ready(timeout=180)
        self.phases.setdefault("pooled", []).append((t1 - t0, t2 - t1, t3 - t2))
        return t3 - t0

    def readiness_check_cost(self) -> float:
        """Context: what jupyter_client's own ``wait_for_ready`` adds on a pooled, ready kernel
        (a user who calls it after the claim pays it)."""
        from jupyter_client.blocking import BlockingKernelClient

        pool = self.pool
        pool.wait_ready(timeout=180)
        kernel = pool.claim()
        kc = BlockingKernelClient()
        try:
            kc.load_connection_info(kernel.manager.get_connection_info())
            kc.start_channels()
            t0 = time.perf_counter()
            kc.wait_for_ready(timeout=60)
            return time.perf_counter() - t0
        finally:
            kc.stop_channels()
            pool.release(kernel)
            pool.wait_ready(timeout=180)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


# -- through the Jupyter server ---------------------------------------------------------------------------

SERVER_CONFIG = """\
c.ServerApp.open_browser = False
c.ServerApp.ip = "127.0.0.1"
c.ServerApp.port = {port}
c.ServerApp.port_retries = 0
c.ServerApp.allow_root = True  # containers run as root; the server refuses to otherwise
c.ServerApp.root_dir = {root!r}
c.IdentityProvider.token = {token!r}
c.AsyncMultiKernelManager.use_pending_kernels = False  # the default: POST /api/kernels awaits the launch
c.WarmPools.sizes = {{"{environment}/default": {size}}}
"""


# the pieces of a first reply through the server, as the client and the kernel's clock see them
SERVER_PARTS = ("post", "ws_open", "to_kernel", "exec", "delivery")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kernel_pids(tmp: Path) -> set[int]:
    """``ipykernel_launcher`` processes whose command line names this run's folder (their connection
    file lies in its JUPYTER_DATA_DIR): this run's kernels, not anyone else's on the machine."""
    import subprocess

    done = subprocess.run(["pgrep", "-af", "ipykernel_launcher"], capture_output=True, text=True, check=False)
    return {int(line.split()[0]) for line in done.stdout.splitlines() if str(tmp) in line}


class ServerBench:
    """A real ``jupyter server`` (our extension enabled on install), its pool of ``demo/default``,
    and a client that talks to it as JupyterLab does: REST with a token, then the kernel's websocket."""

    def __init__(self, tmp: Path, p: dict[str, Any], prefix: Path | None) -> None:
        self.tmp = tmp
        self.p = p
        self.prefix = prefix
        self.proc: Any = None
        self.log_path = tmp / "server.log"
        self.loop = asyncio.new_event_loop()
        self.phases: dict[str, list[tuple[float, ...]]] = {"pooled": [], "cold": []}
        self.cookies: dict[str, str] = {}
        self.misses = 0  # claims answered "started": the pool was empty (re-measured after a refill)

    # the server ----------------------------------------------------------------------------------

    def start(self) -> float:
        """Start the server and wait until it answers; seconds."""
        import secrets
        import subprocess

        self.port, self.token = free_port(), secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        config_dir = self.tmp / "server-config"
        config_dir.mkdir()
        (config_dir / "jupyter_server_config.py").write_text(SERVER_CONFIG.format(
            port=self.port, root=str(self.tmp / "work"), token=self.token, environment=ENVIRONMENT,
            size=self.p["pool_size"]))
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir)}  # MLOPS_* and JUPYTER_DATA_DIR: main()'s
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "jupyter_server"], cwd=self.tmp / "work", env=env,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                if self.run(self.get("/api/status"))["started"]:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter server did not answer in 90 s:\n{self.log_tail()}")
            time.sleep(0.1)
        return time.perf_counter() - t0

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (the server shuts its kernels and pools down), SIGKILL if it is still there after 20 s;
        then no kernel of this run may be left."""
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log("jupyter server ignored SIGTERM for 20 s: SIGKILL")
                self.proc.kill()
                self.proc.wait(timeout=10)

        async def close_client() -> None:
            from tornado.httpclient import AsyncHTTPClient

            AsyncHTTPClient().close()

        with contextlib.suppress(Exception):
            self.run(close_client())
        self.loop.close()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    # HTTP and websocket ----------------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        """The token, and the login cookie the server set on the first answer, as a browser sends it:
        without the cookie, jupyter_server makes every token-authenticated request a new anonymous
        user, and a kernel started by one request is not the next one's."""
        headers = {"Authorization": f"token {self.token}"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return headers

    async def fetch(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        from http.cookies import SimpleCookie

        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        try:
            resp = await AsyncHTTPClient().fetch(
                self.base + path, method=method, headers=self.headers(),
                body=None if body is None else json.dumps(body), allow_nonstandard_methods=True, request_timeout=120)
        except HTTPClientError as e:
            text = e.response.body.decode(errors="replace") if e.response is not None else ""
            raise RuntimeError(f"{method} {path} -> {e.code}: {text}") from e
        for header in resp.headers.get_list("Set-Cookie"):
            self.cookies.update({k: morsel.value for k, morsel in SimpleCookie(header).items()})
        if resp.code not in ok:
            raise RuntimeError(f"{method} {path} -> {resp.code}: {resp.body!r}")
        return json.loads(resp.body) if resp.body else None

    async def get(self, path: str) -> Any:
        return await self.fetch("GET", path)

    async def wait_pool_full(self, timeout: float = 180.0) -> float:
        """Poll ``GET /mlops/api/pools`` until every pool has ready == size; seconds waited."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        while True:
            pools = (await self.get("/mlops/api/pools"))["pools"]
            for pool in pools:
                if pool.get("error"):
                    raise RuntimeError(f"the server's pool {pool['key']} failed: {pool['error']}\n{self.log_tail()}")
            if not pools:
                raise RuntimeError(f"the server has no warm pool (c.WarmPools.sizes not read?)\n{self.log_tail()}")
            if all(pool["ready"] >= pool["size"] for pool in pools):
                return time.perf_counter() - t0
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server's pools did not fill in {timeout:.0f} s: {pools}")
            await asyncio.sleep(0.05)

    async def connect(self, kernel_id: str, session: Any) -> Any:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        url = f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels?session_id={session.session}"
        return await websocket_connect(HTTPRequest(url, headers=self.headers()))

    @staticmethod
    async def execute(ws: Any, session: Any, code: str = CODE, **content: Any) -> dict[str, Any]:
        """An ``execute_request`` on the shell channel; its ``execute_reply`` (a whole message)."""
        msg = session.msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                              "user_expressions": {}, "allow_stdin": False, **content})
        msg["channel"] = "shell"
        await ws.write_message(json.dumps(msg, default=str))
        while True:
            text = await asyncio.wait_for(ws.read_message(), timeout=60)
            if text is None:
                raise RuntimeError("the kernel's websocket closed before the execute_reply")
            reply = json.loads(text)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"] and reply["msg_type"] == "execute_reply":
                if reply["content"].get("status") != "ok":
                    raise RuntimeError(f"{code!r} -> {reply['content']}")
                return reply

    # the measures ----------------------------------------------------------------------------------

    async def _first_reply(self, method_path: str, body: dict[str, Any], kind: str, check: bool) -> float | None:
        """POST, websocket, ``1+1`` until its reply; seconds, or None when a pooled claim was not pooled.
        The kernel is shut down afterwards (untimed)."""
        from jupyter_client.session import Session

        session = Session()
        ws = None
        t0 = time.perf_counter()
        kernel = await self.fetch("POST", method_path, body, ok=(201,))
        try:
            t1 = time.perf_counter()
            ws = await self.connect(kernel["id"], session)
            t2 = time.perf_counter()
            opened = time.time()
            reply = await self.execute(ws, session)
            t3 = time.perf_counter()
            received = time.time()
            if check and kind == "pooled":
                got = (await self.execute(ws, session, CHECK, user_expressions={"v": "value"}))
                got = got["content"]["user_expressions"]["v"]["data"]["text/plain"]
                if got != repr([str(self.prefix), "on", "1.0"]):
                    raise RuntimeError(f"the server's pooled kernel is not in the prefix {self.prefix}: {got}")
        except BaseException:
            if ws is not None:
                ws.close()
            with contextlib.suppress(Exception):  # the first error is the one to see
                await self.delete(kind, kernel["id"])
            raise
        ws.close()
        await self.delete(kind, kernel["id"])
        if kind == "pooled" and kernel.get("origin") != "pool":
            return None
        # the websocket part split by the kernel's own clock (the same machine's): when it began to
        # execute (ipykernel's metadata "started") and when it sent the reply (the reply's header date)
        from dateutil.parser import isoparse

        began = isoparse(reply["metadata"]["started"]).timestamp()
        sent = isoparse(reply["header"]["date"]).timestamp()
        self.phases[kind].append((t1 - t0, t2 - t1, max(1e-6, began - opened), max(1e-6, sent - began),
                                  max(1e-6, received - sent)))
        return t3 - t0

    async def delete(self, kind: str, kernel_id: str) -> None:
        prefix = "/mlops/api/kernels/" if kind == "pooled" else "/api/kernels/"
        await self.fetch("DELETE", prefix + kernel_id, ok=(204,))

    def pooled(self, check: bool = False) -> float:
        """``POST /mlops/api/kernels`` (a claim), websocket, ``1+1``; the pool refills untimed after."""
        for _ in range(3):
            took = self.run(self._first_reply("/mlops/api/kernels", {"environment": ENVIRONMENT, "profile": "default"},
                                              "pooled", check))
            # untimed: the kernel the claim started in its place is up before the next measure, so no
            # other measure shares the CPU with it
            self.run(self.wait_pool_full())
            if took is not None:
                return took
            self.misses += 1
            log("  the claim was answered by a kernel started, not pooled: measured again after the refill")
        raise RuntimeError("three claims in a row were not pooled")

    def cold(self) -> float:
        """``POST /api/kernels {"name": "python3"}`` (jupyter_server's own start), websocket, ``1+1``."""
        took = self.run(self._first_reply("/api/kernels", {"name": ANCHOR_KERNEL}, "cold", False))
        return float(took)


def run_server(tmp: Path, p: dict[str, Any], prefix: Path | None, m: dict[str, float | None]) -> int:
    """The server measures into ``m``; returns the number of claims that were not pooled."""
    before = kernel_pids(tmp)
    if before:
        raise RuntimeError(f"kernels of this run still running before the server starts: {sorted(before)}")
    s = ServerBench(tmp, p, prefix)
    try:
        m["server_start_s"] = s.start()
        m["server_pool_fill_s"] = s.run(s.wait_pool_full())
        log(f"jupyter server on 127.0.0.1:{s.port} up in {m['server_start_s']:.2f} s; its pool of "
            f"{p['pool_size']} x {ENVIRONMENT}/default full {m['server_pool_fill_s']:.2f} s later")
        log(f"through the server: {p['server_rounds']} x (POST /api/kernels python3, POST /mlops/api/kernels "
            "demo/default), each then websocket and 1+1, after a warm-up of each (which checks the prefix)")
        s.cold()  # warm-ups, untimed
        s.pooled(check=True)
        s.phases = {"pooled": [], "cold": []}
        res = interleave(log, p["server_rounds"], [("server_cold", s.cold), ("server_pooled", s.pooled)])
    finally:
        s.stop()
        deadline = time.monotonic() + 10
        left = kernel_pids(tmp)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = kernel_pids(tmp)
        if left:
            import signal

            for pid in left:  # this run's kernels (named by its folder): killed by pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise RuntimeError(f"kernel processes left after the server stopped: {sorted(left)}")
    m["server_cold_first_reply_s"] = median(res["server_cold"])
    m["server_pooled_first_reply_s"] = median(res["server_pooled"])
    for kind in ("pooled", "cold"):
        for i, part in enumerate(SERVER_PARTS):
            m[f"server_{kind}_{part}_s"] = median([t[i] for t in s.phases[kind]])
    return s.misses


# -- the run ----------------------------------------------------------------------------------------------

QUICK = {"pads": 30, "pool_size": 2, "kernel_rounds": 5, "env_rounds": 3, "readiness_checks": 0, "server_rounds": 5}
DEFAULT = {"pads": 100, "pool_size": 2, "kernel_rounds": 9, "env_rounds": 7, "readiness_checks": 3,
           "server_rounds": 9}


def run_all(b: Bench, p: dict[str, Any]) -> dict[str, float | None]:
    m: dict[str, float | None] = {}
    m.update(b.setup_environments())

    # 4. env create -------------------------------------------------------------------------------
    log(f"env create: {p['env_rounds']} x (empty cache, no-op, second environment sharing the cache), "
        f"{b.packages} packages, after a warm-up round")
    res = interleave(log, p["env_rounds"], [("env create", b.env_round)], warmup=[b.env_round])
    rows = res["env create"]
    m["env_create_s"] = median([r[0] for r in rows])
    m["env_create_noop_s"] = median([r[1] for r in rows])
    m["env_create_shared_cache_s"] = median([r[2] for r in rows])

    # 1-3. kernels ----------------------------------------------------------------------------------
    m["pool_fill_s"] = b.start_pool()
    log(f"pool of {p['pool_size']} x {KERNEL} ready in {m['pool_fill_s']:.2f} s")
    log(f"kernels: {p['kernel_rounds']} x (jupyter_client cold {ANCHOR_KERNEL}, cold {KERNEL}, pooled {KERNEL}) "
        "after a warm-up of each (which checks the kernels run in the prefix)")
    with stdout_to_stderr():
        res = interleave(log, p["kernel_rounds"], [
            ("cold_jupyter_client", lambda: b.cold(ANCHOR_KERNEL)),
            ("cold_in_prefix", lambda: b.cold(KERNEL)),
            ("pooled", b.pooled),
            ("cold_no_wait", lambda: b.cold(ANCHOR_KERNEL, wait=False)),
            ("cold_in_prefix_no_wait", lambda: b.cold(KERNEL, wait=False)),
        ], warmup=[lambda: b.cold(ANCHOR_KERNEL), lambda: b.cold(KERNEL, check=True), lambda: b.pooled(check=True),
                   lambda: b.cold(ANCHOR_KERNEL, wait=False), lambda: b.cold(KERNEL, wait=False)])
        ready = [b.readiness_check_cost() for _ in range(p["readiness_checks"])]
    m["cold_first_reply_s"] = median(res["cold_jupyter_client"])
    m["cold_in_prefix_s"] = median(res["cold_in_prefix"])
    m["pooled_first_reply_s"] = median(res["pooled"])
    m["cold_no_wait_s"] = median(res["cold_no_wait"])
    m["cold_in_prefix_no_wait_s"] = median(res["cold_in_prefix_no_wait"])
    # where the time goes (medians of the timed rounds; the warm-up is the first entry of each)
    for key, name, parts in (("cold", ANCHOR_KERNEL, ("launch", "ready", "reply")),
                             ("cold_in_prefix", KERNEL, ("launch", "ready", "reply")),
                             ("pooled", "pooled", ("claim", "connect", "reply"))):
        timed = b.phases[name][1:]
        for i, part in enumerate(parts):
            m[f"{key}_{part}_s"] = median([t[i] for t in timed])
    if ready:
        m["wait_for_ready_on_pooled_s"] = median(ready)

    # 5. through the Jupyter server -----------------------------------------------------------------
    b.close()  # the in-process pool's kernels are gone before the server starts its own
    with stdout_to_stderr():
        b.server_misses = run_server(b.tmp, p, b.prefix, m)
    return m


def main(argv: list[str] | None = None) -> int:
    quick = quick_mode(__doc__, "fewer repeats, 30 packages (< 60 s on 2 cores)", argv)
    p = QUICK if quick else DEFAULT

    started = time.perf_counter()
    with scratch("bench-kernels-") as tmp:
        os.environ.update({
            "MLOPS_ENVIRONMENTS_DIR": str(tmp / "environments"),
            "MLOPS_ENVS_DIR": str(tmp / "envs"),
            "MLOPS_PKGS_DIR": str(tmp / "pkgs"),
            "JUPYTER_DATA_DIR": str(tmp / "jupyter-data"),  # kernel specs, runtime (connection files, GPU leases)
            "JUPYTER_CONFIG_DIR": str(tmp / "jupyter-config"),  # not the user's ~/.jupyter
        })
        os.environ.pop("JUPYTER_RUNTIME_DIR", None)
        os.environ.pop("JUPYTER_PATH", None)
        (tmp / "work").mkdir()
        os.chdir(tmp / "work")  # no jupyter_server_config.py of the repository's (nor its folder's)
        log(f"temp folder {tmp}; {'quick' if quick else 'default'} mode: {p}")
        b = Bench(tmp, p)
        try:
            m = run_all(b, p)
        finally:
            b.close()
    wall = time.perf_counter() - started
    report(m, p, wall, quick, b.server_misses)
    return 0


def secs(value: float | None) -> str:
    """A table cell in seconds; under 10 ms in milliseconds (a no-op create, a pooled reply's parts)."""
    if value is not None and not math.isnan(value) and value < 0.01:
        return f"{value * 1000:.2f} ms"
    return fmt(value, "s")


def report(m: dict[str, float | None], p: dict[str, Any], wall: float, quick: bool, misses: int = 0) -> None:
    ratios = {
        "vs_cold_jupyter_client": ratio(m, "cold_first_reply_s", "pooled_first_reply_s"),
        "cold_vs_jupyter_client": ratio(m, "cold_first_reply_s", "cold_in_prefix_s"),
        "vs_cold_no_wait": ratio(m, "cold_no_wait_s", "pooled_first_reply_s"),
        "cold_no_wait_vs_jupyter_client": ratio(m, "cold_no_wait_s", "cold_in_prefix_no_wait_s"),
        "shared_cache_vs_empty_cache": ratio(m, "env_create_s", "env_create_shared_cache_s"),
        "noop_vs_create": ratio(m, "env_create_s", "env_create_noop_s"),
        "server_vs_cold": ratio(m, "server_cold_first_reply_s", "server_pooled_first_reply_s"),
    }
    rows = [
        # measure, anchor, anchor metric, ours metric, ratio, goal keys (on ours or on the ratio)
        ("first reply, pooled kernel", "start_new_kernel", "cold_first_reply_s", "pooled_first_reply_s",
         "vs_cold_jupyter_client", ["pooled_first_reply_s", "vs_cold_jupyter_client"]),
        ("  same", "start, no ready wait", "cold_no_wait_s", "pooled_first_reply_s", "vs_cold_no_wait", []),
        ("cold start in a prefix", "start_new_kernel", "cold_first_reply_s", "cold_in_prefix_s",
         "cold_vs_jupyter_client", ["cold_vs_jupyter_client"]),
        ("  same, no ready wait", "start, no ready wait", "cold_no_wait_s", "cold_in_prefix_no_wait_s",
         "cold_no_wait_vs_jupyter_client", []),
        ("env create, shared cache", "empty cache", "env_create_s", "env_create_shared_cache_s",
         "shared_cache_vs_empty_cache", []),
        ("env create, no-op", "empty cache", "env_create_s", "env_create_noop_s", "noop_vs_create", []),
        ("first reply via the server", "POST /api/kernels", "server_cold_first_reply_s", "server_pooled_first_reply_s",
         "server_vs_cold", ["server_pooled_first_reply_s", "server_vs_cold"]),
    ]
    print()
    print(f"kernels benchmark ({'--quick' if quick else 'default'}): medians; ratio = anchor / ours, bigger is better")
    print(f"  kernels x{p['kernel_rounds']} (pool of {p['pool_size']}), env create x{p['env_rounds']} "
          f"({p['pads'] + 3} packages), through jupyter server x{p['server_rounds']}; total {wall:.0f} s")
    header = f"{'measure':<28} {'anchor':<20} {'anchor':>9} {'ours':>9} {'ratio':>9}  {'goal':<32} met"
    print(header)
    print("-" * len(header))
    for label, anchor_name, a_key, o_key, r_key, goal_keys in rows:
        r = ratios.get(r_key)
        goals = [(g, GOALS[g], goal_met(m[g] if g in m else ratios.get(g), GOALS[g])) for g in goal_keys]
        goal_txt = ", ".join(f"{g} {t}" for g, t, _ in goals)
        met = ", ".join(ok for _, _, ok in goals)
        r_txt = f"{r:>8.2f}x" if r is not None else f"{'-':>9}"
        print(f"{label:<28} {anchor_name:<20} {secs(m.get(a_key)):>9} {secs(m.get(o_key)):>9} "
              f"{r_txt}  {goal_txt:<32} {met}")
    print(f"{'env create, empty cache':<28} {'(no anchor)':<20} {'':>9} {secs(m.get('env_create_s')):>9}")
    print()
    print("where the time goes (medians, s):")
    print(f"  jupyter_client cold:  start_kernel {m['cold_launch_s']:.3f}, wait_for_ready {m['cold_ready_s']:.3f}, "
          f"1+1 {m['cold_reply_s']:.3f}")
    print(f"  cold in the prefix:   start_kernel {m['cold_in_prefix_launch_s']:.3f}, "
          f"wait_for_ready {m['cold_in_prefix_ready_s']:.3f}, 1+1 {m['cold_in_prefix_reply_s']:.3f}")
    print(f"  pooled:               claim {m['pooled_claim_s']:.4f}, client + channels {m['pooled_connect_s']:.4f}, "
          f"1+1 {m['pooled_reply_s']:.4f}")
    if m.get("wait_for_ready_on_pooled_s") is not None:
        print(f"  (jupyter_client's wait_for_ready on a pooled kernel would add {m['wait_for_ready_on_pooled_s']:.3f})")
    print(f"  pool of {p['pool_size']} filled in {m['pool_fill_s']:.2f}; channel built in {m['channel_build_s']:.1f}, "
          f"a lock in {m['env_lock_s']:.2f}")
    print("  through jupyter server: POST; websocket open (handshake, the server's kernel_info on a first connection);")
    print("  to kernel (open -> the kernel starts 1+1, by its clock: the server's zmq channels and nudge, forwarding);")
    print("  exec (the kernel: start -> its execute_reply); delivery (reply sent -> on the client's websocket):")
    for kind, post in (("pooled", "POST /mlops/api/kernels"), ("cold", "POST /api/kernels")):
        print(f"    {kind + ':':<8} {post} {m[f'server_{kind}_post_s']:.4f}, websocket open "
              f"{m[f'server_{kind}_ws_open_s']:.4f}, to kernel {m[f'server_{kind}_to_kernel_s']:.4f}, "
              f"exec {m[f'server_{kind}_exec_s']:.4f}, delivery {m[f'server_{kind}_delivery_s']:.4f}")
    print(f"  server up in {m['server_start_s']:.2f}, its pool full {m['server_pool_fill_s']:.2f} later"
          + (f"; {misses} claim(s) found the pool empty and were measured again" if misses else ""))
    print()
    # 4 significant figures: a claim (~50 us) or a no-op create (~0.2 ms) stays above 0
    metrics = {key: (float(f"{v:.4g}") if v is not None else None) for key, v in m.items()}
    print(json.dumps({"bench": "kernels", "metrics": metrics, "ratios": ratios, "goals": GOALS}))


if __name__ == "__main__":
    sys.exit(main())
