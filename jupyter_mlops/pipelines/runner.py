"""Run a pipeline: the DAG in order, independent steps at once, each step on a fresh pooled kernel.

For each step, once the steps it needs are done:
  1. its cache key is computed (see :mod:`.cache`); a hit skips it (no kernel, no run);
  2. otherwise a child run is created in the tracking spool (never waiting for MLflow), a kernel
     is claimed from the pool, a setup snippet points the kernel's tracking at the step's run, and
     papermill executes the notebook there, cell progress reported as it goes;
  3. on success the declared outputs are versioned with DVC and recorded on the run, with the
     output notebook; the cache entry is written. On failure the partial output notebook is kept
     and logged, and the step is retried (with backoff) while retries remain.
Steps whose parents failed are ``blocked``. Ctrl-C (or SIGTERM through the CLI) cancels: running
kernels are interrupted, every kernel the pool started is shut down, runs end as KILLED.

The pipeline run and its steps are rows in the state store (:mod:`.state`); the MLflow parent run
and child runs are uploaded by the background flusher like any other run.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..config import MlopsConfig, load_config
from ..errors import MlopsError, PipelineSpecError
from . import cache
from .dag import Dag, build_dag
from .spec import PipelineSpec, StepSpec, load_pipeline
from .state import StateStore, dumps, open_store

__all__ = ["run_pipeline", "resume_pipeline", "PipelineResult", "StepResult", "STEP_STATES"]

log = logging.getLogger("jupyter_mlops.pipelines")

#: pending -> running -> succeeded | failed | cancelled; or cached (skipped by the cache),
#: blocked (a step it needs failed), kept (resume: reused from the run being resumed)
STEP_STATES = ("pending", "running", "succeeded", "failed", "cached", "blocked", "cancelled", "kept")
DONE_OK = frozenset({"succeeded", "cached", "kept"})


@dataclass
class StepResult:
    name: str
    status: str = "pending"
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    cell: tuple[int, int] | None = None
    error: str | None = None
    output_notebook: str | None = None
    cache_key: str | None = None
    spool_id: str | None = None
    cached_from: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # input path -> md5 the key was made of

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started


@dataclass
class PipelineResult:
    run_id: str
    pipeline: str
    file: str
    status: str = "running"  # running | succeeded | failed | cancelled
    started: float = field(default_factory=time.time)
    ended: float | None = None
    steps: dict[str, StepResult] = field(default_factory=dict)
    spool_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def count(self, status: str) -> int:
        return sum(1 for s in self.steps.values() if s.status == status)


class StepFailed(Exception):
    def __init__(self, message: str, output: Path | None = None) -> None:
        super().__init__(message)
        self.output = output


class Cancelled(Exception):
    pass


Listener = Callable[[PipelineResult, StepResult], None]


def run_pipeline(
    path: str | os.PathLike[str],
    *,
    parameters: Mapping[str, Any] | None = None,
    only: Iterable[str] = (),
    force: bool = False,
    workers: int | None = None,
    config: MlopsConfig | None = None,
    listener: Listener | None = None,
    schedule_id: str | None = None,
    kernel_name: str = "python3",
    retry_backoff: float = 1.0,
    pool: Any = None,
) -> PipelineResult:
    """Run the pipeline in ``path``. Returns its result; raises :class:`PipelineSpecError` for a
    pipeline that cannot run, and ``KeyboardInterrupt`` after a clean cancellation.

    ``pool``: a :class:`~jupyter_mlops.kernels.pool.KernelPool` of ``kernel_name`` kernels to take
    the steps' kernels from (its owner closes it); default: a pool of this run's own.
    """
    config = config or load_config()
    spec = load_pipeline(path, parameters)
    dag = build_dag(spec)
    selected = _select(spec, dag, only)
    runner = _Runner(spec, dag, config, selected=selected, force=force, workers=workers, listener=listener,
                     schedule_id=schedule_id, kernel_name=kernel_name, retry_backoff=retry_backoff,
                     parameters=dict(parameters or {}), options={"only": sorted(only), "force": force}, pool=pool)
    return runner.run()


def resume_pipeline(run_id: str, *, config: MlopsConfig | None = None, listener: Listener | None = None,
                    workers: int | None = None, kernel_name: str = "python3", retry_backoff: float = 1.0) -> PipelineResult:
    """Run again the steps of ``run_id`` that did not succeed, and everything downstream of them.

    The others are ``kept``: their outputs must still be the versions that run produced.
    """
    config = config or load_config()
    store = open_store(config.resolved_pipeline_state_url)
    rows = store.query("SELECT * FROM pipeline_runs WHERE id = ?", (run_id,))
    if not rows:
        recent = [r["id"] for r in store.query("SELECT id FROM pipeline_runs ORDER BY started DESC LIMIT 5")]
        raise MlopsError(f"no pipeline run {run_id!r}" + (f"; recent runs: {', '.join(recent)}" if recent else
                         "; no pipeline has run here yet") + " (jupyter mlops pipeline list)")
    row = rows[0]
    if row["status"] == "running":
        raise MlopsError(f"pipeline run {run_id} is still running (pid {row['pid']} on {row['host']}); "
                         "resume it once it has stopped")
    steps = {r["step"]: r for r in store.query("SELECT * FROM step_runs WHERE run_id = ?", (run_id,))}
    parameters = json.loads(row["parameters"])
    spec = load_pipeline(row["file"], parameters)
    dag = build_dag(spec)
    previous = set(steps) & set(spec.steps)
    redo = {name for name in previous if steps[name]["status"] not in DONE_OK}
    redo |= set(spec.steps) - previous if previous else set()
    if not redo:
        raise MlopsError(f"pipeline run {run_id} has nothing to resume: every step succeeded")
    options = json.loads(row["options"] or "{}")
    selected_before = set(previous)
    closure = dag.downstream(redo) & (selected_before | redo)
    kept = {name: steps[name] for name in selected_before - closure if steps[name]["status"] in DONE_OK}
    runner = _Runner(spec, dag, config, selected=closure, force=False, workers=workers, listener=listener,
                     schedule_id=row["schedule_id"], kernel_name=kernel_name, retry_backoff=retry_backoff,
                     parameters=parameters, options={**options, "resumed": run_id}, resumed_from=run_id, kept=kept)
    return runner.run()


def _select(spec: PipelineSpec, dag: Dag, only: Iterable[str]) -> set[str]:
    names: set[str] = set()
    for wanted in only:
        matched = spec.step_names(wanted) or ([wanted] if wanted in spec.steps else [])
        if not matched:
            known = ", ".join(sorted({s.base for s in spec.steps.values()}))
            raise PipelineSpecError(str(spec.file), None, f"--only {wanted}: no such step (steps: {known})")
        names.update(matched)
    return names or set(spec.steps)


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class _Runner:
    def __init__(self, spec: PipelineSpec, dag: Dag, config: MlopsConfig, *, selected: set[str], force: bool,
                 workers: int | None, listener: Listener | None, schedule_id: str | None, kernel_name: str,
                 retry_backoff: float, parameters: dict[str, Any], options: dict[str, Any],
                 resumed_from: str | None = None, kept: Mapping[str, Mapping[str, Any]] | None = None,
                 pool: Any = None) -> None:
        self.spec = spec
        self.dag = dag
        self.config = config
        self.selected = selected
        self.force = force
        self.workers = workers or config.pipeline_workers or spec.workers
        self.listener = listener
        self.kernel_name = kernel_name
        self.retry_backoff = retry_backoff
        self.base = spec.file.parent
        self.store: StateStore = open_store(config.resolved_pipeline_state_url)
        self.result = PipelineResult(_new_run_id(), spec.name, str(spec.file))
        for name in dag.order():
            if name in selected:
                self.result.steps[name] = StepResult(name)
        self.kept = dict(kept or {})
        for name, row in self.kept.items():
            self.result.steps[name] = StepResult(name, status="kept", cached_from=resumed_from,
                                                 spool_id=row.get("spool_id"), cache_key=row.get("cache_key"))
        self.schedule_id = schedule_id
        self.parameters = parameters
        self.options = options
        self.resumed_from = resumed_from
        self.cancel = threading.Event()
        self.pool: Any = pool
        self._own_pool = pool is None
        self._pool_lock = threading.Lock()
        self._running: dict[str, Any] = {}  # step -> claimed kernel
        self.parent: Any = None  # the pipeline's tracking run
        self._tracking_started = False
        self._first_claim = threading.Event()
        self._tracking_lock = threading.Lock()
        self.context: Any = None
        self.outputs_dir = config.embedded_dir / "pipelines" / self.result.run_id

    # -- the whole run ----------------------------------------------------------------------------

    def run(self) -> PipelineResult:
        self._record_start()
        if self.force or self._likely_misses():
            self._ensure_pool()
            self._prewarm_data()
        try:
            self._loop()
        except KeyboardInterrupt:
            self._finish("cancelled")
            raise
        except BaseException:
            self._finish("failed")
            raise
        self._finish("succeeded" if all(s.status in DONE_OK for s in self.result.steps.values()) else "failed")
        return self.result

    def _loop(self) -> None:
        result = self.result
        pending = [n for n in result.steps if result.steps[n].status == "pending"]
        with futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="mlops-step") as executor:
            running: dict[futures.Future[None], str] = {}
            try:
                while pending or running:
                    progressed = True
                    while progressed:
                        progressed = False
                        for name in list(pending):
                            state = self._readiness(name)
                            if state == "wait":
                                continue
                            pending.remove(name)
                            progressed = True
                            if state == "blocked":
                                self._set(name, "blocked", error="a step it needs did not succeed")
                            elif not self._decided_without_running(name):
                                self._ensure_pool()  # queued steps wait for a free worker
                                running[executor.submit(self._run_step, name)] = name
                    if not running:
                        if pending:  # nothing runs and nothing can start: unreachable with a valid DAG
                            for name in pending:
                                self._set(name, "blocked", error="its inputs never became ready")
                            pending.clear()
                        break
                    done, _ = futures.wait(list(running), return_when=futures.FIRST_COMPLETED)
                    for fut in done:
                        running.pop(fut)
                        fut.result()  # _run_step records its own failures; this re-raises our bugs
            except BaseException:
                for fut in running:
                    fut.cancel()
                self._cancel_all()  # kills the kernels, so the workers return at once
                raise

    def _readiness(self, name: str) -> str:
        for parent in self.dag.parents[name]:
            step = self.result.steps.get(parent)
            if step is None:
                continue  # not selected (--only): its outputs are taken as they are
            if step.status in ("pending", "running"):
                return "wait"
            if step.status not in DONE_OK:
                return "blocked"
        return "ready"

    # -- cache ------------------------------------------------------------------------------------

    def _prewarm_data(self) -> None:
        """Import papermill at once and DVC once the first kernel is claimed (together they are
        seconds of CPU that would otherwise fall inside the first steps; on a small machine they
        must not slow the first kernel's start either)."""
        versioned = any(self.spec.steps[n].outputs for n, s in self.result.steps.items() if s.status == "pending")

        def load() -> None:
            import importlib

            try:  # this thread only (Linux: a thread is a task): the steps' kernels go first
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            except (AttributeError, OSError):
                pass
            try:
                for name in ("papermill", "nbclient", "jupyter_mlops.pipelines.notebook"):
                    importlib.import_module(name)
                if not versioned or not self._first_claim.wait(300) or self.cancel.is_set():
                    return
                from ..data import api

                with cache.DATA_LOCK:
                    api._project(self.base).repo  # noqa: B018 - opens the DVC repo (and imports dvc)
            except Exception:  # only a head start: the real use reports any problem
                return

        threading.Thread(target=load, name="mlops-prewarm", daemon=True).start()

    def _likely_misses(self) -> bool:
        """Start kernels right away unless every selected step has a cache entry (a no-op re-run
        then starts none). A wrong guess costs a delayed kernel start, never a wrong result."""
        names = [n for n, s in self.result.steps.items() if s.status == "pending"]
        if not names:
            return False
        rows = self.store.query("SELECT step FROM step_cache WHERE pipeline_file = ?", (str(self.spec.file),))
        return bool(set(names) - {r["step"] for r in rows})

    def _decided_without_running(self, name: str) -> bool:
        """True when the step is settled here: a cache hit, or an input is missing (failed)."""
        step = self.spec.steps[name]
        try:
            inputs = cache.input_versions(step, self.base)
        except MlopsError as e:
            self._set(name, "failed", error=str(e))
            return True  # handled: never runs
        key = cache.step_key(step, inputs)
        self.result.steps[name].cache_key = key
        self.result.steps[name].inputs = inputs
        if self.force:
            return False
        rows = self.store.query("SELECT * FROM step_cache WHERE pipeline_file = ? AND step = ?",
                                (str(self.spec.file), name))
        if not rows or rows[0]["cache_key"] != key:
            return False
        entry = cache.CacheEntry(key, json.loads(rows[0]["outputs"]), rows[0]["run_id"], rows[0]["spool_id"])
        if not cache.outputs_unchanged(entry, self.base):
            return False
        self._set(name, "cached", cached_from=entry.run_id, spool_id=entry.spool_id)
        return True

    # -- one step ---------------------------------------------------------------------------------

    def _run_step(self, name: str) -> None:
        step = self.spec.steps[name]
        res = self.result.steps[name]
        self._set(name, "running", started=time.time())
        run = self._step_run(step, res)
        output: Path | None = None
        try:
            for attempt in range(1, step.retries + 2):
                if self.cancel.is_set():
                    raise Cancelled()
                res.attempts = attempt
                self._save_step(res)
                try:
                    output = self._attempt(step, res, run, attempt)
                    break
                except StepFailed as e:
                    output = e.output or output
                    res.error = str(e)
                    if attempt > step.retries or self.cancel.is_set():
                        raise
                    delay = self.retry_backoff * 2 ** (attempt - 1)
                    log.info("step %s failed (attempt %d of %d), retrying in %.1f s: %s",
                             name, attempt, step.retries + 1, delay, e)
                    self._notify_listener(res)
                    if self.cancel.wait(delay):
                        raise Cancelled() from None
            versions = self._version_outputs(step)
            if run is not None:
                for version in versions:
                    run.log_dataset(version.to_json(), "output")
                self._log_notebook(run, output)
                run.end("FINISHED", log_notebook=False)
            self._store_cache(step, res, versions)
            res.output_notebook = str(output) if output else None
            self._set(name, "succeeded", ended=time.time(), error=None)
        except Cancelled:
            self._end_run(run, output, "KILLED", "cancelled")
            self._set(name, "cancelled", ended=time.time(), error="cancelled")
        except StepFailed as e:
            self._end_run(run, e.output or output, "FAILED", str(e))
            res.output_notebook = str(e.output or output) if (e.output or output) else None
            self._set(name, "failed", ended=time.time(), error=str(e))
        except MlopsError as e:  # versioning the outputs failed, a kernel could not start, ...
            if self.cancel.is_set():
                self._end_run(run, output, "KILLED", "cancelled")
                self._set(name, "cancelled", ended=time.time(), error="cancelled")
            else:
                self._end_run(run, output, "FAILED", str(e))
                self._set(name, "failed", ended=time.time(), error=str(e))

    def _attempt(self, step: StepSpec, res: StepResult, run: Any, attempt: int) -> Path:
        from ..kernels.pool import KernelStartError
        from .notebook import execute_on_kernel

        out = self.outputs_dir / (f"{_safe(step.name)}.ipynb" if attempt == 1 else f"{_safe(step.name)}.attempt{attempt}.ipynb")
        out.parent.mkdir(parents=True, exist_ok=True)
        pool = self._ensure_pool()
        # keep only as many kernels starting as there are steps left to claim them
        if self._own_pool:
            pool.size = min(self.workers, self._frontier())
        try:
            kernel = pool.claim()
        except KernelStartError as e:
            raise StepFailed(str(e)) from e
        self._first_claim.set()
        self._running[step.name] = kernel
        timer = None
        timed_out = threading.Event()
        if step.timeout:
            def expire() -> None:
                timed_out.set()
                pool.interrupt(kernel)
                grace = threading.Timer(5.0, lambda: pool.release_soon(kernel))
                grace.daemon = True
                grace.start()
            timer = threading.Timer(step.timeout, expire)
            timer.daemon = True
            timer.start()
        try:
            failure = execute_on_kernel(
                step.notebook, out, step.parameters, kernel.manager, self.kernel_name,
                setup=self._setup_code(step, res, out),
                on_cell=lambda n, m: self._cell(res, n, m),
            )
        except Exception as e:  # the kernel died, was shut down (timeout, Ctrl-C), or papermill failed
            if self.cancel.is_set():
                raise Cancelled() from e
            if timed_out.is_set():
                raise StepFailed(f"timed out after {step.timeout:g} s; the partial output is in {out}", out) from e
            raise StepFailed(f"{type(e).__name__}: {e}; the partial output is in {out}", out) from e
        finally:
            if timer is not None:
                timer.cancel()
            self._running.pop(step.name, None)
            pool.release_soon(kernel)
        if failure is not None:
            if self.cancel.is_set():
                raise Cancelled()
            if timed_out.is_set():
                raise StepFailed(f"timed out after {step.timeout:g} s in cell {failure.cell_index}; "
                                 f"the partial output is in {out}", out)
            raise StepFailed(f"cell {failure.cell_index} raised {failure.error}; the partial output is in {out}", out)
        missing = [rel for rel in step.outputs if not (self.base / rel).exists()]
        if missing:
            raise StepFailed(f"the notebook ran but did not write its declared output(s) {', '.join(missing)}", out)
        return out

    def _setup_code(self, step: StepSpec, res: StepResult, out: Path) -> str:
        from .notebook import _parameters_json

        # A pooled kernel started before this run existed: everything it must know comes here.
        env = {
            "MLOPS_PROJECT_ROOT": str(self.config.root),
            "MLOPS_SPOOL_DIR": str(self.config.resolved_spool_dir),
            "MLFLOW_TRACKING_URI": self.config.resolved_tracking_uri,
            "MLOPS_NOTEBOOK_PATH": str(step.notebook),
            "MLOPS_OUTPUT_NOTEBOOK_PATH": str(out),
            "MLOPS_INVOCATION_ID": f"{self.result.run_id}:{step.name}",
            "MLOPS_PIPELINE_RUN_ID": self.result.run_id,
            "MLOPS_STEP": step.name,
            "MLOPS_NOTEBOOK_PARAMETERS": _parameters_json(step.notebook, step.parameters),
        }
        if res.spool_id:
            env["MLOPS_ATTACH_SPOOL_ID"] = res.spool_id
        return f"import os as _os\n_os.environ.update({json.dumps(env)})\n_os.chdir({json.dumps(str(self.base))})\ndel _os"

    def _cell(self, res: StepResult, n: int, m: int) -> None:
        res.cell = (n, m)
        self._notify_listener(res)

    def _version_outputs(self, step: StepSpec) -> list[Any]:
        if not step.outputs:
            return []
        from ..data import api

        with cache.DATA_LOCK:
            try:
                return api.add(*[self.base / rel for rel in step.outputs], record=False, start=self.base)
            except MlopsError as e:
                raise MlopsError(f"step {step.name}: its outputs could not be versioned: {e}") from e

    def _store_cache(self, step: StepSpec, res: StepResult, versions: list[Any]) -> None:
        if res.cache_key is None:
            return
        outputs = {rel: v.md5 for rel, v in zip(step.outputs, versions)}
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM step_cache WHERE pipeline_file = ? AND step = ?", (str(self.spec.file), step.name))
            tx.execute("INSERT INTO step_cache (pipeline_file, step, cache_key, outputs, run_id, spool_id, created) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (str(self.spec.file), step.name, res.cache_key, dumps(outputs), self.result.run_id,
                        res.spool_id, time.time()))

    # -- kernels ----------------------------------------------------------------------------------

    def _ensure_pool(self) -> Any:
        with self._pool_lock:
            if self.pool is None:
                from ..kernels.pool import KernelPool

                to_run = sum(1 for s in self.result.steps.values() if s.status == "pending")
                self.pool = KernelPool(self.kernel_name, size=max(1, min(self.workers, to_run)), cwd=self.base)
            return self.pool


    def _frontier(self) -> int:
        """Steps that will want a kernel soon: pending, with everything they need running or
        done. Kernels for steps further down would only take CPU from the running ones."""
        soon = 0
        for name, res in self.result.steps.items():
            if res.status != "pending":
                continue
            parents = [self.result.steps.get(p) for p in self.dag.parents[name]]
            if all(p is None or p.status in ("running", *DONE_OK) for p in parents):
                soon += 1
        return soon

    def _interrupt_running(self) -> None:
        pool = self.pool
        if pool is None:
            return
        for kernel in list(self._running.values()):
            pool.interrupt(kernel)

    def _cancel_all(self) -> None:
        self.cancel.set()
        self._interrupt_running()
        if self.pool is not None:
            if self._own_pool:
                self.pool.close()  # every kernel it started, claimed or not, is shut down
            else:
                for kernel in list(self._running.values()):
                    self.pool.release(kernel, now=True)
        for res in self.result.steps.values():
            if res.status in ("pending", "running"):
                self._set(res.name, "cancelled", ended=time.time(), error="cancelled")

    # -- tracking ---------------------------------------------------------------------------------

    def _start_tracking(self) -> None:
        """The MLflow parent run, made when the first step is about to run: a run where every step
        is cached or kept did no work, and is recorded in the pipeline state only."""
        from ..tracking.context import capture
        from ..tracking.run import create_run

        self.context = capture(None, cwd=self.base)
        tags = {"mlops.pipeline.name": self.spec.name, "mlops.pipeline.file": str(self.spec.file),
                "mlops.pipeline.run_id": self.result.run_id}
        if self.schedule_id:
            tags["mlops.schedule.id"] = self.schedule_id
        if self.resumed_from:
            tags["mlops.pipeline.resumed_from"] = self.resumed_from
        try:
            self.parent = create_run(self._experiment(), f"{self.spec.name} {self.result.run_id}", tags=tags,
                                     params={k: json.dumps(v) if not isinstance(v, str) else v
                                             for k, v in self.spec.parameters.items()} | {
                                                 f"-p {k}": str(v) for k, v in self.parameters.items()},
                                     notebook=None, context=self.context, config=self.config)
        except MlopsError as e:
            log.warning("pipeline %s: not tracked (%s)", self.spec.name, e)
            self.parent = None
            return
        self.result.spool_id = self.parent.spool_id
        with self.store.transaction() as tx:
            tx.execute("UPDATE pipeline_runs SET spool_id = ? WHERE id = ?", (self.parent.spool_id, self.result.run_id))

    def _experiment(self) -> str:
        return self.config.experiment_for(str(self.spec.file.with_suffix("")))

    def _step_run(self, step: StepSpec, res: StepResult) -> Any:
        with self._tracking_lock:
            if self.parent is None and not self._tracking_started:
                self._tracking_started = True
                self._start_tracking()
        if self.parent is None:
            return None
        from ..tracking.run import create_run

        tags = dict(self.context.tags) if self.context else {}
        tags.update({"mlops.pipeline.name": self.spec.name, "mlops.pipeline.run_id": self.result.run_id,
                     "mlops.step": step.name, "mlops.step.base": step.base, "mlops.cache_key": res.cache_key or "",
                     "mlflow.source.name": str(step.notebook), "mlflow.source.type": "NOTEBOOK",
                     "mlops.notebook.path": str(step.notebook)})
        params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in step.parameters.items()}
        try:
            run = create_run(self.parent.header["experiment"], step.name, tags=tags, params=params,
                             notebook=step.notebook, parent_spool_id=self.parent.spool_id, config=self.config)
        except MlopsError as e:
            log.warning("step %s: not tracked (%s)", step.name, e)
            return None
        res.spool_id = run.spool_id
        for rel in res.inputs:
            try:
                from ..data import api

                with cache.DATA_LOCK:
                    version = api.version(self.base / rel, start=self.base)
                run.log_dataset(version.to_json(), "input")
            except MlopsError:
                pass  # not a DVC-versioned input: its content md5 is in the cache key only
        return run

    def _log_notebook(self, run: Any, output: Path | None) -> None:
        if run is not None and output is not None and output.is_file():
            try:
                run.log_artifact(output, "notebook")
            except MlopsError as e:
                log.warning("output notebook %s not logged: %s", output, e)

    def _end_run(self, run: Any, output: Path | None, status: str, error: str) -> None:
        if run is None or run.ended:
            return
        self._log_notebook(run, output)
        try:
            run.set_tag("mlops.error", error[:8000])
        except MlopsError:
            pass
        run.end(status, log_notebook=False)

    # -- state ------------------------------------------------------------------------------------

    def _record_start(self) -> None:
        r = self.result
        with self.store.transaction() as tx:
            tx.execute("INSERT INTO pipeline_runs (id, pipeline, file, status, started, parameters, options, "
                       "resumed_from, schedule_id, host, pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (r.run_id, r.pipeline, r.file, "running", r.started, dumps(self.parameters),
                        dumps(self.options), self.resumed_from, self.schedule_id, socket.gethostname(), os.getpid()))
            for res in r.steps.values():
                tx.execute("INSERT INTO step_runs (run_id, step, status, cache_key, spool_id, cached_from) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (r.run_id, res.name, res.status, res.cache_key, res.spool_id, res.cached_from))

    def _set(self, name: str, status: str, **changes: Any) -> None:
        res = self.result.steps[name]
        res.status = status
        for key, value in changes.items():
            setattr(res, key, value)
        if status in ("cached", "blocked", "failed", "cancelled") and res.ended is None:
            res.ended = time.time()
            if res.started is None:
                res.started = res.ended
        self._save_step(res)
        self._notify_listener(res)

    def _save_step(self, res: StepResult) -> None:
        with self.store.transaction() as tx:
            tx.execute("UPDATE step_runs SET status = ?, cache_key = ?, started = ?, ended = ?, attempts = ?, "
                       "output_notebook = ?, error = ?, spool_id = ?, cached_from = ? WHERE run_id = ? AND step = ?",
                       (res.status, res.cache_key, res.started, res.ended, res.attempts, res.output_notebook,
                        res.error, res.spool_id, res.cached_from, self.result.run_id, res.name))

    def _notify_listener(self, res: StepResult) -> None:
        if self.listener is not None:
            try:
                self.listener(self.result, res)
            except Exception:  # a display problem must not fail the pipeline
                log.exception("progress display failed")

    def _finish(self, status: str) -> None:
        r = self.result
        r.status = status
        r.ended = time.time()
        if self.pool is not None and self._own_pool:
            self.pool.close()
        if self.parent is not None and not self.parent.ended:
            counts = {s: r.count(s) for s in STEP_STATES if r.count(s)}
            try:
                self.parent.set_tags({f"mlops.steps.{k}": str(v) for k, v in counts.items()})
                for res in r.steps.values():
                    if res.status in ("cached", "kept") and res.cached_from:
                        self.parent.set_tag(f"mlops.cached.{_safe(res.name)}", res.cached_from)
            except MlopsError:
                pass
            self.parent.end({"succeeded": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"), log_notebook=False)
        with self.store.transaction() as tx:
            tx.execute("UPDATE pipeline_runs SET status = ?, ended = ? WHERE id = ?", (status, r.ended, r.run_id))
        if status == "failed" and self.config.pipeline_webhook_url:
            from .notify import notify_failure

            notify_failure(self.config.pipeline_webhook_url, r)
