"""Culling by GPU idleness: dcgm-exporter text, the idle decision over sample sequences, and a real
Jupyter Server whose GPU kernels are sampled from a dcgm-exporter stand-in on loopback.

The activity source is the product's seam (``c.GpuCuller.source``): nothing of tornado, NVML or
jupyter_server is patched. The culler's samples are driven by the test through ``tick(now)``, with
the test's own clock, so nothing waits for time to pass.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from traitlets.config import Config

# pytest-jupyter's fixtures, for this module only (its autouse loop fixture would touch every test)
from pytest_jupyter.jupyter_core import *  # noqa: F403
from pytest_jupyter.jupyter_server import *  # noqa: F403
from pytest_jupyter.pytest_tornasync import *  # noqa: F403

from jupyter_mlops.errors import ConfigError
from jupyter_mlops.kernels.gpu_activity import (
    DcgmActivity, GpuHolder, GpuReading, NoGpuActivity, NvmlActivity, activity_from_config, parse_utilisation,
    readings_of,
)
from jupyter_mlops.kernels.registry import KERNELS
from jupyter_mlops.server.gpu_culler import ACTIVE, IDLE, UNKNOWN, GpuCuller, IdleTracker, Observation

GPU_A = "GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52"
GPU_B = "GPU-00000000-0000-0000-0000-0000000000b1"
GPUS = [{"name": "NVIDIA H100 80GB HBM3", "uuid": GPU_A}, {"name": "NVIDIA H100 80GB HBM3", "uuid": GPU_B}]


def exporter_text(values: dict[str, float | str], pods: dict[str, tuple[str, str]] | None = None) -> str:
    """What dcgm-exporter serves: HELP/TYPE lines, other fields, one GPU_UTIL series per GPU, with the
    pod labels it adds on Kubernetes (empty where no pod uses the GPU)."""
    pods = pods or {}
    lines = ["# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).", "# TYPE DCGM_FI_DEV_SM_CLOCK gauge"]
    for index, uuid in enumerate(values):
        lines.append(f'DCGM_FI_DEV_SM_CLOCK{{gpu="{index}",UUID="{uuid}",device="nvidia{index}"}} 1980')
    lines += ["# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).", "# TYPE DCGM_FI_DEV_GPU_UTIL gauge"]
    for index, (uuid, value) in enumerate(values.items()):
        namespace, pod = pods.get(uuid, ("", ""))
        lines.append(f'DCGM_FI_DEV_GPU_UTIL{{gpu="{index}",UUID="{uuid}",pci_bus_id="00000000:{index:02X}:00.0",'
                     f'device="nvidia{index}",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",'
                     f'container="{"kernel" if pod else ""}",namespace="{namespace}",pod="{pod}"}} {value}')
    return "\n".join(lines) + "\n"


# --- the Prometheus text -----------------------------------------------------------------------

def test_parse_keeps_gpu_utilisation_and_refuses_blank_values() -> None:
    text = exporter_text({GPU_A: 37, GPU_B: "NaN", "GPU-c": 2147483632, "GPU-d": -1})
    series = parse_utilisation(text)
    assert [(labels["UUID"], value) for labels, value in series] == [
        (GPU_A, 37.0), (GPU_B, None), ("GPU-c", None), ("GPU-d", None)]
    assert series[0][0]["modelName"] == "NVIDIA H100 80GB HBM3" and series[0][0]["pod"] == ""
    assert parse_utilisation("# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n") == []


@pytest.mark.parametrize("damaged", [
    'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a" 3\n',
    'DCGM_FI_DEV_GPU_UTIL{gpu="0"} busy\n',
    'DCGM_FI_DEV_GPU_UTIL{gpu="0",gpu="1"} 3\n',
    "DCGM_FI_DEV_GPU_UTIL\n",
    "# TYPE DCGM_FI_DEV_GPU_UTIL\n",
])
def test_parse_refuses_a_gpu_utilisation_line_that_is_not_the_exposition_format(damaged: str) -> None:
    with pytest.raises(ValueError):
        parse_utilisation(exporter_text({GPU_A: 1}) + damaged)


def test_parse_reads_only_the_gpu_utilisation_lines() -> None:
    """A damaged line of another metric, a page that is no exposition at all, the metric's name
    inside another metric or a label value: none of it is GPU_UTIL, none of it makes a page unknown."""
    unrelated = ['DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a" 3', "DCGM_FI_DEV_GPU_TEMP{gpu=0} hot",
                 "# TYPE DCGM_FI_DEV_GPU_TEMP", "<html>502 Bad Gateway</html>",
                 'ALERTS{alertname="DCGM_FI_DEV_GPU_UTIL high"} 1', 'DCGM_FI_DEV_GPU_UTIL_AVG{gpu="0"} busy']
    text = "\r\n".join(unrelated) + "\r\n" + exporter_text({GPU_A: 37, GPU_B: 2}) + "\n".join(unrelated)
    assert [(labels["UUID"], value) for labels, value in parse_utilisation(text)] == [(GPU_A, 37.0), (GPU_B, 2.0)]
    assert parse_utilisation("<html>502 Bad Gateway</html>\n") == []
    # through a federating Prometheus: untyped, with timestamps
    federated = '# TYPE DCGM_FI_DEV_GPU_UTIL untyped\nDCGM_FI_DEV_GPU_UTIL{UUID="GPU-a",instance="n1"} 4 1700000000000\n'
    assert parse_utilisation(federated) == [({"UUID": "GPU-a", "instance": "n1"}, 4.0)]


def test_readings_of_a_local_kernel_go_by_the_uuids_of_its_lease() -> None:
    series = parse_utilisation(exporter_text({GPU_A: 3, GPU_B: 90}))
    holder = GpuHolder("k1", "alice", 2, uuids=(GPU_A, "GPU-not-exported"))
    assert readings_of(holder, series) == (GpuReading(GPU_A, 3.0), GpuReading("GPU-not-exported", None))


def test_readings_of_a_kernel_pod_go_by_its_pod_labels() -> None:
    pods = {GPU_A: ("mlops-alice", "kernel-1"), GPU_B: ("mlops-bob", "kernel-1")}
    series = parse_utilisation(exporter_text({GPU_A: 3, GPU_B: 90}, pods))
    assert readings_of(GpuHolder("k1", "alice", 1, namespace="mlops-alice", pod="kernel-1"), series) == (
        GpuReading(GPU_A, 3.0),)
    assert readings_of(GpuHolder("k2", "carol", 1, namespace="mlops-carol", pod="kernel-1"), series) == ()
    # through a Prometheus that kept its own target labels, and from an exporter with the old names
    federated = [({"UUID": GPU_A, "pod": "dcgm-exporter-x", "namespace": "gpu-operator",
                   "exported_pod": "kernel-1", "exported_namespace": "mlops-alice"}, 4.0),
                 ({"UUID": GPU_B, "pod_name": "kernel-1", "pod_namespace": "mlops-alice"}, 1.0)]
    assert readings_of(GpuHolder("k1", "alice", 2, namespace="mlops-alice", pod="kernel-1"), federated) == (
        GpuReading(GPU_B, 1.0), GpuReading(GPU_A, 4.0))  # by UUID


def test_a_gpu_reported_twice_counts_at_its_highest_and_unknown_wins() -> None:
    holder = GpuHolder("k1", "alice", 1, uuids=(GPU_A,))
    assert readings_of(holder, [({"UUID": GPU_A}, 2.0), ({"UUID": GPU_A}, 60.0)]) == (GpuReading(GPU_A, 60.0),)
    assert readings_of(holder, [({"UUID": GPU_A}, 2.0), ({"UUID": GPU_A}, None)]) == (GpuReading(GPU_A, None),)


# --- the sources -------------------------------------------------------------------------------

def test_sources_are_chosen_by_name() -> None:
    assert isinstance(activity_from_config("none"), NoGpuActivity)
    assert isinstance(activity_from_config("nvml"), NvmlActivity)
    dcgm = activity_from_config("dcgm", dcgm_urls=["http://node-1:9400/metrics"], timeout=2)
    assert isinstance(dcgm, DcgmActivity) and dcgm.urls == ("http://node-1:9400/metrics",) and dcgm.timeout == 2
    with pytest.raises(ConfigError, match=r"no GPU activity source 'prometheus' \(known: dcgm, none, nvml\)"):
        activity_from_config("prometheus")
    with pytest.raises(ConfigError, match="at least one dcgm-exporter URL"):
        activity_from_config("dcgm", dcgm_urls=[])


def test_dcgm_says_which_endpoint_and_which_kernel_it_cannot_read(mlops_exporter: Exporter) -> None:
    """Against the exporter stand-in on loopback: what cannot be read is named, and a sample that
    can read everything clears the reason."""
    local = GpuHolder("k1", "alice", 2, uuids=(GPU_A, GPU_B))
    pod = GpuHolder("k2", "carol", 1, namespace="mlops-carol", pod="kernel-2")
    mlops_exporter.values = {GPU_A: 3.0, "GPU-c": 0.0}
    mlops_exporter.pods = {"GPU-c": ("mlops-carol", "kernel-2")}
    source = DcgmActivity([mlops_exporter.url])
    assert asyncio.run(source.sample([local, pod])) == {
        "k1": (GpuReading(GPU_A, 3.0), GpuReading(GPU_B, None)), "k2": (GpuReading("GPU-c", 0.0),)}
    assert source.reason == (f"no DCGM_FI_DEV_GPU_UTIL series of kernel k1's GPU {GPU_B} at the endpoints that "
                             "answered (is its node's dcgm-exporter among c.GpuCuller.dcgm_urls? a MIG instance?)")

    # a kernel pod on a node whose exporter is not among the URLs
    mlops_exporter.values = {GPU_A: 3.0, GPU_B: 1.0}
    assert asyncio.run(source.sample([local, pod]))["k2"] == ()
    assert source.reason is not None and "of kernel pod mlops-carol/kernel-2 (kernel k2) at the endpoints" in source.reason
    assert asyncio.run(source.sample([local])) and source.reason is None

    # a page of no exposition at all, a damaged GPU_UTIL line whose parser error has no words
    mlops_exporter.body = "<html>502 Bad Gateway</html>\n"
    asyncio.run(source.sample([local]))
    assert source.reason is not None and f"no DCGM_FI_DEV_GPU_UTIL series at {mlops_exporter.url} (" in source.reason
    mlops_exporter.body = exporter_text({GPU_A: 3.0, GPU_B: 1.0}) + "# TYPE DCGM_FI_DEV_GPU_UTIL\n"
    assert asyncio.run(source.sample([local])) == {"k1": (GpuReading(GPU_A, None), GpuReading(GPU_B, None))}
    assert source.reason is not None and source.reason.startswith(
        f"cannot read dcgm-exporter at {mlops_exporter.url}: its DCGM_FI_DEV_GPU_UTIL lines are not Prometheus "
        "text (a line cannot be parsed)")


def test_dcgm_reads_the_gpus_of_a_page_with_a_damaged_unrelated_metric(mlops_exporter: Exporter) -> None:
    mlops_exporter.body = ('DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a" 3\n'
                           + exporter_text({GPU_A: 3.0, GPU_B: 80.0}) + "DCGM_FI_DEV_GPU_TEMP{gpu=0} hot\n")
    source = DcgmActivity([mlops_exporter.url])
    assert asyncio.run(source.sample([GpuHolder("k1", "alice", 2, uuids=(GPU_A, GPU_B))])) == {
        "k1": (GpuReading(GPU_A, 3.0), GpuReading(GPU_B, 80.0))}
    assert source.reason is None


def test_nvml_says_why_it_cannot_read() -> None:
    source = NvmlActivity()
    holder = GpuHolder("k1", "alice", 1, uuids=(GPU_A,))
    found = asyncio.run(source.sample([holder]))
    try:
        import pynvml  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        assert found == {} and source.reason == "nvidia-ml-py is not installed: pip install 'jupyter_mlops[gpu]'"
        return
    if source.reason and source.reason.startswith("NVML cannot start"):  # no driver here
        assert found == {} and "no NVIDIA driver" in source.reason
    else:  # a GPU machine: a UUID it does not have is unknown, and named
        assert found == {"k1": (GpuReading(GPU_A, None),)} and GPU_A in (source.reason or "")


def test_nvml_names_the_kernel_pods_it_cannot_see_and_keeps_no_stale_reason() -> None:
    source = NvmlActivity()
    asyncio.run(source.sample([GpuHolder("k1", "alice", 1, uuids=(GPU_A,))]))
    assert source.reason is not None  # no nvidia-ml-py, no driver, or no such GPU here
    assert asyncio.run(source.sample([])) == {} and source.reason is None
    pod = GpuHolder("k2", "carol", 1, namespace="mlops-carol", pod="kernel-2")
    assert asyncio.run(source.sample([pod])) == {}
    assert source.reason == ("nvml reads this machine's GPUs only, not those of kernel pod mlops-carol/kernel-2 "
                             "(source dcgm reads them)")


def test_culler_settings_are_checked() -> None:
    for bad in ({"threshold": 0.0}, {"threshold": 101.0}, {"interval": 0.0}, {"idle_timeout": -1.0}):
        with pytest.raises(ConfigError, match="GpuCuller"):
            GpuCuller(None, config=Config({"GpuCuller": bad}))
    assert not GpuCuller(None, config=Config({"GpuCuller": {"idle_timeout": 600.0}})).enabled  # source none
    assert not GpuCuller(None, config=Config({"GpuCuller": {"source": "dcgm"}})).enabled  # timeout 0
    assert GpuCuller(None, config=Config({"GpuCuller": {"source": "dcgm", "idle_timeout": 1.0}})).enabled


def test_holders_are_local_kernels_with_a_lease_and_kernel_pods_of_gpu_profiles() -> None:
    """Against a stand-in kernel manager: a kernel pod with GPUs needs a cluster the tests cannot
    give one (the emulator's pods have no GPUs); the provisioner attributes read are the ones
    mlops-kubernetes keeps for re-adoption."""
    from types import SimpleNamespace

    from jupyter_mlops.kernels.registry import KernelRecord

    kernels = {
        "local-gpu": SimpleNamespace(provisioner=SimpleNamespace()),
        "local-cpu": SimpleNamespace(provisioner=SimpleNamespace()),
        "pod-gpu": SimpleNamespace(provisioner=SimpleNamespace(namespace="mlops-carol", pod_name="kernel-pod-gpu")),
        "pod-cpu": SimpleNamespace(provisioner=SimpleNamespace(namespace="mlops-carol", pod_name="kernel-pod-cpu")),
        "python3": SimpleNamespace(provisioner=SimpleNamespace()),  # not ours: no record
    }
    mkm = SimpleNamespace(list_kernel_ids=lambda: list(kernels), get_kernel=kernels.__getitem__)
    records = [KernelRecord("local-gpu", "alice", None, "gpu-2", gpus=[{"uuid": GPU_A}, {"uuid": GPU_B}]),
               KernelRecord("local-cpu", "bob", None, "small"),
               KernelRecord("pod-gpu", "carol", "torch", "gpu-2"),
               KernelRecord("pod-cpu", "carol", "torch", "small")]
    config = Config({"KernelProfiles": {"profiles": {"small": {}, "gpu-2": {"gpus": 2}}},
                     "GpuCuller": {"source": "dcgm", "idle_timeout": 60.0}})
    for record in records:
        KERNELS.add(record)
    try:
        assert GpuCuller(mkm, config=config).holders() == [
            GpuHolder("local-gpu", "alice", 2, uuids=(GPU_A, GPU_B)),
            GpuHolder("pod-gpu", "carol", 2, namespace="mlops-carol", pod="kernel-pod-gpu")]
    finally:
        for record in records:
            KERNELS.remove(record.kernel_id)


# --- the idle decision -------------------------------------------------------------------------

def seen(value: float | None, *more: float | None, busy: bool = False, kernel: str = "k1") -> Observation:
    values = (value, *more)
    return Observation(kernel, len(values), tuple(GpuReading(f"GPU-{i}", v) for i, v in enumerate(values)), busy)


def run(tracker: IdleTracker, samples: list[tuple[float, Observation | None]]) -> list[tuple[float, float]]:
    """Feeds (time, observation) in order; returns (time, idle_for) of every cull."""
    culls = []
    for now, observation in samples:
        culls += [(now, c.idle_for) for c in tracker.update(now, [observation] if observation else [])]
    return culls


def test_every_gpu_under_the_threshold_for_the_timeout_culls() -> None:
    tracker = IdleTracker(idle_timeout=600, threshold=5)
    samples = [(t, seen(0.0, 4.9)) for t in range(0, 601, 60)]
    assert run(tracker, samples) == [(600, 600)]
    assert tracker.idle_since("k1") is None  # culled: forgotten
    assert run(tracker, [(660, seen(0.0, 0.0))]) == [] and tracker.idle_since("k1") == 660  # its shutdown failed


def test_classification() -> None:
    tracker = IdleTracker(idle_timeout=600, threshold=5)
    assert tracker.classify(seen(0.0, 4.9)) == IDLE
    assert tracker.classify(seen(0.0, 5.0)) == ACTIVE  # at the threshold is not under it
    assert tracker.classify(seen(None, 80.0)) == ACTIVE  # a busy GPU is enough, whatever the other
    assert tracker.classify(seen(None, 1.0)) == UNKNOWN
    assert tracker.classify(Observation("k1", 2, (GpuReading(GPU_A, 0.0),))) == UNKNOWN  # a GPU not reported
    assert tracker.classify(Observation("k1", 1, ())) == UNKNOWN
    assert tracker.classify(seen(0.0, busy=True)) == ACTIVE
    assert IdleTracker(600, 5, cull_busy=True).classify(seen(0.0, busy=True)) == IDLE


def test_an_active_sample_restarts_the_clock() -> None:
    tracker = IdleTracker(idle_timeout=600, threshold=5)
    samples = [(0, seen(0.0)), (300, seen(0.0)), (540, seen(50.0)), (600, seen(0.0)), (1140, seen(0.0)),
               (1200, seen(1.0))]
    assert run(tracker, samples) == [(1200, 600)]


def test_a_busy_kernel_is_left_alone_unless_cull_busy() -> None:
    samples = [(0, seen(0.0)), (300, seen(0.0, busy=True)), (600, seen(0.0)), (900, seen(0.0))]
    assert run(IdleTracker(600, 5), samples) == []  # the busy sample restarted the clock at 600
    assert run(IdleTracker(600, 5), [*samples, (1200, seen(0.0))]) == [(1200, 600)]
    assert run(IdleTracker(600, 5, cull_busy=True), samples) == [(600, 600)]


def test_an_unknown_sample_stops_the_clock_and_never_culls() -> None:
    """Only time known to be idle counts: a kernel idle, then unseen for an hour (the exporter down
    while it trained, its pod restarting), is not culled at the first idle sample after."""
    tracker = IdleTracker(idle_timeout=600, threshold=5)
    assert run(tracker, [(0, seen(None))]) == [] and tracker.idle_since("k1") is None  # unknown starts no clock
    samples = [(60, seen(0.0)), (300, seen(None)), (700, seen(None)), (3660, seen(None))]
    assert run(tracker, samples) == [] and tracker.idle_since("k1") is None
    assert run(tracker, [(3720, seen(0.0))]) == [] and tracker.idle_since("k1") == 3720  # starts again here
    assert run(tracker, [(4319, seen(0.0)), (4320, seen(0.0))]) == [(4320, 600)]
    # one GPU of two unknown is an unknown sample too
    tracker = IdleTracker(idle_timeout=600, threshold=5)
    assert run(tracker, [(0, seen(0.0, 0.0)), (300, seen(0.0, None)), (600, seen(0.0, 0.0))]) == []
    assert tracker.idle_since("k1") == 600


def test_a_kernel_that_goes_away_is_forgotten() -> None:
    tracker = IdleTracker(idle_timeout=600, threshold=5)
    assert run(tracker, [(0, seen(0.0)), (300, None), (600, seen(0.0)), (1199, seen(0.0))]) == []
    assert tracker.idle_since("k1") == 600


def test_kernels_are_decided_each_on_their_own() -> None:
    tracker = IdleTracker(idle_timeout=600, threshold=5)
    assert tracker.update(0, [seen(0.0, kernel="a"), seen(90.0, kernel="b")]) == []
    culls = tracker.update(600, [seen(0.0, kernel="a"), seen(0.0, kernel="b")])
    assert [c.kernel_id for c in culls] == ["a"] and tracker.idle_since("b") == 600


# --- a real server -----------------------------------------------------------------------------

class Exporter:
    """A dcgm-exporter stand-in on loopback: serves :func:`exporter_text` of ``values`` and ``pods``
    (or ``body`` as it is), or ``status``."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.pods: dict[str, tuple[str, str]] = {}
        self.body: str | None = None  # served as it is, instead of the values
        self.status = 200
        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                text = exporter.body if exporter.body is not None else exporter_text(exporter.values, exporter.pods)
                body = text.encode() if exporter.status == 200 else b"down"
                self.send_response(exporter.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, name="dcgm-exporter", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def mlops_exporter() -> Iterator[Exporter]:
    exporter = Exporter()
    yield exporter
    exporter.close()


@pytest.fixture
def jp_server_config(tmp_path: Path, mlops_exporter: Exporter, monkeypatch: pytest.MonkeyPatch) -> Config:
    for name in ("MLOPS_ENVIRONMENTS_DIR", "MLOPS_ENVS_DIR", "MLOPS_PKGS_DIR"):
        (tmp_path / name.lower()).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.chdir(tmp_path)
    config = Config()
    config.ServerApp.jpserver_extensions = {"jupyter_mlops": True}
    config.KernelProfiles.profiles = {"small": {"display_name": "Small"},
                                      "gpu-1": {"display_name": "One GPU", "gpus": 1}}
    config.LocalKernels.gpu_inventory = "static"
    config.LocalKernels.gpu_devices = GPUS
    config.LocalKernels.gpu_lease_dir = str(tmp_path / "leases")
    config.GpuCuller.source = "dcgm"
    config.GpuCuller.dcgm_urls = [mlops_exporter.url]
    config.GpuCuller.idle_timeout = 600.0
    config.GpuCuller.interval = 3600.0  # the test drives the samples
    return config


@pytest.fixture
def mlops_server(jp_serverapp: Any, jp_asyncio_loop: Any) -> Iterator[Any]:
    asyncio.set_event_loop(jp_asyncio_loop)  # an earlier test's asyncio.run left none
    yield jp_serverapp
    for kernel_id in list(jp_serverapp.kernel_manager.list_kernel_ids()):
        jp_asyncio_loop.run_until_complete(jp_serverapp.kernel_manager.shutdown_kernel(kernel_id, now=True))


def test_the_server_culls_a_kernel_whose_gpu_stays_idle_and_keeps_a_busy_one(
        mlops_server: Any, mlops_exporter: Exporter, jp_asyncio_loop: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings = mlops_server.web_app.settings
    service, culler = settings["mlops_service"], settings["mlops_gpu_culler"]
    mkm = mlops_server.kernel_manager

    def call(coroutine: Any) -> Any:
        return jp_asyncio_loop.run_until_complete(coroutine)

    idle = call(service.start("alice", None, "gpu-1"))
    busy = call(service.start("carol", None, "gpu-1"))
    cpu = call(service.start("bob", None, "small"))
    idle_gpu, busy_gpu = idle["gpus"][0]["uuid"], busy["gpus"][0]["uuid"]
    mlops_exporter.values = {idle_gpu: 0.0, busy_gpu: 87.0}
    assert {h.kernel_id for h in culler.holders()} == {idle["id"], busy["id"]}  # the CPU kernel is none of its business

    assert call(culler.tick(now=1000.0)) == []  # alice's clock starts
    caplog.set_level(logging.INFO)
    assert call(culler.tick(now=1600.0)) == [idle["id"]]
    assert set(mkm.list_kernel_ids()) == {busy["id"], cpu["id"]}
    assert KERNELS.get(idle["id"]) is None and service.gpus()["holders"][0]["user"] == "carol"  # its GPU is free
    (line,) = [r.getMessage() for r in caplog.records if "culling kernel" in r.getMessage()]
    assert idle["id"] in line and "of alice" in line and idle_gpu in line and "under 5%" in line and "10 min" in line

    # carol's GPU goes idle; the exporter fails for a while: unknown is not idle, and stops her clock
    mlops_exporter.values[busy_gpu] = 1.0
    assert call(culler.tick(now=2000.0)) == []
    mlops_exporter.status = 503
    assert call(culler.tick(now=2700.0)) == [] and busy["id"] in mkm.list_kernel_ids()
    assert any("cannot read dcgm-exporter at " + mlops_exporter.url in r.getMessage() for r in caplog.records)
    (line,) = [r.getMessage() for r in caplog.records if "idle clock (" in r.getMessage()]
    assert busy["id"] in line and "(11 min) stops" in line
    mlops_exporter.status = 200
    assert call(culler.tick(now=2760.0)) == []  # her clock starts again here, not at 2000
    assert call(culler.tick(now=3359.0)) == [] and busy["id"] in mkm.list_kernel_ids()
    assert call(culler.tick(now=3360.0)) == [busy["id"]]
    assert set(mkm.list_kernel_ids()) == {cpu["id"]}
