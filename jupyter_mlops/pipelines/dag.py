"""The step graph: edges from ``needs`` and from outputs to inputs; order, cycles, closures."""

from __future__ import annotations

from graphlib import CycleError, TopologicalSorter

from ..errors import PipelineSpecError
from .paths import OutputIndex
from .spec import PipelineSpec

__all__ = ["Dag", "build_dag"]


class Dag:
    def __init__(self, spec: PipelineSpec, parents: dict[str, set[str]]) -> None:
        self.spec = spec
        self.parents = parents
        self.children: dict[str, set[str]] = {name: set() for name in parents}
        for child, ps in parents.items():
            for parent in ps:
                self.children[parent].add(child)

    def order(self) -> list[str]:
        """Steps in an order where every step comes after what it needs (stable: file order)."""
        sorter = TopologicalSorter({name: sorted(ps) for name, ps in self.parents.items()})
        return list(sorter.static_order())

    def downstream(self, names: set[str]) -> set[str]:
        """``names`` and everything that depends on them."""
        return _closure(names, self.children)

    def upstream(self, names: set[str]) -> set[str]:
        """``names`` and everything they depend on."""
        return _closure(names, self.parents)


def _closure(names: set[str], edges: dict[str, set[str]]) -> set[str]:
    found, todo = set(names), list(names)
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in found:
                found.add(nxt)
                todo.append(nxt)
    return found


def build_dag(spec: PipelineSpec) -> Dag:
    """The graph of ``spec``; raises :class:`PipelineSpecError` naming a cycle and where it starts.

    An output feeds an input that is the same path or lies inside it (a folder output); outputs are
    looked up by path (:class:`.paths.OutputIndex`), so the cost grows with the steps, not their square.
    """
    try:
        index = spec.outputs_index or OutputIndex((s.name, s.outputs) for s in spec.steps.values())
    except ValueError as e:  # load_pipeline refuses these first; a spec built by hand may not have been
        raise PipelineSpecError(str(spec.file), None, str(e)) from None
    parents: dict[str, set[str]] = {name: set() for name in spec.steps}
    for name, step in spec.steps.items():
        for need in step.needs:
            parents[name].update(spec.step_names(need) or [need])
        for input_ in step.inputs:  # a step reading what it writes itself is no cycle; needing itself is
            parents[name].update(index.feeding(input_.rstrip("/")) - {name})
    try:
        TopologicalSorter({n: sorted(p) for n, p in parents.items()}).prepare()
    except CycleError as e:
        cycle = e.args[1]
        first = spec.steps[cycle[0]]
        raise PipelineSpecError(str(spec.file), first.line,
                                f"steps form a cycle: {' -> '.join(cycle)}; remove one of these needs or "
                                "input/output links") from None
    return Dag(spec, parents)
