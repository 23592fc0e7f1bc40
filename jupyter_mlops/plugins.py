"""Classes found by name in an entry-point group: GPU inventories, GPU activity sources, pipeline
executors. Callers make their built-ins directly (scanning every installed distribution's entry
points costs tens of milliseconds) and come here only for other names."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

__all__ = ["plugin_class"]

T = TypeVar("T")


def plugin_class(group: str, name: str, base: type[T], *, built_in: Iterable[str], what: str,
                 fail: Callable[[str], Exception]) -> type[T]:
    """The class registered as ``name`` in ``group``, a subclass of ``base``; otherwise raises
    ``fail(message)``, the message naming ``what`` was asked for and what is known."""
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        known = ", ".join(sorted({*built_in, *found}))
        raise fail(f"no {what} {name!r} (known: {known})")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise fail(f"{what} {name!r} ({found[name].value}) is not a {base.__name__}")
    return cls
