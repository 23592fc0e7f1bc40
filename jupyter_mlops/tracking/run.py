"""The kernel side of tracking: start a run, log to the spool, end it.

Nothing here imports mlflow. Each call validates what it can cheaply, appends one record to the
run's spool (see :mod:`.spool`) and returns; the flusher process uploads in the background.
"""

from __future__ import annotations

import atexit
import json
import os
import posixpath
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import MlopsConfig, load_config
from ..errors import (
    InvalidValueError,
    NoActiveRunError,
    ParamChangedError,
    TrackingError,
)
from . import flusher as _flusher
from .context import capture, notebook_path
from .ledger import refusal_note, run_status
from .spool import DONE_DIR, EVENTS, REJECTED, STATE, SpoolWriter, read_json

__all__ = [
    "Run",
    "start_run",
    "create_run",
    "active_run",
    "last_run",
    "end_run",
    "log_metric",
    "log_metrics",
    "log_param",
    "log_params",
    "set_tag",
    "set_tags",
    "log_artifact",
    "flush",
]

# MLflow's limits (mlflow.utils.validation), checked here so a bad value fails at the call.
MAX_KEY_LENGTH = 250
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
_KEY_RE = re.compile(r"[/\w.\- :]+")  # used with fullmatch: "$" would let a final newline through
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

_active: Run | None = None
_atexit_registered = False
_lock = threading.Lock()


def _check_key(kind: str, key: str, valid: set[str]) -> None:
    if not isinstance(key, str) or not key:
        raise InvalidValueError(kind, str(key), "needs a non-empty string name")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidValueError(kind, key[:40] + "...", f"name is longer than {MAX_KEY_LENGTH} characters")
    if not _KEY_RE.fullmatch(key):
        raise InvalidValueError(
            kind, key, "names may hold letters, digits, '_', '-', '.', ' ', ':' and '/' only"
        )
    norm = posixpath.normpath(key)
    if norm != key or norm in (".",) or norm.startswith(("..", "/")):
        raise InvalidValueError(kind, key, f"name must not be a path that resolves elsewhere ({norm!r})")
    valid.add(key)


_I64 = 2**63


def _integer(what: str, key: str, value: Any) -> int:
    """``value`` as MLflow's 64-bit integer (steps, millisecond timestamps), or a clear error."""
    try:
        number = int(value)
        if number != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise InvalidValueError("metric", key, f"{what} must be an integer, got {value!r}") from None
    if not -_I64 <= number < _I64 or (what == "timestamp" and number < 0):
        raise InvalidValueError("metric", key, f"{what} {number} is out of range (64-bit, milliseconds for timestamps)")
    return number


def _check_text(kind: str, key: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise InvalidValueError(kind, key, f"value is longer than {limit} characters" + ("; log it as an artifact" if kind == "param" else ""))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValueError(kind, key, "value is not valid text (it holds a lone surrogate)") from None


def _check_artifact_path(path: str | None) -> None:
    if path is None:
        return
    norm = posixpath.normpath(path)
    if path.startswith("/") or norm == ".." or norm.startswith("../") or "\\" in path:
        raise TrackingError(f"artifact folder {path!r} must be a relative path inside the run (like 'models/v1')")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Run:
    """One tracked run, as the kernel sees it. Create with :func:`start_run`."""

    def __init__(self, writer: SpoolWriter, header: dict[str, Any], config: MlopsConfig) -> None:
        self._writer = writer
        self._fd = writer.fd
        self.header = header
        self.config = config
        self.spool_id: str = header["spool_id"]
        self.spool_dir = writer.run_dir.parent
        self._valid_keys: set[str] = set()
        self._params: dict[str, str] = {}
        self.ended: str | None = None
        self.last_error: str | None = None
        self._end_hooks: list[Callable[[str], None]] = []
        self._before_end: list[Callable[[Run], None]] = []
        #: (role, version) of data this run read ("input") and wrote ("output"); see data/
        self.datasets: list[tuple[str, Any]] = []

    # -- hot path ---------------------------------------------------------------------------------

    def log_metric(self, key: str, value: float, step: int | None = None, timestamp: int | None = None) -> None:
        """Record one metric point. Costs a few microseconds; raises :class:`InvalidValueError`
        on a bad key, step or timestamp, or a value MLflow's client would not send.

        A value is what ``float()`` makes of it, as MLflow's client does (checked with MLflow 3.17,
        on a SQLite store and through ``mlflow server``): numbers, numpy scalars, one-element
        arrays and tensors, and numeric text ('1e3' is 1000.0, 'nan' and 'inf' are NaN and
        infinity). NaN is stored as NaN; MLflow's SQL stores keep +-infinity as +-1.8e308.
        Text that is no number, None, and integers beyond a float's range are refused.
        """
        if key not in self._valid_keys:
            _check_key("metric", key, self._valid_keys)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidValueError("metric", key, f"needs a number, got {value!r}") from None
        except OverflowError:  # float(10**400): MLflow's client lets this escape as a traceback
            raise InvalidValueError("metric", key, "is too large for a 64-bit float") from None
        if self.ended:
            raise NoActiveRunError("log a metric")
        if step is None:
            step = 0
        elif type(step) is not int or not -_I64 <= step < _I64:
            step = _integer("step", key, step)
        if timestamp is None:
            timestamp = time.time_ns() // 1_000_000
        elif type(timestamp) is not int or not 0 <= timestamp < _I64:
            timestamp = _integer("timestamp", key, timestamp)
        self._append(f"m\t{key}\t{number!r}\t{timestamp}\t{step}\n".encode())

    def _append(self, data: bytes) -> None:
        """One record, whole or not at all (a full disk must not leave half a line behind)."""
        try:
            written = os.write(self._fd, data)
        except OSError as e:
            written = 0
            error: OSError | None = e
        else:
            if written == len(data):
                return
            error = None
        self._writer.finish_or_undo(data, written, error, ended=bool(self.ended))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        ts = _now_ms()
        for key, value in metrics.items():
            self.log_metric(key, value, step, ts)

    # -- everything else --------------------------------------------------------------------------

    def log_param(self, key: str, value: Any) -> None:
        self._require_open("log a param")
        if key not in self._valid_keys:
            _check_key("param", key, self._valid_keys)
        text = value if isinstance(value, str) else str(value)  # as mlflow.log_param does
        _check_text("param", key, text, MAX_PARAM_VAL_LENGTH)
        old = self._params.get(key)
        if old is not None:
            if old != text:
                raise ParamChangedError(key, old, text)
            return
        self._params[key] = text
        self._append(f"p\t{key}\t{json.dumps(text)}\n".encode())

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in params.items():
            self.log_param(key, value)

    def set_tag(self, key: str, value: Any) -> None:
        self._require_open("set a tag")
        if key not in self._valid_keys:
            _check_key("tag", key, self._valid_keys)
        text = value if isinstance(value, str) else str(value)
        _check_text("tag", key, text, MAX_TAG_VAL_LENGTH)
        self._append(f"t\t{key}\t{json.dumps(text)}\n".encode())

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.set_tag(key, value)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Snapshot a file or folder now (later edits do not change what is recorded)."""
        self._require_open("log an artifact")
        src = Path(path).expanduser().resolve()
        if not src.exists():
            raise TrackingError(f"cannot log artifact {str(path)!r}: no such file or folder")
        _check_artifact_path(artifact_path)
        spool = self.spool_dir.resolve()
        if src == spool or spool.is_relative_to(src):
            raise TrackingError(f"cannot log {str(path)!r}: it holds the tracking spool {spool}; log a narrower path")
        rel = self._writer.snapshot(src)
        self._append(f"a\t{json.dumps({'src': rel, 'path': artifact_path})}\n".encode())

    def log_text(self, text: str, artifact_dir: str | None, name: str) -> None:
        self._require_open("log an artifact")
        rel = self._writer.snapshot_text(text, name)
        self._append(f"a\t{json.dumps({'src': rel, 'path': artifact_dir})}\n".encode())

    def before_end(self, hook: Callable[["Run"], None]) -> None:
        """Call ``hook(run)`` just before the end record, while the run can still log."""
        self._before_end.append(hook)

    def log_dataset(self, version: Mapping[str, Any], role: str) -> None:
        """Record a data version as the run's ``input`` or ``output`` (MLflow dataset API)."""
        self._require_open("record data")
        self._append(f"d\t{role}\t{json.dumps(dict(version), sort_keys=True)}\n".encode())

    def on_end(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(status)`` once the run has ended (e.g. to close mlflow's own active run)."""
        self._end_hooks.append(hook)

    def note_cell(self, error: str | None) -> None:
        """Called after each cell: remembers whether the last one raised (for the end status)."""
        self.last_error = error

    def end(self, status: str | None = None, *, log_notebook: bool = True) -> str:
        """Close the run: snapshot the notebook, append the end record, release the spool.

        ``status`` defaults to FAILED when the last cell raised, else FINISHED. Idempotent.
        """
        if self.ended:
            return self.ended
        status = (status or ("FAILED" if self.last_error else "FINISHED")).upper()
        if status not in RUN_STATUSES:
            raise InvalidValueError("status", status, f"must be one of {', '.join(RUN_STATUSES)}")
        if log_notebook and not self.attached:
            self._log_notebooks()
        for before in self._before_end:
            try:
                before(self)
            except Exception as e:  # a check must not keep the run from ending
                self.set_tag("mlops.end_hook_error", f"{type(e).__name__}: {e}"[:MAX_TAG_VAL_LENGTH])
        if status == "FAILED" and self.last_error:
            self.set_tag("mlops.error", self.last_error[:MAX_TAG_VAL_LENGTH])
        self._append(f"e\t{status}\t{_now_ms()}\n".encode())
        self._writer.close()
        self.ended = status
        _flusher.ensure_running(self.spool_dir, self.config, nudge=True)
        for hook in self._end_hooks:
            hook(status)
        return status

    def _log_notebooks(self) -> None:
        """A runner's (or papermill's) output notebook holds what ran: log it. Interactively, the
        saved file as ``notebook/<name>`` and what the kernel executed as ``notebook/executed.ipynb``."""
        saved = self.header.get("notebook")
        output = _runner_output_notebook()
        for path in ([output] if output else [saved] if saved else []):
            if Path(path).is_file():
                try:
                    self.log_artifact(path, "notebook")
                except TrackingError:
                    pass  # the notebook vanished meanwhile: the run still ends
        if output or _executed_notebook is None:
            return
        metadata = {}
        if saved:
            metadata = {k: v for k, v in ((read_json(Path(saved)) or {}).get("metadata") or {}).items()
                        if k in ("kernelspec", "language_info")}
        try:
            executed = _executed_notebook(metadata)
        except Exception as e:  # the transcript must not keep the run from ending
            self.set_tag("mlops.executed_notebook_error", f"{type(e).__name__}: {e}"[:MAX_TAG_VAL_LENGTH])
            return
        if executed and executed.get("cells"):
            name = "executed.ipynb" if not saved or Path(saved).name != "executed.ipynb" else "executed.kernel.ipynb"
            self.log_text(json.dumps(executed, indent=1, ensure_ascii=False) + "\n", "notebook", name)

    @property
    def attached(self) -> bool:
        """Recording into a run someone else owns (a pipeline step's): its end is theirs."""
        return bool(self.header.get("attach_spool_id"))

    # -- where the run is -------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once the flusher created the run (or the run attached to), else None."""
        if self.header.get("run_id"):
            return self.header["run_id"]
        state = self.upload_state()
        return state.get("run_id") if state else None

    def upload_state(self) -> dict[str, Any] | None:
        return read_json(self._writer.run_dir / STATE) or read_json(self.spool_dir / DONE_DIR / f"{self.spool_id}.json")

    @property
    def status(self) -> str:
        """The run's state as ``jupyter mlops runs`` words it: RUNNING, FINISHED, REFUSED, ..."""
        return run_status(self.upload_state() or {}, ended=self.ended, writer_alive=not self.ended)

    def refusal(self) -> str | None:
        """What the tracking server refused of this run, why and what to do; None if nothing."""
        return refusal_note(self.upload_state() or {}, self._writer.run_dir / REJECTED)

    def pending_bytes(self) -> int:
        """Bytes of records not uploaded yet (0 when the run is fully uploaded)."""
        done = read_json(self.spool_dir / DONE_DIR / f"{self.spool_id}.json")
        if done is not None:
            return 0
        try:
            size = os.stat(self._writer.run_dir / EVENTS).st_size
        except FileNotFoundError:
            return 0
        state = read_json(self._writer.run_dir / STATE) or {}
        return max(0, size - int(state.get("offset", 0)))

    def wait(self, timeout: float = 30.0, *, uploaded: bool = True) -> bool:
        """Wait until the run exists on the server (and, if ``uploaded``, all records are there).

        False after ``timeout`` or as soon as the server refused the run (see :meth:`refusal`)."""
        _flusher.ensure_running(self.spool_dir, self.config, nudge=True)
        start = time.monotonic()
        while True:
            done = self.run_id is not None and (not uploaded or self.pending_bytes() == 0)
            waited = time.monotonic() - start
            if done or waited >= timeout:
                return done
            if (read_json(self._writer.run_dir / STATE) or {}).get("failed"):
                return False  # refused: kept for `jupyter mlops sync`, nothing to wait for
            # The flusher's progress is a file; a poll costs ~30 us. Poll finely for the first
            # seconds (an upload usually ends there, and a coarse step would add up to its length
            # to every wait), coarsely when the server is away.
            time.sleep(0.002 if waited < 2 else 0.05)

    def _require_open(self, action: str) -> None:
        if self.ended:
            raise NoActiveRunError(action)


def _runner_output_notebook() -> str | None:
    """The output notebook of a runner (``MLOPS_OUTPUT_NOTEBOOK_PATH``) or of a ``papermill``
    command that started this kernel: it holds what ran, outputs included."""
    from .context import papermill_cli_paths

    output = os.environ.get("MLOPS_OUTPUT_NOTEBOOK_PATH")
    if output:
        return output
    cli = papermill_cli_paths()
    return str(cli[1]) if cli else None


#: What the kernel executed, as an nbformat-v4 dict (given metadata to keep), or None. Set by the
#: IPython extension (see jupyter_mlops._transcript); None outside IPython.
_executed_notebook: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None


def set_executed_notebook(source: Callable[[dict[str, Any]], dict[str, Any] | None] | None) -> None:
    """Where :meth:`Run.end` gets the executed notebook it logs as ``notebook/executed.ipynb``."""
    global _executed_notebook
    _executed_notebook = source


def _new_spool_id() -> str:
    """Sortable by creation time to the microsecond: the uploader takes runs oldest first, so a
    parent made a moment before its child is created in MLflow first."""
    now = time.time_ns() // 1000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000)) + f"{now % 1_000_000:06d}-" + uuid.uuid4().hex[:12]


def start_run(
    experiment: str | None = None,
    name: str | None = None,
    *,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    notebook: str | os.PathLike[str] | None = None,
    history: Sequence[str] = (),
    user_ns: Mapping[str, Any] | None = None,
    capture_context: bool = True,
    config: MlopsConfig | None = None,
) -> Run:
    """Start a run and make it the active one. Returns at once: the flusher creates it in MLflow.

    The run nests under ``MLOPS_PARENT_RUN_ID`` when set, or records into an existing run instead
    of creating one: ``MLOPS_RUN_ID`` (an MLflow run id) or ``MLOPS_ATTACH_SPOOL_ID`` (a run still
    in the spool: a pipeline step's run, which the runner owns and ends).
    Raises :class:`TrackingError` if a run is already active, :class:`SpoolError` if the spool
    folder cannot be written.
    """
    global _active, _atexit_registered
    with _lock:
        if _active is not None and not _active.ended:
            raise TrackingError(
                f"run {_active.run_id or _active.spool_id} is still active; end it first "
                "(%mlops end or jupyter_mlops.tracking.end_run())"
            )
        config = config or load_config()
        nb = Path(notebook).resolve() if notebook else notebook_path(user_ns)
        run = create_run(
            experiment, name, tags=tags, params=params, notebook=nb,
            context=capture(nb, history) if capture_context else None,
            parent_run_id=os.environ.get("MLOPS_PARENT_RUN_ID") or None,
            attach_run_id=os.environ.get("MLOPS_RUN_ID") or None,
            attach_spool_id=os.environ.get("MLOPS_ATTACH_SPOOL_ID") or None,
            config=config,
        )
        _active = run
        if not _atexit_registered:
            atexit.register(_end_at_exit)
            _atexit_registered = True
    return run


def create_run(
    experiment: str | None = None,
    name: str | None = None,
    *,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    notebook: Path | None = None,
    context: Any = None,
    parent_run_id: str | None = None,
    parent_spool_id: str | None = None,
    attach_run_id: str | None = None,
    attach_spool_id: str | None = None,
    config: MlopsConfig | None = None,
) -> Run:
    """A run that is not the process's active one (what a pipeline runner holds several of).

    ``parent_spool_id`` / ``attach_spool_id`` name runs still in the same spool: the uploader
    resolves them to MLflow run ids, so no caller ever waits for the server. An attached run
    records into its target and never ends it: the target's owner does.
    """
    config = config or load_config()
    tracking_uri = config.resolved_tracking_uri  # a typo in the URI fails here, not in the uploader
    all_tags = dict(context.tags) if context else {}
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    spool_id = _new_spool_id()
    all_tags["mlops.spool_id"] = spool_id
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    experiment = experiment or config.experiment_for(str(notebook) if notebook else None)
    header = {
        "version": 1,
        "spool_id": spool_id,
        "tracking_uri": tracking_uri,
        "artifact_root": config.resolved_artifact_root,
        "experiment": experiment,
        "run_name": name or (notebook.stem if notebook else None),
        "run_id": attach_run_id,
        "attach_spool_id": attach_spool_id if not attach_run_id else None,
        "parent_run_id": parent_run_id,
        "parent_spool_id": parent_spool_id if not parent_run_id else None,
        "start_time": _now_ms(),
        "notebook": str(notebook) if notebook else None,
        "invocation": os.environ.get("MLOPS_INVOCATION_ID") or None,
        "pid": os.getpid(),
        "tags": all_tags,
    }
    spool_dir = config.resolved_spool_dir
    _flusher.prepare_spool_dir(spool_dir, config)
    for key, value in all_tags.items():
        _check_key("tag", key, set())
        _check_text("tag", key, value, MAX_TAG_VAL_LENGTH)
    writer = SpoolWriter(spool_dir / spool_id, header)
    run = Run(writer, header, config)
    try:
        if context:
            run.log_params(context.params)
            for artifact_dir, file_name, text in context.files:
                run.log_text(text, artifact_dir, file_name)
        if params:
            run.log_params(params)
    except BaseException:
        writer.close()  # a run that failed to start leaves nothing to upload
        shutil.rmtree(writer.run_dir, ignore_errors=True)
        raise
    _flusher.ensure_running(spool_dir, config)
    return run


def _end_at_exit() -> None:
    run = _active
    if run is not None and not run.ended:
        try:
            run.end()
        except Exception:  # interpreter shutdown: never turn an exit into a traceback
            pass


def active_run() -> Run | None:
    """The run being recorded, or None."""
    return _active if _active is not None and not _active.ended else None


def last_run() -> Run | None:
    """The active run, or the one that ended last in this process (for status and flush)."""
    return _active


def _require_active(action: str) -> Run:
    run = _active
    if run is None or run.ended:
        raise NoActiveRunError(action)
    return run


def end_run(status: str | None = None) -> str:
    return _require_active("end the run").end(status)


def log_metric(key: str, value: float, step: int | None = None, timestamp: int | None = None) -> None:
    run = _active
    if run is None:
        raise NoActiveRunError("log a metric")
    run.log_metric(key, value, step, timestamp)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    _require_active("log metrics").log_metrics(metrics, step)


def log_param(key: str, value: Any) -> None:
    _require_active("log a param").log_param(key, value)


def log_params(params: Mapping[str, Any]) -> None:
    _require_active("log params").log_params(params)


def set_tag(key: str, value: Any) -> None:
    _require_active("set a tag").set_tag(key, value)


def set_tags(tags: Mapping[str, Any]) -> None:
    _require_active("set tags").set_tags(tags)


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    _require_active("log an artifact").log_artifact(path, artifact_path)


def flush(timeout: float = 30.0) -> bool:
    """Wait until the active (or last) run's records are on the tracking server."""
    run = last_run()
    if run is None:
        return True
    return run.wait(timeout)
