"""The mlops-local provisioner: real kernels in a real prefix, GPUs from a static inventory.

The prefix is installed by py-rattler from a channel the test builds (see tests/channels.py for how
the kernel's interpreter is provided); GPUs come from the ``static`` inventory, the product's seam
for machines without NVML. Leases, limits, activation and the memory cap are all real.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
from traitlets.config import Config

from jupyter_mlops.errors import GpuUnavailableError, KernelStartError, LimitExceededError
from jupyter_mlops.kernels.registry import KERNELS


GPUS = [{"name": "Test GPU A", "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000001"},
        {"name": "Test GPU B", "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000002"}]


@pytest.fixture
def kernel_env(mlops_demo_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Config]:
    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(mlops_demo_env["definitions"]))
    monkeypatch.setenv("MLOPS_ENVS_DIR", str(mlops_demo_env["envs"]))
    monkeypatch.setenv("MLOPS_PKGS_DIR", str(mlops_demo_env["pkgs"]))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no jupyter_server_config.py of the repository's
    config = Config()
    config.KernelProfiles.profiles = {
        "small": {"display_name": "Small", "cpu": 1, "memory": "1Gi"},
        "gpu-1": {"display_name": "One GPU", "gpus": 1, "environments": ["demo"]},
    }
    config.KernelProfiles.role_limits = {"*": {"max_kernels": 3, "max_gpus": 2}}
    config.LocalKernels.gpu_inventory = "static"
    config.LocalKernels.gpu_devices = GPUS
    config.LocalKernels.gpu_lease_dir = str(tmp_path / "leases")
    yield config
    left = KERNELS.all()
    for record in left:  # one test's leftover must not fail the tests after it
        KERNELS.remove(record.kernel_id)
    assert not left, "a kernel outlived its test"


async def _start(config: Config, kernel_name: str, **kw: Any) -> Any:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name, config=config, transport="ipc",
                            ip=os.path.join(os.getcwd(), f"k{len(KERNELS.all())}"))
    await km.start_kernel(**kw)
    return km


async def _run(km: Any, code: str) -> str:
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        out: list[str] = []
        reply = await client.execute_interactive(
            code, timeout=60, output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(out)
    finally:
        client.stop_channels()


FACTS = ("import json, os, resource, sys, mlops_demo\n"
         "print(json.dumps({'version': mlops_demo.VERSION, 'act': os.environ.get('MLOPS_ACT'), "
         "'level': os.environ.get('MLOPS_LEVEL'), 'prefix': os.environ.get('CONDA_PREFIX'), "
         "'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), 'omp': os.environ.get('OMP_NUM_THREADS'), "
         "'profile': os.environ.get('MLOPS_KERNEL_PROFILE'), 'lock': os.environ.get('MLOPS_ENV_LOCK'), "
         "'data': resource.getrlimit(resource.RLIMIT_DATA)[0], 'path0': os.environ['PATH'].split(':')[0]}))")


def test_kernelspecs_follow_environments_and_profiles(kernel_env: Config, mlops_demo_env: dict[str, Path]) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    from jupyter_mlops.kernels.kernelspecs import sync_from_config

    done = sync_from_config(kernel_env)
    assert sorted(done.written) == ["mlops", "mlops-demo-gpu-1", "mlops-demo-small"]
    assert sync_from_config(kernel_env).written == []  # unchanged specs are not rewritten
    specs = KernelSpecManager().get_all_specs()
    assert specs["mlops-demo-small"]["spec"]["display_name"] == "Python (demo, Small)"
    provisioner = specs["mlops-demo-gpu-1"]["spec"]["metadata"]["kernel_provisioner"]
    assert provisioner == {"provisioner_name": "mlops-local", "config": {"environment": "demo", "profile": "gpu-1"}}
    kernel_env.KernelProfiles.profiles = {"small": {"cpu": 1}}
    assert sync_from_config(kernel_env).removed == ["mlops-demo-gpu-1"]


def test_a_kernel_runs_in_its_prefix_with_the_profile_applied(kernel_env: Config, mlops_demo_env: dict[str, Path]) -> None:
    from jupyter_mlops.kernels.kernelspecs import sync_from_config

    sync_from_config(kernel_env)

    async def go() -> dict[str, Any]:
        km = await _start(kernel_env, "mlops-demo-small")
        try:
            facts = json.loads(await _run(km, FACTS))
            (record,) = KERNELS.all()
            assert (record.user, record.environment, record.profile, record.gpus) == (
                record.user, "demo", "small", [])
            assert record.pid == km.provisioner.pid
            # past the cap, allocation fails inside the kernel instead of taking the machine down
            out = await _run(km, "try:\n    b = bytearray(2 * 1024**3)\n    print('allocated')\n"
                                 "except MemoryError:\n    print('MemoryError')")
            assert out.strip() == "MemoryError"
            return facts
        finally:
            await km.shutdown_kernel(now=True)

    facts = asyncio.run(go())
    prefix = str(mlops_demo_env["prefix"])
    assert facts["version"] == "1.0" and facts["act"] == "on" and facts["level"] == "3"
    assert facts["prefix"] == prefix and facts["path0"] == prefix + "/bin"
    assert facts["lock"] == prefix + "/conda-meta/mlops-lock.yml"
    assert facts["cuda"] == "", "a CPU profile on a GPU machine sees no GPU"
    assert facts["omp"] == "1" and facts["profile"] == "small" and facts["data"] == 1024**3


def test_gpus_are_exclusive_and_come_back_on_shutdown_restart_and_crash(kernel_env: Config) -> None:
    from jupyter_mlops.kernels.kernelspecs import sync_from_config

    sync_from_config(kernel_env)

    async def go() -> None:
        a = await _start(kernel_env, "mlops-demo-gpu-1", mlops_user="alice")
        b = await _start(kernel_env, "mlops-demo-gpu-1", mlops_user="bob")
        try:
            seen = {json.loads(await _run(k, FACTS))["cuda"] for k in (a, b)}
            assert seen == {GPUS[0]["uuid"], GPUS[1]["uuid"]}
            with pytest.raises(GpuUnavailableError, match=r"no GPU free.*alice.*bob|no GPU free.*bob.*alice"):
                await _start(kernel_env, "mlops-demo-gpu-1", mlops_user="carol")
            await a.restart_kernel(now=True)  # the new process leases again, the place is kept
            assert json.loads(await _run(a, FACTS))["cuda"] in seen
            assert {r.user for r in KERNELS.all()} == {"alice", "bob"}
            os.kill(b.provisioner.pid, signal.SIGKILL)  # a crash: polling sees it and frees the GPU
            while await b.provisioner.poll() is None:
                await asyncio.sleep(0.05)
            c = await _start(kernel_env, "mlops-demo-gpu-1", mlops_user="carol")
            await c.shutdown_kernel(now=True)
            await b.shutdown_kernel(now=True)
        finally:
            for km in (a, b):
                if await km.is_alive():
                    await km.shutdown_kernel(now=True)
            if KERNELS.all():
                for km in (a, b):
                    await km.cleanup_resources()

    asyncio.run(go())


def test_limits_and_missing_environments_fail_the_start_at_once(kernel_env: Config, tmp_path: Path) -> None:
    from jupyter_mlops.kernels.kernelspecs import sync_from_config

    sync_from_config(kernel_env)
    kernel_env.KernelProfiles.role_limits = {"*": {"max_kernels": 1}}

    async def go() -> None:
        a = await _start(kernel_env, "mlops-demo-small", mlops_user="alice")
        try:
            with pytest.raises(LimitExceededError, match="alice may run at most 1 kernel at once and runs 1"):
                await _start(kernel_env, "mlops-demo-small", mlops_user="alice")
            b = await _start(kernel_env, "mlops-demo-small", mlops_user="bob")  # a limit is per user
            await b.shutdown_kernel(now=True)
            with pytest.raises(KernelStartError, match=r"no environment 'nope' \(known: demo\)"):
                await _start(kernel_env, "mlops-demo-small", mlops_user="bob", mlops_environment="nope")
        finally:
            await a.shutdown_kernel(now=True)

    asyncio.run(go())


def test_papermill_runs_a_notebook_on_an_environment_kernel_spec(kernel_env: Config, tmp_path: Path) -> None:
    import nbformat
    import papermill

    from jupyter_mlops.kernels.kernelspecs import sync_from_config

    from .conftest import make_notebook

    sync_from_config(kernel_env)
    # papermill's kernel manager knows no server config: the provisioner reads the config files
    (tmp_path / "jupyter_mlops_config.py").write_text(f"c.KernelProfiles.profiles = {kernel_env.KernelProfiles.profiles!r}\n")
    notebook = make_notebook(tmp_path / "nb.ipynb", ["import mlops_demo, os\nprint(mlops_demo.VERSION, "
                                                     "os.environ['MLOPS_KERNEL_PROFILE'])"])
    papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), kernel_name="mlops-demo-small",
                               progress_bar=False)
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert out.cells[0].outputs[0]["text"].strip() == "1.0 small"
