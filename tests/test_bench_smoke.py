"""The benchmarks still run (their numbers are not asserted: machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("bench", "metrics", "ratios"),
    [
        ("tracking", {"caller_us_per_metric", "end_to_end_us_per_metric", "track_startup_s", "track_rss_mib"},
         {"vs_mlflow_sync", "vs_log_batch"}),
        ("data", {"add_mb_per_s", "md5_limit_mb_per_s", "unchanged_check_s"}, {"vs_dvc_add", "vs_dvc_status"}),
        ("pipelines", {"pipeline_s", "step_overhead_s", "noop_rerun_s", "papermill_cli_s", "dvc_repro_noop_s",
                       "papermill_inproc_s", "dag_build_10k_s"}, {"vs_papermill_cli", "vs_dvc_repro_noop", "vs_papermill_inproc"}),
        ("kernels", {"pooled_first_reply_s", "cold_first_reply_s", "cold_in_prefix_s", "env_create_s",
                     "env_create_noop_s", "env_create_shared_cache_s", "server_pooled_first_reply_s",
                     "server_cold_first_reply_s"},
         {"vs_cold_jupyter_client", "cold_vs_jupyter_client", "server_vs_cold"}),
        ("k8s", {"pooled_claim_s", "cold_start_s", "kernels_managed", "api_p99_ms", "watch_latency_p99_ms",
                 "watches_open", "rss_mib", "api_calls_per_start", "api_calls_per_claim"}, {"vs_cold_start"}),
    ],
)
def test_bench_quick_runs_and_reports(bench: str, metrics: set[str], ratios: set[str]) -> None:
    done = subprocess.run([sys.executable, f"bench/{bench}.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == bench
    assert metrics <= set(report["metrics"]) and ratios <= set(report["ratios"])
    assert all(isinstance(v, (int, float)) and v > 0 for v in report["metrics"].values())
