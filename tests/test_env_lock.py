"""Locking and installing from a conda channel the test builds: real packages, real solve, offline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from jupyter_mlops.environments.lockfile import read_lock
from jupyter_mlops.environments.solve import lock_environment
from jupyter_mlops.environments.spec import load_environment
from jupyter_mlops.errors import EnvironmentSpecError

from .channels import build_channel, define

rattler = pytest.importorskip("rattler")
rattler_build = pytest.importorskip("rattler_build")


@pytest.fixture
def mlops_channel(tmp_path: Path) -> Path:
    return build_channel(tmp_path)


def test_lock_writes_conda_lock_v1_and_installs_exactly_what_it_says(tmp_path: Path, mlops_channel: Path) -> None:
    spec = load_environment(define(tmp_path / "envs" / "demo", mlops_channel, "['mlops-demo <2', mlops-act]"))
    lock = lock_environment(spec)
    document = yaml.safe_load(lock.read_text())
    assert document["version"] == 1 and document["metadata"]["platforms"] == ["linux-64"]
    assert set(document["metadata"]) == {"content_hash", "channels", "platforms", "sources"}
    entries = {e["name"]: e for e in document["package"]}
    assert set(entries) == {"python", "mlops-demo", "mlops-act"}
    assert entries["mlops-demo"]["version"] == "1.0" and entries["mlops-demo"]["dependencies"] == {"python": ">=3.8"}
    assert len(entries["mlops-demo"]["hash"]["md5"]) == 32 and entries["mlops-demo"]["manager"] == "conda"

    packages = read_lock(lock, "linux-64")
    demo = next(p for p in packages if p.name == "mlops-demo")
    assert (demo.build, demo.subdir) == ("pyh0_0", "noarch")
    prefix = tmp_path / "prefix"
    asyncio.run(rattler.install([p.to_record() for p in packages], target_prefix=prefix,
                                cache_dir=tmp_path / "pkgs", show_progress=False))
    # noarch: python linked under the stand-in python's site-packages, though the lock entry
    # does not say noarch: the installer reads it from the package
    module = prefix / "lib" / "python3.11" / "site-packages" / "mlops_demo.py"
    assert module.read_text() == "VERSION = '1.0'\n"
    assert (prefix / "etc" / "conda" / "activate.d" / "mlops-act.sh").is_file()


def test_lock_errors_say_what_to_do(tmp_path: Path, mlops_channel: Path) -> None:
    spec = load_environment(define(tmp_path / "envs" / "nope", mlops_channel, "[no-such-package]"))
    with pytest.raises(EnvironmentSpecError, match="cannot be solved for linux-64: .*no-such-package"):
        lock_environment(spec)
    assert not spec.lock_file.exists()  # nothing half-written
    ok = load_environment(define(tmp_path / "envs" / "ok", mlops_channel, "[mlops-demo]"))
    lock = lock_environment(ok)
    with pytest.raises(EnvironmentSpecError, match="platform osx-arm64 is not locked"):
        read_lock(lock, "osx-arm64")
    lock.write_text("version: 7\n")
    with pytest.raises(EnvironmentSpecError, match="not a conda-lock v1 file"):
        read_lock(lock, "linux-64")


def test_create_is_exact_atomic_and_a_no_op_the_second_time(tmp_path: Path, mlops_channel: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from jupyter_mlops.cli import main as cli
    from jupyter_mlops.environments.activation import activation_env
    from jupyter_mlops.environments.install import installed

    envs = tmp_path / "envs"
    define(envs / "demo", mlops_channel, "['mlops-demo <2', mlops-act]")
    (envs / "demo" / "environment.yml").write_text((envs / "demo" / "environment.yml").read_text()
                                                    + "variables: {MLOPS_LEVEL: '3'}\n")
    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(envs))
    monkeypatch.setenv("MLOPS_ENVS_DIR", str(tmp_path / "prefixes"))
    monkeypatch.setenv("MLOPS_PKGS_DIR", str(tmp_path / "pkgs"))
    assert cli(["env", "lock", "demo"]) == 0
    assert cli(["env", "create", "demo"]) == 0
    out = capsys.readouterr().out
    assert "created at" in out and "(3 packages)" in out
    (env,) = installed(tmp_path / "prefixes")
    assert env.lock.read_text() == (envs / "demo" / "conda-lock.yml").read_text()
    before = {p: p.stat().st_mtime_ns for p in env.prefix.rglob("*") if p.is_file()}
    assert cli(["env", "create", "demo"]) == 0
    assert "already installed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in env.prefix.rglob("*") if p.is_file()} == before

    variables = activation_env(env.prefix, {"MLOPS_LEVEL": "3"})
    assert variables["MLOPS_ACT"] == "on" and variables["CONDA_PREFIX"] == str(env.prefix)
    assert variables["PATH"].split(":")[0] == str(env.prefix / "bin") and variables["MLOPS_LEVEL"] == "3"

    assert cli(["env", "export", "demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "@EXPLICIT" in lines and sum(1 for line in lines if line.startswith("file://") and "#" in line) == 3

    partial = env.prefix.with_name(env.prefix.name + ".partial")
    partial.mkdir()
    assert cli(["env", "remove", "demo"]) == 0
    assert not env.prefix.exists() and not partial.exists()
    assert installed(tmp_path / "prefixes") == []


def test_an_interrupted_create_leaves_no_complete_looking_prefix(tmp_path: Path, mlops_channel: Path) -> None:
    from jupyter_mlops.environments import install

    spec = load_environment(define(tmp_path / "defs" / "demo", mlops_channel, "[mlops-demo]"))
    lock_environment(spec)
    spec.lock_file.write_text(spec.lock_file.read_text().replace("mlops-demo-2.0-pyh0_0.conda",
                                                                 "mlops-demo-9.9-pyh0_0.conda"))
    with pytest.raises(Exception, match="could not be installed"):  # the archive is not in the channel
        install.create_environment(spec, tmp_path / "prefixes", tmp_path / "pkgs")
    assert install.installed(tmp_path / "prefixes") == []
    assert not any((tmp_path / "prefixes").glob("*.partial"))
