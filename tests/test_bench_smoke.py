"""The benchmarks still run (their numbers are not asserted: machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.slow


def test_tracking_bench_quick_runs_and_reports() -> None:
    done = subprocess.run([sys.executable, "bench/tracking.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == "tracking"
    assert {"caller_us_per_metric", "end_to_end_us_per_metric", "track_startup_s", "track_rss_mib"} <= set(report["metrics"])
    assert {"vs_mlflow_sync", "vs_log_batch"} <= set(report["ratios"])
    assert all(isinstance(v, (int, float)) and v > 0 for v in report["metrics"].values())


def test_data_bench_quick_runs_and_reports() -> None:
    done = subprocess.run([sys.executable, "bench/data.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == "data"
    assert {"add_mb_per_s", "md5_limit_mb_per_s", "unchanged_check_s"} <= set(report["metrics"])
    assert {"vs_dvc_add", "vs_dvc_status"} <= set(report["ratios"])
