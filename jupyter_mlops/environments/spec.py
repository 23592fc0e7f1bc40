"""``environments/NAME/environment.yml``: what an environment is made of, checked before use.

```yaml
name: cpu                       # optional; must match the folder's name when given
channels: [conda-forge]
platforms: [linux-64, osx-arm64]   # to lock for (conda-lock reads the same key); default: this one
dependencies:
  - python=3.11
  - ipykernel
  - scikit-learn >=1.5
  - pip:
      - some-package==1.0
image: ghcr.io/org/cpu:2026.11  # optional: the container image for Kubernetes kernels and Jobs
```
The folder may also hold ``conda-lock.yml``, written by ``jupyter mlops env lock NAME``. Errors
name the file, the line and the fix (see :mod:`jupyter_mlops._yaml`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _yaml
from ..errors import EnvironmentSpecError

__all__ = ["EnvironmentSpec", "load_environment", "find_environments", "current_platform", "LOCK_FILE", "SPEC_FILE"]

SPEC_FILE = "environment.yml"
LOCK_FILE = "conda-lock.yml"
KEYS = {"name", "channels", "platforms", "dependencies", "image", "variables"}
PLATFORMS = {"linux-64", "linux-aarch64", "linux-ppc64le", "osx-64", "osx-arm64", "win-64", "noarch"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_SPEC = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(\[.*\])?(\s*[=<>!~ ].*)?$")


def current_platform() -> str:
    import platform

    machine = platform.machine().lower()
    arch = {"x86_64": "64", "amd64": "64", "aarch64": "aarch64", "arm64": "arm64", "ppc64le": "ppc64le"}.get(machine, machine)
    system = {"linux": "linux", "darwin": "osx", "win32": "win"}.get(sys.platform, sys.platform)
    return f"{system}-{arch}"


@dataclass
class EnvironmentSpec:
    name: str
    folder: Path
    channels: list[str]
    platforms: list[str]
    dependencies: list[str]  # conda match specs, as written
    pip: list[str] = field(default_factory=list)
    image: str | None = None
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.folder / SPEC_FILE

    @property
    def lock_file(self) -> Path:
        return self.folder / LOCK_FILE

    @property
    def locked(self) -> bool:
        return self.lock_file.is_file()


def _error(file: str, line: int | None, message: str) -> EnvironmentSpecError:
    return EnvironmentSpecError(file, line, message)


def load_environment(folder: str | Path) -> EnvironmentSpec:
    """Read and check ``folder/environment.yml``. Raises :class:`EnvironmentSpecError`."""
    folder = Path(folder)
    file = folder / SPEC_FILE
    shown = str(file)
    name = folder.name
    if not _NAME.match(name):
        raise _error(shown, None, f"environment folder name {name!r}: use lowercase letters, digits, '-', '_' "
                     "or '.' (it becomes part of kernel names)")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _error(shown, None, f"no {SPEC_FILE}; an environment folder needs one (channels, dependencies)") from None
    except OSError as e:
        raise _error(shown, None, f"cannot be read ({e.strerror})") from e
    root = _yaml.compose(text, shown, _error, "an environment needs `channels:` and `dependencies:`")
    top = _yaml.expect(root, (dict,), "the environment", shown, _error)
    _yaml.unknown_keys(top, KEYS, "environment", shown, _error)
    if "name" in top and _yaml.plain(top["name"]) != name:
        raise _error(shown, top["name"].line, f"name {_yaml.plain(top['name'])!r} differs from the folder's "
                     f"name {name!r}; rename one or drop `name:`")
    channels = _strings(top, "channels", shown, required=True)
    if not channels:
        raise _error(shown, top["channels"].line, "`channels:` is empty; name at least one (e.g. conda-forge)")
    platforms = _strings(top, "platforms", shown) or [current_platform()]
    for p in platforms:
        if p not in PLATFORMS:
            raise _error(shown, top["platforms"].line, f"unknown platform {p!r}; use one of "
                         f"{', '.join(sorted(PLATFORMS))}")
    if "dependencies" not in top:
        raise _error(shown, root.line, "no `dependencies:`; list the packages (e.g. - python=3.11)")
    deps_node = top["dependencies"]
    conda: list[str] = []
    pip: list[str] = []
    for item in _yaml.expect(deps_node, (list,), "dependencies", shown, _error):
        if isinstance(item.value, dict):
            _yaml.unknown_keys(item.value, {"pip"}, "dependencies", shown, _error)
            pip_node = item.value["pip"]
            pip.extend(_check_spec(str(_yaml.expect(n, (str,), "a pip requirement", shown, _error)), n.line, shown, "pip")
                       for n in _yaml.expect(pip_node, (list,), "the pip section", shown, _error))
            continue
        value = _yaml.expect(item, (str,), "a dependency", shown, _error)
        conda.append(_check_spec(value, item.line, shown, "conda"))
    if not conda:
        raise _error(shown, deps_node.line, "`dependencies:` lists no conda package")
    if pip and not any(re.match(r"^pip(\s|=|$)", d) for d in conda):
        raise _error(shown, deps_node.line, "a `pip:` section needs `pip` among the conda dependencies; add - pip")
    image = _yaml.expect(top["image"], (str,), "image", shown, _error) if "image" in top else None
    variables = _yaml.plain(top["variables"]) if "variables" in top else {}
    if not isinstance(variables, dict) or not all(isinstance(v, (str, int, float)) for v in variables.values()):
        raise _error(shown, top["variables"].line, "variables must be a mapping of NAME: value")
    return EnvironmentSpec(name, folder.resolve(), channels, platforms, conda, pip, image,
                           {str(k): str(v) for k, v in variables.items()})


def _strings(top: dict[str, _yaml.Node], key: str, shown: str, required: bool = False) -> list[str]:
    if key not in top:
        if required:
            raise _error(shown, None, f"no `{key}:`; add it (e.g. {key}: [conda-forge])")
        return []
    node = top[key]
    if isinstance(node.value, str):
        return [node.value]
    return [str(_yaml.expect(n, (str,), f"{key} entries", shown, _error)) for n in
            _yaml.expect(node, (list,), key, shown, _error)]


def _check_spec(text: str, line: int, shown: str, kind: str) -> str:
    text = text.strip()
    if not text or not _SPEC.match(text):
        raise _error(shown, line, f"{text!r} is not a {kind} package spec; write it as NAME, NAME=VERSION or "
                     "NAME >=VERSION")
    return text


def find_environments(directory: str | Path) -> dict[str, Path]:
    """{name: folder} of the folders under ``directory`` that hold an environment.yml."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {p.name: p for p in sorted(directory.iterdir()) if (p / SPEC_FILE).is_file()}


def describe(spec: EnvironmentSpec) -> dict[str, Any]:
    """What `env show` prints and the REST API returns."""
    return {
        "name": spec.name, "folder": str(spec.folder), "channels": spec.channels, "platforms": spec.platforms,
        "dependencies": spec.dependencies, "pip": spec.pip, "image": spec.image, "variables": spec.variables,
        "locked": spec.locked,
    }
