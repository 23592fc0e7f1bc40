"""Notebooks as steps: pipeline.yaml (spec), the DAG, the step cache, the runner, schedules.

Importing this package imports nothing heavy: a no-op pipeline re-run must answer in a fraction of
a second, so modules are imported where they are used (``from jupyter_mlops.pipelines.runner
import run_pipeline``).
"""
