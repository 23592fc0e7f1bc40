"""jupyter_mlops: tracked runs, versioned data, reproducible kernels and notebook pipelines.

``import jupyter_mlops`` and ``%load_ext jupyter_mlops`` stay fast: mlflow, dvc, papermill and
kubernetes are imported only where they are used.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext jupyter_mlops``: registers the ``%mlops`` magic."""
    from .magics import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unregister

    unregister(ipython)


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """The Jupyter Server extension (REST API, kernel specs, warm pools): jupyter_mlops.server."""
    from .server import _jupyter_server_extension_points as points

    return points()
