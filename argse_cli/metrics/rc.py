"""Risk-coverage curves and areas under them (numpy, float64 accumulation).

The curve is traced by sweeping a threshold over ``score`` (higher = more confident; for AR-GSE
the plug-in margin m(x)): the samples are sorted by score descending and accepted from the top.
Coverage is WEIGHTED coverage ``sum_i w_i a_i / sum_i w_i`` under the weights of the view
(``w_lt`` / ``w_bal``; ``None`` = unit weights).

Ties: samples with equal scores form a *tie block* that is never split arbitrarily. When a target
coverage falls inside a block the block is accepted fractionally (the expectation under random
tie-breaking): its accepted weight and accepted error-weight, overall and per group, scale by the
same fraction ``f = (cov - cov_before) / (cov_after - cov_before)``. All cumulative quantities are
therefore piecewise linear in coverage between tie-block boundaries.

Risks at a coverage (A_k, E_k: accepted weight / error-weight of group k):
standard ``R = sum_k E_k / sum_k A_k``; group error ``e_k = E_k / A_k`` (1.0 if A_k = 0);
group-balanced ``(1/K) sum_k e_k``; worst-group ``max_k e_k``.

Area convention (:data:`AURC_CONVENTION`): ``aurc`` = mean of the risk over the coverage grid
0.01, 0.02, ..., 1.00 (:data:`COVERAGE_GRID`). :func:`geifman_aurc` is the exact discrete AURC of
Geifman et al. (mean over k = 1..N of the top-k risk) used for E-AURC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from argse_cli.metrics.selective import _groups, _labels, _weights

__all__ = [
    "AURC_CONVENTION",
    "COVERAGE_GRID",
    "RCCurve",
    "augrc",
    "aurc",
    "e_aurc",
    "errors_at_coverage",
    "geifman_aurc",
    "optimal_aurc",
    "rc_curve",
    "trapezoid_area",
]

COVERAGE_GRID: np.ndarray = np.round(np.arange(1, 101) / 100, 2)
"""Default coverage grid 0.01, 0.02, ..., 1.00 (100 points)."""

AURC_CONVENTION: str = (
    "AURC = mean of the selective risk over the weighted-coverage grid 0.01, 0.02, ..., 1.00 "
    "(100 points); risk at each coverage from a threshold sweep over the score, tie blocks "
    "accepted fractionally (expectation under random tie-breaking); a group with zero accepted "
    "weight has error 1.0. AUGRC = mean over the same grid of the generalized risk "
    "P(error and accepted)."
)
"""One-line description of the AURC convention, for output files."""


# --------------------------------------------------------------------------------------------
# core: tie blocks x groups, cumulative sums, interpolation at target coverages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    """Samples arranged for cumulative sums by (channel, tie block).

    Tie blocks j = 0..M-1 are the distinct scores in DESCENDING order. Each sample has a channel
    ``ch = 2 g(y) + [h != y]`` (group x error flag, 2K channels). ``perm`` orders the samples by
    (channel, block); with S the cumulative sum of the weights in that order (leading 0), the
    weight of channel ch in the first j blocks is ``S[ptr[j, ch]] - S[start[ch]]``.
    """

    perm: np.ndarray  # [N] sample index at each (channel, block)-ordered position
    chpos: np.ndarray  # [N] inverse of perm: position of sample i
    w_ch: np.ndarray  # [N] float64 weights in perm order
    ptr: np.ndarray  # [M + 1, 2K] position after the samples of channel ch with block < j
    start: np.ndarray  # [2K] first position of channel ch
    n_blocks: int  # M
    n_groups: int  # K
    unit: bool  # w is None (unit weights)


def _blocks(score: Any, pred: Any, y: Any, class_to_group: Any, w: Any = None) -> _Blocks:
    s = np.asarray(score).reshape(-1)
    if s.size == 0:
        raise ValueError("empty input")
    if s.dtype.kind not in "iubf":
        raise ValueError(f"score must be numeric, got {s.dtype}")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError("score contains NaN")
    g, K = _groups(y, class_to_group)
    yy = _labels(y)
    pp = _labels(pred, "pred")
    if not (s.shape[0] == g.shape[0] == pp.shape[0]):
        raise ValueError("score, pred and y must have the same length")
    ww = _weights(w, s.shape[0])
    uniq, inv = np.unique(s, return_inverse=True)
    M = int(uniq.shape[0])
    block = (M - 1) - inv.reshape(-1).astype(np.int64)  # 0 = highest score
    ch = g * 2 + (pp != yy)
    perm = np.lexsort((block, ch))
    chpos = np.empty_like(perm)
    chpos[perm] = np.arange(perm.shape[0])
    ch_s, block_s = ch[perm], block[perm]
    start = np.searchsorted(ch_s, np.arange(2 * K), side="left")
    end = np.searchsorted(ch_s, np.arange(2 * K), side="right")
    jj = np.arange(M + 1)
    ptr = np.stack(
        [
            a + np.searchsorted(block_s[a:b], jj, side="left")
            for a, b in zip(start, end, strict=True)
        ],
        axis=1,
    )
    return _Blocks(
        perm=perm,
        chpos=chpos,
        w_ch=ww[perm],
        ptr=ptr,
        start=start,
        n_blocks=M,
        n_groups=K,
        unit=w is None,
    )


def _cum_weights(bl: _Blocks, pos: np.ndarray | None = None, posmap: Any = None) -> np.ndarray:
    """Cumulative weights S [B, N + 1] in (channel, block) order, S[:, 0] = 0.

    ``pos`` [B, N]: draws of B resamples (a sample drawn c times has weight c * w_i, i.e.
    ``w_b = w * bincount(idx_b)``); they index ``posmap`` (default: sample index -> position,
    ``bl.chpos``). ``None`` = the original sample (B = 1).
    """
    N = bl.w_ch.shape[0]
    if pos is None:
        S = np.zeros((1, N + 1), dtype=np.float64)
        np.cumsum(bl.w_ch, out=S[0, 1:])
        return S
    B = pos.shape[0]
    flat = (bl.chpos if posmap is None else posmap)[pos]
    flat += (np.arange(B, dtype=np.int64) * N)[:, None]
    cnt = np.bincount(flat.ravel(), minlength=B * N).reshape(B, N)
    S = np.zeros((B, N + 1), dtype=np.float64)
    if bl.unit:
        np.cumsum(cnt, axis=1, out=S[:, 1:])
    else:
        np.cumsum(cnt * bl.w_ch, axis=1, out=S[:, 1:])
    return S


def _accepted_at(
    S: np.ndarray, bl: _Blocks, cov: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accepted weight A and error-weight E per group at each target coverage.

    S: [B, N + 1] cumulative weights from :func:`_cum_weights`. Returns A [B, Q, K],
    E [B, Q, K] and the group total weights [B, K]. With CW_j the cumulative weight of the first
    j tie blocks and ``cn_j = CW_j / CW_M``, the target coverage c falls in block j with
    ``cn_{j-1} < c <= cn_j`` (vectorised binary search over j); that block is accepted with the
    fraction ``f = (c - cn_{j-1}) / (cn_j - cn_{j-1})`` for the weight and the error-weight of
    every group alike: ``A_k = CW_{k,j-1} + f (CW_{k,j} - CW_{k,j-1})`` (same for E_k).
    """
    B, N1 = S.shape
    M, K = bl.n_blocks, bl.n_groups
    Q = len(cov)
    Sf = S.ravel()
    roff = (np.arange(B, dtype=np.intp) * N1)[:, None]  # [B, 1] row offsets into Sf
    ptr_t = np.ascontiguousarray(bl.ptr.T)  # [2K, M + 1]
    base = S[:, bl.start]  # [B, 2K]
    base_tot = base[:, :1].copy()  # [B, 1], summed in the same order as in cum_tot
    for c in range(1, 2 * K):
        base_tot += base[:, c : c + 1]

    def cum(j: np.ndarray) -> np.ndarray:  # j [B, Q'] -> [B, Q', 2K] weight of blocks < j
        return Sf.take(roff[:, :, None] + bl.ptr[j]) - base[:, None, :]

    def cum_tot(j: np.ndarray) -> np.ndarray:  # j [B, Q'] -> [B, Q'] total weight, blocks < j
        t = Sf.take(roff + ptr_t[0][j])
        for c in range(1, 2 * K):
            t += Sf.take(roff + ptr_t[c][j])
        return t - base_tot

    Wch = cum(np.full((B, 1), M))[:, 0, :]  # [B, 2K]
    Wtot = cum_tot(np.full((B, 1), M))  # [B, 1]
    pos = Wtot > 0
    den = np.where(pos, Wtot, 1.0)
    q = np.broadcast_to(np.asarray(cov, dtype=np.float64), (B, Q))

    def cn(j: np.ndarray) -> np.ndarray:  # normalised cumulative weight cn_j
        return np.where(pos, cum_tot(j) / den, 0.0)

    lo = np.zeros((B, Q), dtype=np.intp)
    hi = np.full((B, Q), M + 1, dtype=np.intp)
    for _ in range(int(M + 1).bit_length() + 1):  # first j in [0, M] with cn_j >= c
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        less = cn(np.minimum(mid, M)) < q
        lo = np.where(active & less, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)
    j = np.clip(lo, 1, M)
    c0, c1 = cum(j - 1), cum(j)  # [B, Q, 2K]
    n0, n1 = cn(j - 1), cn(j)
    d = n1 - n0
    frac = np.ones_like(d)
    np.divide(q - n0, d, out=frac, where=d > 0)
    frac = np.clip(frac, 0.0, 1.0)[..., None]
    Cq = (c0 + frac * (c1 - c0)).reshape(B, Q, K, 2)
    E = Cq[..., 1]
    A = Cq[..., 0] + E
    Wk = Wch.reshape(B, K, 2).sum(axis=-1)
    return A, E, Wk


def _risks(A: np.ndarray, E: np.ndarray, Wk: np.ndarray) -> dict[str, np.ndarray]:
    """Risks from accepted weight / error-weight A, E [B, Q, K] and group totals Wk [B, K]."""
    At, Et = A.sum(axis=-1), E.sum(axis=-1)
    risk = np.ones_like(At)
    np.divide(Et, At, out=risk, where=At > 0)
    gerr = np.ones_like(A)
    np.divide(E, A, out=gerr, where=A > 0)
    gcov = np.zeros_like(A)
    Wkb = np.broadcast_to(Wk[:, None, :], A.shape)
    np.divide(A, Wkb, out=gcov, where=Wkb > 0)
    risk, gerr, gcov = np.clip(risk, 0, 1), np.clip(gerr, 0, 1), np.clip(gcov, 0, 1)
    return {
        "risk": risk,
        "group_error": gerr,
        "balanced_risk": gerr.mean(axis=-1),
        "worst_risk": gerr.max(axis=-1),
        "group_coverage": gcov,
    }


def _coverage_grid(coverages: Any) -> np.ndarray:
    cov = COVERAGE_GRID if coverages is None else np.asarray(coverages, dtype=np.float64)
    cov = np.atleast_1d(cov).astype(np.float64)
    if cov.ndim != 1 or not np.all(np.isfinite(cov)) or cov.min() < 0 or cov.max() > 1:
        raise ValueError("coverages must be a 1-D array in [0, 1]")
    return cov


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RCCurve:
    """Risk-coverage curve at target weighted coverages (all arrays float64).

    coverage [Q]; risk [Q] standard selective risk; balanced_risk [Q] = mean_k e_k;
    worst_risk [Q] = max_k e_k; group_error [Q, K] = e_k; group_coverage [Q, K] = cov_k.
    """

    view: str
    coverage: np.ndarray
    risk: np.ndarray
    balanced_risk: np.ndarray
    worst_risk: np.ndarray
    group_error: np.ndarray
    group_coverage: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists)."""
        return {
            "view": self.view,
            "coverage": self.coverage.tolist(),
            "risk": self.risk.tolist(),
            "balanced_risk": self.balanced_risk.tolist(),
            "worst_risk": self.worst_risk.tolist(),
            "group_error": self.group_error.tolist(),
            "group_coverage": self.group_coverage.tolist(),
        }


def rc_curve(
    score: Any,
    pred: Any,
    y: Any,
    class_to_group: Any,
    w: Any = None,
    coverages: Any = None,
    view: str = "lt",
) -> RCCurve:
    """Risk-coverage curve by a threshold sweep over ``score`` (descending), at ``coverages``.

    ``coverages`` defaults to :data:`COVERAGE_GRID` (0.01..1.00). Coverage is weighted
    coverage; a tie block straddling a target coverage is accepted fractionally (see module doc),
    so the returned coverage equals the target exactly (0 if the total weight is 0).
    A group with zero accepted weight at a coverage has e_k = 1.0; accepting nothing has risk 1.0.
    """
    cov = _coverage_grid(coverages)
    bl = _blocks(score, pred, y, class_to_group, w)
    A, E, Wk = _accepted_at(_cum_weights(bl), bl, cov)
    r = _risks(A, E, Wk)
    return RCCurve(
        view=view,
        coverage=cov.copy() if Wk.sum() > 0 else np.zeros_like(cov),
        risk=r["risk"][0],
        balanced_risk=r["balanced_risk"][0],
        worst_risk=r["worst_risk"][0],
        group_error=r["group_error"][0],
        group_coverage=r["group_coverage"][0],
    )


_KINDS = ("standard", "balanced", "worst")


def _as_curve(curve_or_args: Any) -> RCCurve:
    if isinstance(curve_or_args, RCCurve):
        return curve_or_args
    if isinstance(curve_or_args, Mapping):
        return rc_curve(**curve_or_args)
    if isinstance(curve_or_args, Sequence):
        return rc_curve(*curve_or_args)
    raise TypeError("expected an RCCurve, a tuple (score, pred, y, class_to_group[, w]) or a dict")


def _grid_mask(cov: np.ndarray) -> np.ndarray:
    """Positions of the default grid in ``cov``; raises if a grid point is missing."""
    pos = np.searchsorted(cov, COVERAGE_GRID - 1e-9)
    ok = (pos < cov.shape[0]) & (
        np.abs(cov[np.minimum(pos, cov.shape[0] - 1)] - COVERAGE_GRID) < 1e-9
    )
    if not ok.all():
        raise ValueError(
            "the curve does not contain every point of COVERAGE_GRID (0.01..1.00); "
            "compute it with the default coverages"
        )
    return pos


def _kind_risk(c: RCCurve, kind: str) -> np.ndarray:
    if kind == "standard":
        return c.risk
    if kind == "balanced":
        return c.balanced_risk
    if kind == "worst":
        return c.worst_risk
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def aurc(curve_or_args: Any, kind: str = "standard") -> float:
    """Area under the risk-coverage curve, project convention (:data:`AURC_CONVENTION`).

    ``AURC = (1/100) sum_{c in {0.01, ..., 1.00}} risk_kind(c)`` with ``kind`` in
    ``"standard"`` (selective risk), ``"balanced"`` (mean_k e_k), ``"worst"`` (max_k e_k).
    ``curve_or_args`` is an :class:`RCCurve` (must contain the whole default grid) or the
    arguments of :func:`rc_curve` as a tuple or dict.
    """
    c = _as_curve(curve_or_args)
    r = _kind_risk(c, kind)
    if c.coverage.shape == COVERAGE_GRID.shape and np.array_equal(c.coverage, COVERAGE_GRID):
        return float(np.mean(r))
    return float(np.mean(r[_grid_mask(c.coverage)]))


def augrc(curve_or_args: Any, kind: str = "standard") -> float:
    """Area under the generalized risk-coverage curve (Traub et al., 2024), mean over the grid.

    Generalized risk = joint probability of an error AND acceptance:
    ``standard``: ``risk(c) * c = sum_k E_k / sum_i w_i``;
    ``balanced``: ``(1/K) sum_k e_k(c) * cov_k(c)`` (per-group P(error, accepted | group k));
    ``worst``: ``max_k e_k(c) * cov_k(c)``. A group with zero accepted weight contributes 0
    (cov_k = 0). ``AUGRC = (1/100) sum_{c in 0.01..1.00} genrisk(c)``.
    """
    c = _as_curve(curve_or_args)
    if kind == "standard":
        g = c.risk * c.coverage
    elif kind in ("balanced", "worst"):
        gk = c.group_error * c.group_coverage
        g = gk.mean(axis=-1) if kind == "balanced" else gk.max(axis=-1)
    else:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if c.coverage.shape == COVERAGE_GRID.shape and np.array_equal(c.coverage, COVERAGE_GRID):
        return float(np.mean(g))
    return float(np.mean(g[_grid_mask(c.coverage)]))


def trapezoid_area(coverage: Any, risk: Any, lo: float = 0.0, hi: float = 1.0) -> float:
    """Trapezoid-rule integral of a (coverage, risk) table over [lo, hi]; NOT normalised.

    Returns ``int_lo^hi r(c) dc`` where r is the piecewise-linear interpolant of the table
    (coverage must be non-decreasing; repeated coverages give vertical steps). Endpoints lo/hi
    inside the table are interpolated; outside the table's range the risk is held constant at
    the first / last value (the np.interp convention). Divide by (hi - lo) for a mean risk.
    """
    x = np.asarray(coverage, dtype=np.float64).reshape(-1)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    if x.shape != r.shape or x.size == 0:
        raise ValueError("coverage and risk must be non-empty and of equal length")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(r))):
        raise ValueError("coverage and risk must be finite")
    if np.any(np.diff(x) < 0):
        raise ValueError("coverage must be non-decreasing")
    if hi < lo:
        raise ValueError("hi must be >= lo")
    # constant extensions outside the table
    area = r[0] * max(0.0, min(hi, x[0]) - lo) + r[-1] * max(0.0, hi - max(lo, x[-1]))
    if x.size > 1:
        x0, x1, r0, r1 = x[:-1], x[1:], r[:-1], r[1:]
        a = np.clip(x0, lo, hi)
        b = np.clip(x1, lo, hi)
        dx = x1 - x0
        has = (b > a) & (dx > 0)
        dxs = np.where(dx > 0, dx, 1.0)
        ra = r0 + (r1 - r0) * (a - x0) / dxs
        rb = r0 + (r1 - r0) * (b - x0) / dxs
        area += float(np.sum(np.where(has, 0.5 * (ra + rb) * (b - a), 0.0)))
    return float(area)


def errors_at_coverage(curve: RCCurve, levels: Sequence[float] = (0.7, 0.8, 0.9)) -> dict[str, Any]:
    """Standard, group-balanced and worst-group error at each coverage level.

    Returns ``{"view", "levels": [...], "standard": [...], "balanced": [...], "worst": [...]}``.
    Each level must be a coverage of the curve (the default grid holds 0.01..1.00); compute the
    curve with ``coverages=levels`` otherwise (no interpolation between curve points).
    """
    c = _as_curve(curve)
    lv = np.asarray(levels, dtype=np.float64).reshape(-1)
    pos = np.array([int(np.argmin(np.abs(c.coverage - v))) for v in lv], dtype=np.intp)
    if lv.size and np.any(np.abs(c.coverage[pos] - lv) > 1e-9):
        raise ValueError(f"levels {lv.tolist()} are not all coverages of the curve")
    return {
        "view": c.view,
        "levels": lv.tolist(),
        "standard": c.risk[pos].tolist(),
        "balanced": c.balanced_risk[pos].tolist(),
        "worst": c.worst_risk[pos].tolist(),
    }


# --------------------------------------------------------------------------------------------
# Geifman et al.'s exact discrete AURC and E-AURC (unit weights)
# --------------------------------------------------------------------------------------------


def _unit_only(w: Any, n: int) -> None:
    if w is None:
        return
    ww = _weights(w, n)
    if not np.all(ww == ww[0]) or ww[0] <= 0:
        raise ValueError(
            "geifman_aurc / e_aurc support unit (or constant positive) weights only; "
            "use aurc() for weighted views"
        )


def _geifman_terms(score: Any, pred: Any, y: Any) -> np.ndarray:
    """Top-k selective risks r_k, k = 1..N, expectation under random tie-breaking.

    ``r_k = Err(k) / k`` with Err(k) the expected number of errors among the top k: inside a tie
    block with n_b samples and r_b errors, taking m of them adds m * r_b / n_b errors. Computed
    as ``Err_lo + ((k - K_lo) * (Err_hi - Err_lo)) / (K_hi - K_lo)`` (integers, exact in float64).
    """
    s = np.asarray(score).reshape(-1)
    if s.size == 0:
        raise ValueError("empty input")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError("score contains NaN")
    err = (_labels(pred, "pred") != _labels(y)).astype(np.int64)
    if err.shape != s.shape:
        raise ValueError("score, pred and y must have the same length")
    n = s.shape[0]
    uniq, inv = np.unique(s, return_inverse=True)
    block = (uniq.shape[0] - 1) - inv.reshape(-1)
    M = uniq.shape[0]
    Kc = np.zeros(M + 1, dtype=np.int64)
    Ec = np.zeros(M + 1, dtype=np.int64)
    np.cumsum(np.bincount(block, minlength=M), out=Kc[1:])
    np.cumsum(np.bincount(block, weights=err, minlength=M).astype(np.int64), out=Ec[1:])
    k = np.arange(1, n + 1, dtype=np.int64)
    j = np.searchsorted(Kc, k, side="left")  # Kc[j-1] < k <= Kc[j]
    klo, khi, elo, ehi = Kc[j - 1], Kc[j], Ec[j - 1], Ec[j]
    num = elo * (khi - klo) + (k - klo) * (ehi - elo)  # exact integers
    return (num / (khi - klo)) / k.astype(np.float64)


def _optimal_terms(n_err: int, n: int) -> np.ndarray:
    """r*_k = max(k - (n - r), 0) / k, k = 1..n: all correct samples accepted first."""
    k = np.arange(1, n + 1, dtype=np.int64)
    num = np.maximum(k - (n - n_err), 0)
    return num.astype(np.float64) / k.astype(np.float64)


def geifman_aurc(score: Any, pred: Any, y: Any, w: Any = None) -> float:
    """Exact discrete AURC (Geifman et al., 2019): ``(1/N) sum_{k=1}^{N} risk(top-k)``.

    Ties use the expectation under random tie-breaking (see :func:`_geifman_terms`).
    Unit weights only (``w`` must be None or constant); use :func:`aurc` for weighted views.
    """
    n = np.asarray(score).reshape(-1).shape[0]
    _unit_only(w, n)
    t = _geifman_terms(score, pred, y)
    return float(np.sum(t) / t.shape[0])


def optimal_aurc(n_err: int, n: int) -> float:
    """Discrete optimum of the AURC with r = n_err errors among n samples.

    The optimal scorer ranks every correct sample first:
    ``AURC* = (1/n) sum_{k=n-r+1}^{n} (k - (n - r)) / k``.
    """
    n_err, n = int(n_err), int(n)
    if n <= 0 or not 0 <= n_err <= n:
        raise ValueError("need n >= 1 and 0 <= n_err <= n")
    t = _optimal_terms(n_err, n)
    return float(np.sum(t) / n)


def e_aurc(score: Any, pred: Any, y: Any, w: Any = None) -> float:
    """Excess AURC ``E-AURC = geifman_aurc - optimal_aurc(n_err, N)`` (unit weights).

    Both use the same term-wise summation, so a scorer that ranks all correct samples above all
    wrong ones (ties allowed inside each class of samples) gives exactly 0.0.
    """
    n = np.asarray(score).reshape(-1).shape[0]
    _unit_only(w, n)
    t = _geifman_terms(score, pred, y)
    n_err = int(np.sum(_labels(pred, "pred") != _labels(y)))
    t_opt = _optimal_terms(n_err, n)
    if np.array_equal(t, t_opt):
        return 0.0
    return float(np.sum(t) / n - np.sum(t_opt) / n)
