"""Pointwise bootstrap bands of risk-coverage curves (for the report's figures).

A curve is read at the coverages ``q`` (default the grid 0.01..1.00) exactly as
:func:`argse_cli.metrics.rc.rc_curve` / :func:`argse_cli.metrics.refit.refit_rc` read it: point i
from its own score ``S[i]`` (a refitted rule per coverage) or, for a threshold sweep, from one
score at every point. With several seeds the curve is the **seed mean** at each point (the
tables' convention). Its band is the pointwise percentile interval of that seed-mean curve over
class-stratified bootstrap resamples of the test rows (:class:`argse_cli.metrics.bootstrap.
_Stratified`: the same resamples for every seed, point and method, given ``seed``).

A pointwise band covers each point separately (not the whole curve at once); it is drawn as a
shaded region around the curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..metrics.bootstrap import _Stratified
from ..metrics.rc import COVERAGE_GRID, _accepted_at, _blocks, _cum_weights, _risks
from ..metrics.refit import _Windows, refit_rc

KINDS = ("balanced_risk", "worst_risk")


def rc_band(curves: Sequence[tuple[Any, Any]], y: Any, class_to_group: Any, w: Any = None, *,
            coverages: Any = None, n_boot: int = 200, seed: int = 0, ci: float = 0.95,
            kinds: Sequence[str] = KINDS, chunk: int = 50) -> dict[str, dict[str, list[float]]]:
    """Seed-mean curve and its pointwise bootstrap band for each risk in ``kinds``.

    ``curves``: one ``(S, P)`` per seed, each either ``[Q, N]`` (a refitted curve: point i read off
    ``S[i]``) or ``[N]`` (a sweep: one score read at every coverage). Returns
    ``{kind: {"coverage", "mean", "lo", "hi"}}`` (lists of length Q; ``n_boot = 0``: the curve
    only, ``lo`` / ``hi`` None).
    """
    q = np.asarray(COVERAGE_GRID if coverages is None else coverages, np.float64)
    Q = q.size
    yy = np.asarray(y, np.int64)
    c2g = np.asarray(class_to_group, np.int64)
    ww = np.ones(yy.size) if w is None else np.asarray(w, np.float64)
    est = {k: np.zeros(Q) for k in kinds}
    boot = {k: np.zeros((n_boot, Q)) for k in kinds}
    n = len(curves)
    for S, P in curves:
        S, P = np.asarray(S), np.asarray(P)
        if S.ndim == 1:  # a sweep: one score read at every coverage (one tie-block reading)
            bl = _blocks(S, P, yy, c2g, w)
            r = _risks(*_accepted_at(_cum_weights(bl), bl, q))
            for k in kinds:
                est[k] += r[k][0] / n
            if not n_boot:
                continue
            plan = _Stratified(yy, n_boot, seed)
            for r0, r1, pos in plan.chunks(chunk):
                rb = _risks(*_accepted_at(_cum_weights(bl, plan.order[pos]), bl, q))
                for k in kinds:
                    boot[k][r0:r1] += rb[k] / n
            continue
        c = refit_rc(S, P, yy, c2g, w, q)
        for k in kinds:
            est[k] += getattr(c, k) / n
        for r0, r1, r in (_point_samples(S, P, yy, c2g, w, ww, q, n_boot, seed, chunk) if n_boot else ()):
            for k in kinds:
                boot[k][r0:r1] += r[k] / n
    a = 100 * (1 - ci) / 2
    out = {}
    for k in kinds:
        lo, hi = np.percentile(boot[k], [a, 100 - a], axis=0) if n_boot else (None, None)
        out[k] = {"coverage": q.tolist(), "mean": est[k].tolist(),
                  "lo": None if lo is None else lo.tolist(), "hi": None if hi is None else hi.tolist()}
    return out


def _point_samples(S: np.ndarray, P: np.ndarray, y: np.ndarray, c2g: np.ndarray, w: Any, ww: np.ndarray,
                   q: np.ndarray, n_boot: int, seed: int, chunk: int):
    """Yield (r0, r1, {risk: [r1 - r0, Q]}) per chunk of resamples: every point's risks, read as
    :func:`argse_cli.metrics.refit.bootstrap_refit` reads them (a window around the cut, the full
    tie-block reading when a resample's cut leaves it) on the same class-stratified resamples."""
    plan = _Stratified(y, n_boot, seed)
    N, K = plan.n, int(c2g.max()) + 1
    win = _Windows(S, P, y, c2g[y], ww, q, K)
    for r0, r1, pos in plan.chunks(chunk):
        b = r1 - r0
        draws = plan.order[pos] + (np.arange(b, dtype=np.int64) * N)[:, None]
        cnt = np.bincount(draws.ravel(), minlength=b * N).reshape(b, N).astype(np.float64)
        r = win.risks(cnt, cnt @ ww)
        miss = ~r.pop("inside")
        for i in np.flatnonzero(miss.any(axis=0)):
            m = miss[:, i]
            bl = _blocks(S[i], P[i], y, c2g, w)
            full = _risks(*_accepted_at(_cum_weights(bl, plan.order[pos[m]]), bl, q[i : i + 1]))
            for k in r:
                r[k][m, i] = full[k][:, 0]
        yield r0, r1, r
