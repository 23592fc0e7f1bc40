"""``jupyter mlops env lock NAME``: solve environment.yml for each platform, write conda-lock.yml.

Solved by py-rattler (no conda or micromamba needed), against the channels the definition names
(``conda-forge`` and other names resolve to conda.anaconda.org; a ``file://`` or ``https://`` URL
is used as it is). For the machine's own platform the solve sees its virtual packages (``__glibc``,
``__cuda``...); for other platforms, none unless declared later.

A ``pip:`` section is locked after the conda solve of each platform, by pip itself, for the Python
that solve picked (:mod:`.pip`); the lock file is written only when every platform has resolved.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ..errors import EnvironmentSpecError
from .lockfile import write_lock
from .spec import EnvironmentSpec, current_platform

__all__ = ["lock_environment"]


def lock_environment(spec: EnvironmentSpec) -> Path:
    """Solve ``spec`` for its platforms and write its lock file; returns the lock's path.

    Raises :class:`EnvironmentSpecError` when the definition cannot be solved (the solver's own
    explanation, shortened) or its pip section cannot be resolved (pip's reason); the lock file is
    then left as it was.
    """
    records = asyncio.run(_solve_all(spec))
    pip = {}
    if spec.pip:
        from .pip import resolve_pip

        pip = {platform: resolve_pip(spec, platform, found) for platform, found in records.items()}
    return write_lock(spec, records, pip=pip)


async def _solve_all(spec: EnvironmentSpec) -> dict[str, list[Any]]:
    import rattler

    channels = [rattler.Channel(c) for c in spec.channels]
    here = current_platform()
    found = {}
    for platform in spec.platforms:
        virtual = None if platform == here else []
        try:
            found[platform] = await rattler.solve(sources=channels, specs=spec.dependencies,
                                                  platforms=[platform, "noarch"], virtual_packages=virtual)
        except Exception as e:  # rattler's solver and fetch errors have no common base
            text = " ".join(str(e).split())
            raise EnvironmentSpecError(str(spec.file), None, f"cannot be solved for {platform}: "
                                       f"{text[:500]}") from e
    return found
