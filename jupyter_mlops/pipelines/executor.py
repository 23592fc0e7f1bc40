"""Where a step's notebook runs: one attempt of one step, on some executor.

The runner (:mod:`.runner`) decides what runs, in which order, how often, and records it; an
executor only runs one attempt and says how it ended. Executors are plug-ins: a subclass of
:class:`StepExecutor` declared under the entry point group ``jupyter_mlops.executors`` (the built-in
``local`` one included), picked by name with :func:`create_executor`. The Kubernetes issue adds
one that runs a step as a Job.

A step's kernel is chosen by its ``environment`` and ``profile``, else by the kernel spec resolved
at load (:attr:`StepSpec.kernel`: the step's ``kernel:``, the run's ``--kernel`` or the notebook's
own kernelspec); :func:`kernel_choice` is that triple, and executors keep one pool per choice, so
two notebooks with different kernelspecs never share kernels.
"""

from __future__ import annotations

import json
import re
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import KernelStartError, MlopsError
from .spec import StepSpec

__all__ = ["StepExecutor", "LocalExecutor", "create_executor", "StepFailed", "Cancelled", "EXECUTOR_GROUP",
           "KernelChoice", "DEFAULT_KERNEL", "kernel_choice"]

EXECUTOR_GROUP = "jupyter_mlops.executors"

#: (environment, profile, kernel spec) a step runs on: the spec only where it names neither of the others.
KernelChoice = tuple[str | None, str | None, str | None]
#: A step that names nothing, in a spec made by hand (load_pipeline always resolves one): python3.
DEFAULT_KERNEL: KernelChoice = (None, None, "python3")


def kernel_choice(step: StepSpec) -> KernelChoice:
    if step.environment or step.profile:
        return (step.environment or None, step.profile or None, None)
    return (None, None, step.kernel or DEFAULT_KERNEL[2])


class StepFailed(Exception):
    """This attempt failed; ``output`` is the (partial) output notebook, if any was written."""

    def __init__(self, message: str, output: Path | None = None) -> None:
        super().__init__(message)
        self.output = output


class Cancelled(Exception):
    """The run was cancelled while this attempt ran."""


class StepExecutor(ABC):
    """Runs attempts of steps. Created once per pipeline run by the runner, closed at its end.

    ``base``: the pipeline's folder, the steps' working directory. ``workers``: how many attempts
    the runner may have going at once. ``work_dir``: the run's own folder (output notebooks, logs).
    """

    def __init__(self, *, base: Path, kernel_name: str | None, workers: int, cancel: threading.Event,
                 work_dir: Path | None = None) -> None:
        self.base = base
        self.work_dir = work_dir
        self.kernel_name = kernel_name
        self.workers = workers
        self.cancel = cancel

    def prepare(self, steps: int, kernels: Mapping[KernelChoice, int] | None = None) -> None:
        """Called when ``steps`` steps will soon want to run: start what takes time (kernels).
        ``kernels``: the same steps counted by :func:`kernel_choice` (None: not known)."""

    def expect(self, soon: int, kernels: Mapping[KernelChoice, int] | None = None) -> None:
        """Called before each attempt with the number of steps that will want to run soon
        (beside this one), so the executor keeps no more ready than will be used; ``kernels`` as
        in :meth:`prepare`."""

    @abstractmethod
    def run(self, step: StepSpec, env: Mapping[str, str], out: Path,
            on_cell: Callable[[int, int], None]) -> None:
        """Run one attempt: ``step``'s notebook with its parameters, ``env`` in its process
        environment, the executed notebook written to ``out``. Returns when it succeeded; raises
        :class:`StepFailed` (with the reason and the partial notebook) or :class:`Cancelled`."""

    @abstractmethod
    def interrupt(self) -> None:
        """Interrupt every running attempt (Ctrl-C): they then raise :class:`Cancelled`."""

    @abstractmethod
    def close(self) -> None:
        """Release everything this executor started; nothing it started may outlive it."""


class LocalExecutor(StepExecutor):
    """Steps on this machine's kernels, each from a :class:`~jupyter_mlops.kernels.pool.KernelPool`.

    Steps that name no environment or profile run on their kernel spec (:attr:`StepSpec.kernel`),
    from a pool per spec, started by :meth:`prepare` and sized to the steps about to run. ``pool``:
    a pool to take the kernels of its spec from instead (its owner closes it).

    A step with an ``environment`` and/or ``profile`` runs on the ``mlops-local`` provisioner's base
    spec (:data:`~jupyter_mlops.kernels.kernelspecs.BASE_SPEC`), from a pool of its own per choice,
    made at the first claim. Those pools start a kernel only when a step claims one: a spare would
    count against the user's kernel limit and hold its GPUs while it waits, and its start could
    fail (no GPU free *then*) with an error the next step would get.
    """

    def __init__(self, *, base: Path, kernel_name: str | None, workers: int, cancel: threading.Event,
                 work_dir: Path | None = None, pool: Any = None) -> None:
        super().__init__(base=base, kernel_name=kernel_name, workers=workers, cancel=cancel, work_dir=work_dir)
        self.pool = pool  # given: not ours to close or size
        self._plain: dict[str, Any] = {}  # kernel spec -> a pool of ours
        self._pools: dict[KernelChoice, Any] = {}  # environment/profile choice -> a pool of ours
        self._specs_synced = False
        self._closed = False
        self._lock = threading.Lock()
        self._running: dict[int, tuple[Any, Any]] = {}  # thread id -> (pool, claimed kernel)
        self.first_claim = threading.Event()

    def prepare(self, steps: int, kernels: Mapping[KernelChoice, int] | None = None) -> None:
        # no plain kernel is started for a run whose steps all name environments: those start on claim
        for choice, count in (kernels if kernels is not None else {self._default_choice(): steps}).items():
            if choice[2] is not None and count:
                self._plain_pool(choice[2], count)

    def expect(self, soon: int, kernels: Mapping[KernelChoice, int] | None = None) -> None:
        counts = kernels if kernels is not None else {self._default_choice(): soon}
        with self._lock:
            plain = dict(self._plain)
        for name, pool in plain.items():
            pool.size = min(self.workers, counts.get((None, None, name), 0))

    def _default_choice(self) -> KernelChoice:
        return (None, None, self.kernel_name or DEFAULT_KERNEL[2])

    def _plain_pool(self, name: str, steps: int = 1) -> Any:
        """The pool of kernel spec ``name``: the one given if it is of that spec, else one of ours."""
        if self.pool is not None and self.pool.kernel_name == name:
            return self.pool
        with self._lock:
            pool = self._plain.get(name)
            if pool is None:
                if self._closed:  # cancelled before any claim: a pool made now would outlive the run
                    raise Cancelled() if self.cancel.is_set() else StepFailed("the executor is closed")
                from ..kernels.pool import KernelPool

                # a log folder per spec: each pool numbers its kernels k1, k2, ... from 1
                logs = self.work_dir / "kernels" if self.work_dir else None
                if logs is not None and self._plain:
                    logs = logs / re.sub(r"[^A-Za-z0-9._-]", "_", name)
                pool = self._plain[name] = KernelPool(name, size=max(1, min(self.workers, steps)), cwd=self.base,
                                                      log_dir=logs)
            return pool

    def _pool_for(self, choice: KernelChoice) -> Any:
        """The pool of ``choice``'s kernels; raises :class:`StepFailed` when there can be none."""
        if choice[2] is not None:
            return self._plain_pool(choice[2])
        with self._lock:
            if self._closed:  # cancelled: a pool made now would outlive the run
                raise Cancelled() if self.cancel.is_set() else StepFailed("the executor is closed")
            pool = self._pools.get(choice)
            if pool is None:
                from ..kernels.kernelspecs import BASE_SPEC
                from ..kernels.pool import KernelPool

                self._sync_kernelspecs()
                environment, profile, _ = choice
                launch = {"mlops_environment": environment, "mlops_profile": profile}
                # a log folder per choice: each pool numbers its kernels k1, k2, ... from 1
                logs = re.sub(r"[^A-Za-z0-9._-]", "_", f"{environment or 'server'}-{profile or 'default'}")
                pool = self._pools[choice] = KernelPool(
                    BASE_SPEC, size=0, cwd=self.base, launch_kwargs={k: v for k, v in launch.items() if v},
                    log_dir=self.work_dir / "kernels" / logs if self.work_dir else None)
            return pool

    def _sync_kernelspecs(self) -> None:
        """Make sure the base spec exists (once per run; it rewrites nothing unchanged)."""
        if self._specs_synced:
            return
        from ..kernels.kernelspecs import sync_from_config

        try:
            sync_from_config()
        except MlopsError as e:  # a profile that does not parse, say: this step fails, saying why
            raise StepFailed(f"kernel specs could not be written: {e}") from e
        self._specs_synced = True

    def run(self, step: StepSpec, env: Mapping[str, str], out: Path,
            on_cell: Callable[[int, int], None]) -> None:
        from .notebook import execute_on_kernel

        choice = kernel_choice(step)
        pool = self._pool_for(choice)
        try:
            kernel = pool.claim()
        except KernelStartError as e:
            # the provisioner's own one-line reason (not installed, not allowed, no GPU free, a limit)
            reason = e.__cause__ if choice[2] is None and isinstance(e.__cause__, MlopsError) else e
            raise StepFailed(str(reason)) from e
        self.first_claim.set()
        me = threading.get_ident()
        self._running[me] = (pool, kernel)
        timed_out = threading.Event()
        timer = self._watchdog(step, pool, kernel, timed_out)
        try:
            failure = execute_on_kernel(step.notebook, out, step.parameters, kernel.manager, kernel.kernel_name,
                                        setup=setup_code(env, self.base), on_cell=on_cell)
        except Exception as e:  # the kernel died, was shut down (timeout, Ctrl-C), or papermill failed
            if self.cancel.is_set():
                raise Cancelled() from e
            if timed_out.is_set():
                raise StepFailed(f"timed out after {step.timeout:g} s; the partial output is in {out}", out) from e
            where = f" (the kernel's own output: {kernel.log})" if kernel.log else ""
            raise StepFailed(f"{type(e).__name__}: {e}; the partial output is in {out}{where}", out) from e
        finally:
            if timer is not None:
                timer.cancel()
            self._running.pop(me, None)
            pool.release_soon(kernel)  # one step, one kernel: never reused
        if failure is not None:
            if self.cancel.is_set():
                raise Cancelled()
            if timed_out.is_set():
                raise StepFailed(f"timed out after {step.timeout:g} s in {failure.where}; "
                                 f"the partial output is in {out}", out)
            raise StepFailed(f"{failure.where} raised {failure.error}; the partial output is in {out}", out)

    def _watchdog(self, step: StepSpec, pool: Any, kernel: Any, fired: threading.Event) -> threading.Timer | None:
        """At the step's timeout: interrupt the kernel; 5 s later, if still busy, shut it down."""
        if not step.timeout:
            return None

        def expire() -> None:
            fired.set()
            pool.interrupt(kernel)
            grace = threading.Timer(5.0, lambda: pool.release_soon(kernel))
            grace.daemon = True
            grace.start()

        timer = threading.Timer(step.timeout, expire)
        timer.daemon = True
        timer.start()
        return timer

    def interrupt(self) -> None:
        for pool, kernel in list(self._running.values()):
            pool.interrupt(kernel)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = [*self._pools.values(), *self._plain.values()]
        for pool in pools:
            pool.close()  # ours: every kernel it started, claimed or not, is shut down
        if self.pool is not None:  # given: its owner closes it; the kernels claimed from it go now
            for pool, kernel in list(self._running.values()):
                if pool is self.pool:
                    pool.release(kernel, now=True)


def setup_code(env: Mapping[str, str], cwd: Path) -> str:
    """What a pooled kernel, started before the run existed, runs first (silently)."""
    return (f"import os as _os\n_os.environ.update({json.dumps(dict(env))})\n"
            f"_os.chdir({json.dumps(str(cwd))})\ndel _os")


def create_executor(name: str, **options: Any) -> StepExecutor:
    """The executor registered as ``name`` in the ``jupyter_mlops.executors`` entry points.

    ``local`` is built in: made directly, since scanning every installed distribution's entry
    points costs tens of milliseconds (a tenth of a no-op re-run). It is declared as an entry
    point too, so tools that list executors see it.
    """
    if name == "local":
        return LocalExecutor(**options)
    from ..plugins import plugin_class

    cls = plugin_class(EXECUTOR_GROUP, name, StepExecutor, built_in=["local"], what="pipeline executor",
                       fail=lambda message: MlopsError(f"{message}; set c.MlopsConfig.pipeline_executor"))
    return cls(**options)
