"""An S3 API on loopback for the object-storage tests: moto's server in a process of its own.

Nothing here talks to AWS: every client is pointed at the loopback endpoint, with made-up
credentials from the environment, as a team's real S3 or MinIO would be configured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from .conftest import free_port

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
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
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
