"""Versioned data: DVC underneath, every version read or written recorded on the active run.

See docs/data.md. Importing this package does not import dvc.
"""

from .api import DataChange, add, pull, push, status, use, version
from .versions import DataVersion

__all__ = ["DataChange", "DataVersion", "add", "pull", "push", "status", "use", "version"]
