"""Temperature scaling of an expert's TRAINING-prior posterior (Guo et al., 2017).

    eta_train(x; T) = softmax((f + tau log pi) / T)
    T* = argmin_{T in bounds} NLL_w(T),  NLL_w(T) = -(1/W) sum_i w_i log eta_train(x_i; T)_{y_i}

``w`` are importance weights of the fit set (e.g. ``w_lt``); None = unit weights. The search runs
over log T (bounded Brent, float64); T = 1 is returned whenever it is at least as good, so fitting
never raises the fit-set NLL above that of T = 1. Reported metrics (NLL, ECE) come from
:mod:`argse_cli.metrics.calibration` (imported lazily).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["calibration_metrics", "fit_temperature", "weighted_nll_at_T"]


def _np64(a: Any) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        a = a.detach().cpu().float().numpy()
    return np.asarray(a, dtype=np.float64)


def _shifted(logits: Any, log_pi: Any, tau: float) -> np.ndarray:
    """z = f + tau log pi in float64."""
    z = _np64(logits)
    if tau != 0:
        z = z + float(tau) * _np64(log_pi)[None, :]
    return z


def _weighted_nll(z: np.ndarray, y: np.ndarray, w: np.ndarray, T: float) -> float:
    """-(1/W) sum_i w_i log softmax(z_i / T)_{y_i}, float64 via logsumexp."""
    s = z / T
    m = s.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.sum(w * (lse - s[np.arange(s.shape[0]), y])) / np.sum(w))


def _weights(w: Any, n: int) -> np.ndarray:
    if w is None:
        return np.ones(n, dtype=np.float64)
    w = _np64(w).reshape(-1)
    if w.shape[0] != n or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("w must be N finite non-negative weights with a positive sum")
    return w


def weighted_nll_at_T(logits: Any, y: Any, log_pi: Any, tau: float, T: float, w: Any = None):
    """NLL_w(T) of softmax((f + tau log pi) / T), float64 (the objective of :func:`fit_temperature`)."""
    z = _shifted(logits, log_pi, tau)
    y = _np64(y).astype(np.int64)
    return _weighted_nll(z, y, _weights(w, z.shape[0]), float(T))


def fit_temperature(
    logits: Any,
    y: Any,
    log_pi: Any,
    tau: float,
    w: Any = None,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """T* minimising the w-weighted NLL of eta_train(x; T) over log T in log(bounds)."""
    from scipy.optimize import minimize_scalar

    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < lo < hi, got {bounds}")
    z = _shifted(logits, log_pi, tau)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty [N, C] array, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits + tau log pi must be finite")
    yy = _np64(y).astype(np.int64).reshape(-1)
    ww = _weights(w, z.shape[0])

    def obj(log_t: float) -> float:
        return _weighted_nll(z, yy, ww, math.exp(log_t))

    res = minimize_scalar(
        obj, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6}
    )
    best_t, best = math.exp(float(res.x)), float(res.fun)
    for t in (lo, hi, 1.0):  # the bounded search never evaluates the end points exactly
        if lo <= t <= hi:
            v = obj(math.log(t))
            if v < best or (t == 1.0 and v <= best):
                best_t, best = t, v
    return best_t


def calibration_metrics(
    logits: Any, y: Any, log_pi: Any, tau: float, T: float = 1.0, w: Any = None, n_bins: int = 15
) -> dict[str, float]:
    """{"nll", "ece"} of eta_train(x; T) under weights ``w`` (metrics from argse_cli.metrics)."""
    from argse_cli.experts.posterior import train_prior_posterior
    from argse_cli.metrics.calibration import ece, nll

    lp = None if log_pi is None else _np64(log_pi)
    p = train_prior_posterior(_np64(logits).astype(np.float32), lp, tau, T)
    y = _np64(y).astype(np.int64)
    return {"nll": nll(p, y, w), "ece": ece(p, y, n_bins=n_bins, w=w)}
