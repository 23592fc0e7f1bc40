"""The process environment a kernel in a prefix gets: what ``conda activate`` would set.

py-rattler writes the activation script (PATH, CONDA_PREFIX, the packages' own
``etc/conda/activate.d/*.sh``); it is run once in bash and the resulting variables are kept in
the prefix (``conda-meta/mlops-activation.json``), keyed by the prefix's package list, so a kernel
start pays a file read, not a shell.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Mapping

from ..errors import MlopsError

__all__ = ["activation_env"]

CACHE = Path("conda-meta") / "mlops-activation.json"
_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _stamp(prefix: Path) -> str:
    meta = prefix / "conda-meta"
    return ",".join(sorted(p.name for p in meta.glob("*.json") if p.name != CACHE.name))


def activation_env(prefix: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables to add to a kernel's environment (PATH starts with the prefix's bin).

    ``extra``: the definition's own ``variables:``, applied last. Raises :class:`MlopsError` when
    an activation script fails.
    """
    cache = prefix / CACHE
    stamp = _stamp(prefix)
    try:
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == stamp:
            return {**saved["env"], **(extra or {})}
    except (OSError, ValueError, KeyError):
        pass
    from rattler.shell import ActivationVariables, Shell, activate

    result = activate(prefix, ActivationVariables(None, _BASE_PATH.split(":")), Shell.bash)
    clean = {"HOME": os.environ.get("HOME", "/"), "PATH": _BASE_PATH, "LANG": os.environ.get("LANG", "C.UTF-8")}
    done = subprocess.run(["bash", "--noprofile", "--norc", "-c", result.script + "\nenv -0"], env=clean,
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise MlopsError(f"activating {prefix} failed: {done.stderr.decode(errors='replace').strip()[-400:]}")
    after = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    changed = {k: v for k, v in after.items() if clean.get(k) != v and k not in ("SHLVL", "_", "PWD", "OLDPWD")}
    try:
        cache.write_text(json.dumps({"stamp": stamp, "env": changed}))
    except OSError:
        pass  # a read-only prefix: activation is computed again next time
    return {**changed, **(extra or {})}
