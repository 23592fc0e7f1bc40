"""The server extension: a real Jupyter Server (pytest-jupyter), two identities, real kernels in a
real environment prefix, GPUs from the static inventory (the product's seam where there are none)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

# pytest-jupyter's fixtures, for this module only (its autouse loop fixture would touch every test)
from pytest_jupyter.jupyter_core import *  # noqa: F403
from pytest_jupyter.jupyter_server import *  # noqa: F403
from pytest_jupyter.pytest_tornasync import *  # noqa: F403

from jupyter_mlops.kernels.registry import KERNELS

from .server_helpers import HeaderUsers, execute, rest_caller

GPUS = [{"name": "Test GPU A", "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000001"}]


@pytest.fixture
def mlops_env_vars(mlops_demo_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(mlops_demo_env["definitions"]))
    monkeypatch.setenv("MLOPS_ENVS_DIR", str(mlops_demo_env["envs"]))
    monkeypatch.setenv("MLOPS_PKGS_DIR", str(mlops_demo_env["pkgs"]))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def jp_server_config(tmp_path: Path) -> Config:
    config = Config()
    config.ServerApp.jpserver_extensions = {"jupyter_mlops": True}
    config.ServerApp.identity_provider_class = HeaderUsers
    config.KernelProfiles.profiles = {
        "small": {"display_name": "Small", "cpu": 1, "memory": "2Gi"},
        "gpu-1": {"display_name": "One GPU", "gpus": 1, "roles": ["gpu-users"]},
    }
    config.KernelProfiles.user_roles = {"alice": ["gpu-users"], "carol": ["gpu-users"]}
    config.KernelProfiles.role_limits = {"*": {"max_kernels": 2}, "gpu-users": {"max_kernels": 3, "max_gpus": 1}}
    config.LocalKernels.gpu_inventory = "static"
    config.LocalKernels.gpu_devices = GPUS
    config.LocalKernels.gpu_lease_dir = str(tmp_path / "leases")
    config.WarmPools.sizes = {"demo/small": 1}
    return config


@pytest.fixture
def api(mlops_env_vars: None, jp_serverapp: Any, jp_fetch: Any, jp_asyncio_loop: Any) -> Any:
    """``api(user, method, *path, body=None) -> (status, json)``; an error status is returned, not raised."""
    # pytest-jupyter's loop is the current one only if no earlier test left the main thread without
    # one (asyncio.run and the pipelines' per-thread loop cleanup both set it to None)
    asyncio.set_event_loop(jp_asyncio_loop)
    yield rest_caller(jp_fetch, jp_asyncio_loop)
    for kernel_id in list(jp_serverapp.kernel_manager.list_kernel_ids()):
        jp_asyncio_loop.run_until_complete(jp_serverapp.kernel_manager.shutdown_kernel(kernel_id, now=True))


def _service(jp_serverapp: Any) -> Any:
    return jp_serverapp.web_app.settings["mlops_service"]


def test_reads_environments_profiles_and_gpus(api: Any, jp_serverapp: Any, jp_kernel_dir: str) -> None:
    status, body = api("bob", "GET", "environments")
    assert status == 200
    (demo,) = body["environments"]
    assert demo["name"] == "demo" and demo["locked"] and len(demo["installed"]) == 1
    status, body = api("bob", "GET", "profiles")
    assert [p["name"] for p in body["profiles"]] == ["small"]  # gpu-1 is for gpu-users
    assert body["limits"] == {"max_kernels": 2, "max_gpus": None}
    assert [p["name"] for p in api("alice", "GET", "profiles")[1]["profiles"]] == ["small", "gpu-1"]
    status, body = api("bob", "GET", "gpus")
    assert status == 200 and [d["uuid"] for d in body["devices"]] == [GPUS[0]["uuid"]] and body["holders"] == []
    assert api("mallory", "GET", "gpus")[0] == 403  # no identity: jupyter_server refuses
    from jupyter_mlops.server.connection import NoDelayWebsocketConnection

    assert jp_serverapp.web_app.settings["kernel_websocket_connection_class"] is NoDelayWebsocketConnection
    specs = sorted(os.listdir(jp_kernel_dir))
    assert {"mlops", "mlops-demo-small", "mlops-demo-gpu-1"} <= set(specs)


def test_a_pooled_kernel_is_claimed_once_and_works_through_the_server(api: Any, jp_serverapp: Any, jp_root_dir: Path,
                                                                       jp_asyncio_loop: Any, jp_ws_fetch: Any,
                                                                       jp_fetch: Any) -> None:
    (jp_root_dir / "sub").mkdir()
    pools = _service(jp_serverapp).pools
    assert jp_asyncio_loop.run_until_complete(pools.wait_ready(120))
    status, kernel = api("bob", "POST", "kernels", body={"environment": "demo", "profile": "small", "path": "sub/nb.ipynb"})
    assert status == 201, kernel
    assert kernel["origin"] == "pool" and kernel["user"] == "bob" and kernel["environment"] == "demo"
    assert kernel["id"] in jp_serverapp.kernel_manager.list_kernel_ids()
    # the next claim for the same pool gets another kernel (a new one is on its way)
    status, second = api("bob", "POST", "kernels", body={"environment": "demo", "profile": "small"})
    assert status == 201 and second["id"] != kernel["id"]
    out = jp_asyncio_loop.run_until_complete(execute(jp_ws_fetch, kernel["id"],
                                                      "import mlops_demo, os; print(mlops_demo.VERSION, os.getcwd())"))
    assert out.split()[0] == "1.0" and out.split()[1].endswith("/sub")
    # an adopted kernel is a server kernel like any other: listed, restarted through the standard API
    assert kernel["id"] in {k["id"] for k in json.loads(jp_asyncio_loop.run_until_complete(
        jp_fetch("api", "kernels", headers={"X-Test-User": "bob"})).body)}
    jp_asyncio_loop.run_until_complete(jp_fetch("api", "kernels", kernel["id"], "restart", method="POST", body="",
                                                headers={"X-Test-User": "bob"}))
    out = jp_asyncio_loop.run_until_complete(execute(jp_ws_fetch, kernel["id"], "import mlops_demo; print(mlops_demo.VERSION)"))
    assert out.strip() == "1.0" and api("bob", "GET", "kernels", kernel["id"])[1]["user"] == "bob"
    assert {k["id"] for k in api("bob", "GET", "kernels")[1]["kernels"]} == {kernel["id"], second["id"]}
    assert api("alice", "GET", "kernels")[1]["kernels"] == []  # a user sees only their own
    assert api("alice", "GET", "kernels", kernel["id"])[0] == 404
    assert api("alice", "DELETE", "kernels", kernel["id"])[0] == 404
    status, body = api("bob", "POST", "kernels", body={"environment": "demo", "profile": "small"})
    assert status == 429 and "bob may run at most 2 kernels at once" in body["message"]
    assert api("bob", "DELETE", "kernels", kernel["id"])[0] == 204
    assert kernel["id"] not in jp_serverapp.kernel_manager.list_kernel_ids()


def test_gpu_kernels_hold_their_gpu_and_errors_say_why(api: Any, jp_serverapp: Any) -> None:
    status, body = api("bob", "POST", "kernels", body={"environment": "demo", "profile": "gpu-1"})
    assert status == 403 and "bob may not use profile 'gpu-1'" in body["message"]
    status, body = api("bob", "POST", "kernels", body={"environment": "nope", "profile": "small"})
    assert status == 400 and "no environment 'nope'" in body["message"]
    status, body = api("bob", "POST", "kernels", body={"profile": "small", "colour": "red"})
    assert status == 400
    status, kernel = api("alice", "POST", "kernels", body={"environment": "demo", "profile": "gpu-1"})
    assert status == 201 and kernel["origin"] == "started" and [g["uuid"] for g in kernel["gpus"]] == [GPUS[0]["uuid"]]
    holders = api("bob", "GET", "gpus")[1]["holders"]
    assert [(h["user"], h["kernel_id"]) for h in holders] == [("alice", kernel["id"])]
    status, body = api("carol", "POST", "kernels", body={"environment": "demo", "profile": "gpu-1"})
    assert status == 409 and "no GPU free" in body["message"] and "alice" in body["message"]
    status, body = api("alice", "POST", "kernels", body={"environment": "demo", "profile": "gpu-1"})
    assert status == 429 and "may hold at most 1 GPU" in body["message"]
    assert api("alice", "DELETE", "kernels", kernel["id"])[0] == 204
    assert api("bob", "GET", "gpus")[1]["holders"] == []
    assert not [r for r in KERNELS.all() if r.kernel_id == kernel["id"]]
