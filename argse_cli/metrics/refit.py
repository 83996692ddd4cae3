"""Risk-coverage curves of REFITTED rules (the paper's protocol for plug-in rules) and their bootstrap.

A refitted curve has one rule per target coverage q (fitted on validation data at that coverage,
:mod:`argse_cli.core.plugin_fit`); its test score ``score[i]`` [N] is that rule's margin shifted so
that accepting ``score >= 0`` has coverage q on the test split (``curve_scores``). The curve's
point at q is read off ``score[i]`` at coverage q exactly as :func:`argse_cli.metrics.rc.rc_curve`
reads a sweep (weighted coverage of the view, tie blocks accepted fractionally, a group with
nothing accepted has error 1.0). Hence the same conventions for both views:

- AURC (standard / balanced / worst) = mean of the risk over the coverage grid 0.01..1.00, each
  point from its own rule (:data:`argse_cli.metrics.rc.AURC_CONVENTION`);
- errors at coverage l = the point of the curve at q = l.

Out-of-fold pooling (cross-fitting): each fold's scores are shifted to its own test coverage q, so
pooling the folds' rows and reading the pooled scores at coverage q is the union of the folds'
accept sets, re-cut at exactly q.

The bootstrap resamples the test rows (class-stratified, as :func:`bootstrap_rc`); a resample is
a count vector over rows shared by every coverage and every method, so paired differences use
the same resamples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from argse_cli.metrics.bootstrap import _interval, _levels, _Stratified, stat_names
from argse_cli.metrics.rc import COVERAGE_GRID, RCCurve, _accepted_at, _blocks, _cum_weights, _risks

__all__ = ["bootstrap_refit", "refit_aurc", "refit_rc", "refit_stats"]


def _check(scores: Any, preds: Any, coverages: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    S = np.asarray(scores)
    P = np.asarray(preds)
    q = np.asarray(COVERAGE_GRID if coverages is None else coverages, np.float64)
    if S.ndim != 2 or S.shape != P.shape or S.shape[0] != q.size:
        raise ValueError("scores and preds must be [Q, N] with Q = len(coverages)")
    return S, P, q


def refit_rc(scores: Any, preds: Any, y: Any, class_to_group: Any, w: Any = None,
             coverages: Any = None, view: str = "lt") -> RCCurve:
    """The refitted curve: point i read off (scores[i], preds[i]) at coverage coverages[i]."""
    S, P, q = _check(scores, preds, coverages)
    K = int(np.asarray(class_to_group).max()) + 1
    out = {k: np.empty(q.size) for k in ("risk", "balanced_risk", "worst_risk")}
    ge, gc = np.empty((q.size, K)), np.empty((q.size, K))
    for i in range(q.size):
        bl = _blocks(S[i], P[i], y, class_to_group, w)
        A, E, Wk = _accepted_at(_cum_weights(bl), bl, q[i : i + 1])
        r = _risks(A, E, Wk)
        for k in out:
            out[k][i] = r[k][0, 0]
        ge[i], gc[i] = r["group_error"][0, 0], r["group_coverage"][0, 0]
    return RCCurve(view=view, coverage=q.copy(), risk=out["risk"], balanced_risk=out["balanced_risk"],
                   worst_risk=out["worst_risk"], group_error=ge, group_coverage=gc)


def _grid_positions(q: np.ndarray) -> np.ndarray:
    pos = np.array([int(np.argmin(np.abs(q - g))) for g in COVERAGE_GRID])
    if not np.allclose(q[pos], COVERAGE_GRID, atol=1e-9):
        raise ValueError("a refitted curve needs every coverage of the grid 0.01..1.00 for its AURC")
    return pos


def refit_aurc(curve: RCCurve, kind: str = "standard") -> float:
    """Mean risk of the refitted curve over the grid 0.01..1.00."""
    r = {"standard": curve.risk, "balanced": curve.balanced_risk, "worst": curve.worst_risk}[kind]
    return float(np.mean(r[_grid_positions(curve.coverage)]))


def _stats_from(r: dict[str, np.ndarray], q: np.ndarray, lv: np.ndarray) -> np.ndarray:
    """[B, 3 + 2L] statistics (names: :func:`stat_names`) from per-point risks r[k] [B, Q]."""
    pos = _grid_positions(q)
    lpos = [int(np.argmin(np.abs(q - x))) for x in lv]
    if not np.allclose(q[lpos], lv, atol=1e-9):
        raise ValueError("every level must be one of the curve's coverages")
    B = r["risk"].shape[0]
    out = np.empty((B, 3 + 2 * lv.size))
    out[:, 0] = r["risk"][:, pos].mean(axis=1)
    out[:, 1] = r["balanced_risk"][:, pos].mean(axis=1)
    out[:, 2] = r["worst_risk"][:, pos].mean(axis=1)
    out[:, 3::2] = r["balanced_risk"][:, lpos]
    out[:, 4::2] = r["worst_risk"][:, lpos]
    return out


def refit_stats(scores: Any, preds: Any, y: Any, class_to_group: Any, w: Any = None,
                coverages: Any = None, levels: Sequence[float] = (0.7, 0.8, 0.9)) -> dict[str, float]:
    """The bootstrapped statistics (``aurc_*``, ``balanced_error@l``, ``worst_error@l``) of the
    original sample."""
    c = refit_rc(scores, preds, y, class_to_group, w, coverages)
    r = {"risk": c.risk[None], "balanced_risk": c.balanced_risk[None], "worst_risk": c.worst_risk[None]}
    lv = _levels(levels)
    return dict(zip(stat_names(lv), _stats_from(r, c.coverage, lv)[0].tolist(), strict=True))


class _Windows:
    """The Q coverage points of one refitted curve, arranged for the bootstrap.

    Point i's rows in descending score order form tie blocks; channels ch = 2 g(y) + [h != y]. The
    rows of the blocks well above the original sample's cut at q_i (the "prefix") are accepted by
    (almost) every resample: their channel sums for all points are one matrix product per chunk of
    resamples. Only a window of blocks around the cut is walked per resample, vectorised over the
    points; its half-width is 6 standard deviations of the accepted weight under class-stratified
    resampling, sum_c w_c^2 n_c p_c (1 - p_c), plus one row. A resample whose cut leaves the window
    is read by the full tie-block machinery of :func:`rc_curve` (exact either way)."""

    def __init__(self, S: np.ndarray, P: np.ndarray, y: np.ndarray, g: np.ndarray, w: np.ndarray,
                 q: np.ndarray, K: int):
        Q, N = S.shape
        self.K, self.q = K, q
        self.M = np.zeros((N, Q * 2 * K))  # prefix channel weights (original row numbering)
        spans, rows, chs, ws, ends = [], [], [], [], []
        classes, cinv = np.unique(y, return_inverse=True)
        for i in range(Q):
            order = np.argsort(-S[i], kind="stable")
            ss = S[i][order]
            end = np.r_[ss[1:] != ss[:-1], True]  # last row of its tie block
            wo = w[order]
            ch = (2 * g + (P[i] != y))[order]
            cw = np.cumsum(wo)
            cut = min(int(np.searchsorted(cw, q[i] * cw[-1])), N - 1)
            acc = np.zeros(N, bool)
            acc[order[: cut + 1]] = True
            n_c = np.bincount(cinv, minlength=len(classes))
            p_c = np.bincount(cinv, weights=acc, minlength=len(classes)) / np.maximum(n_c, 1)
            w_c = np.bincount(cinv, weights=w, minlength=len(classes)) / np.maximum(n_c, 1)
            margin = 6.0 * np.sqrt(np.sum(w_c**2 * n_c * p_c * (1 - p_c))) + w.max()
            lo = int(np.searchsorted(cw, cw[cut] - margin))
            hi = int(np.searchsorted(cw, cw[cut] + margin)) + 1
            lo = int(np.flatnonzero(end[:lo])[-1]) + 1 if lo > 0 and end[:lo].any() else 0  # block-aligned
            hi = min(N, int(np.flatnonzero(end[hi - 1 :])[0]) + hi) if hi <= N else N
            pre = order[:lo]
            self.M[pre, i * 2 * K + ch[:lo]] = wo[:lo]
            spans.append((lo, hi))
            rows.append(order[lo:hi])
            chs.append(ch[lo:hi])
            ws.append(wo[lo:hi])
            ends.append(end[lo:hi])
        L = max(1, max(hi - lo for lo, hi in spans))
        self.rows = np.zeros((Q, L), np.int64)
        self.wsum = np.zeros((Q, L))  # w_i of each window row (zeros pad)
        self.onehot = np.zeros((Q, L, 2 * K))  # the channel of each window row
        self.end = np.zeros((Q, L), bool)
        for i in range(Q):
            n = len(rows[i])
            self.rows[i, :n] = rows[i]
            self.wsum[i, :n] = ws[i]
            self.onehot[i, np.arange(n), chs[i]] = 1.0
            self.end[i, :n] = ends[i]
        self.prev = _prev_end(self.end)

    def risks(self, cnt: np.ndarray, wtot: np.ndarray) -> dict[str, np.ndarray]:
        """Risks [b, Q] and the mask [b, Q] of resamples whose cut lies inside the window."""
        b, Q, K = cnt.shape[0], self.q.size, self.K
        pre = (cnt @ self.M).reshape(b, Q, 2 * K)
        V = cnt[:, self.rows] * self.wsum[None]  # [b, Q, L] resampled weight of each window row
        T = np.cumsum(V, axis=2) + pre.sum(axis=2)[:, :, None]
        goal = (self.q[None, :] * wtot[:, None])[:, :, None]
        hit = (T >= goal) & self.end[None]
        j = np.argmax(hit, axis=2)  # the first block end reaching the goal
        inside = hit.any(axis=2) & (pre.sum(axis=2) < goal[:, :, 0])
        prev = self.prev[np.arange(Q)[None, :], j]  # the previous block's end (-1: the prefix)
        L = V.shape[2]
        pos = np.arange(L)[None, None, :]
        Vt = V.transpose(1, 0, 2)  # [Q, b, L]
        C1 = np.matmul(Vt * (pos <= j.T[:, :, None]), self.onehot).transpose(1, 0, 2) + pre  # [b, Q, 2K]
        C0 = np.matmul(Vt * (pos <= prev.T[:, :, None]), self.onehot).transpose(1, 0, 2) + pre
        t0, t1 = C0.sum(axis=2), C1.sum(axis=2)
        f = np.clip(np.divide(goal[:, :, 0] - t0, t1 - t0, out=np.ones_like(t0), where=t1 > t0), 0.0, 1.0)
        Cq = (C0 + f[..., None] * (C1 - C0)).reshape(b, Q, K, 2)
        E, A = Cq[..., 1], Cq[..., 0] + Cq[..., 1]
        r = _risks(A, E, np.ones((b, K)))
        return {"risk": r["risk"], "balanced_risk": r["balanced_risk"], "worst_risk": r["worst_risk"],
                "inside": inside}


def _prev_end(end: np.ndarray) -> np.ndarray:
    """[Q, L]: for each position, the index of the last block end strictly before it (-1 if none)."""
    Q, L = end.shape
    idx = np.where(end, np.arange(L)[None, :], -1)
    last = np.maximum.accumulate(idx, axis=1)
    out = np.full((Q, L), -1)
    out[:, 1:] = last[:, :-1]
    return out


def _boot_samples(methods: Sequence[tuple[Any, Any]], y: Any, class_to_group: Any, w: Any, q: np.ndarray,
                  lv: np.ndarray, n_boot: int, seed: int, chunk: int = 32) -> list[np.ndarray]:
    """Per-resample statistics [B, S] of every method on the SAME class-stratified resamples (the
    draw counts of a chunk of resamples are computed once and shared by every point and method)."""
    plan = _Stratified(y, n_boot, seed)
    N = plan.n
    yy = np.asarray(y, np.int64)
    c2g = np.asarray(class_to_group, np.int64)
    K = int(c2g.max()) + 1
    ww = np.ones(N) if w is None else np.asarray(w, np.float64)
    wins = [_Windows(np.asarray(S), np.asarray(P), yy, c2g[yy], ww, q, K) for S, P in methods]
    outs = [np.empty((n_boot, 3 + 2 * lv.size)) for _ in methods]
    for r0, r1, pos in plan.chunks(chunk):
        b = r1 - r0
        draws = plan.order[pos] + (np.arange(b, dtype=np.int64) * N)[:, None]
        cnt = np.bincount(draws.ravel(), minlength=b * N).reshape(b, N).astype(np.float64)
        wtot = cnt @ ww
        for (S, P), win, out in zip(methods, wins, outs, strict=True):
            r = win.risks(cnt, wtot)
            miss = ~r.pop("inside")
            for i in np.flatnonzero(miss.any(axis=0)):  # the cut left the window: the full reading
                m = miss[:, i]
                bl = _blocks(S[i], P[i], y, class_to_group, w)
                full = _risks(*_accepted_at(_cum_weights(bl, plan.order[pos[m]]), bl, q[i : i + 1]))
                for k in r:
                    r[k][m, i] = full[k][:, 0]
            out[r0:r1] = _stats_from(r, q, lv)
    return outs


def bootstrap_refit(methods: Sequence[tuple[Any, Any]], y: Any, class_to_group: Any, w: Any = None,
                    coverages: Any = None, levels: Sequence[float] = (0.7, 0.8, 0.9), n_boot: int = 1000,
                    seed: int = 0, ci: float = 0.95, return_samples: bool = False) -> list[dict[str, Any]]:
    """Percentile CIs of the refitted curves' statistics; ``methods`` = [(scores [Q, N], preds [Q, N])]
    evaluated on the same rows and the same resamples (so differences are paired)."""
    q = np.asarray(COVERAGE_GRID if coverages is None else coverages, np.float64)
    for S, P in methods:
        _check(S, P, q)
    lv = _levels(levels)
    names = stat_names(lv)
    samples = _boot_samples(methods, y, class_to_group, w, q, lv, n_boot, seed)
    res = []
    for (S, P), smp in zip(methods, samples, strict=True):
        est = refit_stats(S, P, y, class_to_group, w, q, lv)
        lo, hi = _interval(smp, ci)
        d = {"n_boot": int(n_boot), "seed": int(seed), "ci": float(ci),
             "method": "class-stratified bootstrap of the refitted curve, percentile interval",
             "stats": {n: {"estimate": est[n], "lo": float(a), "hi": float(b)}
                       for n, a, b in zip(names, lo, hi, strict=True)}}
        if return_samples:
            d["samples"] = smp
        res.append(d)
    return res
