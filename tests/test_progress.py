"""What a pipeline run shows: redrawn lines on a terminal, one line per change in a log."""

from __future__ import annotations

import io

from jupyter_mlops.pipelines.progress import Progress, summary_table
from jupyter_mlops.pipelines.results import PipelineResult, StepResult


def _result() -> PipelineResult:
    result = PipelineResult("20261122-000000-abcdef", "demo", "/p/pipeline.yaml", started=100.0)
    result.steps = {"make": StepResult("make", status="succeeded", attempts=1, started=100.0, ended=101.5),
                    "train[model=rf]": StepResult("train[model=rf]", status="running", attempts=1, started=101.5,
                                                  cell=(2, 5))}
    return result


def test_terminal_display_redraws_in_place_with_cell_progress() -> None:
    out = io.StringIO()
    progress = Progress(out, live=True)
    result = _result()
    progress(result, result.steps["train[model=rf]"])
    result.steps["train[model=rf]"].cell = (3, 5)
    progress(result, result.steps["train[model=rf]"])
    progress.close()
    text = out.getvalue()
    assert "cell 2/5" in text and "cell 3/5" in text
    assert "\x1b[3F" in text  # moved back up over the three lines drawn before
    assert "pipeline demo  run 20261122-000000-abcdef" in text


def test_log_display_prints_state_changes_only() -> None:
    out = io.StringIO()
    progress = Progress(out, live=False)
    result = _result()
    step = result.steps["train[model=rf]"]
    progress(result, step)
    step.cell = (3, 5)
    progress(result, step)  # a cell is not a state change: nothing more in a log
    step.status, step.ended, step.error = "failed", 110.0, "cell 3 raised ValueError: bad"
    progress(result, step)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("train[model=rf]: running")
    assert "train[model=rf]: failed in 8.5s: cell 3 raised ValueError: bad" in lines[1]


def test_summary_says_what_happened_and_how_to_resume() -> None:
    result = _result()
    step = result.steps["train[model=rf]"]
    step.status, step.ended, step.error = "failed", 110.0, "cell 3 raised ValueError: bad"
    result.status, result.ended = "failed", 110.0
    table = summary_table(result)
    assert "pipeline demo failed in 10.0s: 1 succeeded, 1 failed" in table
    assert "  train[model=rf]: cell 3 raised ValueError: bad" in table
    assert table.endswith("resume with: jupyter mlops pipeline resume 20261122-000000-abcdef")
