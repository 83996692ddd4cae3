"""Finite-sample guarantees for the margin rejector: Learn-then-Test thresholds and Mondrian
split-conformal thresholds (numpy / scipy only).

Symbols: ``score`` s(x) [N] is a margin (AR-GSE: the plug-in margin m(x)); a threshold t
accepts x iff ``s(x) >= t`` (t = +inf accepts nothing). ``err`` [N] = [h(x) != y]. For a
distribution P of (x, y):

- selective risk   ``R_P(t) = P(h(x) != y | s(x) >= t)``
- coverage         ``cov_P(t) = P(s(x) >= t)``.

Learn-then-Test (LTT; Angelopoulos, Bates, Candes, Jordan, Lei 2021): for each candidate t the
null hypothesis ``H0_t: R(t) > target`` is tested at level delta on the ``calib`` split; the
candidates are tested in a fixed order, from the most confident (highest) threshold down, and the
sequence stops at the first null that is not rejected (fixed-sequence testing controls the
family-wise error at delta with no multiplicity correction). The returned threshold is the lowest
one whose null was rejected, so

    P_calib( R(t_hat) <= target ) >= 1 - delta.

Which distribution each guarantee covers:

- :func:`ltt_threshold` (binomial / Clopper-Pearson): the distribution the calib split was
  sampled from, *unweighted* (in this project the balanced calib/test splits);
- :func:`ltt_threshold_weighted`: a target distribution P_w with density ratio
  ``w(x, y) = c * dP_w / dP_calib`` (here the long-tailed view, w = ``w_lt``, a function of the
  class only = label shift), bounded by ``w_max``;
- :func:`ltt_thresholds_per_group`: the calib distribution *within each predicted group*
  ``g(h(x)) = k`` (the true group g(y) is unknown at test time, so the threshold is routed by
  the predicted class);
- :func:`mondrian_conformal`: ``P(s(X) >= t_k | h(X) != Y, g(h(X)) = k) <= epsilon``.

Every guarantee assumes the calib samples and the future (test) samples are i.i.d. (or, for
the conformal one, exchangeable) draws from the stated distribution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "DIST_CALIB",
    "DIST_WEIGHTED",
    "WeightedLTT",
    "clopper_pearson_upper",
    "hb_pvalue",
    "ltt_threshold",
    "ltt_threshold_weighted",
    "ltt_thresholds_per_group",
    "min_testable_n",
    "mondrian_conformal",
    "power_start_count",
    "risk_control_report",
    "weighted_risk_ucb",
    "wsr_log_capital",
]

DIST_CALIB = "calib split as sampled (unweighted)"
DIST_WEIGHTED = "importance-weighted target (w ~ dP_target/dP_calib, w <= w_max)"


# --------------------------------------------------------------------------- small helpers
def _vec(x: Any, dtype: Any = np.float64, name: str = "array") -> np.ndarray:
    a = np.asarray(x).reshape(-1)
    if dtype is bool:
        return a.astype(bool)
    a = a.astype(dtype)
    if a.dtype.kind == "f" and np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    return a


def _check_level(target: float, delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target must be in [0, 1), got {target}")


def _fnum(x: float) -> float | None:
    """JSON-friendly float: None for +-inf / NaN."""
    x = float(x)
    return x if math.isfinite(x) else None


def clopper_pearson_upper(k: Any, n: Any, delta: float) -> Any:
    """One-sided (1 - delta) Clopper-Pearson upper bound on a binomial proportion.

    ``UCB(k, n) = Beta.ppf(1 - delta; k + 1, n - k)`` for ``k < n``, and 1 for ``k = n`` or
    ``n = 0``. Exact: for every p, ``P_{k ~ Bin(n, p)}(UCB(k, n) < p) <= delta``. Dual form:
    ``UCB(k, n) <= r  <=>  P(Bin(n, r) <= k) <= delta``. Vectorised; scalars in -> float out.
    """
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    k_b, n_b = np.broadcast_arrays(k_arr, n_arr)
    if np.any(k_b < 0) or np.any(k_b > n_b):
        raise ValueError("need 0 <= k <= n")
    out = np.ones(k_b.shape, dtype=np.float64)
    ok = (n_b > 0) & (k_b < n_b)
    if np.any(ok):
        out[ok] = stats.beta.ppf(1.0 - delta, k_b[ok] + 1.0, n_b[ok] - k_b[ok])
    return float(out) if out.ndim == 0 else out


def min_testable_n(target: float, delta: float) -> int:
    """Smallest n for which ``H0: R > target`` can be rejected at all by Clopper-Pearson.

    With k = 0 errors ``UCB = 1 - delta^(1/n)``, which is <= target iff
    ``n >= log(delta) / log(1 - target)``. A test with fewer accepted samples can never reject,
    so such grid points are dropped before the sequence starts (this depends on n only, not on
    the data, and keeps fixed-sequence testing valid).
    """
    _check_level(target, delta)
    if target <= 0.0:
        return np.iinfo(np.int64).max
    n = int(math.ceil(math.log(delta) / math.log1p(-target) - 1e-12))
    while n > 1 and 1.0 - delta ** (1.0 / (n - 1)) <= target:  # guard the rounding
        n -= 1
    while 1.0 - delta ** (1.0 / n) > target:
        n += 1
    return max(n, 1)


@functools.lru_cache(maxsize=256)
def power_start_count(target: float, delta: float) -> int:
    """Default first accept count of the candidate grid (depends on target, delta only).

    The smallest ``j >= min_testable_n(target, delta)`` at which the Clopper-Pearson test can
    reject ``R > target`` with an empirical risk of half the target:
    ``clopper_pearson_upper(floor(j target / 2), j, delta) <= target``. Starting the fixed
    sequence where a test with k = 0 errors is barely possible wastes it on a near-hopeless
    first test (one error among the first few dozen accepted samples would stop it).
    """
    j0 = min_testable_n(target, delta)
    if target <= 0.0:
        return j0
    lo, size = j0, 256
    while True:
        j = np.arange(lo, lo + size, dtype=np.int64)
        ok = clopper_pearson_upper(np.floor(j * target / 2.0), j, delta) <= target
        if ok.any():
            return int(j[np.argmax(ok)])
        lo, size = lo + size, 2 * size


def _default_candidates(score: np.ndarray, n_grid: int, j_start: int) -> np.ndarray:
    """Order statistics of ``score`` at accept counts ``j_start`` and ``ceil(q n) > j_start``.

    q = 1/n_grid .. 1. Returned descending (most confident first); empty if n < j_start.
    """
    n = score.shape[0]
    j_start = max(int(j_start), 1)
    if n < j_start:
        return np.empty(0)
    q = np.arange(1, n_grid + 1, dtype=np.float64) / n_grid
    j = np.ceil(q * n - 1e-9).astype(np.int64)
    j = np.unique(np.concatenate([[j_start], j[(j > j_start) & (j <= n)]]))
    s_desc = np.sort(score)[::-1]
    t = s_desc[j - 1]
    # de-duplicate (ties) but keep the descending order
    _, first = np.unique(t, return_index=True)
    return t[np.sort(first)]


def _counts_at(
    score: np.ndarray, err: np.ndarray, t: np.ndarray, w: np.ndarray | None = None
) -> tuple:
    """n_t = #{s >= t}, k_t = #{s >= t, err} (and the weighted sums when w is given)."""
    order = np.argsort(score, kind="stable")
    s_asc = score[order]
    e_asc = err[order].astype(np.float64)
    suffix_e = np.concatenate([np.cumsum(e_asc[::-1])[::-1], [0.0]])
    pos = np.searchsorted(s_asc, t, side="left")
    n_t = score.shape[0] - pos
    k_t = suffix_e[pos]
    if w is None:
        return n_t, k_t
    w_asc = w[order]
    suffix_w = np.concatenate([np.cumsum(w_asc[::-1])[::-1], [0.0]])
    suffix_we = np.concatenate([np.cumsum((w_asc * e_asc)[::-1])[::-1], [0.0]])
    return n_t, k_t, suffix_w[pos], suffix_we[pos]


def _fixed_sequence(reject: np.ndarray) -> int:
    """Number of leading rejected nulls: the sequence stops at the first non-rejection."""
    fails = np.flatnonzero(~np.asarray(reject, dtype=bool))
    return int(fails[0]) if fails.size else int(reject.shape[0])


def _prepare_candidates(
    score: np.ndarray,
    candidates: Any,
    n_grid: int,
    start_count: int | None,
    target: float,
    delta: float,
) -> tuple[np.ndarray, str]:
    if candidates is None:
        j0 = power_start_count(target, delta) if start_count is None else int(start_count)
        j0 = max(j0, min_testable_n(target, delta))
        kind = f"score order statistics: accept count {j0}, then {n_grid} coverage levels"
        return _default_candidates(score, n_grid, j0), kind
    c = _vec(candidates, name="candidates")
    c = np.unique(c[np.isfinite(c)])[::-1]
    return c, "user-given (fixed in advance)"


# --------------------------------------------------------------------------- binomial LTT
def ltt_threshold(
    score: Any,
    err: Any,
    target: float,
    delta: float,
    candidates: Any = None,
    *,
    n_grid: int = 100,
    start_count: int | None = None,
) -> dict[str, Any]:
    """Learn-then-Test margin threshold with Clopper-Pearson p-values and fixed-sequence testing.

    For each candidate t, in descending order: ``n_t = #{s >= t}``, ``k_t = #{s >= t, err}``;
    reject ``H0_t: R(t) > target`` iff ``clopper_pearson_upper(k_t, n_t, delta) <= target``;
    stop at the first non-rejection. Returns the lowest threshold reached, or +inf (accept
    nothing) when the first null is not rejected.

    Guarantee: ``P_calib(R(t_hat) <= target) >= 1 - delta`` where R is the selective risk under
    the distribution the calib split was sampled from, **unweighted**. Conditionally on n_t,
    k_t ~ Bin(n_t, R(t)), so each test is exact.

    Candidates: a grid fixed before seeing the calib split (``candidates``; any values, tested
    as given, so it should start where a test can pass) gives the guarantee with no further
    assumption. The default grid (``candidates=None``) is the calib scores' order statistics at
    accept count ``start_count`` (default :func:`power_start_count`, never below
    :func:`min_testable_n`) and then at the counts ``j = ceil(q n)`` above it, q = 1/n_grid ..
    1. This grid depends on the data (through the scores only); it keeps the guarantee
    when the score distribution is continuous and ``p(s) = P(err | s(x) = s)`` is non-increasing
    in s. Sketch: let t0 = the lowest valid threshold (R(t0) = target) and M = #{s_i >= t0}; the
    first invalid grid point j' > M accepts the M samples above t0 (errors ~ Bin(M, target)
    given M) plus samples below t0, each erring with p >= target, so k_j' stochastically dominates
    Bin(j', target) and the test at j' rejects with probability <= delta.

    Returns a dict: ``threshold`` (float, +inf = accept nothing), ``n_accepted``, ``n_errors``,
    ``calib_coverage``, ``calib_risk`` (1.0 when nothing is accepted, project convention),
    ``ucb``, ``n_candidates``, ``n_rejected_nulls``, ``target``, ``delta``, ``bound``,
    ``candidates``, ``distribution``.
    """
    _check_level(target, delta)
    s = _vec(score, name="score")
    e = _vec(err, bool)
    if s.shape != e.shape:
        raise ValueError("score and err must have the same length")
    n = s.shape[0]
    cand, cand_kind = _prepare_candidates(s, candidates, n_grid, start_count, target, delta)
    n_t, k_t = _counts_at(s, e, cand)
    ucb = clopper_pearson_upper(k_t, n_t, delta) if cand.size else np.empty(0)
    f = _fixed_sequence(np.asarray(ucb) <= target)
    if f == 0:
        thr, na, ke, u = math.inf, 0, 0, 1.0
    else:
        thr, na, ke, u = float(cand[f - 1]), int(n_t[f - 1]), int(k_t[f - 1]), float(ucb[f - 1])
    return {
        "threshold": thr,
        "n_accepted": na,
        "n_errors": ke,
        "calib_coverage": na / n if n else 0.0,
        "calib_risk": ke / na if na else 1.0,
        "ucb": u,
        "n_candidates": int(cand.size),
        "n_rejected_nulls": f,
        "target": float(target),
        "delta": float(delta),
        "bound": "clopper-pearson (exact binomial)",
        "candidates": cand_kind,
        "distribution": DIST_CALIB,
    }


# --------------------------------------------------------------------------- weighted LTT
def wsr_log_capital(z: Any, m: Any, delta: float, c: float = 0.75, mask: Any = None) -> Any:
    """max_t log K_t of the Waudby-Smith--Ramdas betting process against ``H0: E[Z] >= m``.

    ``z`` [n] or [n, M] in [0, 1] (columns = separate problems), ``m`` scalar or [M] in [0, 1),
    ``mask`` (optional, same shape as z) selects the rows that belong to each problem (the others
    are skipped: they neither bet nor update the estimates). With ``n`` = number of selected
    rows and ``i`` = the running count of selected rows, the capital is
    ``K_t = prod_{i <= t} (1 - lambda_i (Z_i - m))`` with the predictable plug-in bet
    (Waudby-Smith & Ramdas 2023, Eq. 26-27, one-sided):

        mu_i     = (1/2 + sum_{j<=i} Z_j) / (i + 1)
        sigma2_i = (1/4 + sum_{j<=i} (Z_j - mu_j)^2) / (i + 1)
        lambda_i = min( sqrt(2 log(1/delta) / (n sigma2_{i-1})), c / (1 - m) ),  sigma2_0 = 1/4.

    Under H0 (i.i.d. Z with mean >= m) K is a non-negative supermartingale, so by Ville's
    inequality ``P(max_t K_t >= 1/delta) <= delta``: reject H0 iff the returned value is
    ``>= log(1/delta)``. A problem with no rows returns -inf.
    """
    z = np.asarray(z, dtype=np.float64)
    squeeze = z.ndim == 1
    if squeeze:
        z = z[:, None]
    a = np.ones(z.shape) if mask is None else np.asarray(mask, dtype=np.float64).reshape(z.shape)
    n_rows, M = z.shape
    m = np.broadcast_to(np.asarray(m, dtype=np.float64), (M,))
    if n_rows == 0:
        out = np.full(M, -np.inf)
        return float(out[0]) if squeeze else out
    za = z * a
    cnt = np.cumsum(a, axis=0)  # i: running count of selected rows
    n = np.maximum(cnt[-1], 1.0)
    mu = (0.5 + np.cumsum(za, axis=0)) / (cnt + 1.0)
    sig2 = (0.25 + np.cumsum(a * (z - mu) ** 2, axis=0)) / (cnt + 1.0)
    sig2_prev = np.vstack([np.full((1, M), 0.25), sig2[:-1]])
    lam = np.sqrt(2.0 * math.log(1.0 / delta) / (n[None, :] * sig2_prev))
    lam = np.minimum(lam, (c / (1.0 - m))[None, :])
    log_k = np.cumsum(np.log1p(-lam * a * (z - m[None, :])), axis=0)
    out = np.where(cnt[-1] > 0, np.maximum(np.max(log_k, axis=0), 0.0), -np.inf)
    return float(out[0]) if squeeze else out


def hb_pvalue(zbar: Any, n: Any, m: Any) -> Any:
    """Hoeffding--Bentkus p-value for ``H0: E[Z] >= m`` from the mean ``zbar`` of n i.i.d. Z in [0,1].

    ``p = min( exp(-n h1(min(zbar, m), m)), e * P(Bin(n, m) <= ceil(n zbar)) )`` with
    ``h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))`` (Bates, Angelopoulos, Lei, Malik, Jordan
    2021, RCPS). Reject H0 iff ``p <= delta``.
    """
    zbar = np.asarray(zbar, dtype=np.float64)
    a = np.minimum(zbar, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(a > 0, a * np.log(a / m), 0.0)
        t2 = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - m)), 0.0)
    p_hoeff = np.exp(-n * (t1 + t2))
    p_bent = math.e * stats.binom.cdf(np.ceil(n * zbar - 1e-9), n, m)
    p = np.minimum(1.0, np.minimum(p_hoeff, p_bent))
    return float(p) if p.ndim == 0 else p


def _weighted_z(e: np.ndarray, w: np.ndarray, w_max: float, r: Any) -> np.ndarray:
    """``Z = w (err - r) / w_max + r`` in [0, 1]; on the accepted set ``E[Z] <= r <=> R_w <= r``."""
    return (w * (e - np.asarray(r, dtype=np.float64))) / w_max + np.asarray(r, dtype=np.float64)


def _weighted_reject(z: np.ndarray, a: np.ndarray, r: Any, delta: float, bound: str) -> np.ndarray:
    """Reject ``H0: E[Z | accepted] > r`` per column of z [n, M] using the rows with a = 1."""
    if bound == "wsr":
        return wsr_log_capital(z, r, delta, mask=a) >= math.log(1.0 / delta)
    if bound == "hb":
        n_a = a.sum(axis=0)
        zbar = (z * a).sum(axis=0) / np.maximum(n_a, 1.0)
        out = np.zeros(z.shape[1], dtype=bool)
        ok = n_a > 0
        r_b = np.broadcast_to(np.asarray(r, dtype=np.float64), (z.shape[1],))
        out[ok] = hb_pvalue(zbar[ok], n_a[ok], r_b[ok]) <= delta
        return out
    raise ValueError(f"bound must be 'wsr' or 'hb', got {bound!r}")


def weighted_risk_ucb(
    accept: Any, err: Any, w: Any, w_max: float, delta: float, bound: str = "wsr", seed: int = 0
) -> float:
    """(1 - delta) upper confidence bound on the weighted selective risk of a FIXED rule.

    ``R_w = E[w a err] / E[w a]``; ``UCB = inf{r : H0_r: R_w > r rejected}``, found by bisection
    on r in [0, 1] (the test for ``R_w > r`` is the one used by :func:`ltt_threshold_weighted`).
    Reporting aid only: the LTT decision itself never needs this number.
    """
    a = _vec(accept, bool).astype(np.float64)
    e = _vec(err, bool).astype(np.float64)
    w = _vec(w, name="w")
    perm = np.random.default_rng(seed).permutation(a.shape[0])
    a, e, w = a[perm], e[perm], w[perm]

    def rej(r: float) -> bool:
        z = _weighted_z(e, w, w_max, r)[:, None]
        return bool(_weighted_reject(z, a[:, None], r, delta, bound)[0])

    if a.sum() == 0 or not rej(1.0 - 1e-9):
        return 1.0
    lo, hi = 0.0, 1.0 - 1e-9
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if rej(mid) else (mid, hi)
    return float(hi)


@dataclass(frozen=True)
class WeightedLTT:
    """How :func:`ltt_threshold_weighted` tests its nulls ``H0_t: R_w(t) > target``.

    ``bound``: ``"wsr"`` (Waudby-Smith--Ramdas predictable plug-in betting + Ville,
    :func:`wsr_log_capital`) or ``"hb"`` (Hoeffding--Bentkus, :func:`hb_pvalue`).
    ``candidates`` / ``n_grid`` / ``start_count``: the candidate thresholds, as in
    :func:`ltt_threshold`. ``seed``: the fixed shuffle of the calib order before betting.
    """

    bound: str = "wsr"
    n_grid: int = 100
    start_count: int | None = None
    candidates: Any = None
    seed: int = 0


BOUND_NAMES = {"wsr": "waudby-smith-ramdas betting", "hb": "hoeffding-bentkus"}


def ltt_threshold_weighted(
    score: Any,
    err: Any,
    w: Any,
    target: float,
    delta: float,
    w_max: float | None = None,
    opts: WeightedLTT = WeightedLTT(),
) -> dict[str, Any]:
    """LTT threshold controlling the importance-weighted selective risk (long-tailed view).

    Target risk ``R_w(t) = E_calib[w a_t err] / E_calib[w a_t]`` with ``a_t = [s >= t]``, which
    equals the selective risk under ``P_w`` when ``w(x, y) = c dP_w/dP_calib(x, y)`` for a constant
    c > 0 (label shift: w depends on y only). The ratio is handled exactly on the accepted set:

        R_w(t) <= target  <=>  E[Z | s >= t] <= target,   Z = w (err - target) / w_max + target,

    and ``Z in [0, 1]`` whenever ``0 <= w <= w_max``. Given n_t, the accepted calib samples are
    i.i.d. from P_calib( . | s >= t), so each null ``H0_t: E[Z | s >= t] > target`` is tested on
    them with a bound valid for any i.i.d. [0, 1] variables (``opts.bound``, see
    :class:`WeightedLTT`); then fixed-sequence testing from the highest candidate down as in
    :func:`ltt_threshold`.

    Assumptions (stated): calib samples i.i.d.; ``w`` proportional to the density ratio (the
    scale cancels: w is used only through w / w_max, normalising so that E_calib[w] = 1 changes
    nothing); ``w <= w_max`` with w_max fixed in advance (default: max(w), valid when w is a
    function of the class and every class occurs in calib). The calib order is shuffled with a
    fixed ``opts.seed`` (independent of the data) before betting, because the betting process needs
    i.i.d. order and a split may be stored sorted by class. Candidates as in
    :func:`ltt_threshold` (default: score order statistics from ``opts.start_count`` on, where the
    default start is ``power_start_count(target * mean(w) / w_max, delta)``: one error of the
    heaviest class weighs w_max / mean(w) average samples, so the test needs that many more
    accepted samples before it can pass).

    Guarantee: ``P_calib(R_w(t_hat) <= target) >= 1 - delta``. Returns the keys of
    :func:`ltt_threshold`; ``calib_risk`` is the weighted risk, ``ucb`` its (1 - delta) upper
    bound (bisection, :func:`weighted_risk_ucb`), plus ``w_max``.
    """
    _check_level(target, delta)
    s, e, wv, w_max = _weighted_inputs(score, err, w, w_max)
    start_count = opts.start_count
    if opts.candidates is None and start_count is None and s.shape[0] > 0 and wv.mean() > 0:
        # an error of the heaviest class weighs w_max / mean(w) average samples
        start_count = power_start_count(target * float(wv.mean()) / w_max, delta)
    cand, cand_kind = _prepare_candidates(
        s, opts.candidates, opts.n_grid, start_count, target, delta
    )
    f = _fixed_sequence(_weighted_rejections(s, e, wv, w_max, cand, target, delta, opts))
    thr = float(cand[f - 1]) if f > 0 else math.inf
    return {
        **_weighted_summary(s, e, wv, w_max, thr, delta, opts),
        "n_candidates": int(cand.size),
        "n_rejected_nulls": f,
        "target": float(target),
        "delta": float(delta),
        "w_max": w_max,
        "bound": BOUND_NAMES[opts.bound],
        "candidates": cand_kind,
        "distribution": DIST_WEIGHTED,
    }


def _weighted_inputs(
    score: Any, err: Any, w: Any, w_max: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(s, err, w, w_max) checked: equal lengths, ``0 <= w <= w_max`` (default ``w_max = max w``)."""
    s = _vec(score, name="score")
    e = _vec(err, bool)
    wv = _vec(w, name="w")
    if not (s.shape == e.shape == wv.shape):
        raise ValueError("score, err and w must have the same length")
    if np.any(wv < 0):
        raise ValueError("weights must be non-negative")
    w_max = float(wv.max()) if w_max is None else float(w_max)
    if np.any(wv > w_max * (1 + 1e-9)):
        raise ValueError("some weights exceed w_max")
    return s, e, wv, w_max


def _weighted_rejections(
    s: np.ndarray,
    e: np.ndarray,
    wv: np.ndarray,
    w_max: float,
    cand: np.ndarray,
    target: float,
    delta: float,
    opts: WeightedLTT,
) -> np.ndarray:
    """Rejections of ``H0_t: E[Z | s >= t] > target`` for the candidates from the highest down,
    on the calib rows in a fixed shuffled order; stops after the first chunk holding a non-rejection
    (fixed-sequence testing never looks further)."""
    perm = np.random.default_rng(opts.seed).permutation(s.shape[0])
    sp, ep, wp = s[perm], e[perm].astype(np.float64), wv[perm]
    z1 = _weighted_z(ep, wp, w_max, target)
    reject = np.empty(0, dtype=bool)
    for lo in range(0, cand.size, 16):  # chunks: the sequence usually stops early
        a = (sp[:, None] >= cand[None, lo : lo + 16]).astype(np.float64)  # [n, chunk]
        z = np.broadcast_to(z1[:, None], a.shape)
        reject = np.concatenate([reject, _weighted_reject(z, a, target, delta, opts.bound)])
        if not reject.all():
            break
    return reject


def _weighted_summary(
    s: np.ndarray,
    e: np.ndarray,
    wv: np.ndarray,
    w_max: float,
    thr: float,
    delta: float,
    opts: WeightedLTT,
) -> dict[str, Any]:
    """Calib summary of the rule ``s >= thr``: accepted count and errors, weighted coverage and
    risk ``R_w``, and the (1 - delta) upper bound on ``R_w`` (1.0 when nothing is accepted)."""
    if thr == math.inf:  # no null rejected: accept nothing
        na, wa, wea, u = 0, 0.0, 0.0, 1.0
    else:
        acc = s >= thr
        na, wa, wea = int(acc.sum()), float(wv[acc].sum()), float(wv[acc & e].sum())
        u = weighted_risk_ucb(acc, e, wv, w_max, delta, opts.bound, opts.seed)
    return {
        "threshold": thr,
        "n_accepted": na,
        "n_errors": int(e[s >= thr].sum()) if na else 0,
        "calib_coverage": wa / float(wv.sum()) if wv.sum() > 0 else 0.0,
        "calib_risk": wea / wa if wa > 0 else 1.0,
        "ucb": u,
    }


# --------------------------------------------------------------------------- per group
def ltt_thresholds_per_group(
    score: Any,
    err: Any,
    group: Any,
    target: Any,
    delta: float,
    n_groups: int | None = None,
    *,
    n_grid: int = 100,
    start_count: int | None = None,
) -> dict[str, Any]:
    """Per-group LTT thresholds t_k with Bonferroni level delta / K each.

    ``group`` [N] must be computable at test time: use the group of the PREDICTED class,
    ``g(h(x))`` (the true group g(y) is unknown when the rule is applied). The rule accepts x iff
    ``s(x) >= t_[g(h(x))]``. ``target`` is a scalar or one value per group. Guarantee (union
    bound over the K per-group LTT runs on the disjoint subsets):

        P_calib( for all k: P(h(x) != y | s(x) >= t_k, g(h(x)) = k) <= target_k ) >= 1 - delta,

    under the calib distribution (unweighted); hence also the worst predicted-group risk and the
    mean over predicted groups are <= target with probability >= 1 - delta.

    Returns ``thresholds`` [K] (+inf = group accepts nothing), ``per_group`` (the
    :func:`ltt_threshold` dicts), ``delta_per_group``, ``routing``, ``distribution``.
    """
    s = _vec(score, name="score")
    e = _vec(err, bool)
    g = _vec(group, np.int64)
    K = int(n_groups) if n_groups is not None else (int(g.max()) + 1 if g.size else 1)
    tg = np.broadcast_to(np.asarray(target, dtype=np.float64), (K,))
    d_k = delta / K
    per = [
        ltt_threshold(
            s[g == k], e[g == k], float(tg[k]), d_k, n_grid=n_grid, start_count=start_count
        )
        for k in range(K)
    ]
    return {
        "thresholds": [p["threshold"] for p in per],
        "per_group": per,
        "delta_per_group": d_k,
        "target": tg.tolist(),
        "delta": float(delta),
        "routing": "group of the predicted class g(h(x))",
        "distribution": DIST_CALIB + ", within each predicted group",
    }


# --------------------------------------------------------------------------- conformal
def mondrian_conformal(
    score: Any, err: Any, group: Any, epsilon: float, n_groups: int | None = None
) -> dict[str, Any]:
    """Mondrian (per-group) split-conformal thresholds on the margin for the errors.

    For group k (the PREDICTED class's group g(h(x)), known at test time), let
    ``e_(1) <= ... <= e_(n_k)`` be the scores of the calib ERRORS of group k and
    ``j_k = ceil((n_k + 1)(1 - epsilon))``. The rule accepts x iff ``s(x) > e_(j_k)`` (the
    returned ``t_k`` is the next float above e_(j_k), so ``s >= t_k`` is the same rule);
    ``t_k = +inf`` (accept nothing in group k) when ``j_k > n_k``, i.e. ``n_k < (1-eps)/eps``.

    Finite-sample guarantee (exchangeability of the calib errors of group k with a new error of
    group k; marginal over the calibration draw):

        P( s(X) >= t_k | h(X) != Y, g(h(X)) = k ) <= (n_k + 1 - j_k) / (n_k + 1) <= epsilon,

    and ``>= epsilon - 1/(n_k + 1)`` when the scores have no ties (the new error's rank among the
    n_k + 1 error scores is uniform). No statement is made about correct samples (coverage).
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    s = _vec(score, name="score")
    e = _vec(err, bool)
    g = _vec(group, np.int64)
    K = int(n_groups) if n_groups is not None else (int(g.max()) + 1 if g.size else 1)
    thr, n_err, ranks, bounds = [], [], [], []
    for k in range(K):
        es = np.sort(s[(g == k) & e])
        n_k = es.shape[0]
        j = int(math.ceil((n_k + 1) * (1.0 - epsilon) - 1e-9))
        if j > n_k:
            thr.append(math.inf)
            bounds.append(0.0)
        else:
            thr.append(float(np.nextafter(es[j - 1], np.inf)))
            bounds.append((n_k + 1 - j) / (n_k + 1))
        n_err.append(n_k)
        ranks.append(j)
    return {
        "thresholds": thr,
        "n_errors": n_err,
        "rank": ranks,
        "guaranteed_accept_given_error": bounds,
        "epsilon": float(epsilon),
        "routing": "group of the predicted class g(h(x))",
        "guarantee": "P(s >= t_k | error, g(h(x)) = k) <= epsilon (marginal over calib)",
    }


# --------------------------------------------------------------------------- report
def _split(d: Mapping[str, Any], c2g: np.ndarray) -> dict[str, np.ndarray | None]:
    s = _vec(d["score"], name="score")
    pred = _vec(d["pred"], np.int64)
    y = _vec(d["y"], np.int64)
    out = {"score": s, "pred": pred, "y": y, "err": pred != y, "gpred": c2g[pred]}
    for key in ("w_lt", "w_bal"):
        out[key] = _vec(d[key], name=key) if d.get(key) is not None else None
    return out


def _eval_rule(
    t: dict[str, np.ndarray | None], thr_per_sample: np.ndarray, c2g: np.ndarray, K: int
) -> dict[str, Any]:
    from .metrics import selective as sel

    accept = t["score"] >= thr_per_sample
    out: dict[str, Any] = {}
    views = {"unweighted": None, "lt": t["w_lt"], "bal": t["w_bal"]}
    for view, w in views.items():
        if view != "unweighted" and w is None:
            continue
        ww = np.ones_like(t["score"]) if w is None else w
        gp = t["gpred"]
        acc_w = np.bincount(gp, weights=ww * accept, minlength=K)
        err_w = np.bincount(gp, weights=ww * accept * t["err"], minlength=K)
        errall = np.bincount(gp, weights=ww * t["err"], minlength=K)
        erracc = np.bincount(gp, weights=ww * t["err"] * accept, minlength=K)
        gerr = sel.group_errors(accept, t["pred"], t["y"], c2g, w)
        out[view] = {
            "coverage": sel.coverage(accept, w),
            "risk": sel.selective_risk(accept, t["pred"], t["y"], w),
            "group_error": gerr.tolist(),
            "balanced_error": float(gerr.mean()),
            "worst_group_error": float(gerr.max()),
            "pred_group_risk": np.where(acc_w > 0, err_w / np.maximum(acc_w, 1e-300), 1.0).tolist(),
            "pred_group_coverage": (
                acc_w / np.maximum(np.bincount(gp, weights=ww, minlength=K), 1e-300)
            ).tolist(),
            "accept_given_error_pred_group": np.where(
                errall > 0, erracc / np.maximum(errall, 1e-300), 0.0
            ).tolist(),
        }
    return out


def risk_control_report(
    calib: Mapping[str, Any],
    test: Mapping[str, Any],
    class_to_group: Any,
    target: float,
    delta: float,
    epsilon: float,
    *,
    w_max: float | None = None,
    opts: WeightedLTT = WeightedLTT(),
) -> dict[str, Any]:
    """Thresholds on ``calib`` and their achieved ``test`` risk / coverage, JSON-friendly.

    ``calib`` / ``test``: mappings with ``score`` (margin), ``pred``, ``y``, ``w_lt`` and
    optionally ``w_bal``. Methods:

    - ``ltt_binomial``: :func:`ltt_threshold` (guarantee for the unweighted calib distribution);
    - ``ltt_weighted_lt``: :func:`ltt_threshold_weighted` with ``w = w_lt`` (long-tailed view);
    - ``ltt_per_group``: :func:`ltt_thresholds_per_group` on g(pred), delta / K each;
    - ``mondrian_conformal``: :func:`mondrian_conformal` on g(pred) at ``epsilon``.

    Each method reports its thresholds (``None`` = +inf = accept nothing), the calib summary and,
    on ``test``, per view (``unweighted``, ``lt`` = w_lt, ``bal`` = w_bal): ``coverage``,
    ``risk`` (1.0 if nothing accepted), ``group_error`` / ``balanced_error`` /
    ``worst_group_error`` (groups of the TRUE label, project metrics), ``pred_group_risk`` and
    ``pred_group_coverage`` (groups of the predicted class, the quantity the per-group guarantee
    is about) and ``accept_given_error_pred_group`` (what the conformal guarantee bounds).
    ``w_max`` and ``opts`` go to :func:`ltt_threshold_weighted` (``opts.n_grid`` also to
    :func:`ltt_threshold`).
    """
    c2g = _vec(class_to_group, np.int64)
    K = int(c2g.max()) + 1
    cal, tst = _split(calib, c2g), _split(test, c2g)
    if cal["w_lt"] is None:
        raise ValueError("calib needs w_lt for the long-tailed guarantee")
    ltt = ltt_threshold(cal["score"], cal["err"], target, delta, n_grid=opts.n_grid)
    lttw = ltt_threshold_weighted(cal["score"], cal["err"], cal["w_lt"], target, delta, w_max, opts)
    pg = ltt_thresholds_per_group(cal["score"], cal["err"], cal["gpred"], target, delta, K)
    conf = mondrian_conformal(cal["score"], cal["err"], cal["gpred"], epsilon, K)
    methods = _methods(ltt, lttw, pg, conf, target, delta, epsilon)
    for m in methods.values():
        m["test"] = _eval_rule(tst, _threshold_per_sample(tst, m.pop("_thr")), c2g, K)
    return {
        "target": float(target),
        "delta": float(delta),
        "epsilon": float(epsilon),
        "n_calib": int(cal["score"].shape[0]),
        "n_test": int(tst["score"].shape[0]),
        "accept_rule": "accept iff score >= threshold (threshold None = +inf = accept nothing)",
        "methods": methods,
    }


def _threshold_per_sample(t: dict, thr: Any) -> np.ndarray:
    """Each sample's threshold: a scalar t, or ``t_[g(h(x))]`` for per-group thresholds [K]."""
    a = np.asarray(thr, dtype=np.float64)
    return np.full(t["score"].shape, float(a)) if a.ndim == 0 else a[t["gpred"]]


def _calib_summary(d: dict) -> dict:
    return {k: (_fnum(v) if isinstance(v, float) else v) for k, v in d.items()}


def _methods(
    ltt: dict, lttw: dict, pg: dict, conf: dict, target: float, delta: float, epsilon: float
) -> dict[str, dict[str, Any]]:
    """Each method's thresholds, calib summary and guarantee; ``_thr`` is the raw threshold (a
    scalar or [K]) that :func:`risk_control_report` replaces by the ``test`` evaluation."""
    return {
        "ltt_binomial": {
            "threshold": _fnum(ltt["threshold"]),
            "accepts_nothing": not math.isfinite(ltt["threshold"]),
            "calib": _calib_summary(ltt),
            "guarantee": f"P(R(t) <= {target}) >= {1 - delta:g}; R = selective risk under the "
            "calib distribution (unweighted); test split assumed i.i.d. from it",
            "_thr": ltt["threshold"],
        },
        "ltt_weighted_lt": {
            "threshold": _fnum(lttw["threshold"]),
            "accepts_nothing": not math.isfinite(lttw["threshold"]),
            "calib": _calib_summary(lttw),
            "guarantee": f"P(R_lt(t) <= {target}) >= {1 - delta:g}; R_lt = selective risk "
            "under the long-tailed distribution (w_lt density ratio, label shift, "
            f"w <= w_max = {lttw['w_max']:.4g}), {lttw['bound']} bound",
            "_thr": lttw["threshold"],
        },
        "ltt_per_group": {
            "thresholds": [_fnum(x) for x in pg["thresholds"]],
            "calib": [_calib_summary(p) for p in pg["per_group"]],
            "delta_per_group": pg["delta_per_group"],
            "routing": pg["routing"],
            "guarantee": f"P(for all k: P(err | accepted, g(h(x)) = k) <= {target}) >= "
            f"{1 - delta:g} (Bonferroni delta/K), calib distribution (unweighted)",
            "_thr": pg["thresholds"],
        },
        "mondrian_conformal": {
            "thresholds": [_fnum(x) for x in conf["thresholds"]],
            "n_errors": conf["n_errors"],
            "guaranteed_accept_given_error": conf["guaranteed_accept_given_error"],
            "routing": conf["routing"],
            "guarantee": f"for each k: P(accept | error, g(h(x)) = k) <= {epsilon} "
            "(marginal over the calib draw, exchangeability)",
            "_thr": conf["thresholds"],
        },
    }
