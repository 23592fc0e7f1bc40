"""An S3 API on loopback for the object-storage tests: moto's server in a process of its own, and
a relay in front of it that can stall uploads, so a test can kill a client in the middle of one.

Nothing here talks to AWS: every client is pointed at the loopback endpoint, with made-up
credentials from the environment, as a team's real S3 or MinIO would be configured.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .conftest import free_port, stop_process_group

# Made-up credentials: moto accepts any; real clients read them from these variables.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "mlops-test-key",
    "AWS_SECRET_ACCESS_KEY": "mlops-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """`python -m moto.server` on a loopback port (S3 and the rest of moto's AWS, in memory)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it answers; RuntimeError (with its log) if it cannot."""
        log_path = self.folder / "moto.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1):
                    return
            except OSError:
                pass
            time.sleep(0.2)  # waiting for a server to start listening: nothing to block on
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} in {timeout:g}s")

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client on ``endpoint``, credentials from the environment."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    """Every object in ``bucket``, key -> bytes, as a client downloading them would see them."""
    s3 = s3_client(endpoint)
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            objects[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return objects


@dataclass
class Bucket:
    """A bucket of one test's own on the S3 server at ``endpoint``."""

    endpoint: str
    name: str

    def url(self, path: str) -> str:
        return f"s3://{self.name}/{path}"

    def objects(self) -> dict[str, bytes]:
        return bucket_objects(self.endpoint, self.name)


class StallingRelay:
    """An HTTP relay to an S3 endpoint that lets ``allow`` object uploads (PUT /bucket/key) through
    and stalls every later one halfway: it sends the first half of the body upstream, then waits.

    A client killed while it is stalled has sent a partial object, as when a process dies in the
    middle of an upload. ``stalled`` is set once an upload is held, so a test waits on an event, not
    on time; ``release()`` lets everything through from then on and returns once every held upload
    is dropped (never completed: their client is gone). A client that dies while sending an allowed
    upload has its partial body dropped the same way.
    """

    def __init__(self, upstream: str, allow: int) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.allow = allow
        self.passed = 0
        self.stalled = threading.Event()
        self._open = threading.Event()
        self._lock = threading.Condition()
        self._held = 0
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
                pass

            def do_PUT(self) -> None:
                relay._relay(self)

            do_GET = do_HEAD = do_POST = do_DELETE = do_PUT

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def release(self, timeout: float = 60.0) -> None:
        """Let every upload through from now on; return once the held ones are dropped."""
        self._open.set()
        with self._lock:
            if not self._lock.wait_for(lambda: self._held == 0, timeout):
                raise RuntimeError(f"{self._held} held upload(s) still open after {timeout:g}s")

    def close(self) -> None:
        self._open.set()
        self._server.shutdown()
        self._server.server_close()

    def _is_upload(self, handler: BaseHTTPRequestHandler) -> bool:
        path = handler.path.split("?", 1)[0].strip("/")
        return handler.command == "PUT" and "/" in path  # an object, not a bucket

    def _relay(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        stall = False
        if self._is_upload(handler) and not self._open.is_set():
            with self._lock:
                stall = self.passed >= self.allow
                if not stall:
                    self.passed += 1
        upstream = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            upstream.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
            for name, value in handler.headers.items():
                upstream.putheader(name, value)
            upstream.endheaders()
            if stall:
                self._hold(upstream, handler, length)
                return
            body = handler.rfile.read(length) if length else b""
            upstream.send(body)
            if len(body) < length:  # the client died while sending: drop what it sent
                handler.close_connection = True
                return
            response = upstream.getresponse()
            body = response.read()
            handler.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection"):
                    handler.send_header(name, value)
            if response.getheader("Content-Length") is None:
                handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(body)
        except OSError:
            handler.close_connection = True
        finally:
            upstream.close()

    def _hold(self, upstream: http.client.HTTPConnection, handler: BaseHTTPRequestHandler, length: int) -> None:
        """Send half the body upstream, wait to be released, then close upstream mid-body; the
        client (killed meanwhile) never gets an answer."""
        with self._lock:
            self._held += 1
        try:
            upstream.send(handler.rfile.read(length // 2))
            self.stalled.set()
            self._open.wait(120)
            handler.close_connection = True
        finally:
            upstream.close()
            with self._lock:
                self._held -= 1
                self._lock.notify_all()
