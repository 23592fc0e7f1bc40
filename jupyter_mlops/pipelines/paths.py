"""A pipeline's step names and data paths: one spelling each, inside the project, one producer.

Paths in ``inputs:`` / ``outputs:`` are relative to the pipeline file's folder. At load each is
normalised (posix, ``./`` and ``a/..`` folded), so ``out/x`` and ``./out/x`` are one path, and
refused when absolute or outside the project (the git/DVC root that holds the pipeline file): a
step that wrote there would touch files no run versions, before anything said so.

:class:`OutputIndex` maps each output path to its step and finds, for an input, the steps whose
output is that path or a folder holding it, by looking up the input and each of its parent
folders: linear in the number of paths, where comparing every output with every input was
quadratic (31 s for a 10,000-step matrix).
"""

from __future__ import annotations

import posixpath
import re
from typing import Iterable

__all__ = ["notebook_file", "normalise", "OutputIndex", "OutputClash"]


class OutputClash(ValueError):
    """Two steps' outputs overlap; ``step`` is the later one in the file (where to point)."""

    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


_UNSAFE = re.compile(r"[^\w.-]")
#: a relative path whose parts are all plain names: no empty part, no ``.`` or ``..``, no ``\``
_PLAIN = re.compile(r"(?!\.\.?(?:/|$))[^/\\\s][^/\\]*(?:/(?!\.\.?(?:/|$))[^/\\]+)*\Z")


def notebook_file(step_name: str) -> str:
    """The file name (no suffix) of a step's output notebook: ``train[model=rf]`` -> ``train_model_rf_``.
    Two steps must not share one (checked at load), or the second would overwrite the first's."""
    return _UNSAFE.sub("_", step_name)


def normalise(path: str, base: str, root: str) -> str:
    """``path`` (relative to the folder ``base``) in its one spelling, relative to ``base``; both
    folders absolute, posix.

    Raises ``ValueError`` with the reason when it is empty, absolute, or lands outside ``root``.
    """
    if _PLAIN.match(path):  # most paths: already in their one spelling, and inside base (so the project)
        return path
    if not path.strip():
        raise ValueError("is empty")
    if posixpath.isabs(path):
        raise ValueError("is absolute; name it relative to the pipeline file's folder")
    norm = posixpath.normpath(path)
    if norm == ".":
        raise ValueError("is the pipeline file's own folder; name a file or folder inside it")
    inside = posixpath.normpath(posixpath.join(base, norm))
    top = root.rstrip("/")
    if inside == top:
        raise ValueError(f"is the project folder {root} itself; name a file or folder inside it")
    if not inside.startswith(top + "/"):
        raise ValueError(f"is outside the project {root}; outputs and inputs live inside it")
    return norm


def _parents(path: str) -> Iterable[str]:
    """``a/b/c`` -> ``a/b``, ``a`` (a leading ``..`` part is kept whole)."""
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


class OutputIndex:
    """Output path -> the step that writes it, for the steps given in order.

    Raises :class:`OutputClash` naming both steps when two write one path, or when one's output is a
    folder holding another's (the folder's version would change behind the other's back).
    """

    def __init__(self, outputs: Iterable[tuple[str, list[str]]]) -> None:
        self.writers: dict[str, str] = {}
        pairs = [(name, out) for name, outs in outputs for out in outs]
        for name, out in pairs:
            other = self.writers.get(out)
            if other is not None and other != name:
                raise OutputClash(f"steps {other} and {name} both write {out!r}; each output needs one producer "
                                  "(use a matrix key in the path)", name)
            self.writers[out] = name
        for name, out in pairs:
            for folder in _parents(out):
                other = self.writers.get(folder)
                if other is not None and other != name:
                    raise OutputClash(f"step {other} writes the folder {folder!r}, which holds {out!r} written by "
                                      f"step {name}; give them paths apart", name)

    def feeding(self, input_: str) -> set[str]:
        """The steps whose output is ``input_`` or a folder holding it."""
        found = set()
        for path in (input_, *_parents(input_)):
            writer = self.writers.get(path)
            if writer is not None:
                found.add(writer)
        return found
