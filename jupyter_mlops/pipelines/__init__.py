"""Notebooks as steps: execution through papermill (and, later, the DAG, cache and scheduler)."""

from .notebook import NotebookResult, run_notebook

__all__ = ["NotebookResult", "run_notebook"]
