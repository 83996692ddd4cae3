"""Calibration metrics of a posterior ``probs`` [N, C] (float32 in, float64 accumulation).

- ECE: equal-width bins on the confidence ``conf_i = max_y p_iy`` over [0, 1], bin b holding
  ``(b/B, (b+1)/B]`` (bin 0 also holds 0);
  ``ECE = sum_b (W_b / W) |acc_b - conf_b|`` with W_b the weight in bin b, acc_b the weighted
  accuracy of ``argmax_y p_iy`` and conf_b the weighted mean confidence in bin b.
- NLL: ``-(1/W) sum_i w_i log(max(p_{i,y_i}, 1e-12))``.

``w`` = sample weights of the view (``w_lt`` / ``w_bal``; None = unit weights).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from argse_cli.metrics.selective import _labels, _weights

__all__ = ["PROB_CLIP", "ece", "nll"]

PROB_CLIP = 1e-12


def _probs(probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {p.shape}")
    y = _labels(y)
    if y.shape[0] != p.shape[0]:
        raise ValueError("probs and y must have the same number of rows")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs must be finite")
    return p, y


def ece(probs: Any, y: Any, n_bins: int = 15, w: Any = None) -> float:
    """Weighted expected calibration error with ``n_bins`` equal-width confidence bins."""
    p, y = _probs(probs, y)
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    w = _weights(w, p.shape[0])
    W = float(np.sum(w))
    if W <= 0:
        return 0.0
    conf = np.max(p, axis=1).astype(np.float64)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    Ab = np.bincount(b, weights=w * correct, minlength=n_bins)
    Cb = np.bincount(b, weights=w * conf, minlength=n_bins)
    # sum_b (W_b/W) |A_b/W_b - C_b/W_b| = sum_b |A_b - C_b| / W
    return float(np.sum(np.abs(Ab - Cb)) / W)


def nll(probs: Any, y: Any, w: Any = None) -> float:
    """Weighted mean negative log-likelihood ``-(1/W) sum_i w_i log(max(p_{i,y_i}, 1e-12))``."""
    p, y = _probs(probs, y)
    w = _weights(w, p.shape[0])
    W = float(np.sum(w))
    if W <= 0:
        return 0.0
    py = p[np.arange(p.shape[0]), y].astype(np.float64)
    return float(-np.sum(w * np.log(np.maximum(py, PROB_CLIP))) / W)
