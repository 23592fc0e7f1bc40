"""Every error jupyter_mlops raises on purpose derives from :class:`MlopsError`.

Each subclass carries the facts of what went wrong as attributes and a message that says what to
do about it, in one or two lines, so faces (magics, CLI, REST) can show ``str(error)`` as it is.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "MlopsError",
    "ConfigError",
    "UsageError",
    "TrackingError",
    "NoActiveRunError",
    "SpoolError",
    "InvalidValueError",
    "ParamChangedError",
    "TrackingServerError",
    "DataError",
    "NotInRepoError",
    "OutsideRepoError",
    "NotTrackedError",
    "UnknownRevisionError",
    "RemoteError",
    "SpecError",
    "PipelineSpecError",
    "EnvironmentSpecError",
    "StepInputError",
    "CronError",
    "NotebookFailed",
    "ScheduleError",
    "UnknownScheduleError",
    "StateError",
    "KernelStartError",
    "GpuError",
    "GpuUnavailableError",
    "LimitExceededError",
    "ManifestError",
]


class MlopsError(Exception):
    """Base of every error the product raises deliberately."""


class ConfigError(MlopsError):
    """A configuration file or setting is invalid."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class NotAllowedError(ConfigError):
    """A user asked for something the configuration does not grant them (a profile of another role,
    an environment their profile does not run)."""


class UsageError(MlopsError):
    """A command or magic was called the wrong way."""


class TrackingError(MlopsError):
    """Base of errors about experiment tracking."""


class NoActiveRunError(TrackingError):
    def __init__(self, action: str) -> None:
        self.action = action
        super().__init__(
            f"cannot {action}: no run is active. Start one with `%mlops track` "
            "or jupyter_mlops.tracking.start_run()."
        )


class SpoolError(TrackingError):
    """The local spool cannot be written: nothing could be recorded."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot write the tracking spool {path}: {reason}. "
            "Point MLOPS_SPOOL_DIR (or c.MlopsConfig.spool_dir) at a writable folder."
        )


class InvalidValueError(TrackingError):
    """A key or value that MLflow would reject, caught at the call instead of at upload."""

    def __init__(self, kind: str, key: str, message: str) -> None:
        self.kind = kind
        self.key = key
        super().__init__(f"{kind} {key!r}: {message}")


class ParamChangedError(InvalidValueError):
    def __init__(self, key: str, old: str, new: str) -> None:
        self.old = old
        self.new = new
        super().__init__(
            "param",
            key,
            f"already logged as {old!r} in this run; MLflow params cannot change "
            f"(got {new!r}). Log it as a metric or a tag, or start a new run.",
        )


class TrackingServerError(TrackingError):
    """The tracking server could not be reached or refused a request."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"tracking server {uri}: {reason}")


class DataError(MlopsError):
    """Base of errors about versioned data."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class NotInRepoError(DataError):
    def __init__(self, folder: str) -> None:
        super().__init__(
            f"{folder} is not in a DVC project: run `jupyter mlops init` there first "
            "(it sets up git, DVC and a local remote)",
            path=folder,
        )


class OutsideRepoError(DataError):
    def __init__(self, path: str, root: str) -> None:
        self.root = root
        super().__init__(f"{path} is outside the project {root}: version data inside it", path=path)


class NotTrackedError(DataError):
    def __init__(self, path: str, rev: str | None = None) -> None:
        self.rev = rev
        where = f" at revision {rev}" if rev else ""
        super().__init__(
            f"{path} is not versioned with DVC{where}: add it with `%mlops data add {path}`"
            + (" and commit the .dvc file" if rev else ""),
            path=path,
        )


class UnknownRevisionError(DataError):
    def __init__(self, rev: str) -> None:
        self.rev = rev
        super().__init__(f"unknown git revision {rev!r}: use a commit, a tag or a branch of this repository")


class RemoteError(DataError):
    """The DVC remote cannot be reached or written."""


class SpecError(MlopsError):
    """A file the user wrote (pipeline.yaml, environment.yml) that cannot be used: says the
    file, the line and the fix."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")


class PipelineSpecError(SpecError):
    """A pipeline.yaml that cannot run."""


class EnvironmentSpecError(SpecError):
    """An environments/NAME/environment.yml that cannot be used."""


class StepInputError(MlopsError):
    """A step's input is missing (and no step of this run writes it)."""


class PipelineBusyError(MlopsError):
    """Another live run of the same pipeline file holds it (a run asked not to wait)."""

    def __init__(self, pipeline_file: str, run_id: str, where: str) -> None:
        self.pipeline_file = pipeline_file
        self.run_id = run_id
        super().__init__(f"{pipeline_file} is being run by run {run_id} ({where}); wait for it (run without "
                         f"--no-wait) or stop it: jupyter mlops pipeline cancel {run_id}")


class CronError(MlopsError, ValueError):
    """A cron expression (or its time zone) that cannot be used; the message says the fix."""

    def __init__(self, text: str | None, problem: str, *, field: str | None = None, value: str | None = None) -> None:
        self.text = text
        self.problem = problem
        self.field = field
        self.value = value
        super().__init__(problem if text is None else f"cron {text!r}: {problem}")


class NotebookFailed(MlopsError):
    """A cell raised. Carries the failing cell and keeps the partial output notebook."""

    def __init__(self, notebook: Path, output: Path, cell_index: int | None, cells: int | None, error: str) -> None:
        self.notebook = notebook
        self.output = output
        self.cell_index = cell_index  # the author's code cell n (1-based), of ``cells`` code cells
        self.cells = cells
        self.error = error
        super().__init__(f"{notebook}: {self.where} raised {error}. The partial output is in {output}.")

    @property
    def where(self) -> str:
        """``code cell 3 of 7``: as the author counts code cells in Jupyter, and as progress shows them."""
        if self.cell_index is None:
            return "a cell"
        return f"code cell {self.cell_index} of {self.cells}" if self.cells else f"code cell {self.cell_index}"


class ScheduleError(MlopsError):
    """A schedule that cannot be added or changed; the message says what to do."""


class UnknownScheduleError(ScheduleError):
    def __init__(self, schedule_id: str, known: list[str]) -> None:
        self.schedule_id = schedule_id
        self.known = known
        hint = (f"known: {', '.join(known)}" if known
                else "there are none; add one with `jupyter mlops schedule add PIPELINE.yaml`")
        super().__init__(f"no schedule {schedule_id!r}; {hint}")


class StateError(MlopsError):
    """The state database cannot be opened or written."""


class KernelStartError(MlopsError):
    """A kernel could not be started (bad kernel spec, the interpreter failed, a timeout)."""


class GpuError(MlopsError):
    """Base of errors about GPUs and their leases (e.g. a lease folder that cannot be written)."""


def _gpus(count: int, gpu_type: str | None = None) -> str:
    kind = f"{gpu_type} " if gpu_type else ""
    return f"{count} {kind}GPU{'' if count == 1 else 's'}"


def _some(items: list[str], most: int = 4) -> str:
    """At most ``most`` items, then how many more: keeps a message to a line or two."""
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


class GpuUnavailableError(GpuError):
    """A GPU request that cannot be met: the GPUs do not exist here, they are busy, or a wait timed out.

    ``busy`` lists the holders of the matching GPUs (dicts with device, user, kernel_id, pid),
    ``waiting`` the queued requests ahead of this one.
    """

    def __init__(self, requested: int, *, existing: int, gpu_type: str | None = None,
                 busy: list[dict] | None = None, waiting: int = 0, reason: str | None = None,
                 timed_out: float | None = None) -> None:
        self.requested = requested
        self.existing = existing
        self.gpu_type = gpu_type
        self.busy = list(busy or [])
        self.waiting = waiting
        self.reason = reason
        self.timed_out = timed_out
        asked = _gpus(requested, gpu_type)
        if existing < requested:
            if existing:
                fix = f"ask for at most {existing}" + (" or another GPU type" if gpu_type else "")
                super().__init__(f"asked for {asked} but only {existing} exist on this machine: {fix}.")
            else:
                why = f" ({reason})" if reason else ""
                fix = "ask for another GPU type" if gpu_type else "choose a profile without GPUs"
                super().__init__(f"asked for {asked} but none exist on this machine{why}: {fix}.")
            return
        held = [f"GPU {h['device']} ({h.get('user') or 'unknown user'}, kernel {h.get('kernel_id') or '?'})"
                for h in self.busy]
        facts = f"busy: {_some(held)}" if held else "none is busy"
        if waiting:
            queued = "1 request waits" if waiting == 1 else f"{waiting} requests wait"
            facts += f"; {queued} ahead in the queue"
        if timed_out is not None:
            super().__init__(f"waited {timed_out:g} s for {asked} and none came free ({existing} exist; {facts}). "
                             "Shut down a kernel that holds one, or try again later.")
        else:
            super().__init__(f"no GPU free: asked for {asked}, {existing} exist; {facts}. "
                             "Shut down a kernel that holds one, or ask to wait in the queue.")


class LimitExceededError(MlopsError):
    """A user at a per-user limit (``limit`` is "kernels" or "gpus"); ``running`` is what they run."""

    def __init__(self, user: str, limit: str, maximum: int, running: list[dict], *, asked: int = 0) -> None:
        self.user = user
        self.limit = limit
        self.maximum = maximum
        self.running = list(running)
        self.asked = asked
        kernels = [f"{r.get('kernel_id') or '?'}" + (f" ({_gpus(r['gpus'])})" if r.get("gpus") else "")
                   for r in self.running]
        listing = _some(kernels, 5) or "nothing"
        if limit == "kernels":
            super().__init__(f"{user} may run at most {maximum} kernel{'' if maximum == 1 else 's'} at once "
                             f"and runs {len(kernels)}: {listing}. Shut one down first.")
        else:
            held = sum(int(r.get("gpus") or 0) for r in self.running)
            super().__init__(f"{user} may hold at most {_gpus(maximum)} at once, holds {held} ({listing}) "
                             f"and asked for {asked} more. Shut down a GPU kernel or ask for fewer.")


class KubernetesError(MlopsError):
    """The cluster refused or failed a request (quota exceeded, forbidden, unreachable), said in one
    line with the API's own message."""


class QuotaExceededError(KubernetesError):
    """The user's namespace has no room left under its ResourceQuota for what was asked."""


class ManifestError(ConfigError):
    """A Kubernetes manifest the product built that the cluster would refuse (a quantity that does not
    parse, an unknown enum, a cron schedule, a name); ``field`` is the path in the manifest."""

    def __init__(self, kind: str, name: str, field: str, problem: str) -> None:
        self.kind = kind
        self.name = name
        self.field = field
        self.problem = problem
        super().__init__(f"{kind} {name or '?'}: {field}: {problem}", source="kubernetes manifest")
