"""The Jupyter Server extension of jupyter_mlops (see :mod:`.app`)."""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import MlopsExtensionApp

    return [{"module": "jupyter_mlops.server", "app": MlopsExtensionApp}]
