"""``pip:`` sections: locked by pip's own resolver, installed exactly by the prefix's pip.

Locking (``env lock``, after the conda solve of a platform) runs ``python -m pip install --dry-run
--report FILE`` in the interpreter that runs jupyter_mlops, aimed at that platform: the Python version
the conda solve picked (``--python-version``, ``--implementation cp``), the platform's wheel tags
(``--platform``), and its environment markers (``sys_platform``, ``platform_machine``...), which
pip would otherwise take from this machine. Index options are pip's own: the user's pip
configuration and ``PIP_INDEX_URL`` / ``PIP_EXTRA_INDEX_URL`` / ``PIP_FIND_LINKS`` / ``PIP_NO_INDEX``.

Decisions, and why:

* Wheels only (``--only-binary=:all:``), on every platform: the lock pins the sha256 of what gets
  installed, and a wheel built from an sdist at create time is neither that file nor reproducible
  (and ``env create`` installs with ``--no-index``, where build dependencies cannot be fetched).
  An sdist-only requirement fails to lock with pip's "no matching distribution" reason.
* As conda-lock does, what the conda solve provides is not locked again from PyPI: every conda
  package that depends on python stands in the pip resolution as an empty wheel of its own
  version (a direct requirement, so pip never looks for it elsewhere). A pip requirement on such a
  package is satisfied by conda's version, or fails to lock naming both; its files are never
  overwritten by pip's. Conda and PyPI names are the same except for the few in ``PYPI_NAMES``.
* ``--ignore-installed`` (and ``--target`` into a throw-away folder, which older pips demand with
  ``--platform``): the packages of the interpreter running the lock say nothing about the
  environment being locked.
* The report goes to a file, not ``--report - --quiet``: pip explains a conflict ("X 1.0 depends
  on Y>=3") on stdout at the level ``--quiet`` hides, and that explanation is the error's reason.

Installing (``env create``, see :mod:`.install`) downloads each locked URL into the package cache
(``<pkgs_dir>/pip/<sha256>/``), checks its sha256 before anything is installed, then runs
``<prefix>/bin/python -m pip install --no-deps --no-index --require-hashes --ignore-installed
--isolated --prefix <prefix>`` on those files: exactly the lock, nothing resolved, no index asked,
no pip configuration of the user's applied. URLs are fetched with urllib (proxies from the
environment); an index that needs credentials pip holds in a keyring or netrc is not supported yet.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..errors import EnvironmentSpecError, MlopsError
from .lockfile import LockedPipPackage

if TYPE_CHECKING:
    from .spec import EnvironmentSpec

__all__ = ["resolve_pip", "fetch_wheels", "install_wheels", "PYPI_NAMES"]

# Conda names whose PyPI distribution is called otherwise (conda-lock downloads a full mapping;
# offline, these are the ones environments meet most).
PYPI_NAMES = {
    "pytorch": "torch", "pytorch-cpu": "torch", "pytorch-gpu": "torch", "matplotlib-base": "matplotlib",
    "python-tzdata": "tzdata", "python-kubernetes": "kubernetes", "python-flatbuffers": "flatbuffers",
    "tensorflow-base": "tensorflow", "py-opencv": "opencv-python", "pyqt": "PyQt5",
}

_MANYLINUX = [f"manylinux_2_{minor}" for minor in range(28, 16, -1)] + ["manylinux2014", "manylinux2010",
                                                                         "manylinux1"]
# What pip may pick for each conda platform: glibc 2.17 to 2.28 on Linux (conda-forge's floor is
# 2.17), macOS from conda-forge's minimum (pip adds every older macOS and universal2 itself).
PLATFORM_TAGS = {
    "linux-64": [f"{m}_x86_64" for m in _MANYLINUX],
    "linux-aarch64": [f"{m}_aarch64" for m in _MANYLINUX if m not in ("manylinux2010", "manylinux1")],
    "linux-ppc64le": [f"{m}_ppc64le" for m in _MANYLINUX if m not in ("manylinux2010", "manylinux1")],
    "osx-64": ["macosx_10_13_x86_64"],
    "osx-arm64": ["macosx_11_0_arm64"],
    "win-64": ["win_amd64"],
}
_SYSTEMS = {"linux": ("linux", "Linux", "posix"), "osx": ("darwin", "Darwin", "posix"),
            "win": ("win32", "Windows", "nt")}
_MACHINES = {"linux-64": "x86_64", "linux-aarch64": "aarch64", "linux-ppc64le": "ppc64le", "osx-64": "x86_64",
             "osx-arm64": "arm64", "win-64": "AMD64"}

# Runs pip with the target's environment markers: pip evaluates `; sys_platform == "win32"` and
# friends against the running interpreter otherwise, which is wrong for another platform.
_BOOT = """\
import json, runpy, sys
target = json.loads(sys.argv[1])
import pip._vendor.packaging.markers as markers
here = markers.default_environment
markers.default_environment = lambda: {**here(), **target}
sys.argv = ["pip", *sys.argv[2:]]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""
_NOT_FOR_LOCKING = ("PIP_USER", "PIP_PREFIX", "PIP_TARGET", "PIP_ROOT", "PIP_REQUIRE_VIRTUALENV")


def canonical(name: str) -> str:
    """PEP 503: how pip compares names."""
    return re.sub(r"[-_.]+", "-", name).lower()


def target_markers(platform: str, python_version: str) -> dict[str, str]:
    """The environment markers of ``platform`` with the conda solve's Python."""
    sys_platform, system, os_name = _SYSTEMS[platform.split("-")[0]]
    short = ".".join(python_version.split(".")[:2])
    return {"sys_platform": sys_platform, "platform_system": system, "os_name": os_name,
            "platform_machine": _MACHINES[platform], "python_version": short, "python_full_version": python_version,
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": python_version}


def resolve_pip(spec: EnvironmentSpec, platform: str, records: Sequence[Any]) -> list[LockedPipPackage]:
    """Pin ``spec.pip`` for ``platform`` on top of that platform's conda solve (``records``).

    Raises :class:`EnvironmentSpecError` (one line: the environment file, the requirement, pip's
    reason) when pip cannot resolve, when the solve has no python, or for a platform without
    wheel tags.
    """
    shown = str(spec.file)
    if platform not in PLATFORM_TAGS:
        raise EnvironmentSpecError(shown, None, f"a `pip:` section cannot be locked for {platform} (no wheel "
                                   f"platform tags); lock it for {', '.join(PLATFORM_TAGS)}")
    python = next((r for r in records if r.name.normalized == "python"), None)
    if python is None:
        raise EnvironmentSpecError(shown, None, f"a `pip:` section needs python among the conda packages; the solve "
                                   f"for {platform} has none: add - python")
    if importlib.util.find_spec("pip") is None:
        raise EnvironmentSpecError(shown, None, f"locking the `pip:` section needs pip in {sys.executable}; "
                                   "install it there (python -m ensurepip)")
    version = ".".join(re.findall(r"\d+", str(python.version))[:3])
    marks = target_markers(platform, version)
    with tempfile.TemporaryDirectory(prefix="mlops-pip-lock-") as tmp:
        stand_ins = Path(tmp) / "conda"
        done, report = _run_pip(spec.pip, platform, version, _conda_stand_ins(records, stand_ins), Path(tmp))
        if done.returncode != 0:
            reason = _reason(done.stdout, stand_ins)
            requirement, line = _culprit(spec, reason)
            raise EnvironmentSpecError(shown, line, f"pip requirement {requirement} cannot be resolved for {platform} "
                                       f"(python {version}): {reason}")
        if report is None:
            raise EnvironmentSpecError(shown, None, f"pip gave no installation report for {platform} (pip 22.2 or "
                                       f"newer is needed): {' '.join(done.stdout.split())[-300:]}")
        return [_pinned(item, platform, marks, shown) for item in report.get("install", [])
                if not str(item["download_info"]["url"]).startswith(stand_ins.as_uri())]


def _run_pip(requirements: Sequence[str], platform: str, version: str, stand_ins: Sequence[Path],
             tmp: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """pip's dry run for ``platform``: its output (stdout and stderr in order) and its report."""
    (tmp / "conda.txt").write_text("".join(f"{p.as_uri()}\n" for p in stand_ins))
    report = tmp / "report.json"  # a file, not stdout: pip explains a conflict on stdout
    command = [sys.executable, "-c", _BOOT, json.dumps(target_markers(platform, version)),
               "install", "--dry-run", "--ignore-installed", "--report", str(report), "--no-input",
               "--disable-pip-version-check", "--target", str(tmp / "target"),
               "--python-version", version, "--implementation", "cp", "--only-binary=:all:",
               *(f"--platform={tag}" for tag in PLATFORM_TAGS[platform]),
               "-r", str(tmp / "conda.txt"), *requirements]
    env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_LOCKING}
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False)
    try:
        return done, json.loads(report.read_text())
    except (OSError, ValueError):
        return done, None


def _conda_stand_ins(records: Sequence[Any], folder: Path) -> list[Path]:
    """One empty wheel per conda package that depends on python, named as on PyPI."""
    from packaging.version import InvalidVersion, Version

    folder.mkdir(parents=True)
    wheels = []
    for record in records:
        name = record.name.normalized
        if name in ("python", "python_abi") or not any(re.split(r"[\s=<>!~]", d, maxsplit=1)[0] == "python"
                                                        for d in record.depends):
            continue
        try:
            version = str(Version(str(record.version)))
        except InvalidVersion:
            continue  # no PyPI version can equal it: pip may lock that name itself
        wheels.append(_empty_wheel(folder, PYPI_NAMES.get(name, name), version))
    return wheels


def _empty_wheel(folder: Path, name: str, version: str) -> Path:
    stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    info = f"{stem}.dist-info"
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: jupyter_mlops\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def _pinned(item: dict[str, Any], platform: str, marks: dict[str, str], shown: str) -> LockedPipPackage:
    from packaging.requirements import InvalidRequirement, Requirement

    info, meta = item["download_info"], item["metadata"]
    if "archive_info" not in info or not str(info["url"]).endswith(".whl"):
        raise EnvironmentSpecError(shown, None, f"pip package {meta['name']} comes from {info['url']}, not a wheel "
                                   "archive; a `pip:` section locks wheels only (name a released version)")
    archive = info["archive_info"] or {}
    sha256 = (archive.get("hashes") or {}).get("sha256") or str(archive.get("hash", "")).partition("sha256=")[2]
    if not sha256:
        sha256 = _sha256_of(info["url"])
    depends: dict[str, str] = {}
    for text in meta.get("requires_dist") or []:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.marker is None or requirement.marker.evaluate({**marks, "extra": ""}):
            depends[canonical(requirement.name)] = str(requirement.specifier) or "*"
    return LockedPipPackage(canonical(meta["name"]), str(meta["version"]), platform, str(info["url"]), sha256,
                            tuple(depends.items()))


def _sha256_of(url: str) -> str:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url) as response:  # noqa: S310 - an index's URL, as pip used it
        for block in iter(lambda: response.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reason(output: str, stand_ins: Path) -> str:
    """pip's reason on one line: its ERROR lines and the causes of a conflict it lists."""
    keep, causes = [], False
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("ERROR:"):
            causes = False
            if "ResolutionImpossible" not in line:
                keep.append(line[len("ERROR:"):].strip())
        elif line.startswith("The conflict is caused by"):
            causes = True
        elif not line or line.startswith("To fix"):
            causes = False
        elif causes:
            keep.append(line)
    text = "; ".join(keep) or " ".join(output.split())[-300:] or "pip failed without a message"
    # a conda package's stand-in shows as a file the user never wrote: say what it is
    where = rf"\(from (?:file://)?{re.escape(str(stand_ins))}/[^)]*\)"
    text = re.sub(rf"The user requested (\S+ \S+) {where}", r"the conda solve has \1", text)
    text = re.sub(where, "(from the conda solve)", text)
    return " ".join(text.split())[:600]


def _culprit(spec: EnvironmentSpec, reason: str) -> tuple[str, int | None]:
    """The requirement of the pip section that pip's reason names, and its line (when one does)."""
    from packaging.requirements import InvalidRequirement, Requirement

    words = {canonical(w) for w in re.findall(r"[A-Za-z0-9][A-Za-z0-9._-]*", reason)}
    named = []
    for text in spec.pip:
        try:
            name = canonical(Requirement(text).name)
        except InvalidRequirement:
            name = canonical(re.split(r"[\s\[=<>!~;@]", text, maxsplit=1)[0])
        if name in words:
            named.append(text)
    if len(named) != 1:
        return ", ".join(repr(t) for t in named or spec.pip), None
    lines = spec.file.read_text(encoding="utf-8").splitlines()
    found = [i for i, line in enumerate(lines, 1) if named[0] in line]
    return repr(named[0]), found[0] if len(found) == 1 else None


def fetch_wheels(packages: Iterable[LockedPipPackage], cache_dir: Path) -> list[Path]:
    """Download each locked wheel into ``cache_dir/pip/<sha256>/`` (kept: a second create reuses it)
    and check its sha256. Raises :class:`MlopsError` naming the package, the URL and both hashes
    on a mismatch, or the URL and the reason when it cannot be fetched."""
    files = []
    for package in packages:
        folder = cache_dir / "pip" / package.sha256
        path = folder / package.file_name
        if path.is_file() and _file_sha256(path) == package.sha256:
            files.append(path)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with urllib.request.urlopen(package.url) as response, partial.open("wb") as out:  # noqa: S310
                shutil.copyfileobj(response, out, 1 << 20)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise MlopsError(f"pip package {package.name} {package.version}: {package.url} cannot be fetched "
                             f"({getattr(e, 'reason', None) or e})") from e
        got = _file_sha256(partial)
        if got != package.sha256:
            partial.unlink()
            raise MlopsError(f"pip package {package.name} {package.version}: {package.url} has sha256 {got}, the "
                             f"lock says {package.sha256}; the file changed where it is published or the lock is "
                             "damaged, so nothing was installed: check the source and lock again")
        partial.replace(path)
        files.append(path)
    return files


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prefix_env() -> dict[str, str]:
    """The caller's environment without what would point the prefix's Python or pip elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def install_wheels(packages: Sequence[LockedPipPackage], files: Sequence[Path], prefix: Path,
                   final: Path | None = None) -> None:
    """Install ``files`` (from :func:`fetch_wheels`, checked) into ``prefix`` with its own pip,
    resolving nothing. ``final``: where ``prefix`` will be renamed to; scripts pip wrote name that
    interpreter, not the temporary one. Raises :class:`MlopsError` when the prefix has no working
    ``bin/python -m pip`` (pip missing from the conda dependencies) or pip fails."""
    python = prefix / "bin" / "python"
    env = _prefix_env()
    try:
        probe = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, text=True, env=env,
                               check=False)
        why = "" if probe.returncode == 0 else " ".join((probe.stderr or probe.stdout).split())[-200:]
    except OSError as e:
        why = e.strerror or str(e)
    if why:
        raise MlopsError(f"the lock has {len(packages)} pip packages but the environment's bin/python -m pip does "
                         f"not run ({why}); pip must be among the conda dependencies: add - pip and lock again")
    with tempfile.TemporaryDirectory(prefix="mlops-pip-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(f"{f.as_uri()} --hash=sha256:{p.sha256}\n" for p, f in zip(packages, files)))
        done = subprocess.run([str(python), "-m", "pip", "install", "--isolated", "--no-deps", "--no-index",
                               "--require-hashes", "--ignore-installed", "--no-input", "--disable-pip-version-check",
                               "--no-warn-script-location", "--prefix", str(prefix), "-r", str(requirements)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False)
    if done.returncode != 0:
        raise MlopsError(f"pip could not install the locked wheels: {_reason(done.stdout, Path(tmp))}")
    if final is not None:
        _point_scripts_at(prefix, final)


def _point_scripts_at(prefix: Path, final: Path) -> None:
    """Scripts' interpreter lines name ``final`` instead of ``prefix`` (pip writes the path of the
    Python that installed them, here the one of the temporary prefix)."""
    old, new = str(prefix).encode(), str(final).encode()
    for script in (prefix / "bin").iterdir() if (prefix / "bin").is_dir() else ():
        if script.is_symlink() or not script.is_file():
            continue
        with script.open("rb") as f:
            head = f.read(2)
        if head != b"#!":
            continue
        data = script.read_bytes()
        lines = data.split(b"\n", 2)
        # the interpreter line, or the exec line of the sh trampoline pip writes for a long path
        edit = 2 if lines[0].strip() == b"#!/bin/sh" else 1
        fixed = b"\n".join([line.replace(old, new) for line in lines[:edit]] + lines[edit:])
        if fixed != data:
            script.write_bytes(fixed)
