"""Selective-classification metrics of one fixed acceptance rule (numpy, float64 accumulation).

Symbols: ``accept`` [N] bool (a(x) = 1 iff the sample is accepted), ``pred`` [N] = h(x),
``y`` [N] labels, ``class_to_group`` [C] = g(y) in {0..K-1}, ``w`` [N] sample weights of the
evaluation *view* (``w_lt``: long-tailed test distribution, ``w_bal``: balanced; ``None`` = unit
weights). With G_k = {i : g(y_i) = k}:

- coverage            ``cov   = sum_i w_i a_i / sum_i w_i``
- group coverage      ``cov_k = sum_{i in G_k} w_i a_i / sum_{i in G_k} w_i``  (0.0 for an empty group)
- group error         ``e_k   = sum_{i in G_k} w_i a_i [h_i != y_i] / sum_{i in G_k} w_i a_i``
- selective risk      ``R     = sum_i w_i a_i [h_i != y_i] / sum_i w_i a_i``
- group-balanced err  ``(1/K) sum_k e_k``,  worst-group error ``max_k e_k``.

Convention (project-wide): a group with no accepted sample (zero accepted weight) has
``e_k = 1.0``; likewise the selective risk of a rule that accepts nothing is ``1.0`` (not 0.0),
so rejecting everything can never look like a perfect classifier.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "balanced_error",
    "coverage",
    "group_coverage",
    "group_errors",
    "min_group_coverage",
    "selective_metrics",
    "selective_risk",
    "worst_group_error",
]


WEIGHT_FLOOR = 1e-12
"""The weights' domain: finite, >= 0; a subnormal weight, or one below WEIGHT_FLOOR x the largest
weight, counts as 0 (it would underflow when a tie block is accepted fractionally, and a group's
error would jump between 0 and 1 along the curve)."""


def _weights(w: Any, n: int) -> np.ndarray:
    """float64 weights [n]; ``None`` -> ones. Rejects negative or non-finite weights; subnormal
    weights and weights below ``WEIGHT_FLOOR * max(w)`` are set to 0 (the documented domain)."""
    if w is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"w has {w.shape[0]} entries, expected {n}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    floor = max(WEIGHT_FLOOR * float(w.max(initial=0.0)), np.finfo(np.float64).tiny)
    if np.any((w > 0) & (w < floor)):
        w = np.where(w < floor, 0.0, w)
    return w


def _labels(y: Any, name: str = "y") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype.kind not in "iub":
        raise ValueError(f"{name} must be integer, got {y.dtype}")
    return y.astype(np.int64, copy=False)


def _groups(y: Any, class_to_group: Any) -> tuple[np.ndarray, int]:
    """Group of every sample g(y_i) [N] and the number of groups K = max(class_to_group) + 1."""
    y = _labels(y)
    c2g = _labels(class_to_group, "class_to_group")
    if c2g.size == 0 or c2g.min() < 0:
        raise ValueError("class_to_group must be non-empty with groups in 0..K-1")
    if y.size and (y.min() < 0 or y.max() >= c2g.size):
        raise ValueError(f"labels must lie in 0..{c2g.size - 1}")
    return c2g[y], int(c2g.max()) + 1


def _accept(accept: Any, n: int | None = None) -> np.ndarray:
    a = np.asarray(accept).reshape(-1).astype(bool, copy=False)
    if n is not None and a.shape[0] != n:
        raise ValueError(f"accept has {a.shape[0]} entries, expected {n}")
    return a


def _safe_ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """num / den where den > 0 else ``empty`` (no warnings, no NaN), clipped to [0, 1]."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return np.clip(out, 0.0, 1.0)


def coverage(accept: Any, w: Any = None) -> float:
    """Weighted coverage ``cov = sum_i w_i a_i / sum_i w_i`` (0.0 if the total weight is 0)."""
    a = _accept(accept)
    w = _weights(w, a.shape[0])
    return float(_safe_ratio(np.sum(w * a), np.sum(w), 0.0))


def group_coverage(accept: Any, y: Any, class_to_group: Any, w: Any = None) -> np.ndarray:
    """Per-group coverage ``cov_k = sum_{G_k} w a / sum_{G_k} w`` [K]; 0.0 for an empty group."""
    g, K = _groups(y, class_to_group)
    a = _accept(accept, g.shape[0])
    w = _weights(w, g.shape[0])
    acc_w = np.bincount(g, weights=w * a, minlength=K)
    tot_w = np.bincount(g, weights=w, minlength=K)
    return _safe_ratio(acc_w, tot_w, 0.0)


def min_group_coverage(accept: Any, y: Any, class_to_group: Any, w: Any = None) -> float:
    """``min_k cov_k``."""
    return float(np.min(group_coverage(accept, y, class_to_group, w)))


def group_errors(accept: Any, pred: Any, y: Any, class_to_group: Any, w: Any = None) -> np.ndarray:
    """Per-group selective error e_k [K] = weighted error among the ACCEPTED samples of group k.

    ``e_k = sum_{G_k} w a [h != y] / sum_{G_k} w a``; ``e_k = 1.0`` when group k has zero
    accepted weight (no accepted sample, or the group is absent).
    """
    g, K = _groups(y, class_to_group)
    a = _accept(accept, g.shape[0])
    err = _labels(pred, "pred") != _labels(y)
    w = _weights(w, g.shape[0])
    wa = w * a
    acc_w = np.bincount(g, weights=wa, minlength=K)
    err_w = np.bincount(g, weights=wa * err, minlength=K)
    return _safe_ratio(err_w, acc_w, 1.0)


def selective_risk(accept: Any, pred: Any, y: Any, w: Any = None) -> float:
    """Standard selective risk ``R = sum_i w a [h != y] / sum_i w a``; 1.0 if nothing is accepted."""
    y = _labels(y)
    a = _accept(accept, y.shape[0])
    err = _labels(pred, "pred") != y
    w = _weights(w, y.shape[0])
    wa = w * a
    return float(_safe_ratio(np.sum(wa * err), np.sum(wa), 1.0))


def balanced_error(accept: Any, pred: Any, y: Any, class_to_group: Any, w: Any = None) -> float:
    """Group-balanced error ``(1/K) sum_k e_k`` (e_k from :func:`group_errors`)."""
    return float(np.mean(group_errors(accept, pred, y, class_to_group, w)))


def worst_group_error(accept: Any, pred: Any, y: Any, class_to_group: Any, w: Any = None) -> float:
    """Worst-group error ``max_k e_k`` (e_k from :func:`group_errors`)."""
    return float(np.max(group_errors(accept, pred, y, class_to_group, w)))


def selective_metrics(
    score: Any,
    pred: Any,
    y: Any,
    class_to_group: Any,
    w: Any = None,
    threshold: float = 0.0,
    view: str = "lt",
) -> dict[str, Any]:
    """All metrics of the rule ``accept iff score >= threshold`` under the weights of ``view``.

    For AR-GSE ``score`` is the plug-in margin m(x) and threshold 0 is the paper's rule.
    Returns a JSON-friendly dict: ``view``, ``threshold``, ``n``, ``coverage``,
    ``group_coverage`` [K], ``min_group_coverage``, ``risk`` (standard selective risk),
    ``group_error`` [K] (e_k), ``balanced_error`` (mean_k e_k), ``worst_group_error`` (max_k e_k).
    """
    s = np.asarray(score).reshape(-1)
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError("score contains NaN")
    accept = s >= threshold
    gcov = group_coverage(accept, y, class_to_group, w)
    gerr = group_errors(accept, pred, y, class_to_group, w)
    return {
        "view": view,
        "threshold": float(threshold),
        "n": int(s.shape[0]),
        "coverage": coverage(accept, w),
        "group_coverage": gcov.tolist(),
        "min_group_coverage": float(gcov.min()),
        "risk": selective_risk(accept, pred, y, w),
        "group_error": gerr.tolist(),
        "balanced_error": float(gerr.mean()),
        "worst_group_error": float(gerr.max()),
    }
