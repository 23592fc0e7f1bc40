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
    "PipelineSpecError",
    "StepInputError",
    "CronError",
    "NotebookFailed",
    "ScheduleError",
    "UnknownScheduleError",
    "StateError",
    "KernelStartError",
]


class MlopsError(Exception):
    """Base of every error the product raises deliberately."""


class ConfigError(MlopsError):
    """A configuration file or setting is invalid."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


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


class PipelineSpecError(MlopsError):
    """A pipeline.yaml that cannot run: says the file, the line and the fix."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")


class StepInputError(MlopsError):
    """A step's input is missing (and no step of this run writes it)."""


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

    def __init__(self, notebook: Path, output: Path, cell_index: int | None, error: str) -> None:
        self.notebook = notebook
        self.output = output
        self.cell_index = cell_index
        self.error = error
        where = f"cell {cell_index}" if cell_index is not None else "a cell"
        super().__init__(f"{notebook}: {where} raised {error}. The partial output is in {output}.")


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
