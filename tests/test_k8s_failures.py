"""Why a pod will not start, read from its status and events (pure: the emulator tests drive the
same code with real pod objects), and the kernel pod's connection file."""

from __future__ import annotations

import json

import pytest

from jupyter_mlops.k8s.failures import is_running, progress, start_failure
from jupyter_mlops.k8s.kernel_entry import connection_info


def pod(phase: str = "Pending", containers: list | None = None, conditions: list | None = None) -> dict:
    return {"metadata": {"name": "kernel-1", "namespace": "mlops-alice"},
            "status": {"phase": phase, "containerStatuses": containers or [], "conditions": conditions or []}}


def test_a_pending_pod_is_not_a_failure_yet() -> None:
    assert start_failure(pod()) is None and not is_running(pod())


def test_each_failure_says_what_and_what_to_do() -> None:
    pull = pod(containers=[{"ready": False, "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                    "message": 'Back-off pulling image "nope:1"'}}}])
    assert start_failure(pull) == ('pod kernel-1: ImagePullBackOff: Back-off pulling image "nope:1"; check the '
                                   "environment's image: its name, tag and the registry's credentials")
    unschedulable = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}])
    assert "Unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu." in start_failure(unschedulable)
    oom = pod("Failed", [{"ready": False, "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}])
    assert "OOMKilled" in start_failure(oom) and "more memory" in start_failure(oom)
    crashed = pod("Failed", [{"ready": False, "state": {"terminated": {"reason": "Error", "exitCode": 1}}}])
    assert "the container ended (Error 1)" in start_failure(crashed)
    assert start_failure(None) == "the pod was deleted before it started"
    event = {"type": "Warning", "reason": "FailedScheduling", "message": "0/1 nodes are available: 1 Insufficient cpu."}
    assert "Insufficient cpu" in start_failure(pod(), [event])


def test_running_and_progress() -> None:
    running = pod("Running", [{"ready": True, "state": {"running": {}}}])
    assert is_running(running) and start_failure(running) is None
    events = [{"reason": "Scheduled", "message": "assigned"}, {"reason": "Pulling", "message": 'Pulling image "big:1"'}]
    assert progress(events) == 'pulling: Pulling image "big:1"' and progress([]) is None


def test_the_kernel_pod_builds_its_connection_from_its_environment() -> None:
    info = connection_info({"MLOPS_KERNEL_KEY": "k", "MLOPS_POD_IP": "10.1.2.3",
                            "MLOPS_KERNEL_PORTS": json.dumps({"shell": 52001, "hb": 52005})})
    # every address of the pod: its IP for the server, localhost for a port-forward
    assert info == {"ip": "0.0.0.0", "transport": "tcp", "key": "k", "signature_scheme": "hmac-sha256",
                    "kernel_name": "", "shell_port": 52001, "hb_port": 52005}
    assert connection_info({"MLOPS_KERNEL_KEY": "k", "MLOPS_KERNEL_PORTS": "{}", "MLOPS_KERNEL_BIND": "127.0.9.2"}
                           )["ip"] == "127.0.9.2"


@pytest.mark.parametrize("setting, value", [("on_stop", "nope"), ("connect", "ssh")])
def test_a_wrong_kubernetes_setting_is_one_line_naming_it(setting: str, value: str) -> None:
    from traitlets.config import Config

    from jupyter_mlops.errors import ConfigError
    from jupyter_mlops.k8s.settings import KubernetesSettings

    config = Config()
    setattr(config.Kubernetes, setting, value)
    with pytest.raises(ConfigError) as raised:
        KubernetesSettings.checked(config)
    assert "\n" not in str(raised.value) and str(raised.value).startswith("c.Kubernetes:")
    assert f"'{setting}'" in str(raised.value) and repr(value) in str(raised.value)
