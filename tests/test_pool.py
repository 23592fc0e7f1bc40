"""KernelPool: kernels started ahead, each handed out once, none left behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from jupyter_mlops.errors import KernelStartError, MlopsError
from jupyter_mlops.kernels.pool import KernelPool
from jupyter_mlops.pipelines.executor import LocalExecutor, create_executor


def _execute(kernel, code: str) -> dict:
    """Run ``code`` on a claimed kernel with a plain blocking client; the reply's content."""
    client = kernel.manager.blocking_client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        reply = client.execute_interactive(code, timeout=30, output_hook=lambda msg: None,
                                           user_expressions={"v": "value"})
        return reply["content"]
    finally:
        client.stop_channels()


def test_claim_gives_ready_distinct_kernels_never_reused_and_close_leaves_none(tmp_path: Path) -> None:
    pool = KernelPool("python3", size=2, cwd=tmp_path)
    try:
        assert pool.wait_ready(2, timeout=120)
        first, second = pool.claim(), pool.claim()
        assert first.kernel_id != second.kernel_id
        pids = [first.pid, second.pid]
        content = _execute(first, "import os\nvalue = os.getcwd()")
        assert content["status"] == "ok"
        assert str(tmp_path) in content["user_expressions"]["v"]["data"]["text/plain"]
        # state set in one kernel is not in the next: nothing is shared or reused
        _execute(first, "secret = 42")
        assert "secret" not in _execute(second, "value = sorted(globals())")["user_expressions"]["v"]["data"]["text/plain"]
        pool.release(first)
        assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
        third = pool.claim(timeout=120)
        assert third.kernel_id not in (first.kernel_id, second.kernel_id)
        pids.append(third.pid)
    finally:
        pool.close()
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
    assert not alive


def test_a_kernel_that_cannot_start_fails_the_claim_with_the_reason(tmp_path: Path) -> None:
    pool = KernelPool("no-such-kernel-spec", size=1, cwd=tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(KernelStartError, match="no-such-kernel-spec"):
            pool.claim(timeout=60)
        assert time.monotonic() - started < 30  # the error, not a timeout
    finally:
        pool.close()


def test_claims_from_many_threads_each_get_their_own_kernel(tmp_path: Path) -> None:
    pool = KernelPool("python3", size=1, cwd=tmp_path)
    got: list[str] = []
    lock = threading.Lock()

    def claim() -> None:
        kernel = pool.claim(timeout=120)
        with lock:
            got.append(kernel.kernel_id)

    try:
        threads = [threading.Thread(target=claim) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert len(got) == 3 and len(set(got)) == 3
    finally:
        pool.close()


def test_executors_are_found_by_entry_point_and_an_unknown_one_is_named(tmp_path: Path) -> None:
    executor = create_executor("local", base=tmp_path, kernel_name="python3", workers=1, cancel=threading.Event())
    assert isinstance(executor, LocalExecutor)
    executor.close()
    with pytest.raises(MlopsError, match=r"no pipeline executor 'k8s' \(known: kubernetes, local\)"):
        create_executor("k8s", base=tmp_path, kernel_name="python3", workers=1, cancel=threading.Event())
