"""Which kernel specs exist here, and what a kernel's environment is made of (for the step cache).

Kernel specs are found as ``jupyter_client``'s ``KernelSpecManager.find_kernel_specs()`` finds
them (the ``kernels`` folders of the Jupyter path, then IPython's, then ipykernel's own
``python3``), but without importing jupyter_client: that import costs a quarter of a second, most of
a no-op pipeline re-run. tests/test_pipeline_spec.py checks that both find the same names.

:func:`kernel_fingerprint` is the environment part of a step's cache key for a step that runs on a
plain kernel spec (one that names no ``environment:``; those are keyed by their lock). It is what
the kernel really runs on, not what the runner process runs on:

* the spec's ``argv`` and ``env``, with ``python`` resolved as jupyter_client resolves it (to the
  runner's interpreter) and the executable's absolute path;
* for a Python kernel (``ipykernel`` in its argv): the interpreter's version, and the
  ``name==version`` of every distribution visible on *that interpreter's* ``sys.path`` (its
  ``*.dist-info`` / ``*.egg-info`` folder names), plus the names in its prefix's ``conda-meta``.
  ``sys.path`` is asked of the interpreter itself (a subprocess, with the environment the kernel
  gets), so a package installed where the kernel does not look changes nothing;
* for any other kernel (R, Julia, ...): the executable's size and mtime only. Its libraries are
  not seen: name an ``environment:`` (a lock) to have them in the key.

The answer is cached on disk (``$XDG_CACHE_HOME/jupyter_mlops/kernel-env.json``) per (argv, env,
interpreter identity), and reused while every folder of the interpreter's ``sys.path`` keeps the
mtime it had (installing or removing a package changes its folder's mtime), so a no-op re-run pays a
few ``stat`` calls, not a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["find_kernelspecs", "kernelspec", "kernel_fingerprint", "python_fingerprint"]

NATIVE = "python3"
_lock = threading.Lock()
_memory: dict[str, dict[str, Any]] = {}  # this process's copy of the disk cache (validated the same way)


def _kernel_dirs() -> list[Path]:
    from jupyter_core.paths import jupyter_path

    dirs = [Path(d) for d in jupyter_path("kernels")]
    ipython = os.environ.get("IPYTHONDIR") or os.path.join(os.path.expanduser("~"), ".ipython")
    dirs.append(Path(ipython) / "kernels")
    return dirs


_found: tuple[list[tuple[Path, int | None]], dict[str, Path]] | None = None  # (folders' mtimes, answer)


def find_kernelspecs() -> dict[str, Path]:
    """``{name: resource folder}`` of the kernel specs installed here (names lowercased, first wins).

    Remembered while no kernels folder changes its mtime (adding or removing a spec does): every
    step's key asks, and listing the folders each time was most of a millisecond."""
    global _found
    dirs = _kernel_dirs()
    stamps = [(d, _mtime(str(d))) for d in dirs]
    if _found is not None and _found[0] == stamps:
        return dict(_found[1])
    found = _list_kernelspecs(dirs)
    _found = (stamps, found)
    return dict(found)


def _list_kernelspecs(dirs: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in dirs:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = folder / name
            if name.lower() not in found and (path / "kernel.json").is_file():
                found[name.lower()] = path
    if NATIVE not in found:
        import importlib.util

        spec = importlib.util.find_spec("ipykernel")
        if spec is not None and spec.origin:
            found[NATIVE] = Path(spec.origin).parent / "resources"
    return found


def kernelspec(name: str, known: dict[str, Path] | None = None) -> dict[str, Any] | None:
    """The kernel.json of ``name`` (``argv``, ``env``, ...), or None when there is no such spec."""
    folder = (known if known is not None else find_kernelspecs()).get(name.lower())
    if folder is None:
        return None
    try:
        with open(folder / "kernel.json", encoding="utf-8") as f:
            spec = json.load(f)
    except OSError:  # ipykernel's own python3 has no kernel.json: it is this interpreter
        return {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "env": {}}
    except ValueError:
        return {"argv": [], "env": {}, "broken": str(folder)}
    return spec if isinstance(spec, dict) else {"argv": [], "env": {}}


def _executable(argv0: str) -> str:
    """argv[0] as the kernel manager runs it: ``python`` is the runner's interpreter (jupyter_client
    substitutes it), anything else is looked up on PATH. Links are not followed: a venv's
    ``bin/python`` is a link to the base interpreter, and only through the link is it the venv's."""
    major, minor = sys.version_info[:2]
    if argv0 in ("python", f"python{major}", f"python{major}.{minor}"):
        return os.path.abspath(sys.executable)
    return os.path.abspath(shutil.which(argv0) or argv0)


def kernel_fingerprint(name: str) -> str:
    """sha256 of what kernel spec ``name`` runs on (see the module's docstring)."""
    spec = kernelspec(name) or {"argv": [], "env": {}, "missing": name}
    argv = [str(a) for a in spec.get("argv") or []]
    env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
    exe = _executable(argv[0]) if argv else ""
    is_python = any("ipykernel" in a for a in argv)
    parts: dict[str, Any] = {"argv": argv[1:], "env": env, "executable": exe}
    parts["environment"] = python_fingerprint(exe, env) if is_python and exe else _file_identity(exe)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _file_identity(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


#: What shapes an interpreter's sys.path besides its own files.
_PATH_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONNOUSERSITE", "PYTHONUSERBASE", "PYTHONSAFEPATH")


def python_fingerprint(interpreter: str, env: dict[str, str] | None = None) -> str:
    """sha256 of an interpreter's version and the distributions on its ``sys.path`` (with ``env``
    over this process's environment, as a kernel gets it). Cached as the module's docstring says."""
    env = dict(env or {})
    merged = {**os.environ, **env}
    identity = {"interpreter": interpreter, "file": _file_identity(interpreter),
                "variables": {v: merged.get(v) for v in _PATH_VARIABLES}}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    with _lock:
        entry = _memory.get(key) or _load_disk().get(key)
        if entry and _still_valid(entry):
            _memory[key] = entry
            return str(entry["fingerprint"])
        probed = _probe(interpreter, merged)
        if probed is None:  # cannot be asked: key on its identity, so a change still shows
            return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        version, prefix, paths = probed
        # the mtimes before the listing: an install in between makes the entry stale, not wrong
        mtimes = {p: _mtime(p) for p in [*paths, os.path.join(prefix, "conda-meta")]}
        listing = _distributions(paths) + _conda_meta(prefix)
        fingerprint = hashlib.sha256(json.dumps([version, listing]).encode()).hexdigest()
        _memory[key] = {"fingerprint": fingerprint, "mtimes": mtimes}
        _save_disk(key, _memory[key])
        return fingerprint


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _still_valid(entry: dict[str, Any]) -> bool:
    mtimes = entry.get("mtimes")
    return isinstance(mtimes, dict) and all(_mtime(p) == m for p, m in mtimes.items())


_PROBE = "import json, sys; print(json.dumps([sys.version, sys.prefix, sys.path[1:]]))"


def _probe(interpreter: str, env: dict[str, str]) -> tuple[str, str, list[str]] | None:
    """(version, prefix, sys.path) as ``interpreter`` starts with ``env``; its own folder (sys.path[0],
    the script's) is left out: a kernel's is its working directory, not a place packages live."""
    try:
        done = subprocess.run([interpreter, "-c", _PROBE], env=env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL, cwd=os.path.dirname(interpreter) or None)
        version, prefix, paths = json.loads(done.stdout)
    except (OSError, ValueError, TypeError, subprocess.SubprocessError):
        return None
    return str(version), str(prefix), [os.path.abspath(p) for p in paths if p]


def _distributions(paths: list[str]) -> list[str]:
    found = set()
    for entry in paths:
        try:
            names = os.listdir(entry)
        except OSError:
            continue
        for name in names:
            for suffix in (".dist-info", ".egg-info"):
                if name.endswith(suffix):
                    dist, _, version = name[: -len(suffix)].partition("-")
                    found.add(f"{dist.lower().replace('_', '-')}=={version}")
    return sorted(found)


def _conda_meta(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(os.path.join(prefix, "conda-meta")) if n.endswith(".json"))
    except OSError:
        return []


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jupyter_mlops" / "kernel-env.json"


def _load_disk() -> dict[str, Any]:
    try:
        with open(_cache_file(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_disk(key: str, entry: dict[str, Any]) -> None:
    """Best effort (a read-only home only costs a probe next time); replaced atomically, so two
    runners writing at once leave one whole file."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_disk()
        data[key] = entry
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
