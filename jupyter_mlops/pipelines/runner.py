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
kernels are interrupted, every kernel the pool started is shut down, runs end as KILLED. So does
``pipeline cancel`` from any host (its request is seen by the run's heartbeat, see :mod:`.runlock`).
One run per pipeline file at a time: a second one waits for the first, or refuses (``wait=False``).

The pipeline run and its steps are rows in the state store (:mod:`.state`); the MLflow parent run
and child runs are uploaded by the background flusher like any other run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..config import MlopsConfig, load_config
from ..errors import MlopsError, PipelineSpecError
from . import cache
from .dag import Dag, build_dag
from .executor import (
    Cancelled,
    KernelChoice,
    StepExecutor,
    StepFailed,
    create_executor,
    kernel_choice,
)
from .history import RunHistory
from .paths import notebook_file
from .prewarm import import_kernel_modules, start_prewarm
from .recording import PipelineRecorder
from .runlock import Heartbeat, start_run
from .results import DONE_OK, STEP_STATES, PipelineResult, StepResult
from .spec import PipelineSpec, StepSpec, load_pipeline
from .state import open_store

__all__ = ["run_pipeline", "resume_pipeline", "PipelineResult", "StepResult", "STEP_STATES"]

log = logging.getLogger("jupyter_mlops.pipelines")

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
    kernel_name: str | None = None,
    retry_backoff: float = 1.0,
    pool: Any = None,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    cancel_signal: bool = False,
    logical_date: str | None = None,
) -> PipelineResult:
    """Run the pipeline in ``path``. Returns its result (status ``cancelled`` after ``pipeline
    cancel``); raises :class:`PipelineSpecError` for a pipeline that cannot run, and
    ``KeyboardInterrupt`` after a clean cancellation by Ctrl-C.

    ``config``: default, the settings of the pipeline file's project (wherever this is run from).
    ``kernel_name``: the kernel spec of steps that name no kernel, environment or profile (default:
    each notebook's own). ``pool``: a :class:`~jupyter_mlops.kernels.pool.KernelPool` to take the
    kernels of steps on its spec from (its owner closes it); default: pools of this run's own.
    While another run of this pipeline file goes, ``wait`` for it (telling ``on_wait`` once, default
    the log) or, without ``wait``, raise :class:`~jupyter_mlops.errors.PipelineBusyError`.
    ``cancel_signal``: this process turns SIGTERM into a clean cancel (the CLI does), so ``pipeline
    cancel`` on this host may send one instead of waiting for the heartbeat to see its request.
    ``logical_date``: the time a scheduled run stands for (ISO 8601, the schedule's zone), given as
    the parameter ``logical_date`` to the steps whose notebooks declare it, unless ``-p`` sets it.
    """
    config = config or load_config(folder=Path(path).resolve().parent)
    spec = load_pipeline(path, parameters, kernel=kernel_name, max_steps=config.pipeline_max_steps)
    _set_logical_date(spec, logical_date, parameters or {})
    dag = build_dag(spec)
    selected = _select(spec, dag, only)
    _check_versionable(spec, selected)
    runner = _Runner(spec, dag, config, selected=selected, force=force, workers=workers, listener=listener,
                     schedule_id=schedule_id, kernel_name=kernel_name, retry_backoff=retry_backoff,
                     parameters=dict(parameters or {}), pool=pool, options={
                         "only": sorted(only), "force": force, "kernel": kernel_name,
                         **({"logical_date": logical_date} if logical_date else {})})
    return runner.run(wait=wait, on_wait=on_wait, cancel_signal=cancel_signal)


def resume_pipeline(run_id: str, *, config: MlopsConfig | None = None, listener: Listener | None = None,
                    workers: int | None = None, kernel_name: str | None = None, retry_backoff: float = 1.0,
                    wait: bool = True, on_wait: Callable[[str], None] | None = None,
                    cancel_signal: bool = False) -> PipelineResult:
    """Run again the steps of ``run_id`` that did not succeed, and everything downstream of them.

    The others are ``kept`` when their outputs are still the versions that run recorded; a step
    whose outputs changed since (or were never recorded) runs again too, with what follows it. A
    run whose runner died (still ``running`` in the store) is marked ``crashed`` and resumed.
    ``kernel_name``: as for :func:`run_pipeline`; default, the one that run was given.
    ``wait``, ``on_wait``, ``cancel_signal``: as for :func:`run_pipeline`.
    """
    config = config or load_config()
    history = RunHistory(open_store(config.resolved_pipeline_state_url))
    row = history.run(run_id)
    if row is None:
        raise MlopsError(f"no pipeline run {run_id!r}; {history.unknown_run_hint()} (jupyter mlops pipeline list)")
    row = history.settle(row)
    if row["status"] == "running":
        raise MlopsError(f"pipeline run {run_id} is still running (pid {row['pid']} on {row['host']}); "
                         "resume it once it has stopped")
    steps = {r["step"]: r for r in history.steps(run_id)}
    parameters = json.loads(row["parameters"])
    options = json.loads(row["options"] or "{}")
    kernel_name = kernel_name or options.get("kernel")
    spec = load_pipeline(row["file"], parameters, kernel=kernel_name, max_steps=config.pipeline_max_steps)
    _set_logical_date(spec, options.get("logical_date"), parameters)  # the same date as the run it resumes
    dag = build_dag(spec)
    previous = set(steps) & set(spec.steps)  # the steps that run selected (all, or its --only)
    redo = {name for name in previous if steps[name]["status"] not in DONE_OK}
    redo |= {name for name in previous - redo if not _outputs_hold(spec.steps[name], steps[name], spec.file.parent)}
    if not redo:
        raise MlopsError(f"pipeline run {run_id} has nothing to resume: every step succeeded")
    closure = dag.downstream(redo) & previous
    kept = {name: steps[name] for name in previous - closure}
    runner = _Runner(spec, dag, config, selected=closure, force=False, workers=workers, listener=listener,
                     schedule_id=row["schedule_id"], kernel_name=kernel_name, retry_backoff=retry_backoff,
                     parameters=parameters, options={**options, "resumed": run_id, "kernel": kernel_name}, resumed_from=run_id, kept=kept)
    return runner.run(wait=wait, on_wait=on_wait, cancel_signal=cancel_signal)


def _outputs_hold(step: StepSpec, row: Mapping[str, Any], base: Path) -> bool:
    """The step's outputs still have the md5s its run recorded (none recorded: only a step without
    outputs holds)."""
    recorded = json.loads(row["outputs"]) if row.get("outputs") else None
    if recorded is None:
        return not step.outputs
    return all(cache.version_md5(base / rel, base) == md5 for rel, md5 in recorded.items())


def _set_logical_date(spec: PipelineSpec, logical_date: str | None, parameters: Mapping[str, Any]) -> None:
    """A scheduled run's fire time, for the notebooks that declare ``logical_date`` (a ``-p`` of it,
    as for a backfill, wins). It is a parameter like any: in the step's cache key, so a step that
    reads it runs again for each new date."""
    if logical_date is None or any(name.rpartition(".")[2] == "logical_date" for name in parameters):
        return
    for step in spec.steps.values():
        if "logical_date" in step.defaults:
            step.parameters["logical_date"] = logical_date


def _select(spec: PipelineSpec, dag: Dag, only: Iterable[str]) -> set[str]:
    names: set[str] = set()
    for wanted in only:
        matched = spec.step_names(wanted) or ([wanted] if wanted in spec.steps else [])
        if not matched:
            known = ", ".join(sorted({s.base for s in spec.steps.values()}))
            raise PipelineSpecError(str(spec.file), None, f"--only {wanted}: no such step (steps: {known})")
        names.update(matched)
    return names or set(spec.steps)


def _check_versionable(spec: PipelineSpec, names: set[str]) -> None:
    """Outputs are versioned with DVC: say so before anything runs, not after the first step."""
    from ..data.dvc_client import find_dvc_root

    if any(spec.steps[n].outputs for n in names) and find_dvc_root(spec.file.parent) is None:
        raise MlopsError(f"{spec.file.parent} is not in a DVC project, and the steps' outputs are versioned "
                         "with DVC: run `jupyter mlops init` there first (git, DVC and a local remote)")


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


class _Runner:
    def __init__(self, spec: PipelineSpec, dag: Dag, config: MlopsConfig, *, selected: set[str], force: bool,
                 workers: int | None, listener: Listener | None, schedule_id: str | None, kernel_name: str | None,
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
        self.history = RunHistory(open_store(config.resolved_pipeline_state_url))
        self.cancel = threading.Event()
        self.result = PipelineResult(_new_run_id(), spec.name, str(spec.file))
        for name in dag.order():
            if name in selected:
                self.result.steps[name] = StepResult(name)
        self.kept = dict(kept or {})
        for name, row in self.kept.items():
            self.result.steps[name] = StepResult(name, status="kept", cached_from=resumed_from,
                                                 spool_id=row.get("spool_id"), cache_key=row.get("cache_key"),
                                                 outputs=json.loads(row["outputs"]) if row.get("outputs") else None)
        self.schedule_id = schedule_id
        self.parameters = parameters
        self.options = options
        self.resumed_from = resumed_from
        self.outputs_dir = config.embedded_dir / "pipelines" / self.result.run_id
        self.executor: StepExecutor = create_executor(
            config.pipeline_executor, base=self.base, kernel_name=kernel_name, workers=self.workers,
            cancel=self.cancel, work_dir=self.outputs_dir, **({"pool": pool} if pool is not None else {}))
        self.recorder = PipelineRecorder(spec, config, self.result.run_id, parameters=parameters,
                                         schedule_id=schedule_id, resumed_from=resumed_from)

    # -- the whole run ----------------------------------------------------------------------------

    def run(self, *, wait: bool = True, on_wait: Callable[[str], None] | None = None,
            cancel_signal: bool = False) -> PipelineResult:
        try:
            start_run(self.history, self.result, wait=wait, on_wait=on_wait or log.warning, cancel=self.cancel,
                      parameters=self.parameters, options=self.options, resumed_from=self.resumed_from,
                      schedule_id=self.schedule_id, cancel_signal=cancel_signal)
        except BaseException:
            self.executor.close()
            raise
        self.heartbeat = Heartbeat(self.history, self.result.run_id, self._cancel_requested).start()
        try:  # from here on, whatever happens ends the run (and releases the pipeline)
            if self.force or self._likely_misses():
                pending = [n for n, s in self.result.steps.items() if s.status == "pending"]
                import_kernel_modules()  # before any thread of the run starts (see .prewarm)
                self.executor.prepare(len(pending), self._kernels(pending))
                self._prewarm_data()
            self._loop()
        except KeyboardInterrupt:
            self._finish("cancelled")
            raise
        except BaseException:
            self._finish("failed")
            raise
        if self.cancel.is_set():  # `pipeline cancel`
            self._finish("cancelled")
        else:
            self._finish("succeeded" if all(s.status in DONE_OK for s in self.result.steps.values()) else "failed")
        return self.result

    def _cancel_requested(self) -> None:
        """From the heartbeat thread: stop the running cells; the loop starts nothing more."""
        log.info("pipeline run %s: cancel requested", self.result.run_id)
        self.cancel.set()
        self.executor.interrupt()
        self.executor.close()  # as for Ctrl-C: a step claiming a kernel right now gets none

    def _loop(self) -> None:
        result = self.result
        pending = [n for n in result.steps if result.steps[n].status == "pending"]
        import concurrent.futures as futures  # here: a no-op re-run never needs it (10 ms)

        with futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="mlops-step") as executor:
            running: dict[futures.Future[None], str] = {}
            try:
                while pending or running:
                    if self.cancel.is_set():  # cancelled from elsewhere: what has not started never will
                        for name in pending:
                            self._set(name, "cancelled", error="cancelled")
                        pending.clear()
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
                                # queued steps wait for a free worker
                                running[executor.submit(self._run_step, name)] = name
                    if not running:
                        if pending:  # nothing runs and nothing can start: unreachable with a valid DAG
                            for name in pending:
                                self._set(name, "blocked", error="its inputs never became ready")
                            pending.clear()
                        break
                    # With a timeout: a SIGINT/SIGTERM that the OS delivers to another thread (a
                    # worker, the heartbeat) only sets a flag, and a main thread blocked without one
                    # would run the handler (Ctrl-C, `pipeline cancel`) when a step ends, maybe never.
                    done, _ = futures.wait(list(running), timeout=0.5, return_when=futures.FIRST_COMPLETED)
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
        """Papermill now and DVC after the first claim, in the background (see :mod:`.prewarm`)."""
        versioned = any(self.spec.steps[n].outputs for n, s in self.result.steps.items() if s.status == "pending")
        start_prewarm(self.executor, self.base, versioned=versioned, cancel=self.cancel)

    def _likely_misses(self) -> bool:
        """Start kernels right away unless every selected step has a cache entry (a no-op re-run
        then starts none). A wrong guess costs a delayed kernel start, never a wrong result."""
        names = [n for n, s in self.result.steps.items() if s.status == "pending"]
        if not names:
            return False
        if not all(self.spec.steps[n].cache for n in names):
            return True
        return bool(set(names) - self.history.cached_steps(str(self.spec.file)))

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
        if self.force or not step.cache:
            return False
        entry = self.history.cache_entry(str(self.spec.file), name)
        if entry is None or entry.key != key or not cache.outputs_unchanged(entry, self.base):
            return False
        self._set(name, "cached", cached_from=entry.run_id, spool_id=entry.spool_id, outputs=dict(entry.outputs))
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
                self.history.save_step(self.result.run_id, res)
                try:
                    output = self._attempt(step, res, attempt)
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
            self.recorder.succeeded(run, output, versions)
            self._store_cache(step, res, versions)
            res.output_notebook = str(output) if output else None
            self._set(name, "succeeded", ended=time.time(), error=None)
        except Cancelled:
            self.recorder.ended(run, output, "KILLED", "cancelled")
            self._set(name, "cancelled", ended=time.time(), error="cancelled")
        except StepFailed as e:
            res.output_notebook = str(e.output or output) if (e.output or output) else None
            if self.cancel.is_set():  # it failed because the run is being cancelled
                self.recorder.ended(run, e.output or output, "KILLED", "cancelled")
                self._set(name, "cancelled", ended=time.time(), error="cancelled")
            else:
                self.recorder.ended(run, e.output or output, "FAILED", str(e))
                self._set(name, "failed", ended=time.time(), error=str(e))
        except MlopsError as e:  # versioning the outputs failed, a kernel could not start, ...
            if self.cancel.is_set():
                self.recorder.ended(run, output, "KILLED", "cancelled")
                self._set(name, "cancelled", ended=time.time(), error="cancelled")
            else:
                self.recorder.ended(run, output, "FAILED", str(e))
                self._set(name, "failed", ended=time.time(), error=str(e))

    def _attempt(self, step: StepSpec, res: StepResult, attempt: int) -> Path:
        stem = notebook_file(step.name)
        out = self.outputs_dir / (f"{stem}.ipynb" if attempt == 1 else f"{stem}.attempt{attempt}.ipynb")
        out.parent.mkdir(parents=True, exist_ok=True)
        soon = self._frontier()
        self.executor.expect(len(soon), self._kernels(soon))
        self.executor.run(step, self._step_env(step, res, out), out, lambda n, m: self._cell(res, n, m))
        missing = [rel for rel in step.outputs if not (self.base / rel).exists()]
        if missing:
            raise StepFailed(f"the notebook ran but did not write its declared output(s) {', '.join(missing)}", out)
        return out

    def _step_env(self, step: StepSpec, res: StepResult, out: Path) -> dict[str, str]:
        """What the step's process must know: where to track, which run is its own."""
        from .notebook import _parameters_json

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
        return env

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
        if res.cache_key is not None:
            outputs = {rel: v.md5 for rel, v in zip(step.outputs, versions)}
            res.outputs = outputs  # saved on the step run too: a later run overwrites the cache entry
            entry = cache.CacheEntry(res.cache_key, outputs, self.result.run_id, res.spool_id)
            self.history.store_cache(str(self.spec.file), step.name, entry)

    # -- kernels ----------------------------------------------------------------------------------

    def _frontier(self) -> list[str]:
        """Steps that will want a kernel soon: pending, with everything they need running or
        done. Kernels for steps further down would only take CPU from the running ones."""
        soon = []
        for name, res in self.result.steps.items():
            if res.status != "pending":
                continue
            parents = [self.result.steps.get(p) for p in self.dag.parents[name]]
            if all(p is None or p.status in ("running", *DONE_OK) for p in parents):
                soon.append(name)
        return soon

    def _kernels(self, names: Iterable[str]) -> dict[KernelChoice, int]:
        """How many of ``names`` want a kernel of each (environment, profile, kernel spec)."""
        counts: dict[KernelChoice, int] = {}
        for name in names:
            choice = kernel_choice(self.spec.steps[name])
            counts[choice] = counts.get(choice, 0) + 1
        return counts

    def _cancel_all(self) -> None:
        self.cancel.set()
        self.executor.interrupt()
        self.executor.close()  # nothing it started outlives the run: the workers return at once
        for res in self.result.steps.values():
            if res.status in ("pending", "running"):
                self._set(res.name, "cancelled", ended=time.time(), error="cancelled")

    # -- tracking and state -----------------------------------------------------------------------

    def _step_run(self, step: StepSpec, res: StepResult) -> Any:
        from ..data import api

        inputs = {}
        for rel in res.inputs:
            try:
                with cache.DATA_LOCK:
                    inputs[rel] = api.version(self.base / rel, start=self.base)
            except MlopsError:
                pass  # not versioned by DVC: its content md5 is in the cache key only
        run = self.recorder.step_run(step, res.cache_key, inputs)
        if run is not None:
            res.spool_id = run.spool_id
            if self.result.spool_id is None and self.recorder.parent_spool_id:
                self.result.spool_id = self.recorder.parent_spool_id
                self.history.set_spool(self.result.run_id, self.result.spool_id)
        return run

    def _set(self, name: str, status: str, **changes: Any) -> None:
        res = self.result.steps[name]
        res.status = status
        for key, value in changes.items():
            setattr(res, key, value)
        if status in ("cached", "blocked", "failed", "cancelled") and res.ended is None:
            res.ended = time.time()
            if res.started is None:
                res.started = res.ended
        self.history.save_step(self.result.run_id, res)
        self._notify_listener(res)

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
        self.heartbeat.stop()
        try:
            self.executor.close()
            self.recorder.finish(r, STEP_STATES)
        finally:  # the run's end and the pipeline's release, whatever failed above
            self.history.finish(r.run_id, status, r.ended)
        if status == "failed" and self.config.pipeline_webhook_url:
            from .notify import notify_failure

            notify_failure(self.config.pipeline_webhook_url, r)
