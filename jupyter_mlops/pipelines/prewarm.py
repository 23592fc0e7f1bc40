"""The imports a run needs, done ahead and never two at once.

A pipeline run that starts kernels needs seconds of imports (papermill, nbclient, DVC) that would
otherwise fall inside its first steps, so one background thread makes them while the first kernels
start. No import of that thread may race with a worker's: a thread that imports a submodule of a
package another thread is still initializing gets the half-made package ("cannot import name ...
from partially initialized module", or ``_DeadlockError``). Hence, in one place:

* :func:`import_kernel_modules`, in the main thread before any of the run's threads start: what a
  worker imports first (the kernel pool and specs, and under them jupyter_client, which papermill
  and nbclient import too: a worker importing ``jupyter_client.asynchronous.client`` while the
  prewarm thread is inside ``jupyter_client/__init__`` got a partial module);
* :func:`start_prewarm`: that thread imports whole top-level packages only (a worker importing one
  waits for it to be complete), and DVC under ``DATA_LOCK``, which every use of DVC in a run holds.
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from typing import Any

from . import cache

__all__ = ["import_kernel_modules", "start_prewarm"]


def import_kernel_modules() -> None:
    """In the main thread, before the run's threads start. Kernels need these first, so nothing
    waits longer for them."""
    for name in ("jupyter_client", "jupyter_mlops.kernels.pool", "jupyter_mlops.kernels.kernelspecs"):
        importlib.import_module(name)


def start_prewarm(executor: Any, base: Path, *, versioned: bool, cancel: threading.Event) -> None:
    """Import papermill at once and, when the run versions outputs, DVC once the first kernel is
    claimed (``executor.first_claim``): on a small machine they must not slow the first kernel's
    start either. Only a head start: the real use reports any problem."""

    def load() -> None:
        try:  # this thread only (Linux: a thread is a task): the steps' kernels go first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        try:
            for name in ("papermill", "nbclient", "jupyter_mlops.pipelines.notebook"):
                importlib.import_module(name)
            first_claim = getattr(executor, "first_claim", None)
            if not versioned or (first_claim is not None and not first_claim.wait(300)) or cancel.is_set():
                return
            from ..data import api

            with cache.DATA_LOCK:
                api._project(base).repo  # noqa: B018 - opens the DVC repo (and imports dvc)
        except Exception:
            return

    threading.Thread(target=load, name="mlops-prewarm", daemon=True).start()
