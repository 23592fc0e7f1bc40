"""Run one notebook headless through papermill, with tracking wired in through the environment.

The kernel inherits ``MLOPS_NOTEBOOK_PATH`` / ``MLOPS_OUTPUT_NOTEBOOK_PATH`` (so ``%mlops track``
knows which notebook it runs and logs the executed copy) and ``MLOPS_INVOCATION_ID`` (so the
caller can find the runs this execution produced in the spool).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import MlopsConfig, load_config
from ..errors import MlopsError, NotebookFailed
from ..tracking import flusher
from ..tracking.ledger import SpooledRun, spooled_runs

__all__ = ["NotebookResult", "NotebookFailed", "run_notebook", "execute_on_kernel", "register_engine",
           "code_cell_number", "failed_cell", "recorded_parameters"]

#: Cells papermill adds to the notebook it writes: the injected parameters, the error banners.
ADDED_TAGS = frozenset({"injected-parameters", "papermill-error-cell-tag"})


@dataclass
class NotebookResult:
    notebook: Path
    output: Path
    invocation: str
    runs: list[SpooledRun] = field(default_factory=list)
    error: NotebookFailed | None = None


def run_notebook(
    notebook: str | os.PathLike[str],
    *,
    parameters: Mapping[str, Any] | None = None,
    output: str | os.PathLike[str] | None = None,
    config: MlopsConfig | None = None,
    kernel_name: str | None = None,
    progress: bool = True,
    wait_upload: float = 120.0,
    on_wait: Callable[[list[SpooledRun]], None] | None = None,
) -> NotebookResult:
    """Execute ``notebook`` and wait until the runs it tracked are uploaded.

    Returns a result whose ``error`` is set when a cell raised (the run is then FAILED and the
    partial output notebook kept). Raises :class:`MlopsError` for a missing notebook.
    """
    config = config or load_config()
    src = Path(notebook).resolve()
    if not src.is_file():
        raise MlopsError(f"no notebook at {notebook}: check the path")
    out = Path(output).resolve() if output else config.embedded_dir / "outputs" / f"{src.stem}.out.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    invocation = uuid.uuid4().hex
    env = {
        "MLOPS_NOTEBOOK_PATH": str(src),
        "MLOPS_OUTPUT_NOTEBOOK_PATH": str(out),
        "MLOPS_INVOCATION_ID": invocation,
        "MLOPS_PROJECT_ROOT": str(config.root),
    }
    if config.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = config.tracking_uri
    if config.spool_dir:
        env["MLOPS_SPOOL_DIR"] = str(config.resolved_spool_dir)
    env["MLOPS_NOTEBOOK_PARAMETERS"] = _parameters_json(src, parameters or {})
    result = NotebookResult(src, out, invocation)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel papermill starts inherits this process's environment
    try:
        result.error = _execute(src, out, dict(parameters or {}), kernel_name, progress)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result.runs = wait_for_runs(config.resolved_spool_dir, invocation, config, wait_upload, on_wait)
    return result


def _stuck(run: SpooledRun, after: float) -> bool:
    since = run.state.get("waiting_since")
    return bool(run.state.get("waiting")) and since is not None and time.time() - float(since) >= after


def recorded_parameters(src: Path, parameters: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(defaults, injected) as a run records them: the notebook's parameters cell (a literal as MLflow
    stringifies it, an expression as written) and the values set, as text. The runner's record of a
    step and the kernel's ``%mlops track`` use this one form, so they never log two values for one param.

    Reads the JSON directly: nbformat costs a tenth of a second to import, per step.
    Raises :class:`MlopsError` for a notebook that cannot be read."""
    from ..parameters_cell import read_notebook
    from ..tracking.context import parameter_defaults

    try:
        defaults = parameter_defaults(read_notebook(src))
    except (OSError, ValueError) as e:
        raise MlopsError(f"{src}: not a readable notebook ({e})") from e
    return defaults, {k: v if isinstance(v, str) else str(v) for k, v in parameters.items()}


def _parameters_json(src: Path, parameters: Mapping[str, Any]) -> str:
    """Defaults of the notebook's parameters cell and the injected values, for the run's params."""
    defaults, injected = recorded_parameters(src, parameters)
    return json.dumps({"defaults": defaults, "injected": injected})


def _execute(src: Path, out: Path, parameters: dict[str, Any], kernel_name: str | None, progress: bool) -> NotebookFailed | None:
    import papermill
    from jupyter_client.kernelspec import NoSuchKernel
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(src),
            str(out),
            parameters=parameters,
            kernel_name=kernel_name,
            progress_bar=progress,
            cwd=str(src.parent),
        )
    except PapermillExecutionError as e:
        return NotebookFailed(src, out, *(failed_cell(out) or (None, None)), f"{e.ename}: {e.evalue}")
    except NoSuchKernel as e:
        raise MlopsError(f"no kernel named {e.name!r}: see `jupyter kernelspec list` for the names here") from e
    return None


def wait_for_runs(
    spool_dir: Path,
    invocation: str,
    config: MlopsConfig,
    timeout: float,
    on_wait: Callable[[list[SpooledRun]], None] | None = None,
    give_up_after: float = 10.0,
) -> list[SpooledRun]:
    """Wait until every run of ``invocation`` is uploaded; return them.

    Stops early when the uploader has been unable to reach the server for ``give_up_after``
    seconds for every remaining run (see ``SpooledRun.waiting``), or at ``timeout``.
    """
    deadline = time.monotonic() + timeout
    runs = spooled_runs(spool_dir, invocation)
    if any(not r.done for r in runs):
        flusher.ensure_running(spool_dir, config, nudge=True)
    delay = 0.05
    told = False
    while any(not r.done for r in runs) and time.monotonic() < deadline:
        if all(_stuck(r, give_up_after) for r in runs if not r.done):
            break  # the server does not answer: the runs stay spooled, say so now
        if on_wait and not told:
            on_wait(runs)
            told = True
        time.sleep(delay)  # the flusher works in another process; its progress is on disk
        delay = min(delay * 1.5, 0.5)
        if flusher.running_pid(spool_dir) is None:
            flusher.ensure_running(spool_dir, config)
        runs = spooled_runs(spool_dir, invocation)
    return runs


# -- on a pooled kernel (pipeline steps) ---------------------------------------------------------

_engine_registered = False


def register_engine() -> None:
    """papermill engine ``mlops``: nbclient on a kernel we started, with a setup snippet and hooks."""
    global _engine_registered
    if _engine_registered:
        return
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import (
        NBClientEngine,
        NotebookExecutionManager,
        papermill_engines,
    )
    from papermill.utils import merge_kwargs, remove_args

    class StepExecutionManager(NotebookExecutionManager):
        """papermill writes the whole output notebook before and after every cell: for a step
        of short cells that is most of its overhead. Here: at the start, after a failing cell, at
        the end, and otherwise at most once a second (a crash loses at most a second of output)."""

        save_every = 1.0
        _force = True
        _saved_at = 0.0

        def save(self, **kwargs: Any) -> None:
            now = time.monotonic()
            if self._force or now - self._saved_at >= self.save_every:
                super().save(**kwargs)
                self._saved_at, self._force = now, False

        def cell_exception(self, cell: Any, cell_index: Any = None, **kwargs: Any) -> None:
            super().cell_exception(cell, cell_index, **kwargs)
            self._force = True  # the failing cell's output is written at once

        def notebook_complete(self, **kwargs: Any) -> None:
            self._force = True
            super().notebook_complete(**kwargs)

    class MlopsEngine(NBClientEngine):
        @classmethod
        def execute_notebook(cls, nb, kernel_name, output_path=None, progress_bar=True,  # type: ignore[override]
                             log_output=False, autosave_cell_every=30, **kwargs):
            nb_man = StepExecutionManager(nb, output_path=output_path, progress_bar=progress_bar,
                                          log_output=log_output, autosave_cell_every=autosave_cell_every)
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
            finally:
                nb_man.cleanup_pbar()
                nb_man.notebook_complete()
            return nb_man.nb

        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,  # type: ignore[override]
                                     stderr_file=None, start_timeout=60, execution_timeout=None, **kwargs):
            setup = kwargs.pop("mlops_setup", None)
            on_cell = kwargs.pop("mlops_on_cell", None)
            kwargs = remove_args(["input_path", "timeout", "startup_timeout"], **kwargs)
            final = merge_kwargs(kwargs, timeout=execution_timeout, startup_timeout=start_timeout,
                                 kernel_name=kernel_name, log_output=log_output,
                                 stdout_file=stdout_file, stderr_file=stderr_file)
            client = PapermillNotebookClient(nb_man, **final)

            async def notebook_start(notebook: Any) -> None:
                if setup:
                    reply = await client.async_wait_for_reply(
                        client.kc.execute(setup, silent=True, store_history=False))
                    if reply is None or reply["content"]["status"] != "ok":
                        content = (reply or {}).get("content", {})
                        raise MlopsError(f"the step's setup code failed in the kernel: "
                                         f"{content.get('ename', 'no reply')}: {content.get('evalue', '')}")

            def cell_start(cell: Any, cell_index: int) -> None:
                number = code_cell_number(nb_man.nb.cells, cell_index) if on_cell else None
                if on_cell and number is not None:  # papermill's injected cell is not the author's
                    on_cell(*number)

            client.on_notebook_start = notebook_start
            client.on_cell_start = cell_start
            try:
                return client.execute()
            finally:
                kc = client.kc
                if kc is not None:  # ours to close: the kernel is not (its pool shuts it down)
                    kc.stop_channels()
                    if kc._created_context and not kc.context.closed:
                        kc.context.destroy(linger=0)

    papermill_engines.register("mlops", MlopsEngine)
    _engine_registered = True


def execute_on_kernel(
    src: Path,
    out: Path,
    parameters: Mapping[str, Any],
    manager: Any,
    kernel_name: str,
    *,
    setup: str | None = None,
    on_cell: Callable[[int, int], None] | None = None,
) -> NotebookFailed | None:
    """Run ``src`` through papermill on an already started kernel (``manager``), writing ``out``.

    ``setup`` is executed silently before the first cell (no trace in the output notebook);
    ``on_cell(n, m)`` is called as code cell n of m starts (:func:`code_cell_number`: the failure
    names its cell the same way). Returns the failure, if a cell raised;
    the kernel is left running (its owner shuts it down).
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    register_engine()
    try:
        papermill.execute_notebook(
            str(src), str(out), parameters=dict(parameters), kernel_name=kernel_name, language="python",
            progress_bar=False, log_output=False, km=manager, engine_name="mlops",
            mlops_setup=setup, mlops_on_cell=on_cell,
        )
    except PapermillExecutionError as e:
        return NotebookFailed(src, out, *(failed_cell(out) or (None, None)), f"{e.ename}: {e.evalue}")
    finally:
        _close_thread_loop()
    return None


def code_cell_number(cells: Sequence[Mapping[str, Any]], index: int | None = None) -> tuple[int, int] | None:
    """``(n, m)``: the cell at ``index`` of an executed notebook is the author's code cell n of m.

    Counted as the author sees them in Jupyter: code cells only, in order, the cells papermill
    added (:data:`ADDED_TAGS`) left out; so progress ("cell 3/7") and errors ("code cell 3 of 7
    raised") name the same cell the same way. ``index`` None: the first cell whose output is an
    error. None when that cell is not one of the author's code cells (or there is none).
    """
    found, count = None, 0
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "code" or ADDED_TAGS & set((cell.get("metadata") or {}).get("tags") or ()):
            continue
        count += 1
        if found is None and (i == index if index is not None else
                              any(o.get("output_type") == "error" for o in cell.get("outputs") or ())):
            found = count
    return (found, count) if found is not None else None


def failed_cell(out: Path) -> tuple[int, int] | None:
    """:func:`code_cell_number` of the cell that raised, read from the output notebook papermill wrote
    (its error banners shift papermill's own cell index, so the error output is what is looked for)."""
    try:
        with open(out, encoding="utf-8") as f:
            cells = json.load(f)["cells"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return code_cell_number(cells)


def _close_thread_loop() -> None:
    """nbclient runs its coroutines on an event loop it makes for the calling thread and never
    closes; a worker thread that runs many steps would leak one per thread. Close it here."""
    import asyncio
    import contextlib

    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop()
        return  # called from inside a loop: not ours to close
    policy = asyncio.get_event_loop_policy()
    loop = getattr(policy._local, "_loop", None)  # the loop set for this thread, without creating one
    if loop is not None and not loop.is_closed():
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
