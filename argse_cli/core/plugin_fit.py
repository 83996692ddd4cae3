"""The one fitting core: Algorithm 1 (CS-plug-in) and Algorithm 2 (Plug-in[Worst]) of Narasimhan
et al. (ICLR 2024, "Learning to Reject Meets Long-tail Learning"), their lambda search and their
coverage search. AR-GSE, every plug-in baseline, the refit view and the guarantees fit their rules
here and nowhere else.

Symbols (the paper's): ``eta`` [N, C] posterior on the training prior; ``g(y)`` the class -> group
map (K groups, 0 = head); ``alpha`` [K] > 0; ``mu`` [K] in the gauge mu_[K-1] = 0; ``beta`` [K] on
the simplex; ``q`` a target coverage; ``c`` a rejection cost. The rule (Theorem 1,
:mod:`argse_cli.core.rule`), with ``u_k = K beta_k / alpha_k``:

    h(x) = argmax_y u_[g(y)] eta_y,
    m(x) = max_y u_[g(y)] eta_y - sum_y (u_[g(y)] - mu_[g(y)]) eta_y + c,   accept iff m(x) >= 0.

It depends on eta only through the per-group statistics Mx_k = max_{y in G_k} eta_y (argmax class
A_k) and E_k = sum_{y in G_k} eta_y (:class:`Split`), so every fit below is O(N K) in memory.

**Coverage-matched Algorithm 1** (:func:`fit_curve`), at each target coverage q of a grid, for
each candidate mu:

    alpha^(0) = 1;  for m = 1..M:  threshold at the fit split's weighted (1 - q)-quantile of the
    margins (coverage q under the view weights w), then
    alpha_k^(m) = max(K * P_wp(accept, y in G_k), alpha_min)   (wp = training-prior weights);
    score(mu) = sum_k beta_k e_k on the selection split, the rule thresholded at coverage q there.

The fixed point iterates on a discrete accept set, so once alpha repeats it is exact; rows stop
iterating then (the result equals M plain iterations). No damping (the paper's update).

**lambda search** (K = 2: mu = [lambda, 0]): the grid starts at -1, -0.9, ..., 1 (step 0.1).
The chosen lambda is the minimiser of the score; **ties go to the minimiser closest to 0, then to
the smaller lambda**. If the chosen lambda is the grid's first or last point, the grid is widened
on that side by one doubling of its extent with ``points_per_doubling`` points (1.1, 1.2, ..., 2;
then 2.2, ..., 4; ...), until the minimiser is interior or |lambda| reaches ``lambda_bound`` (64);
``at_bound`` records a minimiser left on the bound. K > 2: projected normalised gradient descent
on mu_0..mu_[K-2] (see :func:`_gradient_search`).

**Cost-matched Algorithm 1** (:func:`cost_operating_point`): for a rejection cost c, the operating
coverage is q*(c) = argmin_q [score_q + c (1 - q)] over the coverage grid (ties: the larger q).
A fixed-c fixed point can collapse to "accept nothing" (alpha -> 0); searching q avoids that and
reads the cost-matched rule off the same coverage-matched fits.

**Algorithm 2** (:func:`fit_worst_curve`, Plug-in[Worst]): beta^(0) = 1/K; for t = 1..T: Algorithm 1
with beta^(t-1) fitted and selected on S1; e^(t) = group errors on S2 at coverage q;
beta^(t) proportional to beta^(t-1) exp(xi e^(t)). The returned rule is the round with the
smallest max_k e^(t)_k on S2 (the first such round on ties).

Every evaluation of a rule at a coverage q re-sets its threshold to coverage q on the split it is
evaluated on (margins and that split's view weights only; accept every sample tied with the
threshold). A group with no accepted sample has error 1.0. Everything is float64.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from argse_cli.core.rule import PluginRule

__all__ = [
    "SEARCH",
    "PluginCurve",
    "SearchSpec",
    "Split",
    "cost_operating_point",
    "coverage_cut",
    "curve_scores",
    "eg_step",
    "fit_at_coverage",
    "fit_curve",
    "fit_worst_curve",
    "group_errors_at_coverage",
    "group_stats",
    "lambda_grid",
]

COVERAGES: np.ndarray = np.round(np.arange(1, 101) / 100, 2)
"""The coverage grid 0.01, 0.02, ..., 1.00 every refit curve is traced on."""


@dataclass(frozen=True)
class SearchSpec:
    """The one search every plug-in method is fitted with (AR-GSE and every baseline)."""

    M: int = 10
    """fixed-point iterations of Algorithm 1"""
    alpha_min: float = 1e-3
    """lower clamp of alpha_k (a group that is never accepted)"""
    lambda_span: float = 1.0
    """the initial lambda grid covers [-span, span] ..."""
    lambda_step: float = 0.1
    """... at this step (the selection score is flat at finer steps on validation splits of ~10^3 rows)"""
    points_per_doubling: int = 10
    """points added by one widening (the extent doubles)"""
    lambda_bound: float = 64.0
    """widening stops when |lambda| reaches this bound"""
    n_steps: int = 150
    """K > 2: gradient steps"""
    mu_bound: float = 20.0
    """K > 2: box for mu"""
    chunk_cells: int = 2_000_000
    """rows x samples evaluated at once per thread (memory ~ 40 bytes per cell)"""
    threads: int = min(2, os.cpu_count() or 1)
    """row chunks evaluated in parallel (numpy releases the GIL in sort, cumsum, ufuncs)"""

    def to_dict(self) -> dict[str, Any]:
        """The fields that decide the fit (not the runtime ones: chunking, threads)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("chunk_cells", "threads")}


SEARCH = SearchSpec()
"""The search of every fit in argse."""


def lambda_grid(spec: SearchSpec = SEARCH) -> np.ndarray:
    """The initial K = 2 grid: -span, -span + step, ..., span."""
    n = int(round(2 * spec.lambda_span / spec.lambda_step))
    return np.round(np.linspace(-spec.lambda_span, spec.lambda_span, n + 1), 12)


def _widening(edge: float, spec: SearchSpec) -> np.ndarray:
    """The points one widening adds beyond ``edge`` (same sign): |edge| (1 + k / P), k = 1..P,
    capped at the bound; empty once |edge| >= bound."""
    e = abs(float(edge))
    if e >= spec.lambda_bound or e <= 0:
        return np.empty(0)
    pts = e * (1.0 + np.arange(1, spec.points_per_doubling + 1) / spec.points_per_doubling)
    pts = np.unique(np.minimum(pts, spec.lambda_bound))
    return np.round(np.sign(edge) * pts, 12)


def choose_lambda(lams: np.ndarray, obj: np.ndarray) -> int:
    """Index of the minimiser of ``obj`` over ``lams``; ties (within 1e-12) go to the one closest
    to 0, then to the smaller lambda."""
    lams, obj = np.asarray(lams, float), np.asarray(obj, float)
    tied = np.flatnonzero(obj <= np.nanmin(obj) + 1e-12)
    order = np.lexsort((lams[tied], np.abs(lams[tied])))
    return int(tied[order[0]])


# --------------------------------------------------------------------------------- data


def group_stats(eta: Any, class_to_group: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Mx, A, E) [N, K] of eta [N, C]: Mx_k = max_{y in G_k} eta_y, A_k its class (the first on
    ties), E_k = sum_{y in G_k} eta_y (float64 sums)."""
    eta = np.asarray(eta)
    if eta.dtype not in (np.float32, np.float64):
        eta = eta.astype(np.float32)
    c2g = np.asarray(class_to_group, np.int64).reshape(-1)
    if eta.ndim != 2 or eta.shape[1] != c2g.shape[0]:
        raise ValueError("eta must be [N, C] with C = len(class_to_group)")
    K, N = int(c2g.max()) + 1, eta.shape[0]
    Mx, A, E = np.empty((N, K)), np.empty((N, K), np.int64), np.empty((N, K))
    rows = np.arange(N)
    for k in range(K):
        cols = np.flatnonzero(c2g == k)
        sub = eta[:, cols]
        a = np.argmax(sub, axis=1)
        A[:, k], Mx[:, k] = cols[a], sub[rows, a]
        E[:, k] = sub.sum(axis=1, dtype=np.float64)
    return Mx, A, E


@dataclass(frozen=True, eq=False)
class Split:
    """What the fits need of one split: per-group statistics of eta and the weights.

    ``Mx`` [N, K] max of eta over G_k, ``A`` [N, K] its class, ``E`` [N, K] sum of eta over G_k;
    ``y`` [N] labels, ``g`` [N] = g(y); ``w`` [N] the view's weights (coverage and errors),
    ``wp`` [N] the training-prior weights of alpha's fixed point (Theorem 1: eta is P_train(y|x)).
    """

    Mx: np.ndarray
    A: np.ndarray
    E: np.ndarray
    y: np.ndarray
    g: np.ndarray
    w: np.ndarray
    wp: np.ndarray
    class_to_group: np.ndarray

    @property
    def K(self) -> int:
        return int(self.Mx.shape[1])

    @property
    def n(self) -> int:
        return int(self.Mx.shape[0])

    @functools.cached_property
    def group_cols(self) -> list[np.ndarray]:
        """Sample indices of each group (by label)."""
        return [np.flatnonzero(self.g == k) for k in range(self.K)]

    @functools.cached_property
    def f32(self) -> dict[str, np.ndarray]:
        """float32 working copies for the vectorised kernels (statistics, weights, group one-hots)."""
        d = {"Mx": self.Mx.astype(np.float32), "E": np.ascontiguousarray(self.E, np.float32),
             "w": self.w.astype(np.float32)}
        if self.K == 2:
            d["Mx0"], d["Mx1"] = d["Mx"][None, :, 0].copy(), d["Mx"][None, :, 1].copy()
        return d

    @classmethod
    def from_eta(cls, eta: Any, y: Any, class_to_group: Any, w: Any = None, w_prior: Any = None) -> Split:
        """Statistics of ``eta`` [N, C] (float32 or float64). ``w`` None = unit weights;
        ``w_prior`` None = ``w``."""
        Mx, A, E = group_stats(eta, class_to_group)
        return cls.from_stats(Mx, A, E, y, class_to_group, w, w_prior)

    @classmethod
    def from_stats(cls, Mx: Any, A: Any, E: Any, y: Any, class_to_group: Any, w: Any = None,
                   w_prior: Any = None) -> Split:
        c2g = np.asarray(class_to_group, np.int64).reshape(-1)
        y = np.asarray(y, np.int64).reshape(-1)
        n = y.shape[0]
        w = np.ones(n) if w is None else np.asarray(w, np.float64).reshape(-1)
        wp = w if w_prior is None else np.asarray(w_prior, np.float64).reshape(-1)
        if w.shape != (n,) or wp.shape != (n,):
            raise ValueError("w and w_prior need one weight per sample")
        if np.any(w < 0) or np.any(wp < 0) or not (w.sum() > 0 and wp.sum() > 0):
            raise ValueError("weights must be non-negative with a positive total")
        return cls(np.asarray(Mx, np.float64), np.asarray(A, np.int64), np.asarray(E, np.float64),
                   y, c2g[y], w, wp, c2g)

    def subset(self, idx: Any) -> Split:
        idx = np.asarray(idx)
        return Split(self.Mx[idx], self.A[idx], self.E[idx], self.y[idx], self.g[idx], self.w[idx],
                     self.wp[idx], self.class_to_group)


# --------------------------------------------------------------------------------- kernels


def _margins(s: Split, u: np.ndarray, mu: np.ndarray, pred: bool = False):
    """(m - c) [R, N] float32 of R rules (u [R, K] = K beta / alpha, mu [R, K]) and, with ``pred``,
    h [R, N]. Since u > 0: max_y u_[g(y)] eta_y = max_k u_k Mx_k and
    sum_y (u - mu)_[g(y)] eta_y = sum_k (u_k - mu_k) E_k."""
    f = s.f32
    u32 = u.astype(np.float32)
    c = (u - mu).astype(np.float32)
    lin = c[:, 0:1] * f["E"][None, :, 0]  # elementwise (no BLAS): the same bits for any batch of rows
    for k in range(1, s.K):
        lin += c[:, k : k + 1] * f["E"][None, :, k]
    if s.K == 2:
        best = u32[:, 0:1] * f["Mx0"]
        tail = u32[:, 1:2] * f["Mx1"]
        win1 = tail > best if pred else None
        np.maximum(best, tail, out=best)
        h = np.where(win1, s.A[None, :, 1], s.A[None, :, 0]) if pred else None
    else:
        sc = u32[:, None, :] * f["Mx"][None, :, :]
        k = np.argmax(sc, axis=2)
        best = np.take_along_axis(sc, k[:, :, None], axis=2)[:, :, 0]
        h = np.take_along_axis(np.broadcast_to(s.A[None], sc.shape), k[:, :, None], axis=2)[:, :, 0] if pred else None
    best -= lin
    return (best, h) if pred else best


_ID_BITS = 29
_ID_MASK = np.int64((1 << _ID_BITS) - 1)


def coverage_cut(base: np.ndarray, w: np.ndarray, q: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Per row r, the value v_r such that accepting base >= v_r has weighted coverage q_r: the
    smallest achievable coverage >= q_r (all samples tied with v_r accepted; 1e-12 relative slack).
    q_r <= 0 accepts nothing (v_r = +inf). With ``rows`` [R'] (indices into ``base``'s rows), the
    cuts are of the rows ``base[rows]`` at the coverages ``q`` [R'] (each distinct row sorted once).

    ``base`` is float32. Sorting trick (exact): a float32 converted to float64 has 29 zero
    low mantissa bits; writing the sample index there keeps every pair of distinct float32 values
    in order, so one vectorised float64 value sort yields the order and the indices (an argsort
    costs several times more)."""
    U, N = base.shape
    if N >= 1 << _ID_BITS:
        raise ValueError("more than 2**29 samples in one split")
    if N > 1 and np.all(w == w[0]):
        return _coverage_cut_equal_weights(base, w, q, rows)
    return _coverage_cut_sorted(base, w, q, rows)


def _coverage_cut_sorted(base: np.ndarray, w: np.ndarray, q: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """:func:`coverage_cut` for any weights: one sort per distinct row."""
    U, N = base.shape
    key = base.astype(np.float64)
    bits = key.view(np.int64)
    bits |= np.arange(N, dtype=np.int64)
    key.sort(axis=1)
    idx = bits & _ID_MASK  # sample index at each ascending position
    cw = np.cumsum(w[idx], axis=1, dtype=np.float64)  # weight up to and including position j
    rows = np.arange(U) if rows is None else np.asarray(rows, np.int64)
    W = cw[rows, -1]
    goal = np.minimum(q, 1.0) * W * (1.0 - 1e-12)
    # weight at or above position j = W - cw[j - 1]; the cut is the largest j with that >= goal,
    # i.e. j = #{positions i < N - 1 with cw[i] <= W - goal} (cw is non-decreasing)
    lim = W - goal
    j = np.empty(rows.size, np.int64)
    for u in np.unique(rows):
        r = np.flatnonzero(rows == u)
        j[r] = np.searchsorted(cw[u, :-1], lim[r], side="right")
    vbits = bits[rows, j] & ~_ID_MASK
    v = vbits.view(np.float64)
    return np.where(q <= 0, np.inf, v)


def _coverage_cut_equal_weights(base: np.ndarray, w: np.ndarray, q: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """:func:`coverage_cut` when every weight is the same (a view whose weights are all 1): the
    cumulative weights do not depend on the order, so the cut position j_r is known before
    sorting and the value at ascending position j_r is a selection (``np.partition``, linear
    time) instead of a sort -- the same value, bit for bit."""
    U, N = base.shape
    rows = np.arange(U) if rows is None else np.asarray(rows, np.int64)
    cw = np.cumsum(w, dtype=np.float64)  # = the sorted path's cumsum of w[idx] (all entries equal)
    W = cw[-1]
    goal = np.minimum(q, 1.0) * W * (1.0 - 1e-12)
    j = np.searchsorted(cw[:-1], W - goal, side="right")
    v = np.empty(rows.size)
    if rows.size == 1:
        v[0] = np.partition(base[rows[0]], j[0])[j[0]]
    else:
        for jj in np.unique(j):  # rows sharing a cut position (a coverage): one vectorised selection
            at = np.flatnonzero(j == jj)
            v[at] = np.partition(base[rows[at]], jj, axis=1)[:, jj]
    return np.where(q <= 0, np.inf, v)


def _group_sums(x: np.ndarray, s: Split, weights: np.ndarray | None = None) -> np.ndarray:
    """[R, K]: sum over the samples n of group k of x[r, n] (* weights[n]), in float64, row by row
    (numpy's pairwise sum along a row: the same bits whatever the number of rows)."""
    out = np.empty((x.shape[0], s.K))
    for k, cols in enumerate(s.group_cols):
        v = x[:, cols].astype(np.float64)
        if weights is not None:
            v *= weights[cols]
        out[:, k] = v.sum(axis=1)
    return out


def _errors(s: Split, base: np.ndarray, h: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Group errors e [R, K] of the rules thresholded at coverage q on split s (1.0 if none accepted)."""
    acc = base >= coverage_cut(base, s.f32["w"], q)[:, None]
    D = _group_sums(acc, s, s.w)
    Er = _group_sums(acc & (h != s.y[None, :]), s, s.w)
    return np.where(D > 0, Er / np.where(D > 0, D, 1.0), 1.0)


def _fixed_point(s: Split, ub: np.ndarray, mu: np.ndarray, q: np.ndarray, spec: SearchSpec):
    """alpha^(M) [R, K] and the fit threshold v [R] (accept iff m - c >= v, i.e. c = -v).

    ``ub`` [R, K] = K beta_k (ones for uniform beta), so u = ub / alpha. Every row starts at
    alpha = 1, so the first iteration's margins depend on mu (and beta) only: rows sharing them
    share one sort."""
    R, K = ub.shape
    alpha = np.ones((R, K))
    v = np.empty(R)
    Wp = float(s.wp.sum())
    w = s.f32["w"]
    todo = np.arange(R)
    for it in range(spec.M):
        if todo.size == 0:
            break
        if it == 0:
            key = np.concatenate([ub, mu], axis=1)
            uniq, inv = np.unique(key, axis=0, return_inverse=True)
            base_u = _margins(s, uniq[:, :K], uniq[:, K:])
            cut = coverage_cut(base_u, w, q, rows=inv.reshape(-1))
            base = base_u[inv.reshape(-1)]
        else:
            base = _margins(s, ub[todo] / alpha[todo], mu[todo])
            cut = coverage_cut(base, w, q[todo])
        acc = base >= cut[:, None]
        new = np.maximum(K * _group_sums(acc, s, s.wp) / Wp, spec.alpha_min)
        moved = np.any(new != alpha[todo], axis=1)
        v[todo[~moved]] = cut[~moved]  # alpha repeated: these margins and this cut are final
        alpha[todo] = new
        todo = todo[moved]  # alpha repeated: every further iterate is the same
    if todo.size:
        v[todo] = coverage_cut(_margins(s, ub[todo] / alpha[todo], mu[todo]), w, q[todo])
    return alpha, v


def _solve(fit: Split, sel: Split, q: np.ndarray, mu: np.ndarray, beta: np.ndarray | None,
           spec: SearchSpec) -> dict[str, np.ndarray]:
    """Algorithm 1's inner step for R candidates (q_r, mu_r, beta_r): the fixed point on ``fit``,
    then the selection score sum_k beta_k e_k on ``sel`` at coverage q_r. Chunked over rows."""
    R, K = mu.shape
    bobj = np.full((R, K), 1.0 / K) if beta is None else beta
    ub = np.ones((R, K)) if beta is None else K * beta
    out = {"alpha": np.empty((R, K)), "v": np.empty(R), "obj": np.empty(R), "e": np.empty((R, K))}
    fit.f32, sel.f32, fit.group_cols, sel.group_cols  # noqa: B018 - build the caches before threads share them
    threads = max(1, min(spec.threads, R // 64))
    step = max(1, min(spec.chunk_cells // max(fit.n + sel.n, 1), -(-R // threads)))

    def chunk(a: int) -> None:
        b = min(R, a + step)
        alpha, v = _fixed_point(fit, ub[a:b], mu[a:b], q[a:b], spec)
        base, h = _margins(sel, ub[a:b] / alpha, mu[a:b], pred=True)
        e = _errors(sel, base, h, q[a:b])
        out["alpha"][a:b], out["v"][a:b], out["e"][a:b] = alpha, v, e
        out["obj"][a:b] = (bobj[a:b] * e).sum(axis=1)

    starts = range(0, R, step)
    if threads == 1:
        for a in starts:
            chunk(a)
    else:  # every row is computed on its own (no cross-row reduction): same bits as one thread
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(chunk, starts))
    return out


# --------------------------------------------------------------------------------- curves


@dataclass
class PluginCurve:
    """Rules fitted at each coverage of ``coverages`` [Q] (row i = coverage i).

    ``alpha``, ``mu``, ``beta`` [Q, K] (beta: the rule's weights, uniform 1/K for Algorithm 1 with
    uniform beta); ``c`` [Q] the fit threshold as a cost (accept iff m(x) >= 0 on the fit split at
    coverage q); ``lam`` [Q] = mu_0 - mu_1 (K = 2); ``objective`` [Q] the selection score
    sum_k beta_k e_k; ``sel_error`` [Q, K] the selection split's group errors; ``widened`` [Q]
    widenings of the lambda grid; ``at_bound`` [Q] minimiser left at |lambda| = bound;
    ``rounds`` [Q] Algorithm 2's chosen round (-1 for Algorithm 1); ``algorithm`` 1 or 2.
    """

    coverages: np.ndarray
    alpha: np.ndarray
    mu: np.ndarray
    beta: np.ndarray
    c: np.ndarray
    lam: np.ndarray
    objective: np.ndarray
    sel_error: np.ndarray
    widened: np.ndarray
    at_bound: np.ndarray
    rounds: np.ndarray
    class_to_group: np.ndarray
    algorithm: int = 1
    uniform_beta: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def K(self) -> int:
        return int(self.alpha.shape[1])

    def rule(self, i: int) -> PluginRule:
        """The plug-in rule fitted at coverage i (its c is the fit split's threshold)."""
        beta = None if self.uniform_beta else self.beta[i]
        return PluginRule(self.alpha[i], self.mu[i], float(self.c[i]), beta, self.class_to_group)

    def index(self, q: float) -> int:
        i = int(np.argmin(np.abs(self.coverages - q)))
        if abs(self.coverages[i] - q) > 1e-9:
            raise ValueError(f"coverage {q} is not on the curve's grid")
        return i

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "coverages": self.coverages.tolist(), "alpha": self.alpha.tolist(), "mu": self.mu.tolist(),
            "beta": self.beta.tolist(), "c": self.c.tolist(), "lambda": self.lam.tolist(),
            "objective": self.objective.tolist(), "sel_error": self.sel_error.tolist(),
            "widened": self.widened.tolist(), "at_bound": self.at_bound.tolist(),
            "rounds": self.rounds.tolist(), "uniform_beta": self.uniform_beta,
            "class_to_group": self.class_to_group.tolist(), "info": self.info,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PluginCurve:
        a = lambda k, t=float: np.asarray(d[k], t)  # noqa: E731
        return cls(a("coverages"), a("alpha"), a("mu"), a("beta"), a("c"), a("lambda"), a("objective"),
                   a("sel_error"), a("widened", np.int64), a("at_bound", bool), a("rounds", np.int64),
                   a("class_to_group", np.int64), int(d["algorithm"]), bool(d["uniform_beta"]),
                   dict(d.get("info", {})))


def _coverages(coverages: Any) -> np.ndarray:
    q = COVERAGES if coverages is None else np.atleast_1d(np.asarray(coverages, np.float64))
    if q.ndim != 1 or q.size == 0 or np.any(~np.isfinite(q)) or q.min() <= 0 or q.max() > 1:
        raise ValueError("coverages must lie in (0, 1]")
    return q


def fit_curve(fit: Split, sel: Split, coverages: Any = None, beta: Any = None,
              spec: SearchSpec = SEARCH) -> PluginCurve:
    """Coverage-matched Algorithm 1 at every coverage (default 0.01..1.00): alpha by the fixed
    point on ``fit``, mu by the lambda search (K = 2) or the gradient search (K > 2) scored on
    ``sel``. ``beta`` None (uniform: CS-plug-in / Plug-in[Balanced]), [K], or [Q, K] (one per
    coverage, as in Algorithm 2's rounds)."""
    q = _coverages(coverages)
    K = fit.K
    if K < 2 or sel.K != K:
        raise ValueError("need K >= 2 groups, the same in both splits")
    Q = q.size
    B = None if beta is None else np.broadcast_to(np.asarray(beta, np.float64), (Q, K)).copy()
    if B is not None:
        if np.any(B < 0) or np.any(B.sum(axis=1) <= 0):
            raise ValueError("beta must be non-negative weights")
        B = B / B.sum(axis=1, keepdims=True)
    if K == 2:
        res = _lambda_search(fit, sel, q, B, spec)
    else:
        res = _gradient_search(fit, sel, q, B, spec)
    return PluginCurve(
        coverages=q, alpha=res["alpha"], mu=res["mu"], beta=np.full((Q, K), 1.0 / K) if B is None else B,
        c=-res["v"], lam=res["mu"][:, 0] - res["mu"][:, -1], objective=res["obj"], sel_error=res["e"],
        widened=res["widened"], at_bound=res["at_bound"], rounds=np.full(Q, -1), algorithm=1,
        uniform_beta=B is None, class_to_group=fit.class_to_group, info={"search": spec.to_dict()},
    )  # fmt: skip


def _lambda_search(fit: Split, sel: Split, q: np.ndarray, B: np.ndarray | None, spec: SearchSpec) -> dict:
    Q = q.size
    grid = lambda_grid(spec)
    lams = [list(grid) for _ in range(Q)]  # evaluated lambdas per coverage
    rows: list[tuple[int, float]] = [(i, float(l)) for i in range(Q) for l in grid]
    seen: dict[tuple[int, float], dict] = {}
    widened = np.zeros(Q, np.int64)
    while rows:
        qi = np.array([r[0] for r in rows])
        mu = np.zeros((len(rows), 2))
        mu[:, 0] = [r[1] for r in rows]
        r = _solve(fit, sel, q[qi], mu, None if B is None else B[qi], spec)
        for j, key in enumerate(rows):
            seen[key] = {k: r[k][j] for k in r}
        rows = []
        for i in range(Q):
            L = np.asarray(lams[i])
            j = choose_lambda(L, [seen[(i, float(l))]["obj"] for l in L])
            if j in (int(np.argmin(L)), int(np.argmax(L))):
                new = _widening(L[j], spec)
                if new.size:
                    widened[i] += 1
                    lams[i].extend(new.tolist())
                    rows += [(i, float(l)) for l in new]
    out = {"alpha": np.empty((Q, 2)), "mu": np.zeros((Q, 2)), "v": np.empty(Q), "obj": np.empty(Q),
           "e": np.empty((Q, 2)), "widened": widened, "at_bound": np.zeros(Q, bool)}
    for i in range(Q):
        L = np.asarray(lams[i])
        j = choose_lambda(L, [seen[(i, float(l))]["obj"] for l in L])
        best = seen[(i, float(L[j]))]
        out["mu"][i, 0] = L[j]
        for k in ("alpha", "v", "obj", "e"):
            out[k][i] = best[k]
        out["at_bound"][i] = abs(L[j]) >= spec.lambda_bound and j in (int(np.argmin(L)), int(np.argmax(L)))
    return out


def _gradient_search(fit: Split, sel: Split, q: np.ndarray, B: np.ndarray | None, spec: SearchSpec) -> dict:
    """K > 2: per coverage, projected normalised gradient descent on mu_0..mu_[K-2] (mu_[K-1] = 0)
    in [-mu_bound, mu_bound]. The score is piecewise constant in mu, so each step follows the
    gradient of its smoothed version (accept -> sigmoid(tau m), tau = 1/(0.05 std m)) on ``sel``,
    alpha held at its fixed point, h fixed, the coverage threshold's dependence on mu included;
    step n has length std(m) / sqrt(n + 1). The iterate with the lowest exact score is kept
    (never worse than mu = 0, the first iterate)."""
    Q, K = q.size, fit.K
    out = {"alpha": np.empty((Q, K)), "mu": np.zeros((Q, K)), "v": np.empty(Q), "obj": np.empty(Q),
           "e": np.empty((Q, K)), "widened": np.zeros(Q, np.int64), "at_bound": np.zeros(Q, bool)}
    for i in range(Q):
        b = None if B is None else B[i : i + 1]
        bobj = np.full(K, 1.0 / K) if b is None else b[0]
        ub = np.ones(K) if b is None else K * b[0]
        mu = np.zeros(K)
        best = None
        for n in range(spec.n_steps + 1):
            r = _solve(fit, sel, q[i : i + 1], mu[None], b, spec)
            if best is None or r["obj"][0] < best[0] - 1e-12:
                best = (r["obj"][0], mu.copy(), r)
            if n == spec.n_steps:
                break
            base, h = _margins(sel, (ub / r["alpha"][0])[None], mu[None], pred=True)
            m = base[0] - coverage_cut(base, sel.w, q[i : i + 1])[0]
            scale = float(np.std(m)) or 1.0
            tau = 1.0 / (0.05 * scale)
            sg = 1.0 / (1.0 + np.exp(-np.clip(tau * m, -500, 500)))
            sp = tau * sg * (1.0 - sg)
            dm = sel.E[:, : K - 1]
            ws = sel.w * sp
            if ws.sum() > 0:
                dm = dm - (ws @ dm) / ws.sum()
            err = (h[0] != sel.y).astype(float)
            D = np.bincount(sel.g, weights=sel.w * sg, minlength=K)
            e = np.bincount(sel.g, weights=sel.w * sg * err, minlength=K) / np.maximum(D, 1e-300)
            coef = bobj[sel.g] * sel.w * (err - e[sel.g]) / np.maximum(D[sel.g], 1e-300)
            grad = (coef * sp) @ dm
            norm = float(np.linalg.norm(grad))
            if norm == 0.0 or not np.isfinite(norm):
                break
            mu[: K - 1] = np.clip(mu[: K - 1] - scale / np.sqrt(n + 1.0) * grad / norm,
                                  -spec.mu_bound, spec.mu_bound)
        obj, mu_b, r = best
        out["mu"][i] = mu_b
        for k in ("alpha", "v", "obj", "e"):
            out[k][i] = r[k][0]
    return out


def eg_step(beta: Any, e: Any, xi: float) -> np.ndarray:
    """Exponentiated gradient: beta_k <- beta_k exp(xi e_k) / sum_j beta_j exp(xi e_j) (rows)."""
    beta = np.asarray(beta, np.float64)
    z = np.log(np.clip(beta, 1e-300, None)) + xi * np.asarray(e, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    b = np.exp(z)
    return b / b.sum(axis=-1, keepdims=True)


def _curve_margins(curve: PluginCurve, s: Split) -> tuple[np.ndarray, np.ndarray]:
    ub = curve.beta * curve.K if not curve.uniform_beta else np.ones_like(curve.alpha)
    return _margins(s, ub / curve.alpha, curve.mu, pred=True)


def group_errors_at_coverage(curve: PluginCurve, s: Split) -> np.ndarray:
    """e [Q, K] of each coverage's rule on split ``s``, thresholded at that coverage on ``s``."""
    base, h = _curve_margins(curve, s)
    return _errors(s, base, h, curve.coverages)


def curve_scores(curve: PluginCurve, s: Split) -> tuple[np.ndarray, np.ndarray]:
    """(score [Q, N] float64, h [Q, N]) of each coverage's rule on split ``s`` (labels unused):
    score_i = m_i(x) - c_i shifted by the cut at coverage q_i on ``s`` (weights ``s.w``), so that
    accepting score_i >= 0 has coverage q_i on ``s`` (the smallest achievable >= q_i)."""
    base, h = _curve_margins(curve, s)
    v = coverage_cut(base, s.w, curve.coverages)
    return base - np.where(np.isfinite(v), v, 0.0)[:, None], h


def fit_worst_curve(s1: Split, s2: Split, coverages: Any = None, *, T: int = 10, xi: float = 1.0,
                    spec: SearchSpec = SEARCH) -> PluginCurve:
    """Algorithm 2 (Plug-in[Worst]) at every coverage: T rounds of Algorithm 1 with beta^(t-1)
    (fitted and selected on S1), group errors e^(t) on S2 at that coverage, beta^(t) by the
    exponentiated-gradient step; the round with the smallest max_k e^(t)_k on S2 is returned
    (first on ties). ``info`` holds beta and the S2 errors of every round."""
    if T < 1 or not xi > 0:
        raise ValueError("need T >= 1 and xi > 0")
    q = _coverages(coverages)
    Q, K = q.size, s1.K
    beta = np.full((Q, K), 1.0 / K)
    rounds, errs = [], []
    for _t in range(T):
        cur = fit_curve(s1, s1, q, beta=beta, spec=spec)
        cur.uniform_beta = False
        e = group_errors_at_coverage(cur, s2)
        rounds.append(cur)
        errs.append(e)
        beta = eg_step(beta, e, xi)
    E2 = np.stack(errs)  # [T, Q, K]
    best = np.argmin(E2.max(axis=2), axis=0)  # first minimiser
    pick = lambda name: np.stack([getattr(rounds[t], name)[i] for i, t in enumerate(best)])  # noqa: E731
    return PluginCurve(
        coverages=q, alpha=pick("alpha"), mu=pick("mu"), beta=pick("beta"), c=pick("c"), lam=pick("lam"),
        objective=pick("objective"), sel_error=E2[best, np.arange(Q)], widened=pick("widened"),
        at_bound=pick("at_bound"), rounds=best.astype(np.int64), algorithm=2, uniform_beta=False,
        class_to_group=s1.class_to_group,
        info={"search": spec.to_dict(), "T": T, "xi": xi,
              "round_betas": np.stack([r.beta for r in rounds]).tolist(), "round_s2_errors": E2.tolist()},
    )  # fmt: skip


def cost_operating_point(curve: PluginCurve, c: float) -> int:
    """Cost-matched Algorithm 1: the coverage index minimising objective_q + c (1 - q) (ties: the
    larger q). The objective is the selection split's sum_k beta_k e_k (Algorithm 2: S2's worst
    group error max_k e_k, the quantity its rounds are chosen by)."""
    score = (curve.sel_error.max(axis=1) if curve.algorithm == 2 else curve.objective)
    total = score + float(c) * (1.0 - curve.coverages)
    tied = np.flatnonzero(total <= total.min() + 1e-12)
    return int(tied[np.argmax(curve.coverages[tied])])


def fit_at_coverage(fit: Split, sel: Split, q: float, beta: Any = None, spec: SearchSpec = SEARCH) -> PluginRule:
    """The Algorithm 1 rule at one coverage (the curve's row for that coverage)."""
    return fit_curve(fit, sel, [q], beta=beta, spec=spec).rule(0)


def with_spec(**kw: Any) -> SearchSpec:
    """SEARCH with some fields changed (tests, ablations)."""
    return replace(SEARCH, **kw)
