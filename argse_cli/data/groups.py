"""Class -> group maps (group 0 = head = most frequent classes).

Rule syntax (a string, as written in configs and on the command line):
  threshold:T        K=2; tail (group 1) = classes with <= T training samples, head = the rest.
  quantile:q         K=2; head = the ceil(q*C) most frequent classes, tail = the rest.
  quantile:q1,...,qm K=m+1; classes ranked by count (descending, ties by class index); group k holds
                     ranks [ceil(q_k*C), ceil(q_{k+1}*C)) with q_0 = 0, q_{m+1} = 1.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from argse_cli.errors import ArgseError

_EPS = 1e-9
_SYNTAX_FIX = "write threshold:T (e.g. threshold:20) or quantile:q[,q2,...] (e.g. quantile:0.5)"


@dataclass(frozen=True)
class GroupRule:
    """A parsed group rule: kind 'threshold' (values=(T,)) or 'quantile' (values=(q1<...<qm))."""

    kind: str
    values: tuple[float, ...]
    text: str

    @property
    def num_groups(self) -> int:
        return 2 if self.kind == "threshold" else len(self.values) + 1


def group_names(num_groups: int) -> list[str]:
    """Display names: head/tail for K=2, head/medium/tail for K=3, group0.. otherwise."""
    if num_groups == 2:
        return ["head", "tail"]
    if num_groups == 3:
        return ["head", "medium", "tail"]
    return [f"group{k}" for k in range(num_groups)]


def default_group_rule(dataset: str) -> str:
    """quantile:0.5 for cifar10 (5 head / 5 tail), threshold:20 for cifar100 (Narasimhan et al.)."""
    if dataset == "cifar10":
        return "quantile:0.5"
    if dataset == "cifar100":
        return "threshold:20"
    raise ArgseError("dataset", f"unknown dataset {dataset!r}", "use cifar10 or cifar100")


def parse_group_rule(rule: str) -> GroupRule:
    """Validate the rule syntax and return a GroupRule; ArgseError(field='groups') if malformed."""
    if not isinstance(rule, str) or ":" not in rule:
        raise ArgseError("groups", f"cannot parse group rule {rule!r}", _SYNTAX_FIX)
    kind, _, arg = rule.strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    try:
        values = tuple(float(v) for v in arg.split(","))
    except ValueError:
        raise ArgseError(
            "groups", f"cannot parse numbers in group rule {rule!r}", _SYNTAX_FIX
        ) from None
    if any(not math.isfinite(v) for v in values):
        raise ArgseError("groups", f"group rule {rule!r} has a non-finite number", _SYNTAX_FIX)
    if kind == "threshold":
        if len(values) != 1 or values[0] < 0 or values[0] != int(values[0]):
            raise ArgseError(
                "groups",
                f"group rule {rule!r}: threshold needs one non-negative integer",
                "write e.g. threshold:20",
            )
        return GroupRule("threshold", (float(int(values[0])),), rule.strip())
    if kind == "quantile":
        if any(not 0.0 < q < 1.0 for q in values):
            raise ArgseError(
                "groups",
                f"group rule {rule!r}: quantiles must lie strictly between 0 and 1",
                "write e.g. quantile:0.5 or quantile:0.3,0.7",
            )
        if any(b <= a for a, b in itertools.pairwise(values)):
            raise ArgseError(
                "groups",
                f"group rule {rule!r}: quantiles must be strictly increasing",
                "write e.g. quantile:0.3,0.7",
            )
        return GroupRule("quantile", values, rule.strip())
    raise ArgseError("groups", f"unknown group rule kind {kind!r} in {rule!r}", _SYNTAX_FIX)


def _empty_group_error(rule: str, k: int, K: int, detail: str, fix: str) -> ArgseError:
    name = group_names(K)[k]
    return ArgseError(
        field="groups",
        problem=f"rule {rule} leaves group {k} ({name}) empty ({detail})",
        fix=fix,
    )


def get_class_to_group(counts: np.ndarray, rule: str) -> np.ndarray:
    """Map each class to its group id (int64 [C], 0 = head = most frequent) from training counts."""
    parsed = parse_group_rule(rule)
    counts = np.asarray(counts, dtype=np.int64)
    C = len(counts)
    K = parsed.num_groups
    if parsed.kind == "threshold":
        T = int(parsed.values[0])
        g = (counts <= T).astype(np.int64)
        if not g.any():
            raise _empty_group_error(
                parsed.text,
                1,
                K,
                f"the rarest class has {int(counts.min())} training samples > {T}",
                f"use quantile:0.5 or a threshold >= {int(counts.min())}",
            )
        if g.all():
            raise _empty_group_error(
                parsed.text,
                0,
                K,
                f"the most frequent class has {int(counts.max())} training samples <= {T}",
                f"use quantile:0.5 or a threshold < {int(counts.max())}",
            )
        return g
    # quantile: rank classes by count, descending; stable sort breaks ties by class index.
    order = np.argsort(-counts, kind="stable")
    bounds = [0] + [math.ceil(q * C - _EPS) for q in parsed.values] + [C]
    g = np.empty(C, dtype=np.int64)
    for k in range(K):
        lo, hi = bounds[k], bounds[k + 1]
        if hi <= lo:
            raise _empty_group_error(
                parsed.text,
                k,
                K,
                f"{C} classes give group {k} the ranks [{lo}, {hi})",
                "use fewer or more widely spaced quantiles, e.g. quantile:0.5",
            )
        g[order[lo:hi]] = k
    return g
