"""Kernel profiles: resources, allowed environments, roles and limits, checked from config."""

from __future__ import annotations

import pytest
from traitlets.config import Config

from jupyter_mlops.errors import ConfigError
from jupyter_mlops.kernels.limits import UserLimits
from jupyter_mlops.kernels.profiles import KernelProfiles, parse_memory


def profiles(**settings: object) -> KernelProfiles:
    return KernelProfiles(config=Config({"KernelProfiles": settings}))


GPU = {"cpu": 8, "memory": "32Gi", "gpus": 1, "gpu_type": "H100", "environments": ["pytorch-gpu"],
       "roles": ["gpu-users"]}


def test_parse_memory_units() -> None:
    assert parse_memory("4Gi", "x") == 4 * 2**30
    assert parse_memory("4G", "x") == 4 * 10**9
    assert parse_memory("512Mi", "x") == 512 * 2**20
    assert parse_memory("1.5GiB", "x") == int(1.5 * 2**30)
    assert parse_memory(1024, "x") == 1024
    for bad in ("lots", "-1Gi", "0", "4 Zi", True):
        with pytest.raises(ConfigError, match="is not a size"):
            parse_memory(bad, "profile 'x'")


def test_profiles_resources_roles_and_environments() -> None:
    kp = profiles(profiles={"small": {"cpu": 2, "memory": "4Gi"}, "gpu-1": GPU}, default_profile="small",
                  user_roles={"alice": ["gpu-users"]})
    small = kp.get(None, "bob")
    assert (small.name, small.cpu, small.memory, small.gpus) == ("small", 2.0, 4 * 2**30, 0)
    gpu = kp.get("gpu-1", "alice", "pytorch-gpu")
    assert gpu.gpus == 1 and gpu.gpu_type == "H100" and gpu.to_json()["environments"] == ["pytorch-gpu"]
    with pytest.raises(ConfigError, match="bob may not use profile 'gpu-1': it is for role\\(s\\) gpu-users"):
        kp.get("gpu-1", "bob")
    with pytest.raises(ConfigError, match="profile 'gpu-1' does not run environment 'cpu'"):
        kp.get("gpu-1", "alice", "cpu")
    with pytest.raises(ConfigError, match="no kernel profile 'huge' \\(known: small, gpu-1\\)"):
        kp.get("huge", "alice")


@pytest.mark.parametrize(("raw", "says"), [
    ({"cpus": 2}, "unknown setting 'cpus'"),
    ({"cpu": 0}, "cpu must be a number of cores above 0"),
    ({"gpus": -1}, "gpus must be a whole number"),
    ({"gpus": 1.5}, "gpus must be a whole number"),
    ({"memory": "big"}, "memory 'big' is not a size"),
    ({"environments": "cpu"}, "environments must be a list of names"),
])
def test_each_bad_setting_names_the_profile_and_field(raw: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=f"profile 'p': {says}"):
        profiles(profiles={"p": raw}).parsed()


def test_bad_names_and_no_profiles() -> None:
    with pytest.raises(ConfigError, match="names are lowercase letters"):
        profiles(profiles={"Big GPU": {}}).parsed()
    with pytest.raises(ConfigError, match="no kernel profiles are configured"):
        profiles(profiles={}).parsed()
    assert set(KernelProfiles().parsed()) == {"default"}  # the embedded default: one profile, no limits


def test_limits_take_the_most_generous_role() -> None:
    kp = profiles(user_roles={"alice": ["a", "b"], "bob": ["a"]},
                  role_limits={"a": {"max_kernels": 2, "max_gpus": 0}, "b": {"max_kernels": 5, "max_gpus": 1},
                               "*": {"max_kernels": 1, "max_gpus": 0}})
    assert kp.limits("alice") == UserLimits(max_kernels=5, max_gpus=1)
    assert kp.limits("bob") == UserLimits(max_kernels=2, max_gpus=0)
    assert kp.limits("carol") == UserLimits(max_kernels=1, max_gpus=0)
    assert profiles().limits("anyone") == UserLimits()
