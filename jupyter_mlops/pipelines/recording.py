"""A pipeline run's MLflow runs: a parent for the run, a child per step that ran.

All through the tracking spool (:func:`jupyter_mlops.tracking.run.create_run`): nothing here
imports mlflow or waits for a server. Children name their parent by spool id; the uploader
resolves it. A run in which no step ran gets no MLflow run at all (the parent is made lazily).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Mapping

from ..config import MlopsConfig
from ..errors import MlopsError
from .paths import notebook_file
from .spec import PipelineSpec, StepSpec

__all__ = ["PipelineRecorder"]

log = logging.getLogger("jupyter_mlops.pipelines")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class PipelineRecorder:
    def __init__(self, spec: PipelineSpec, config: MlopsConfig, run_id: str, *, parameters: Mapping[str, Any],
                 schedule_id: str | None, resumed_from: str | None) -> None:
        self.spec = spec
        self.config = config
        self.run_id = run_id
        self.parameters = dict(parameters)
        self.schedule_id = schedule_id
        self.resumed_from = resumed_from
        self.parent: Any = None
        self.context: Any = None
        self._started = False
        self._lock = threading.Lock()

    @property
    def parent_spool_id(self) -> str | None:
        return self.parent.spool_id if self.parent is not None else None

    def _start(self) -> None:
        from ..tracking.context import capture
        from ..tracking.run import create_run

        self.context = capture(None, cwd=self.spec.file.parent)
        tags = {"mlops.pipeline.name": self.spec.name, "mlops.pipeline.file": str(self.spec.file),
                "mlops.pipeline.run_id": self.run_id}
        if self.schedule_id:
            tags["mlops.schedule.id"] = self.schedule_id
        if self.resumed_from:
            tags["mlops.pipeline.resumed_from"] = self.resumed_from
        # each pipeline parameter once, with its effective value: the file's, or -p name=value over
        # it; a -p for one step (-p step.name=value) is on that step's run, with its other values
        params = {k: _text(v) for k, v in self.spec.parameters.items()}
        params.update({k: _text(v) for k, v in self.parameters.items() if "." not in k})
        experiment = self.config.experiment_for(str(self.spec.file.with_suffix("")))
        try:
            self.parent = create_run(experiment, f"{self.spec.name} {self.run_id}", tags=tags, params=params,
                                     context=self.context, config=self.config)
        except MlopsError as e:  # the spool cannot be written: the pipeline still runs, untracked
            log.warning("pipeline %s: not tracked (%s)", self.spec.name, e)

    def step_run(self, step: StepSpec, cache_key: str | None, inputs: Mapping[str, Any]) -> Any:
        """The step's child run (the parent is made with the first), with its inputs recorded."""
        with self._lock:
            if not self._started:
                self._started = True
                self._start()
        if self.parent is None:
            return None
        from ..tracking.run import create_run
        from .notebook import recorded_parameters

        try:  # the step's effective values: the cell's own defaults, the values set over them
            defaults, injected = recorded_parameters(step.notebook, step.parameters)
        except MlopsError:
            defaults, injected = {}, {k: _text(v) for k, v in step.parameters.items()}
        tags = dict(self.context.tags) if self.context else {}
        tags.update({"mlops.pipeline.name": self.spec.name, "mlops.pipeline.run_id": self.run_id,
                     "mlops.step": step.name, "mlops.step.base": step.base, "mlops.cache_key": cache_key or "",
                     "mlflow.source.name": str(step.notebook), "mlflow.source.type": "NOTEBOOK",
                     "mlops.notebook.path": str(step.notebook)})
        try:
            run = create_run(self.parent.header["experiment"], step.name, tags=tags,
                             params={**defaults, **injected}, notebook=step.notebook,
                             parent_spool_id=self.parent.spool_id, config=self.config)
        except MlopsError as e:
            log.warning("step %s: not tracked (%s)", step.name, e)
            return None
        for version in inputs.values():
            run.log_dataset(version.to_json(), "input")
        return run

    def succeeded(self, run: Any, output: Path | None, versions: list[Any]) -> None:
        if run is None:
            return
        for version in versions:
            run.log_dataset(version.to_json(), "output")
        self._log_notebook(run, output)
        run.end("FINISHED", log_notebook=False)

    def ended(self, run: Any, output: Path | None, status: str, error: str) -> None:
        """A step that failed (FAILED) or was cancelled (KILLED): its notebook and the reason."""
        if run is None or run.ended:
            return
        self._log_notebook(run, output)
        try:
            run.set_tag("mlops.error", error[:8000])
        except MlopsError:
            pass
        run.end(status, log_notebook=False)

    def _log_notebook(self, run: Any, output: Path | None) -> None:
        if output is not None and output.is_file():
            try:
                run.log_artifact(output, "notebook")
            except MlopsError as e:
                log.warning("output notebook %s not logged: %s", output, e)

    def finish(self, result: Any, states: tuple[str, ...]) -> None:
        """End the parent run with the step counts and where cached steps came from."""
        parent = self.parent
        if parent is None or parent.ended:
            return
        try:
            parent.set_tags({f"mlops.steps.{s}": str(result.count(s)) for s in states if result.count(s)})
            for res in result.steps.values():
                if res.status in ("cached", "kept") and res.cached_from:
                    parent.set_tag(f"mlops.cached.{notebook_file(res.name)}", res.cached_from)
        except MlopsError:
            pass
        parent.end({"succeeded": "FINISHED", "failed": "FAILED"}.get(result.status, "KILLED"), log_notebook=False)
