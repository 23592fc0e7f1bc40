"""The scheduler's filters and its FitError message, for the kubelet stand-in.

Filters run in the real scheduler's order and stop at the first that fails for a node:
TaintToleration, NodeAffinity (nodeSelector and required node affinity), NodeResourcesFit. Not
emulated: scoring (the first fitting node in name order wins), preemption, pod (anti-)affinity,
topology spread, PreferNoSchedule.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import TYPE_CHECKING

from ._admission import pod_usage
from ._selectors import match_label_selector_object
from ._store import Obj

if TYPE_CHECKING:
    from .kubelet import Node


def _tolerates(tolerations: list[Obj], taint: dict[str, str]) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and not t.get("key"):
            return True
        if t.get("key") == taint.get("key") and (t.get("operator") == "Exists" or
                                                 t.get("value", "") == taint.get("value", "")):
            return True
    return False


def _affinity_matches(spec: Obj, node: "Node") -> bool:
    labels = node.all_labels()
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms")
    if not terms:
        return True

    def expr_ok(e: Obj, values: dict[str, str]) -> bool:
        key, op, vals = e["key"], e["operator"], e.get("values") or []
        if op in ("Gt", "Lt"):
            return key in values and values[key].isdigit() and (
                int(values[key]) > int(vals[0]) if op == "Gt" else int(values[key]) < int(vals[0]))
        return match_label_selector_object({"matchExpressions": [{"key": key, "operator": op, "values": vals}]},
                                           values)
    return any(all(expr_ok(e, labels) for e in term.get("matchExpressions") or []) and
               all(expr_ok(e, {"metadata.name": node.name}) for e in term.get("matchFields") or [])
               for term in terms)


def unfit(pod: Obj, node: "Node", used: dict[str, Fraction], count: int) -> list[str]:
    """Why ``pod`` cannot go on ``node`` (its pods use ``used``, ``count`` of them), in the
    scheduler's words; [] if it fits."""
    spec = pod["spec"]
    for taint in node.taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(spec.get("tolerations") or [], taint):
            return [f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"]
    if not _affinity_matches(spec, node):
        return ["node(s) didn't match Pod's node affinity/selector"]
    free = node.allocatable()
    reasons = ["Too many pods"] if count >= node.max_pods else []
    for key, q in sorted(pod_usage(pod).items()):
        res = key[9:]
        if key.startswith("requests.") and q > 0 and used.get(res, Fraction(0)) + q > free.get(res, Fraction(0)):
            reasons.append(f"Insufficient {res}")
    return reasons


def fit_error(n_nodes: int, per_node: list[list[str]]) -> str:
    """``0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) didn't match ...
    preemption: 0/2 nodes are available: ...``, reasons counted and sorted as FitError.Error() does."""
    if not n_nodes:
        return "no nodes available to schedule pods"
    reasons: Counter[str] = Counter()
    preemption: Counter[str] = Counter()
    for why in per_node:
        reasons.update(why)
        helpful = why[0].startswith(("Insufficient", "Too many"))
        preemption["No preemption victims found for incoming pod" if helpful
                   else "Preemption is not helpful for scheduling"] += 1
    detail = ", ".join(sorted(f"{v} {k}" for k, v in reasons.items()))
    pre = ", ".join(sorted(f"{v} {k}" for k, v in preemption.items()))
    return f"0/{n_nodes} nodes are available: {detail}. preemption: 0/{n_nodes} nodes are available: {pre}."
