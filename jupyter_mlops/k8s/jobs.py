"""``kubernetes``: the step executor that runs each attempt of a pipeline step as a Kubernetes Job.

Selected by ``c.MlopsConfig.pipeline_executor = "kubernetes"``; driven by the same runner as the
local executor (cache, retries, tracking, resume stay the runner's). For one attempt:

* the Job goes to the namespace of the user running the pipeline (``c.Kubernetes.namespace_template``,
  made on first use with their role's quota), runs the step's environment's ``image:`` with the
  step's profile's resources, ``backoffLimit: 0`` (retries are the runner's) and
  ``activeDeadlineSeconds`` = the step's ``timeout``;
* its command, :mod:`.step_entry`, gets the notebook and its parameters through its environment
  and prints the executed notebook, and the runs ``%mlops track`` recorded in the pod, back into
  its log, which this executor follows while the pod runs (cell progress included), so the output
  notebook lands at ``out`` on this machine with no volume shared with the cluster;
* the pod is followed through the Cluster's pod and pod-event watches, plus watches of the step
  Jobs and of their events in the user's namespace (no polling): a pod that cannot start
  (Unschedulable, image pull errors, a quota that refuses it) fails the attempt as soon as the
  cluster says why; a Job that fails says why in one line (DeadlineExceeded, OOMKilled, the
  notebook's own error with its cell);
* Ctrl-C (:meth:`JobExecutor.interrupt`) deletes the running Jobs; every Job is deleted once its
  outcome is read, and :meth:`JobExecutor.close` waits until they are gone.

Not yet: steps that declare ``inputs:`` or ``outputs:`` fail at once, since their data would have to
come from and go to a DVC remote the pod can reach (a follow-up of issue 6).

The runner is synchronous and calls :meth:`run` from worker threads; the Kubernetes client is async.
The executor owns one event loop in a thread of its own; attempts are coroutines submitted to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from ..errors import KubernetesError, MlopsError
from ..pipelines.executor import Cancelled, StepExecutor, StepFailed
from ..pipelines.spec import StepSpec
from .namespaces import api_message as _api_message
from .namespaces import ensure_namespace

__all__ = ["JobExecutor", "ensure_namespace", "LABEL_STEP", "LABEL_PIPELINE_RUN", "DATA_NOT_SUPPORTED"]

LABEL_STEP = "mlops.jupyter.org/step"
LABEL_PIPELINE_RUN = "mlops.jupyter.org/pipeline-run"
DATA_NOT_SUPPORTED = ("not supported yet: data inputs and outputs on Kubernetes need a DVC remote the pod can reach "
                      "(issue 6 follow-up); run this pipeline with c.MlopsConfig.pipeline_executor = 'local'")
#: paths of the runner's machine: meaningless in a pod, which gets its own (see step_entry)
_RUNNER_PATHS = frozenset({"MLOPS_PROJECT_ROOT", "MLOPS_SPOOL_DIR", "MLOPS_OUTPUT_NOTEBOOK_PATH"})
_LOG_GRACE = 30.0  # seconds a finished pod's log may take to arrive in full
_GONE_WAIT = 60.0  # seconds close() waits for deleted Jobs (and their pods) to go

T = TypeVar("T")


@dataclass
class _Context:
    """What every attempt of this run shares, read once from the configuration."""

    config: Any  # MlopsConfig
    settings: Any  # KubernetesSettings
    profiles: Any  # KernelProfiles
    user: str
    namespace: str


@dataclass
class _Plan:
    name: str
    namespace: str
    manifest: dict[str, Any]
    timeout: float | None
    spool_dir: Path | None  # the runner's spool, where the pod's tracked runs go
    tracking_uri: str  # ... and where they are uploaded to
    attach_spool_id: str | None  # the step's own run, which the pod's %mlops track records into
    seen: bool = False  # the Job watch has shown the Job: from then on its absence means deleted


class JobExecutor(StepExecutor):
    """Steps as Jobs. ``config``: a traitlets ``Config`` (default: :func:`~jupyter_mlops.config.load_config`'s
    files and environment); ``user``: whose namespace the Jobs go to (default: this process's user)."""

    def __init__(self, *, base: Path, kernel_name: str, workers: int, cancel: threading.Event,
                 work_dir: Path | None = None, config: Any = None, user: str | None = None) -> None:
        super().__init__(base=base, kernel_name=kernel_name, workers=workers, cancel=cancel, work_dir=work_dir)
        self._given_config = config
        self._user = user
        self._lock = threading.Lock()
        self._context: _Context | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connected: asyncio.Future[Any] | None = None  # in the loop: the Cluster and the Job watches
        self._cluster: Any = None
        self._jobs: Any = None  # Watcher of step Jobs in the user's namespace
        self._job_events: Any = None  # ... and of the events about Jobs there (FailedCreate: a quota refused the pod)
        self._attempts: dict[str, concurrent.futures.Future[None]] = {}  # Job name -> running attempt
        self._created: set[str] = set()  # Jobs made and not yet seen gone
        self._tasks: set[asyncio.Task[Any]] = set()  # attempts in the loop (close waits for their cleanup)
        self._deletions: set[asyncio.Future[None]] = set()
        self._closed = False

    # -- the runner's face (worker threads) ----------------------------------------------------------

    def prepare(self, steps: int, kernels: Mapping[Any, int] | None = None) -> None:
        """Connect (and make the namespace) while the runner does the rest of its setup."""
        try:
            self._submit(self._connect())
        except (StepFailed, Cancelled):
            pass  # said again by the first attempt

    def run(self, step: StepSpec, env: Mapping[str, str], out: Path,
            on_cell: Callable[[int, int], None]) -> None:
        if self.cancel.is_set():
            raise Cancelled()
        plan = self._plan(step, env)
        future = self._submit(self._attempt(step, plan, out, on_cell), key=plan.name)
        try:
            future.result()
        except concurrent.futures.CancelledError:
            raise Cancelled() from None
        except StepFailed:
            if self.cancel.is_set():
                raise Cancelled() from None
            raise
        finally:
            with self._lock:
                self._attempts.pop(plan.name, None)

    def interrupt(self) -> None:
        """Cancel every running attempt: each deletes its Job (its pods get SIGTERM) on the way out."""
        with self._lock:
            attempts = list(self._attempts.values())
        for future in attempts:
            future.cancel()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            attempts = list(self._attempts.values())
            loop, thread = self._loop, self._thread
        for future in attempts:
            future.cancel()
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(_GONE_WAIT + 30)
        except Exception as e:  # say it: a Job may be left in the cluster (its TTL removes it later)
            import logging

            logging.getLogger("jupyter_mlops.k8s").warning("step Jobs may be left in the cluster: %s", e)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

    # -- planning (worker thread): everything that can be refused before the cluster is asked ---------

    def _ctx(self) -> _Context:
        with self._lock:
            if self._context is None:
                from ..config import load_config
                from ..kernels.launch import current_user
                from ..kernels.profiles import KernelProfiles
                from .names import namespace_for
                from .settings import KubernetesSettings

                try:
                    config = load_config(self._given_config)
                    settings = KubernetesSettings(config=config.config)
                    user = self._user or current_user()
                    self._context = _Context(config, settings, KernelProfiles(config=config.config), user,
                                             namespace_for(user, settings.namespace_template))
                except MlopsError as e:
                    raise StepFailed(f"the Kubernetes settings cannot be used: {e}") from e
            return self._context

    def _plan(self, step: StepSpec, env: Mapping[str, str]) -> _Plan:
        from . import manifests
        from .names import label_value, object_name
        from .step_entry import COMMAND, notebook_env

        ctx = self._ctx()
        if step.inputs or step.outputs:
            raise StepFailed(DATA_NOT_SUPPORTED)
        image, variables = self._image(step.environment)
        try:
            profile = ctx.profiles.get(step.profile, ctx.user, step.environment)
        except MlopsError as e:
            raise StepFailed(str(e)) from e
        try:
            carried = notebook_env(step.notebook.read_bytes(), step.notebook.name, step.parameters)
        except (OSError, ValueError, TypeError) as e:
            raise StepFailed(f"{step.notebook}: {e}") from e
        pod_env = {**variables, **{k: v for k, v in env.items() if k not in _RUNNER_PATHS}, **carried}
        # what a local step's kernel would work out from the project it runs in, which the pod lacks
        pod_env.setdefault("MLOPS_EXPERIMENT", ctx.config.experiment_for(str(step.notebook)))
        if ctx.config.resolved_artifact_root:
            pod_env.setdefault("MLOPS_ARTIFACT_ROOT", ctx.config.resolved_artifact_root)
        name = object_name("step", step.name, uuid.uuid4().hex[:8], max_len=52)
        labels = {LABEL_STEP: label_value(step.name), LABEL_PIPELINE_RUN: label_value(env.get("MLOPS_PIPELINE_RUN_ID", "")),
                  manifests.LABEL_USER: label_value(ctx.user)}
        try:
            job = manifests.step_job(
                name=name, namespace=ctx.namespace, image=image, command=COMMAND, env=pod_env, profile=profile,
                labels=labels, backoff_limit=0, service_account=ctx.settings.service_account or None,
                active_deadline_seconds=max(1, math.ceil(step.timeout)) if step.timeout else None,
                image_pull_policy=ctx.settings.image_pull_policy)
        except MlopsError as e:
            raise StepFailed(f"the step's Job cannot be made: {e}") from e
        spool = env.get("MLOPS_SPOOL_DIR")
        return _Plan(name, ctx.namespace, job, step.timeout, Path(spool) if spool else None,
                     env.get("MLFLOW_TRACKING_URI") or ctx.config.resolved_tracking_uri, env.get("MLOPS_ATTACH_SPOOL_ID"))

    def _image(self, environment: str | None) -> tuple[str, dict[str, str]]:
        """The environment's image and ``variables:``; StepFailed saying what to add when there is none."""
        from ..environments.spec import find_environments, load_environment

        if not environment:
            raise StepFailed("a step on Kubernetes runs in an environment's image: add `environment: NAME` to the "
                             "step in pipeline.yaml, naming an environment whose environment.yml has `image:`")
        try:
            found = find_environments(self._ctx().config.resolved_environments_dir)
            if environment not in found:
                raise StepFailed(f"no environment {environment!r} (known: {', '.join(found) or 'none'})")
            spec = load_environment(found[environment])
        except MlopsError as e:
            raise StepFailed(str(e)) from e
        if not spec.image:
            raise StepFailed(f"environment {environment!r} has no `image:`; add the image built from its lock to "
                             f"{spec.file} (a step on Kubernetes runs in it)")
        return spec.image, {str(k): str(v) for k, v in (spec.variables or {}).items()}

    # -- the loop -----------------------------------------------------------------------------------------

    def _submit(self, coro: Any, key: str | None = None) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._closed:
                coro.close()
                raise Cancelled() if self.cancel.is_set() else StepFailed("the executor is closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="mlops-k8s-jobs", daemon=True)
                self._thread.start()
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            if key is not None:
                self._attempts[key] = future
            return future

    async def _connect(self) -> Any:
        """The Cluster (its pod and event watches), a watch of step Jobs, the user's namespace; once."""
        if self._connected is None:
            self._connected = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._connected)
        except KubernetesError as e:
            raise StepFailed(str(e)) from e

    async def _open(self) -> Any:
        from .client import MANAGED_SELECTOR, Cluster, connect
        from .manifests import COMPONENT
        from .watch import Watcher

        ctx = self._ctx()
        # A Cluster of this executor's own: the process's shared one (cluster_for) belongs to another loop.
        # The Cluster's watches follow pods and pod events; Jobs and their events are watched here, in
        # the one namespace this executor uses.
        cluster = Cluster(await connect(ctx.settings))
        jobs = Watcher(functools.partial(cluster.batch.list_namespaced_job, ctx.namespace,
                                         label_selector=f"{MANAGED_SELECTOR},{COMPONENT}=step"), what="jobs")
        job_events = Watcher(functools.partial(cluster.core.list_namespaced_event, ctx.namespace,
                                               field_selector="involvedObject.kind=Job"), what="job events")
        try:
            await ensure_namespace(cluster.core, ctx.namespace, ctx.user, ctx.settings)
            await asyncio.gather(cluster.start(), jobs.start(), job_events.start())
        except Exception as e:
            await jobs.stop()
            await job_events.stop()
            await cluster.close()
            if isinstance(e, KubernetesError):
                raise
            raise KubernetesError(f"the Kubernetes API at {cluster.api.configuration.host} does not answer: "
                                  f"{' '.join(str(e).split())[:200]}") from e
        self._cluster, self._jobs, self._job_events = cluster, jobs, job_events
        return cluster

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)  # each schedules its Job's deletion
        while self._deletions:
            await asyncio.gather(*list(self._deletions), return_exceptions=True)
        if self._jobs is not None:
            for name in list(self._created):
                try:
                    await self._jobs.wait_for(self._ctx().namespace, name, lambda job: job is None, timeout=_GONE_WAIT)
                except asyncio.TimeoutError:
                    pass
            await self._jobs.stop()
            await self._job_events.stop()
        if self._cluster is not None:
            await self._cluster.close()

    # -- one attempt (in the loop) -----------------------------------------------------------------------

    async def _attempt(self, step: StepSpec, plan: _Plan, out: Path, on_cell: Callable[[int, int], None]) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        from .step_entry import StepLog

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await self._connect()
        log = StepLog(on_cell)
        follow: asyncio.Task[None] | None = None
        self._created.add(plan.name)  # before the call: a cancel during it may still leave the Job made
        try:
            try:
                await self._cluster.batch.create_namespaced_job(plan.namespace, plan.manifest)
            except ApiException as e:
                raise StepFailed(_api_message(e, f"creating Job {plan.namespace}/{plan.name}")) from e
            state, found = await self._until(plan, self._start_state, self._ctx().settings.startup_timeout)
            if state == "failed":
                raise StepFailed(found)
            if state == "started":
                follow = asyncio.ensure_future(self._follow(plan.namespace, found, log))
                state, found = await self._until(plan, self._end_state)
            if follow is not None:
                done, _ = await asyncio.wait({follow}, timeout=_LOG_GRACE)
                if not done:
                    log.lines.append(f"(the pod's log did not end within {_LOG_GRACE:g} s of the Job)")
            log.close()
            self._outcome(step, plan, state, found, log, out)
        except asyncio.TimeoutError:
            raise StepFailed(f"the step's pod did not start within {self._ctx().settings.startup_timeout:g} s "
                             "(c.Kubernetes.startup_timeout)") from None
        finally:
            if follow is not None and not follow.done():
                follow.cancel()
            pod = self._pod_of(plan)
            if pod is not None:
                self._cluster.forget(plan.namespace, pod["metadata"]["name"])
            self._delete_soon(plan)

    async def _until(self, plan: _Plan, check: Callable[[_Plan], tuple[str, Any] | None],
                     timeout: float | None = None) -> tuple[str, Any]:
        """``check(plan)`` as soon as it is not None, re-evaluated on every change the watches of pods,
        Jobs and their events see (no polling). Raises asyncio.TimeoutError after ``timeout`` seconds."""
        found: tuple[str, Any] | None = None

        def settled(_: Any) -> bool:  # the watches' own object for (namespace, Job name) is not used
            nonlocal found
            found = check(plan)
            return found is not None

        watches = (self._cluster.pods, self._cluster.event_watch, self._jobs, self._job_events)
        waits = [asyncio.ensure_future(w.wait_for(plan.namespace, plan.name, settled)) for w in watches]
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if not done:
            raise asyncio.TimeoutError
        for wait in done:
            if not wait.cancelled() and wait.exception() is not None:
                raise KubernetesError(f"watching step Jobs failed: {wait.exception()}") from wait.exception()
        assert found is not None
        return found

    def _pod_of(self, plan: _Plan) -> dict[str, Any] | None:
        """The Job's pod (the newest, should there be several), from the shared pod watch."""
        pods = [p for (namespace, _), p in list(self._cluster.pods.objects.items()) if namespace == plan.namespace
                and plan.name in {(p["metadata"].get("labels") or {}).get(k) for k in ("job-name", "batch.kubernetes.io/job-name")}]
        return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)

    def _start_state(self, plan: _Plan) -> tuple[str, Any] | None:
        from .failures import start_failure

        job = self._jobs.get(plan.namespace, plan.name)
        plan.seen = plan.seen or job is not None
        pod = self._pod_of(plan)
        if pod is not None and _started(pod):
            return "started", pod["metadata"]["name"]
        if job is None:
            return ("gone", None) if plan.seen else None  # not yet in the watch, or deleted
        if _finished(job):
            return "ended", job
        if pod is not None:
            reason = start_failure(pod, self._cluster.events_of(plan.namespace, pod["metadata"]["name"]))
            return ("failed", reason) if reason else None
        refused = _failed_create(self._job_events.objects.values(), plan)
        return ("failed", f"the Job could not make its pod: {refused}") if refused else None

    def _end_state(self, plan: _Plan) -> tuple[str, Any] | None:
        job = self._jobs.get(plan.namespace, plan.name)
        if job is None:
            return "gone", None
        return ("ended", job) if _finished(job) else None

    async def _follow(self, namespace: str, pod: str, log: Any) -> None:
        """Read the pod's log as it is written, until the container ends."""
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            response = await self._cluster.core.read_namespaced_pod_log(pod, namespace, follow=True,
                                                                       _preload_content=False)
        except ApiException as e:
            log.lines.append(f"(the pod's log could not be read: {e.status} {e.reason})")
            return
        try:
            if response.status >= 300:
                log.lines.append(f"(the pod's log could not be read: {response.status} {(await response.text())[:300]})")
                return
            async for chunk in response.content.iter_any():
                log.feed(chunk)
        except Exception as e:  # a dropped connection: what came so far is all there is
            log.lines.append(f"(reading the pod's log stopped: {type(e).__name__}: {e})")
        finally:
            response.release()

    def _outcome(self, step: StepSpec, plan: _Plan, state: str, job: Any, log: Any, out: Path) -> None:
        """Write what came back; return for a success, raise StepFailed (or Cancelled) saying why not."""
        from .failures import HINTS
        from .step_entry import receive_spool

        if self.cancel.is_set():
            raise Cancelled()
        notebook = log.payload("notebook")
        if notebook is not None:
            out.write_bytes(notebook)
        partial = out if notebook is not None else None
        if plan.spool_dir is not None and log.payload("spool") is not None:
            receive_spool(log.payload("spool"), plan.spool_dir, tracking_uri=plan.tracking_uri,
                          artifact_root=self._ctx().config.resolved_artifact_root, attach_spool_id=plan.attach_spool_id)
        logfile = out.with_suffix(".log")
        if log.lines or log.warnings:
            logfile.write_text("\n".join(log.lines + [f"warning: {w}" for w in log.warnings]) + "\n")
        where = f"; the partial output is in {out}" if partial else ""
        if state == "gone":
            raise StepFailed(f"the step's Job {plan.namespace}/{plan.name} was deleted while it ran{where}", partial)
        condition = _finished(job)
        if condition is not None and condition["type"] == "Complete":
            if notebook is None:
                raise StepFailed(f"the step ran, but its output notebook did not come back through the pod's log "
                                 f"(see {logfile})")
            return
        reason = (condition or {}).get("reason") or "Failed"
        if reason == "DeadlineExceeded":
            raise StepFailed(f"timed out after {plan.timeout:g} s (DeadlineExceeded: the Job ran past its "
                             f"activeDeadlineSeconds){where}", partial)
        pod = self._pod_of(plan)
        terminated = _terminated(pod)
        if terminated.get("reason") == "OOMKilled":
            raise StepFailed(f"pod {pod['metadata']['name']}: OOMKilled; {HINTS['OOMKilled']}{where}", partial)
        if log.error:
            raise StepFailed(f"{log.error}{where}", partial)
        last = next((line.strip() for line in reversed(log.lines) if line.strip()), "") or terminated.get("message", "")
        ended = f"{terminated.get('reason', 'Error')}, exit {terminated['exitCode']}" if "exitCode" in terminated else reason
        raise StepFailed(f"the step's pod failed ({ended}){': ' + ' '.join(last.split())[:300] if last else ''}; "
                         f"its log: {logfile}{where}", partial)

    def _delete_soon(self, plan: _Plan) -> None:
        """Delete the Job and (Foreground) its pods; close() waits for these."""
        from kubernetes_asyncio.client.exceptions import ApiException

        async def delete() -> None:
            try:
                await self._cluster.batch.delete_namespaced_job(plan.name, plan.namespace,
                                                                propagation_policy="Foreground")
            except ApiException as e:
                if e.status != 404:
                    raise KubernetesError(_api_message(e, f"deleting Job {plan.namespace}/{plan.name}")) from e

        task = asyncio.ensure_future(delete())
        self._deletions.add(task)
        task.add_done_callback(self._deletions.discard)


# -- pure helpers -------------------------------------------------------------------------------------------


def _started(pod: dict[str, Any]) -> bool:
    """A container of the pod ran (or runs): from here on its log tells the story."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any({"running", "terminated"} & set(s.get("state") or {}) for s in statuses)


def _terminated(pod: dict[str, Any] | None) -> dict[str, Any]:
    for status in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return terminated
    return {}


def _finished(job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Job's Complete or Failed condition, if it has one that holds."""
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition
    return None


def _failed_create(events: Any, plan: _Plan) -> str | None:
    """The job controller's FailedCreate event for this Job (a quota that refuses its pod)."""
    for event in list(events):
        involved = event.get("involvedObject") or {}
        if involved.get("kind") == "Job" and involved.get("name") == plan.name \
                and involved.get("namespace") == plan.namespace and event.get("reason") == "FailedCreate":
            return " ".join(str(event.get("message") or "").split())[:300]
    return None
