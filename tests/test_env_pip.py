"""``pip:`` sections: locked by pip itself on top of the conda solve, installed exactly into the prefix.

Offline and real. The wheels are written by the tests as a build backend writes them (a zip with
METADATA, WHEEL and a RECORD of sha256s) into a folder that pip reads as its only index, through
``PIP_FIND_LINKS`` and ``PIP_NO_INDEX=1``: the environment variables a user's pip configuration
would set, so the product's code path is the one a real index takes.

pip in the prefix: a definition with a pip section must list ``pip`` among its conda dependencies
(spec.py), and the channel of tests/channels.py has no conda ``pip`` (none can be had offline). The
tests add one that holds no pip at all, a ``noarch: generic`` package that depends on python, as a
real conda ``pip`` does. ``bin/python -m pip`` still works because the prefix's ``bin/python`` is
the stand-in that runs the test interpreter (which has pip) with the prefix's site-packages first;
install.py always passes ``--prefix <prefix>`` to that pip (for a real conda python, its own
prefix), so the wheels land in the prefix's ``lib/python3.11/site-packages``, where the stand-in
looks, and never in the tests' virtualenv.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from jupyter_mlops.environments.install import create_environment, installed
from jupyter_mlops.environments.lockfile import read_lock, read_pip_lock
from jupyter_mlops.environments.solve import lock_environment
from jupyter_mlops.environments.spec import load_environment
from jupyter_mlops.errors import EnvironmentSpecError, MlopsError

from .channels import build_channel, define, package

rattler = pytest.importorskip("rattler")
rattler_build = pytest.importorskip("rattler_build")

DEPS = "[python, 'mlops-demo <2', pip, {pip: [%s]}]"


def wheel(folder: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = (),
          scripts: dict[str, str] | None = None) -> Path:
    """A pure-Python wheel, as a build backend writes it."""
    stem = f"{name.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    files = dict(files)
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires))
    files[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    if scripts:
        files[f"{info}/entry_points.txt"] = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}\n")
    files[f"{info}/RECORD"] = "".join(record) + f"{info}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return out


@pytest.fixture
def mlops_channel(tmp_path: Path) -> Path:
    """tests/channels.py's channel plus a conda ``pip`` (see the module's docstring)."""
    channel = build_channel(tmp_path)
    package(channel, tmp_path / "stage", "pip", "24.0", "noarch", {"share/mlops-tests/pip.txt": "stand-in\n"},
            noarch="generic", depends=["python >=3.8"], build="pyh0_0")
    done = rattler.index.index_fs(channel, force=True)
    if inspect.isawaitable(done):
        asyncio.run(done)
    return channel


@pytest.fixture
def mlops_wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The only index pip sees: a find-links folder of wheels the test wrote."""
    folder = tmp_path / "wheels"
    wheel(folder, "mlops-pipdemo", "1.2", {"mlops_pipdemo.py": "VERSION = '1.2'\n"},
          requires=("mlops-pipdep >=0.1", "mlops-demo >=1", 'mlops-nowhere ; sys_platform == "win32"'),
          scripts={"mlops-pipdemo": "mlops_pipdemo:main"})
    for version in ("0.1", "0.3"):
        wheel(folder, "mlops-pipdep", version, {"mlops_pipdep.py": f"VERSION = '{version}'\n"})
    wheel(folder, "mlops-needs-demo3", "1.0", {"mlops_needs_demo3.py": ""}, requires=("mlops-demo >=3",))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this machine's pip configuration stays out
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lock_pins_each_wheel_with_url_and_sha256_on_top_of_the_conda_solve(
        tmp_path: Path, mlops_channel: Path, mlops_wheels: Path) -> None:
    spec = load_environment(define(tmp_path / "envs" / "demo", mlops_channel, DEPS % "mlops-pipdemo"))
    document = yaml.safe_load(lock_environment(spec).read_text())
    entries = {(e["manager"], e["name"]): e for e in document["package"]}
    assert set(entries) == {("conda", "python"), ("conda", "mlops-demo"), ("conda", "pip"),
                            ("pip", "mlops-pipdemo"), ("pip", "mlops-pipdep")}
    demo, dep = entries["pip", "mlops-pipdemo"], entries["pip", "mlops-pipdep"]
    assert demo == {
        "name": "mlops-pipdemo", "version": "1.2", "manager": "pip", "platform": "linux-64",
        # the win32-only requirement does not apply to linux-64; mlops-demo is conda's (1.0), not locked again
        "dependencies": {"mlops-pipdep": ">=0.1", "mlops-demo": ">=1"},
        "url": (mlops_wheels / "mlops_pipdemo-1.2-py3-none-any.whl").as_uri(),
        "hash": {"sha256": sha256(mlops_wheels / "mlops_pipdemo-1.2-py3-none-any.whl")},
        "category": "main", "optional": False,
    }
    assert dep["version"] == "0.3"
    assert dep["hash"]["sha256"] == sha256(mlops_wheels / "mlops_pipdep-0.3-py3-none-any.whl")
    assert [e["manager"] for e in document["package"]] == ["conda"] * 3 + ["pip"] * 2  # conda first, as conda-lock
    # the conda reader is not confused by the pip entries, and the pip reader gives them back
    assert {p.name for p in read_lock(spec.lock_file, "linux-64")} == {"python", "mlops-demo", "pip"}
    assert [(w.name, w.version) for w in read_pip_lock(spec.lock_file, "linux-64")] == [
        ("mlops-pipdemo", "1.2"), ("mlops-pipdep", "0.3")]


def test_create_installs_the_locked_wheels_exactly_before_the_prefix_appears(
        tmp_path: Path, mlops_channel: Path, mlops_wheels: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from jupyter_mlops.cli import main as cli

    envs = tmp_path / "envs"
    define(envs / "demo", mlops_channel, DEPS % "mlops-pipdemo")
    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(envs))
    monkeypatch.setenv("MLOPS_ENVS_DIR", str(tmp_path / "prefixes"))
    monkeypatch.setenv("MLOPS_PKGS_DIR", str(tmp_path / "pkgs"))
    assert cli(["env", "lock", "demo"]) == 0
    wheel(mlops_wheels, "mlops-pipdep", "0.9", {"mlops_pipdep.py": "VERSION = '0.9'\n"})  # create must not re-resolve
    assert cli(["env", "create", "demo"]) == 0
    assert "(5 packages)" in capsys.readouterr().out
    (env,) = installed(tmp_path / "prefixes")
    done = subprocess.run([str(env.prefix / "bin" / "python"), "-c",
                           "import mlops_pipdemo, mlops_pipdep, mlops_demo; "
                           "print(mlops_pipdemo.VERSION, mlops_pipdep.VERSION, mlops_demo.VERSION)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1.2", "0.3", "1.0"]
    site = env.prefix / "lib" / "python3.11" / "site-packages"
    assert (site / "mlops_pipdemo-1.2.dist-info").is_dir() and (env.prefix / "bin" / "mlops-pipdemo").is_file()
    assert ".partial" not in (env.prefix / "bin" / "mlops-pipdemo").read_text()
    assert not any((tmp_path / "prefixes").glob("*.partial"))

    assert cli(["env", "create", "demo"]) == 0
    assert "already installed" in capsys.readouterr().out

    assert cli(["env", "export", "demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    explicit = lines[lines.index("@EXPLICIT") + 1:]
    assert [line.startswith("file://") for line in explicit].count(True) == 3
    url = (mlops_wheels / "mlops_pipdemo-1.2-py3-none-any.whl").as_uri()
    assert f"# pip: mlops-pipdemo @ {url} --hash=sha256:{env_sha(env.prefix, 'mlops-pipdemo')}" in explicit
    assert all(line.startswith("#") for line in explicit[3:])  # conda and micromamba skip them


def env_sha(prefix: Path, name: str) -> str:
    locked = read_pip_lock(prefix / "conda-meta" / "mlops-lock.yml", "linux-64")
    return next(w.sha256 for w in locked if w.name == name)


def test_a_wheel_that_differs_from_the_lock_installs_nothing(tmp_path: Path, mlops_channel: Path,
                                                             mlops_wheels: Path) -> None:
    spec = load_environment(define(tmp_path / "defs" / "demo", mlops_channel, DEPS % "mlops-pipdemo"))
    lock_environment(spec)
    wheel(mlops_wheels, "mlops-pipdep", "0.3", {"mlops_pipdep.py": "VERSION = 'tampered'\n"})
    with pytest.raises(MlopsError, match=r"^demo: pip package mlops-pipdep 0.3: file://\S+ has sha256 [0-9a-f]{64}, "
                                         r"the lock says [0-9a-f]{64}; .*nothing was installed"):
        create_environment(spec, tmp_path / "prefixes", tmp_path / "pkgs")
    assert installed(tmp_path / "prefixes") == [] and not any((tmp_path / "prefixes").glob("*"))
    assert not any(p.name.startswith("mlops_pipdep") for p in (tmp_path / "pkgs" / "pip").rglob("*"))  # not cached


def test_a_prefix_without_pip_says_pip_must_be_a_conda_dependency(tmp_path: Path, mlops_channel: Path,
                                                                  mlops_wheels: Path) -> None:
    spec = load_environment(define(tmp_path / "defs" / "demo", mlops_channel, DEPS % "mlops-pipdemo"))
    lock_environment(spec)
    document = yaml.safe_load(spec.lock_file.read_text())  # a lock whose conda part brings no bin/python
    document["package"] = [e for e in document["package"] if e["name"] not in ("python", "mlops-demo")]
    spec.lock_file.write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(MlopsError, match=r"the lock has 2 pip packages but the environment's bin/python -m pip does "
                                         r"not run .*pip must be among the conda dependencies"):
        create_environment(spec, tmp_path / "prefixes", tmp_path / "pkgs")
    assert not any((tmp_path / "prefixes").glob("*"))


def test_what_pip_cannot_resolve_fails_the_lock_in_one_line_and_leaves_the_lock_as_it_was(
        tmp_path: Path, mlops_channel: Path, mlops_wheels: Path) -> None:
    folder = define(tmp_path / "envs" / "demo", mlops_channel, DEPS % "mlops-pipdemo")
    definition = (folder / "environment.yml").read_text()
    spec = load_environment(folder)
    before = lock_environment(spec).read_text()

    unresolvable = definition.replace("[mlops-pipdemo]", "[mlops-pipdemo, 'mlops-nothere==1.0']")
    (folder / "environment.yml").write_text(unresolvable)
    with pytest.raises(EnvironmentSpecError) as failed:
        lock_environment(load_environment(folder))
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'environment.yml'}:3: pip requirement 'mlops-nothere==1.0' cannot be "
                              "resolved for linux-64 (python 3.11.7): ")
    assert "No matching distribution found for mlops-nothere==1.0" in message
    assert spec.lock_file.read_text() == before

    # conda's packages are fixed at the solve's versions: a wheel that needs another fails, naming both
    (folder / "environment.yml").write_text(definition.replace("[mlops-pipdemo]", "[mlops-needs-demo3]"))
    with pytest.raises(EnvironmentSpecError) as failed:
        lock_environment(load_environment(folder))
    message = str(failed.value)
    assert "\n" not in message and "pip requirement 'mlops-needs-demo3' cannot be resolved" in message
    assert "the conda solve has mlops-demo 1.0; mlops-needs-demo3 1.0 depends on mlops-demo>=3" in message
    assert spec.lock_file.read_text() == before

    fresh = load_environment(define(tmp_path / "envs" / "fresh", mlops_channel, DEPS % "mlops-nothere"))
    with pytest.raises(EnvironmentSpecError, match="'mlops-nothere' cannot be resolved"):
        lock_environment(fresh)
    assert not fresh.lock_file.exists()


def test_markers_and_tags_are_the_target_platforms_not_this_machines(tmp_path: Path, mlops_wheels: Path) -> None:
    from jupyter_mlops.environments.pip import _run_pip

    wheel(mlops_wheels, "mlops-mac", "1.0", {"mlops_mac.py": ""},
          requires=('mlops-pipdep ; sys_platform == "darwin" and platform_machine == "arm64"',
                    'mlops-nowhere ; sys_platform == "linux"', 'mlops-nowhere ; python_version < "3.12"'))
    done, report = _run_pip(["mlops-mac"], "osx-arm64", "3.12.1", [], tmp_path)
    assert done.returncode == 0, done.stdout
    assert report is not None
    assert sorted(i["metadata"]["name"] for i in report["install"]) == ["mlops-mac", "mlops-pipdep"]


def test_scripts_pip_writes_name_the_final_prefix(tmp_path: Path) -> None:
    from jupyter_mlops.environments.pip import _point_scripts_at

    final = tmp_path / "env-0123456789ab"
    partial = final.with_name(final.name + ".partial")
    (partial / "bin").mkdir(parents=True)
    (partial / "bin" / "tool").write_text(f"#!{partial}/bin/python\nprint('{partial}')\n")
    (partial / "bin" / "long").write_text(f"#!/bin/sh\n'''exec' {partial}/bin/python \"$0\" \"$@\"\n' '''\n")
    (partial / "bin" / "data").write_bytes(b"\x7fELF" + str(partial).encode())
    _point_scripts_at(partial, final)
    assert (partial / "bin" / "tool").read_text() == f"#!{final}/bin/python\nprint('{partial}')\n"
    assert f"'''exec' {final}/bin/python" in (partial / "bin" / "long").read_text()
    assert (partial / "bin" / "data").read_bytes() == b"\x7fELF" + str(partial).encode()
