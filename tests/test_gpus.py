"""GPU inventory, exclusive leases (within and across processes), the wait queue and user limits.

Devices come from StaticInventory, the product's own seam: nothing of nvidia-ml-py is patched.
Threads and processes are synchronized on events and printed lines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from jupyter_mlops.errors import ConfigError, GpuUnavailableError, LimitExceededError, MlopsError, UsageError
from jupyter_mlops.kernels.gpus import (
    GpuAllocator, GpuDevice, Lease, NoGpuInventory, NvmlInventory, StaticInventory, UserLimits,
    check_limits, inventory_from_config,
)

A100_0 = GpuDevice(0, "GPU-00000000-0000-0000-0000-0000000000a0", "NVIDIA A100-SXM4-80GB", 80 * 2**30)
A100_1 = GpuDevice(1, "GPU-00000000-0000-0000-0000-0000000000a1", "NVIDIA A100-SXM4-80GB", 80 * 2**30)
T4 = GpuDevice(2, "GPU-00000000-0000-0000-0000-0000000000c4", "Tesla T4", 16 * 2**30)
DEVICES = [A100_0, A100_1, T4]
WAIT = 10.0  # the most any event below may take; reached only when something is broken


def owner(user: str = "alice", kernel_id: str = "k1") -> dict[str, Any]:
    return {"user": user, "kernel_id": kernel_id}


@pytest.fixture
def mlops_lease_dir(tmp_path: Path) -> Path:
    return tmp_path / "gpu-leases"


@pytest.fixture
def mlops_allocator(mlops_lease_dir: Path) -> GpuAllocator:
    return GpuAllocator(StaticInventory(DEVICES), mlops_lease_dir)


@pytest.fixture
def mlops_waiting(mlops_lease_dir: Path) -> GpuAllocator:
    return GpuAllocator(StaticInventory(DEVICES), mlops_lease_dir, wait=True)


# --- inventories -------------------------------------------------------------------------------

def test_inventory_from_config_builds_static_devices() -> None:
    inventory = inventory_from_config("static", [
        {"name": "Tesla T4", "uuid": T4.uuid, "index": 2, "memory_total": 16 * 2**30},
        {"name": "NVIDIA A100-SXM4-80GB"},
    ])
    assert [(d.index, d.name) for d in inventory.devices()] == [(1, "NVIDIA A100-SXM4-80GB"), (2, "Tesla T4")]
    assert inventory.available and inventory.reason is None
    assert inventory_from_config("static").devices() == []
    none = inventory_from_config("none")
    assert isinstance(none, NoGpuInventory) and none.devices() == [] and "turned off" in (none.reason or "")
    assert isinstance(inventory_from_config("nvml"), NvmlInventory)


@pytest.mark.parametrize("name, devices, says", [
    ("static", [{"uuid": "GPU-x"}], "GPU device 0: name must be a string"),
    ("static", [{"name": "T4", "memory": 1}], "GPU device 0: unknown key 'memory'"),
    ("static", [{"name": "T4", "index": True}], "index must be an int"),
    ("static", [{"name": "T4", "uuid": "GPU-x"}, {"name": "T4", "uuid": "GPU-x"}], "declared twice: GPU-x"),
    ("nvml", [{"name": "T4"}], "used only by the 'static' inventory"),
    ("cuda", None, "no GPU inventory 'cuda' (known: none, nvml, static)"),
])
def test_inventory_config_errors_say_what_is_wrong(name: str, devices: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=None) as error:
        inventory_from_config(name, devices)
    assert says in str(error.value)


def test_nvml_inventory_on_this_machine_lists_what_is_there_without_raising(mlops_lease_dir: Path) -> None:
    inventory = NvmlInventory()
    devices = inventory.devices()
    if devices:  # a machine with a driver and GPUs
        assert inventory.available and all(d.visible_id.startswith(("GPU-", "MIG-")) for d in devices)
        return
    assert not inventory.available and inventory.reason
    if importlib.util.find_spec("pynvml") is None:
        assert inventory.reason == "nvidia-ml-py is not installed: pip install 'jupyter_mlops[gpu]'"
    else:
        assert "NVML" in inventory.reason
    allocator = GpuAllocator(inventory, mlops_lease_dir)
    with pytest.raises(GpuUnavailableError) as error:
        allocator.allocate(1, owner())
    assert str(error.value) == (f"asked for 1 GPU but none exist on this machine ({inventory.reason}): "
                                "choose a profile without GPUs.")
    assert allocator.allocate(0, owner()).env()["CUDA_VISIBLE_DEVICES"] == ""


def test_importing_the_module_or_choosing_nvml_does_not_import_pynvml() -> None:
    code = ("import sys, jupyter_mlops.kernels.gpus as g\ng.inventory_from_config('nvml')\n"
            "print('pynvml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- leases ------------------------------------------------------------------------------------

def test_a_lease_is_exclusive_and_names_its_gpus_by_uuid(mlops_allocator: GpuAllocator) -> None:
    first = mlops_allocator.allocate(2, owner("alice", "k1"))
    assert first.devices == (A100_0, A100_1)
    assert first.env() == {"CUDA_VISIBLE_DEVICES": f"{A100_0.uuid},{A100_1.uuid}",
                           "NVIDIA_VISIBLE_DEVICES": f"{A100_0.uuid},{A100_1.uuid}"}
    second = mlops_allocator.allocate(1, owner("bob", "k2"))
    assert second.devices == (T4,)
    with pytest.raises(GpuUnavailableError):
        mlops_allocator.allocate(1, owner("carol", "k3"))
    first.release()
    assert mlops_allocator.allocate(1, owner("carol", "k3")).devices == (A100_0,)


def test_allocation_is_all_or_nothing(mlops_allocator: GpuAllocator) -> None:
    held = mlops_allocator.allocate(1, owner("bob", "k9"))
    with pytest.raises(GpuUnavailableError) as error:
        mlops_allocator.allocate(3, owner())
    assert error.value.requested == 3 and error.value.existing == 3
    assert str(error.value) == ("no GPU free: asked for 3 GPUs, 3 exist; busy: GPU 0 (bob, kernel k9). "
                                "Shut down a kernel that holds one, or ask to wait in the queue.")
    assert [h["device"] for h in mlops_allocator.holders()] == [0]  # the failed request kept nothing
    assert mlops_allocator.allocate(2, owner()).devices == (A100_1, T4)
    held.release()


def test_gpu_type_is_a_case_insensitive_part_of_the_name(mlops_allocator: GpuAllocator) -> None:
    assert mlops_allocator.allocate(1, owner(), gpu_type="t4").devices == (T4,)
    assert mlops_allocator.allocate(2, owner(), gpu_type="A100").devices == (A100_0, A100_1)
    with pytest.raises(GpuUnavailableError) as error:
        mlops_allocator.allocate(1, owner(), gpu_type="T4")
    assert str(error.value).startswith("no GPU free: asked for 1 T4 GPU, 1 exist; busy: GPU 2 (alice, kernel k1).")


def test_asking_for_more_gpus_than_exist_fails_at_once_even_when_waiting(mlops_waiting: GpuAllocator) -> None:
    with pytest.raises(GpuUnavailableError) as error:
        mlops_waiting.allocate(3, owner(), gpu_type="a100")
    assert str(error.value) == ("asked for 3 a100 GPUs but only 2 exist on this machine: "
                                "ask for at most 2 or another GPU type.")
    with pytest.raises(GpuUnavailableError) as error:
        mlops_waiting.allocate(1, owner(), gpu_type="h100")
    assert str(error.value) == "asked for 1 h100 GPU but none exist on this machine: ask for another GPU type."
    with pytest.raises(UsageError):
        mlops_waiting.allocate(-1, owner())


def test_busy_error_names_each_holder(mlops_allocator: GpuAllocator) -> None:
    mlops_allocator.allocate(1, owner("alice", "k1"), gpu_type="a100")
    mlops_allocator.allocate(1, owner("bob", "k2"), gpu_type="a100")
    with pytest.raises(GpuUnavailableError) as error:
        mlops_allocator.allocate(1, owner("carol", "k3"), gpu_type="a100")
    assert isinstance(error.value, MlopsError)
    assert "asked for 1 a100 GPU, 2 exist; busy: GPU 0 (alice, kernel k1), GPU 1 (bob, kernel k2)" in str(error.value)
    assert [(h["user"], h["kernel_id"]) for h in error.value.busy] == [("alice", "k1"), ("bob", "k2")]


def test_zero_gpus_hides_every_gpu(mlops_allocator: GpuAllocator) -> None:
    lease = mlops_allocator.allocate(0, owner())
    assert lease.devices == ()
    assert lease.env() == {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": ""}
    assert mlops_allocator.holders() == []


def test_a_declared_gpu_without_uuid_is_named_by_index_in_pci_order(mlops_lease_dir: Path) -> None:
    allocator = GpuAllocator(inventory_from_config("static", [{"name": "Tesla T4", "index": 3}]), mlops_lease_dir)
    assert allocator.allocate(1, owner()).env() == {
        "CUDA_VISIBLE_DEVICES": "3", "NVIDIA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_release_is_idempotent_and_a_lease_is_a_context_manager(mlops_allocator: GpuAllocator) -> None:
    lease = mlops_allocator.allocate(3, owner())
    lease.release()
    lease.release()
    assert lease.released and mlops_allocator.holders() == []
    with mlops_allocator.allocate(3, owner("bob", "k2")) as again:
        assert len(mlops_allocator.holders()) == 3
    assert again.released and mlops_allocator.holders() == []


def test_holders_say_who_holds_what(mlops_allocator: GpuAllocator) -> None:
    mlops_allocator.allocate(1, {**owner("alice", "k1"), "since": "2026-11-23T10:00:00+00:00"}, gpu_type="t4")
    assert mlops_allocator.holders() == [{
        "device": 2, "uuid": T4.uuid, "name": "Tesla T4", "user": "alice", "kernel_id": "k1",
        "pid": os.getpid(), "since": "2026-11-23T10:00:00+00:00",
    }]


def test_a_record_left_by_a_dead_holder_is_ignored_and_overwritten(mlops_allocator: GpuAllocator,
                                                                    mlops_lease_dir: Path) -> None:
    mlops_lease_dir.mkdir()
    stale = mlops_lease_dir / f"{T4.uuid}.json"
    stale.write_text(json.dumps({"user": "ghost", "kernel_id": "gone", "pid": 1}))
    assert mlops_allocator.holders() == []
    mlops_allocator.allocate(1, owner("alice", "k1"), gpu_type="t4")
    assert json.loads(stale.read_text())["user"] == "alice"


HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from jupyter_mlops.kernels.gpus import GpuAllocator, GpuDevice, StaticInventory
    devices = [GpuDevice(**d) for d in {devices!r}]
    allocator = GpuAllocator(StaticInventory(devices), Path({lease_dir!r}), wait=True, poll_interval=0.02)
    def queued(position):
        print("queued", position, flush=True)
    lease = allocator.allocate(1, {{"user": "zoe", "kernel_id": "remote"}}, gpu_type="t4", on_queue=queued)
    print("held", flush=True)
    sys.stdin.read()  # hold until killed
""")


@pytest.fixture
def mlops_other_process(mlops_lease_dir: Path) -> Iterator[Any]:
    """Starts another process that takes (or queues for) the T4 in the same lease folder."""
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        code = HOLDER.format(devices=[d.to_dict() for d in DEVICES], lease_dir=str(mlops_lease_dir))
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            assert stream is not None
            stream.close()


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # once reaped, the OS has closed its files and dropped its locks


def test_a_gpu_held_by_another_process_is_busy_until_that_process_dies(mlops_allocator: GpuAllocator,
                                                                       mlops_other_process: Any) -> None:
    other = mlops_other_process()
    assert other.stdout.readline() == "held\n"
    with pytest.raises(GpuUnavailableError) as error:
        mlops_allocator.allocate(1, owner(), gpu_type="t4")
    assert "busy: GPU 2 (zoe, kernel remote)" in str(error.value)
    assert [(h["user"], h["pid"]) for h in mlops_allocator.holders()] == [("zoe", other.pid)]
    kill(other)
    assert mlops_allocator.holders() == []
    assert mlops_allocator.allocate(1, owner(), gpu_type="t4").devices == (T4,)


def test_a_waiter_in_another_process_gets_the_gpu_when_it_is_released(mlops_allocator: GpuAllocator,
                                                                      mlops_other_process: Any) -> None:
    lease = mlops_allocator.allocate(1, owner(), gpu_type="t4")
    other = mlops_other_process()
    assert other.stdout.readline() == "queued 1\n"
    assert [(w["user"], w["pid"]) for w in mlops_allocator.waiting()] == [("zoe", other.pid)]
    lease.release()
    assert other.stdout.readline() == "held\n"  # found within its poll interval: no notification crosses processes
    assert mlops_allocator.waiting() == []


def test_a_waiter_that_died_leaves_the_queue(mlops_waiting: GpuAllocator, mlops_other_process: Any) -> None:
    lease = mlops_waiting.allocate(1, owner(), gpu_type="t4")
    other = mlops_other_process()
    assert other.stdout.readline() == "queued 1\n"
    kill(other)
    assert mlops_waiting.waiting() == []
    lease.release()


# --- the wait queue ----------------------------------------------------------------------------

class Waiter(threading.Thread):
    """Asks for a GPU in a thread, recording the queue positions it is told."""

    def __init__(self, allocator: GpuAllocator, name: str, gpu_type: str | None = "t4", count: int = 1) -> None:
        super().__init__(name=name, daemon=True)
        self.allocator, self.gpu_type, self.count = allocator, gpu_type, count
        self.positions: list[int] = []
        self.moved = threading.Condition()
        self.lease: Lease | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.lease = self.allocator.allocate(self.count, owner(self.name, f"k-{self.name}"), gpu_type=self.gpu_type,
                                                 on_queue=self.report)
        except BaseException as e:
            self.error = e

    def report(self, position: int) -> None:
        with self.moved:
            self.positions.append(position)
            self.moved.notify_all()

    def reaches(self, position: int) -> bool:
        with self.moved:
            return self.moved.wait_for(lambda: position in self.positions, WAIT)

    def served(self) -> Lease:
        self.join(WAIT)
        assert not self.is_alive() and self.error is None and self.lease is not None
        return self.lease


def test_waiters_are_served_first_come_first_served_and_told_their_position(mlops_waiting: GpuAllocator) -> None:
    held = mlops_waiting.allocate(1, owner("bob", "k0"), gpu_type="t4")
    first, second = Waiter(mlops_waiting, "ann"), Waiter(mlops_waiting, "cid")
    first.start()
    assert first.reaches(1)
    second.start()
    assert second.reaches(2)
    assert [w["user"] for w in mlops_waiting.waiting()] == ["ann", "cid"]
    held.release()
    lease = first.served()
    assert lease.devices == (T4,) and first.positions == [1]
    assert second.reaches(1)
    lease.release()
    assert second.served().devices == (T4,) and second.positions == [2, 1]
    assert mlops_waiting.waiting() == []


def test_a_request_for_other_gpus_is_not_held_up_by_the_queue(mlops_waiting: GpuAllocator) -> None:
    held = mlops_waiting.allocate(1, owner("bob", "k0"), gpu_type="t4")
    waiter = Waiter(mlops_waiting, "ann")
    waiter.start()
    assert waiter.reaches(1)
    assert mlops_waiting.allocate(1, owner(), gpu_type="a100").devices == (A100_0,)
    held.release()
    waiter.served().release()


def test_a_request_that_does_not_wait_does_not_jump_the_queue(mlops_waiting: GpuAllocator,
                                                              mlops_lease_dir: Path) -> None:
    first, second = (mlops_waiting.allocate(1, owner("bob", f"k{i}"), gpu_type="a100") for i in range(2))
    waiter = Waiter(mlops_waiting, "ann", gpu_type="a100", count=2)
    waiter.start()
    assert waiter.reaches(1)
    first.release()  # one A100 free: not enough for the waiter, enough for a request for one
    impatient = GpuAllocator(StaticInventory(DEVICES), mlops_lease_dir)
    with pytest.raises(GpuUnavailableError) as error:
        impatient.allocate(1, owner(), gpu_type="a100")
    assert "busy: GPU 1 (bob, kernel k1); 1 request waits ahead in the queue" in str(error.value)
    second.release()
    assert waiter.served().devices == (A100_0, A100_1)


def test_a_wait_ends_with_a_clear_error_after_the_timeout(mlops_lease_dir: Path) -> None:
    allocator = GpuAllocator(StaticInventory(DEVICES), mlops_lease_dir, wait=True, timeout=0.05)
    held = allocator.allocate(1, owner("bob", "k0"), gpu_type="t4")
    positions: list[int] = []
    with pytest.raises(GpuUnavailableError) as error:
        allocator.allocate(1, owner(), gpu_type="t4", on_queue=positions.append)
    assert positions == [1]
    assert str(error.value) == ("waited 0.05 s for 1 t4 GPU and none came free "
                                "(1 exist; busy: GPU 2 (bob, kernel k0)). "
                                "Shut down a kernel that holds one, or try again later.")
    assert error.value.timed_out == 0.05
    assert allocator.waiting() == []
    held.release()


def test_allocate_async_waits_off_the_loop_and_leaves_the_queue_when_cancelled(mlops_waiting: GpuAllocator) -> None:
    held = mlops_waiting.allocate(1, owner("bob", "k0"), gpu_type="t4")

    async def scenario() -> None:
        queued = asyncio.Event()
        positions: list[int] = []

        def on_queue(position: int) -> None:
            positions.append(position)
            queued.set()

        task = asyncio.create_task(mlops_waiting.allocate_async(1, owner(), gpu_type="t4", on_queue=on_queue))
        await asyncio.wait_for(queued.wait(), WAIT)
        assert positions == [1]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert mlops_waiting.waiting() == []
        held.release()
        lease = await asyncio.wait_for(mlops_waiting.allocate_async(1, owner(), gpu_type="t4"), WAIT)
        assert lease.devices == (T4,)
        lease.release()

    asyncio.run(scenario())
    assert mlops_waiting.holders() == []


# --- per-user limits ---------------------------------------------------------------------------

RUNNING = [
    {"user": "alice", "kernel_id": "k1", "gpus": 1},
    {"user": "alice", "kernel_id": "k2"},
    {"user": "bob", "kernel_id": "k3", "gpus": 4},
]


def test_a_user_at_the_kernel_limit_is_told_what_runs() -> None:
    with pytest.raises(LimitExceededError) as error:
        check_limits("alice", UserLimits(max_kernels=2), RUNNING, want_gpus=0)
    assert (error.value.limit, error.value.maximum) == ("kernels", 2)
    assert str(error.value) == ("alice may run at most 2 kernels at once and runs 2: k1 (1 GPU), k2. "
                                "Shut one down first.")


def test_a_user_at_the_gpu_limit_is_told_what_holds_gpus() -> None:
    with pytest.raises(LimitExceededError) as error:
        check_limits("alice", UserLimits(max_kernels=5, max_gpus=2), RUNNING, want_gpus=2)
    assert (error.value.limit, error.value.maximum, error.value.asked) == ("gpus", 2, 2)
    assert str(error.value) == ("alice may hold at most 2 GPUs at once, holds 1 (k1 (1 GPU)) and asked for 2 more. "
                                "Shut down a GPU kernel or ask for fewer.")


def test_limits_count_only_the_users_own_kernels() -> None:
    check_limits("alice", UserLimits(max_kernels=3, max_gpus=2), RUNNING, want_gpus=1)
    check_limits("carol", UserLimits(max_kernels=1, max_gpus=1), RUNNING, want_gpus=1)
    check_limits("bob", UserLimits(max_gpus=4), RUNNING, want_gpus=0)  # a CPU kernel is not a GPU over the limit
    check_limits("alice", UserLimits(), RUNNING * 10, want_gpus=100)
    with pytest.raises(ConfigError):
        UserLimits(max_kernels=-1)


def test_the_gpus_command_shows_holders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from jupyter_mlops.cli import main as cli
    from jupyter_mlops.config import load_config
    from jupyter_mlops.kernels.launch import LocalKernels
    from jupyter_mlops.kernels.provisioner import gpu_allocator

    monkeypatch.chdir(tmp_path)
    (tmp_path / "jupyter_mlops_config.py").write_text(
        "c.LocalKernels.gpu_inventory = 'static'\n"
        "c.LocalKernels.gpu_devices = [{'name': 'Test GPU', 'uuid': 'GPU-1'}, {'name': 'Test GPU', 'uuid': 'GPU-2'}]\n"
        f"c.LocalKernels.gpu_lease_dir = {str(tmp_path / 'leases')!r}\n")
    allocator = gpu_allocator(LocalKernels(config=load_config().config))
    with allocator.allocate(1, {"user": "alice", "kernel_id": "k-1"}):
        assert cli(["gpus"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "held by alice (kernel k-1" in lines[0] and lines[1].endswith("free")
    assert cli(["gpus", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["holders"] == []


def test_a_pooled_kernels_gpus_pass_to_whoever_claims_it(mlops_allocator: GpuAllocator) -> None:
    lease = mlops_allocator.allocate(1, {"user": "pool:demo/gpu-1", "kernel_id": "k-9"})
    lease.hand_over("alice")
    assert [(h["user"], h["kernel_id"]) for h in mlops_allocator.holders()] == [("alice", "k-9")]
    lease.release()
    lease.hand_over("bob")  # too late: nothing is written for a lease given back
    assert mlops_allocator.holders() == []
