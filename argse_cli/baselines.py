"""Baseline rejectors of Narasimhan et al. (ICLR 2024), "Learning to Reject Meets Long-tail Learning".

Symbols (the paper's): ``eta`` [N, C] posterior on the training prior, ``y`` [N] labels,
``class_to_group`` [C] = g(y) in {0..K-1} (0 = head), ``w`` [N] sample weights of a view
(``w_lt`` long-tailed or ``w_bal`` balanced), ``alpha`` [K], ``mu`` [K] (gauge mu_[K-1] = 0),
``beta`` [K] on the simplex (None = uniform), ``c`` the rejection cost / threshold.

The rule itself (prediction h, margin m, accept iff m >= 0) is the one of
:mod:`argse_cli.rejector`; this module only *fits* its parameters:

- :class:`ChowRule`  accept iff max_y eta_y - 1 + c >= 0, predict argmax_y eta_y;
- :func:`fit_cs_plugin`  Algorithm 1 (cost-sensitive plug-in, "CS-plug-in"; beta uniform gives
  the balanced plug-in "Plug-in[Balanced]");
- :func:`fit_plugin_worst` Algorithm 2 (exponentiated-gradient over beta, "Plug-in[Worst]");
- :func:`threshold_for_coverage`, :func:`refit_at_coverages`: the coverage-matched protocol.

Everything the fits accumulate (coverages, alpha, errors, thresholds) is float64. Inside the
fitting loops the margin is evaluated from per-group statistics of eta (exactly the same
formula, see :func:`_group_stats`); the returned rules always use
:func:`argse_cli.rejector.plugin_margin` / :func:`~argse_cli.rejector.plugin_predict`, and their
final threshold is re-chosen on those official margins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from argse_cli.metrics.selective import coverage, group_errors
from argse_cli.rejector import fix_mu_gauge, group_weights_u, plugin_margin, plugin_predict

__all__ = [
    "ChowRule",
    "PluginFit",
    "PluginRule",
    "RefitPoint",
    "WorstFit",
    "fit_chow",
    "fit_cs_plugin",
    "fit_plugin_worst",
    "refit_at_coverages",
    "rule_from_dict",
    "split_S1_S2",
    "sweep_curve_inputs",
    "threshold_for_coverage",
    "with_coverage",
]

ALPHA_MIN = 1e-3
"""Lower clamp of every alpha_k in the fixed point (a group that is never accepted)."""

DEFAULT_LAMBDA_GRID = np.linspace(-1.0, 1.0, 41)
"""Default K = 2 grid of lambda = mu_head - mu_tail (mu = [lambda, 0]), step 0.05.

Why: since sum_y eta_y = 1 the term sum_y mu_[g(y)] eta_y = lambda * P(head | x) moves each
margin by at most |lambda|, on the same scale as c (a probability) and as the margin
max_y u eta - sum_y u eta (at alpha = 1 it lies in [-1, 0]). [-1, 1] therefore spans "tail gets
a full unit of extra acceptance" to "head gets it"; the step 0.05 resolves coverage shifts of a
few percent. Once alpha_tail is small, u_tail = 1/alpha_tail stretches the margins and the
optimum can lie beyond the span (|lambda| ~ 3 on a synthetic 0.8/0.2 head/tail problem); it is
then reached by the widening (each widening doubles the span on the side of the optimum, keeping
the step), which only evaluates the new points.
"""


# --------------------------------------------------------------------------- rules


def _c2g(class_to_group: Any) -> np.ndarray:
    g = np.asarray(class_to_group, dtype=np.int64).reshape(-1)
    if g.size == 0 or g.min() < 0:
        raise ValueError("class_to_group must be non-empty with groups in 0..K-1")
    K = int(g.max()) + 1
    if np.unique(g).size != K:
        raise ValueError("every group 0..K-1 must own at least one class")
    return g


def _np_eta(eta: Any) -> np.ndarray:
    """eta as a numpy array (float32 kept, float64 kept, anything else -> float32)."""
    if type(eta).__module__.startswith("torch"):
        eta = eta.detach().cpu().numpy()
    a = np.asarray(eta)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


@dataclass(frozen=True, eq=False)
class PluginRule:
    """The group-aware plug-in rule (Theorem 1): u_k = K beta_k / alpha_k,

    h(x) = argmax_y u_[g(y)] eta_y,
    m(x) = max_y u_[g(y)] eta_y - sum_y (u_[g(y)] - mu_[g(y)]) eta_y + c, accept iff m >= 0.

    ``mu`` is stored in the gauge mu_[K-1] = 0: a ``mu`` given with mu_[K-1] != 0 is moved there
    by :func:`fix_mu_gauge` (c absorbs mu_[K-1]; every margin is unchanged).
    """

    alpha: np.ndarray
    mu: np.ndarray
    c: float
    beta: np.ndarray | None
    class_to_group: np.ndarray

    def __post_init__(self) -> None:
        alpha = np.asarray(self.alpha, dtype=np.float64).reshape(-1)
        mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        c = float(self.c)
        c2g = _c2g(self.class_to_group)
        K = int(c2g.max()) + 1
        if alpha.shape != (K,) or mu.shape != (K,):
            raise ValueError(f"alpha and mu must have K={K} entries")
        if np.any(alpha <= 0):
            raise ValueError("alpha must be > 0")
        if mu[-1] != 0.0:
            mu, c = fix_mu_gauge(mu, c)
            mu[-1] = 0.0
        beta = self.beta
        if beta is not None:
            beta = np.asarray(beta, dtype=np.float64).reshape(-1)
            if beta.shape != (K,):
                raise ValueError(f"beta must have K={K} entries")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "class_to_group", c2g)

    @property
    def K(self) -> int:
        return int(self.alpha.shape[0])

    def base_margin(self, eta: Any) -> np.ndarray:
        """m(x) - c in float64 (``plugin_margin`` with c = 0, computed in eta's precision)."""
        m0 = plugin_margin(_np_eta(eta), self.alpha, self.mu, 0.0, self.class_to_group, self.beta)
        return np.asarray(m0, dtype=np.float64)

    def margin(self, eta: Any) -> np.ndarray:
        """m(x) = base_margin(x) + c (float64); accept iff m >= 0."""
        return self.base_margin(eta) + self.c

    def predict(self, eta: Any) -> np.ndarray:
        """h(x) = argmax_y u_[g(y)] eta_y (``plugin_predict``)."""
        return np.asarray(plugin_predict(_np_eta(eta), self.alpha, self.class_to_group, self.beta))

    def accept(self, eta: Any) -> np.ndarray:
        return self.margin(eta) >= 0.0

    def with_c(self, c: float) -> PluginRule:
        return PluginRule(self.alpha, self.mu, float(c), self.beta, self.class_to_group)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "plugin",
            "alpha": self.alpha.tolist(),
            "mu": self.mu.tolist(),
            "c": self.c,
            "beta": None if self.beta is None else self.beta.tolist(),
            "class_to_group": self.class_to_group.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PluginRule:
        if d.get("kind", "plugin") != "plugin":
            raise ValueError(f"not a plug-in rule: kind={d.get('kind')!r}")
        return cls(d["alpha"], d["mu"], d["c"], d.get("beta"), d["class_to_group"])


@dataclass(frozen=True)
class ChowRule:
    """Chow's rule: m(x) = max_y eta_y - 1 + c, accept iff m >= 0 (i.e. max_y eta_y >= 1 - c);
    h(x) = argmax_y eta_y. The special case alpha = 1, mu = 0, beta uniform of :class:`PluginRule`."""

    c: float

    def base_margin(self, eta: Any) -> np.ndarray:
        """max_y eta_y - 1 (float64)."""
        return np.asarray(_np_eta(eta).max(axis=-1), dtype=np.float64) - 1.0

    def margin(self, eta: Any) -> np.ndarray:
        return self.base_margin(eta) + float(self.c)

    def predict(self, eta: Any) -> np.ndarray:
        return np.argmax(_np_eta(eta), axis=-1)

    def accept(self, eta: Any) -> np.ndarray:
        return self.margin(eta) >= 0.0

    def with_c(self, c: float) -> ChowRule:
        return ChowRule(float(c))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "chow", "c": float(self.c)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChowRule:
        if d.get("kind", "chow") != "chow":
            raise ValueError(f"not a Chow rule: kind={d.get('kind')!r}")
        return cls(float(d["c"]))


def rule_from_dict(d: dict[str, Any]) -> PluginRule | ChowRule:
    """Inverse of ``rule.to_dict()`` for either rule kind."""
    kind = d.get("kind")
    if kind == "plugin":
        return PluginRule.from_dict(d)
    if kind == "chow":
        return ChowRule.from_dict(d)
    raise ValueError(f"unknown rule kind {kind!r}")


# --------------------------------------------------------------------------- thresholds


def threshold_for_coverage(margin: Any, w: Any, target: float) -> float:
    """The shift s with weighted coverage sum_i w_i [m_i + s >= 0] / sum_i w_i = ``target``.

    s = -m_(k), where m_(1) >= m_(2) >= ... are the margins sorted in decreasing order and k is
    the smallest rank whose cumulative weight reaches ``target`` (the weighted
    (1 - target)-quantile of the margins, taken from above). Ties: every sample whose margin
    equals m_(k) is accepted with it, so the coverage is the smallest achievable value >= target
    (exactly ``target`` when the scores are distinct and the target is reachable, e.g. unit
    weights and target * N an integer). A relative slack of 1e-12 on the cumulative weight
    absorbs float rounding. ``target <= 0`` accepts nothing; ``target >= 1`` accepts everything
    with positive weight. ``w=None`` means unit weights. float64 throughout.
    """
    m = np.asarray(margin, dtype=np.float64).reshape(-1)
    if m.size == 0:
        raise ValueError("empty margin")
    if not np.all(np.isfinite(m)):
        raise ValueError("margins must be finite")
    wt = np.ones_like(m) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
    if wt.shape != m.shape:
        raise ValueError("w and margin differ in length")
    if target <= 0.0:
        return float(-np.nextafter(m.max(), np.inf))
    W = float(wt.sum())
    if W <= 0:
        raise ValueError("total weight must be > 0")
    goal = min(float(target), 1.0) * W * (1.0 - 1e-12)
    return -_upper_weighted_quantile(m, wt, goal, min(float(target), 1.0))


_SELECT_SORT_BELOW = 1024  # candidate sets this small are finished by a sort
_SELECT_BRACKET_ABOVE = 16384  # larger inputs first try a bracket from a strided sample


def _upper_weighted_quantile(m: np.ndarray, w: np.ndarray, goal: float, q: float) -> float:
    """m_(k) of :func:`threshold_for_coverage` without sorting all of m (expected O(N)).

    With S(v) = sum_{i: m_i >= v} w_i, m_(k) = max{v in m : S(v) >= goal} (the value at the
    smallest rank of the decreasing order whose cumulative weight reaches ``goal``; ties share a
    value, so no tie order matters). Weighted quickselect: keep a candidate set that contains
    m_(k) and the weight ``above`` of everything larger than it; split it at its median (or, first,
    at a bracket [lo, hi] read off a strided sample of 8192 values around coverage q +- 0.03, kept
    only when S(> hi) < goal <= S(>= lo) holds on the full data); finish by a sort once at most
    1024 candidates remain. The sums are taken in another order than a full cumulative sum, so the
    result can differ from the sort only when a cumulative weight lies within float rounding
    (~1e-16 relative) of ``goal``; ``goal`` already carries a 1e-12 relative slack."""
    vals, wts, above = m, w, 0.0
    if m.size > _SELECT_BRACKET_ABOVE:
        idx = np.linspace(0, m.size - 1, 8192).astype(np.int64)
        sm, sw = m[idx], w[idx]
        o = np.argsort(-sm, kind="stable")
        cs = np.cumsum(sw[o])
        if cs[-1] > 0:
            cs /= cs[-1]
            hi = sm[o[min(int(np.searchsorted(cs, max(q - 0.03, 0.0))), sm.size - 1)]]
            lo = sm[o[min(int(np.searchsorted(cs, min(q + 0.03, 1.0))), sm.size - 1)]]
            gt = m > hi
            s_gt = float(w[gt].sum())
            if s_gt < goal:
                inside = (m >= lo) & ~gt
                if s_gt + float(w[inside].sum()) >= goal:
                    vals, wts, above = m[inside], w[inside], s_gt
    while vals.size > _SELECT_SORT_BELOW:
        pivot = np.partition(vals, vals.size // 2)[vals.size // 2]
        gt = vals > pivot
        s_gt = above + float(wts[gt].sum())
        if s_gt >= goal:  # m_(k) > pivot: S(min of the larger values) >= goal
            vals, wts = vals[gt], wts[gt]
            continue
        s_ge = s_gt + float(wts[vals == pivot].sum())
        if s_ge >= goal:  # S(pivot) >= goal and S(v) <= S(> pivot) < goal for every v > pivot
            return float(pivot)
        lt = vals < pivot
        vals, wts, above = vals[lt], wts[lt], s_ge
    order = np.argsort(-vals, kind="stable")
    cw = above + np.cumsum(wts[order])
    k = min(int(np.searchsorted(cw, goal, side="left")), vals.size - 1)
    return float(vals[order[k]])


def with_coverage(rule: Any, eta: Any, w: Any, target: float) -> Any:
    """``rule`` with c re-set so that its weighted coverage on ``eta`` is ``target``
    (threshold on ``rule.base_margin``; labels are never needed)."""
    return rule.with_c(threshold_for_coverage(rule.base_margin(eta), w, target))


def fit_chow(eta: Any, w: Any, target_coverage: float) -> ChowRule:
    """Chow's rule thresholded at the weighted (1 - target)-quantile of max_y eta_y."""
    return with_coverage(ChowRule(0.0), eta, w, target_coverage)


# --------------------------------------------------------------------------- fast margins


@dataclass(frozen=True)
class _Stats:
    """Per-group statistics of eta: Mx[n,k] = max_{y in G_k} eta_y, A[n,k] its argmax class,
    E[n,k] = sum_{y in G_k} eta_y. The plug-in rule depends on eta only through them."""

    Mx: np.ndarray
    A: np.ndarray
    E: np.ndarray


def _group_stats(eta: Any, c2g: np.ndarray) -> _Stats:
    eta = _np_eta(eta)
    N = eta.shape[0]
    K = int(c2g.max()) + 1
    Mx = np.empty((N, K), dtype=np.float64)
    E = np.empty((N, K), dtype=np.float64)
    A = np.empty((N, K), dtype=np.int64)
    rows = np.arange(N)
    for k in range(K):
        cols = np.flatnonzero(c2g == k)
        sub = eta[:, cols]
        a = np.argmax(sub, axis=1)
        A[:, k] = cols[a]
        Mx[:, k] = sub[rows, a]
        E[:, k] = sub.sum(axis=1, dtype=np.float64)
    return _Stats(Mx, A, E)


def _fast_base(st: _Stats, u: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m - c, h) from group statistics. Since u_k > 0,
    max_y u_[g(y)] eta_y = max_k u_k Mx_k and sum_y (u - mu)_[g(y)] eta_y = sum_k (u_k - mu_k) E_k;
    h = A[n, argmax_k u_k Mx_k]. Same formula as ``plugin_margin``/``plugin_predict`` (float64)."""
    s = st.Mx * u
    kstar = np.argmax(s, axis=1)
    rows = np.arange(s.shape[0])
    base = s[rows, kstar] - st.E @ (u - mu)
    return base, st.A[rows, kstar]


def _u(alpha: np.ndarray, beta: np.ndarray | None) -> np.ndarray:
    return np.asarray(group_weights_u(np.asarray(alpha, dtype=np.float64), beta), dtype=np.float64)


def _fixed_point(
    st: _Stats,
    gy: np.ndarray,
    w: np.ndarray,
    w_prior: np.ndarray,
    mu: np.ndarray,
    beta: np.ndarray | None,
    c: float | None,
    target: float | None,
    M: int,
    damping: float = 0.0,
) -> tuple[np.ndarray, float]:
    """alpha^(0) = 1; M times: alpha_k <- max(K * P_prior(accept, y in G_k), ALPHA_MIN) with
    P_prior(accept, y in G_k) = sum_{i: g(y_i)=k} wp_i a_i / sum_i wp_i (``w_prior`` = wp), where
    a_i uses the fixed ``c`` or the shift re-chosen at each iteration for coverage ``target``
    under the view weights ``w``. With ``damping`` d > 0 the update is
    alpha <- (1 - d) K P + d alpha (same fixed points; damps the 2-cycles that the plain update
    can fall into when the accepted mass moves between groups). Returns (alpha^(M), c for it)."""
    K = st.Mx.shape[1]
    Wp = float(w_prior.sum())
    alpha = np.ones(K, dtype=np.float64)
    for _ in range(M):
        base, _h = _fast_base(st, _u(alpha, beta), mu)
        cc = c if target is None else threshold_for_coverage(base, w, target)
        acc = base + cc >= 0.0
        mass = np.bincount(gy[acc], weights=w_prior[acc], minlength=K)
        alpha = np.maximum((1.0 - damping) * K * mass / Wp + damping * alpha, ALPHA_MIN)
    base, _h = _fast_base(st, _u(alpha, beta), mu)
    cc = c if target is None else threshold_for_coverage(base, w, target)
    return alpha, float(cc)


def _objective(
    accept: np.ndarray,
    pred: np.ndarray,
    y: np.ndarray,
    c2g: np.ndarray,
    w: np.ndarray,
    beta_obj: np.ndarray,
    c: float | None,
) -> float:
    """sum_k beta_k e_k (+ c * (1 - coverage) when the rejection cost c is fixed, i.e. the
    paper's cost-sensitive L2R risk; at a fixed target coverage that term is a constant)."""
    e = group_errors(accept, pred, y, c2g, w)
    obj = float(np.dot(beta_obj, e))
    if c is not None:
        obj += float(c) * (1.0 - coverage(accept, w))
    return obj


# --------------------------------------------------------------------------- Algorithm 1


@dataclass
class PluginFit:
    """Result of :func:`fit_cs_plugin`.

    K = 2 (grid): ``grid`` [L] the final lambda grid (mu = [lambda, 0]), ``objective`` [L].
    K > 2 (gradient): ``grid`` [T+1, K] the visited mu iterates, ``objective`` [T+1].
    ``widened``: number of grid widenings (0 for the gradient method).
    """

    rule: PluginRule
    grid: np.ndarray
    objective: np.ndarray
    widened: int
    method: str = "grid"
    info: dict[str, Any] = field(default_factory=dict)


def _prior_weights(w_prior: Any, w: np.ndarray) -> np.ndarray:
    if w_prior is None:
        return w
    wp = np.asarray(w_prior, dtype=np.float64).reshape(-1)
    if wp.shape != w.shape or np.any(wp < 0) or not wp.sum() > 0:
        raise ValueError("w_prior must be non-negative weights, one per fit sample")
    return wp


def _prep(eta: Any, y: Any, w: Any, c2g: np.ndarray):
    eta = _np_eta(eta)
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    n = eta.shape[0]
    if y.shape[0] != n:
        raise ValueError("eta and y differ in length")
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError("eta and w differ in length")
    if eta.shape[1] != c2g.shape[0]:
        raise ValueError("eta's class count differs from class_to_group")
    return eta, y, w


def fit_cs_plugin(
    eta_fit: Any,
    y_fit: Any,
    w_fit: Any,
    class_to_group: Any,
    *,
    eta_sel: Any = None,
    y_sel: Any = None,
    w_sel: Any = None,
    w_prior: Any = None,
    c: float | None = None,
    target_coverage: float | None = None,
    beta: Any = None,
    lambda_grid: Any = None,
    M: int = 10,
    widen: bool = True,
    max_widen: int = 6,
    method: str | None = None,
    n_steps: int = 150,
    lr: float = 1.0,
    mu_bound: float = 20.0,
    tau_frac: float = 0.05,
) -> PluginFit:
    """Algorithm 1, the cost-sensitive plug-in (CS-plug-in), for weights ``beta`` (None = uniform).

    For a candidate mu (gauge mu_[K-1] = 0): alpha^(0) = 1 and M fixed-point iterations
    alpha_k <- max(K * P(accept, y in G_k), 1e-3) on the fit data (self-normalised weighted sum),
    accepting with the fixed ``c`` or with the shift re-chosen at every iteration so that the
    coverage on the fit data under the view ``w_fit`` is ``target_coverage`` (exactly one of the
    two).

    ``w_prior`` (default: ``w_fit``) are the weights of the fixed point's P(accept, y in G_k).
    Theorem 1 needs them to be those of the distribution whose posterior ``eta`` is, i.e. the
    training prior: pass ``w_prior=w_lt`` whenever ``w_fit`` is another view (``w_bal``).
    alpha under the balanced view paired with a training-prior eta is inconsistent: on a
    synthetic 2-group problem it leaves the balanced error ~0.09 above the best plug-in rule.
    (Errors and coverage are still measured under ``w_fit`` / ``w_sel``.) The candidate's score is the objective sum_k beta_k e_k (+ c * P_w(reject) in
    fixed-c mode, the paper's cost-sensitive risk; constant at fixed coverage) with e_k the
    weighted group errors on the selection split (``eta_sel``...; else the fit split), the rule
    being applied with the threshold chosen on the fit data.

    ``method="grid"`` (default for K = 2): mu = [lambda, 0] for lambda on ``lambda_grid``
    (default :data:`DEFAULT_LAMBDA_GRID`). The minimiser is taken as the middle one of the tied
    minima. If it is the first or last grid point and ``widen``, the grid is extended on that side
    by its current span (span doubles, step kept) and the search repeats, at most ``max_widen``
    times.

    ``method="gradient"`` (default for K > 2; the Lagrangian variant): projected normalised
    gradient descent on the free multipliers mu_0..mu_[K-2] (mu_[K-1] = 0) within the box
    [-mu_bound, mu_bound]. The objective is piecewise constant in mu, so the step direction is
    the gradient of its smoothed version (accept -> sigmoid(tau m), tau = 1/(tau_frac * std m))
    on the selection data, with alpha held at its fixed point for the current mu, h fixed (it
    does not depend on mu) and, at fixed coverage, the threshold's implicit dependence on mu
    included. Step n has length lr * std(m) / sqrt(n + 1) (std of the current margins on the
    selection data: the step follows the margin scale, which grows as 1/alpha); the iterate with
    the lowest *exact* objective is returned (so never worse than mu = 0, the first iterate).

    The returned rule has alpha^(M) of the chosen mu and c = the fixed c, or the threshold
    re-chosen on the official margins (``PluginRule.base_margin``) of the fit data.
    """
    if (c is None) == (target_coverage is None):
        raise ValueError("give exactly one of c / target_coverage")
    if target_coverage is not None and not 0.0 < target_coverage <= 1.0:
        raise ValueError("target_coverage must lie in (0, 1]")
    c2g = _c2g(class_to_group)
    K = int(c2g.max()) + 1
    if K < 2:
        raise ValueError("need K >= 2 groups")
    eta_f, y_f, w_f = _prep(eta_fit, y_fit, w_fit, c2g)
    wp_f = _prior_weights(w_prior, w_f)
    st_f = _group_stats(eta_f, c2g)
    if eta_sel is not None:
        eta_s, y_s, w_s = _prep(eta_sel, y_sel, w_sel, c2g)
        st_s = _group_stats(eta_s, c2g)
    else:
        y_s, w_s, st_s = y_f, w_f, st_f
    return _fit_cs_plugin_stats(
        st_f, y_f, w_f, wp_f, st_s, y_s, w_s, c2g, eta_f=eta_f, c=c, target=target_coverage,
        beta=beta, lambda_grid=lambda_grid, M=M, widen=widen, max_widen=max_widen,
        method=method, n_steps=n_steps, lr=lr, mu_bound=mu_bound, tau_frac=tau_frac,
    )  # fmt: skip


def fit_cs_plugin_from_stats(
    Mx: Any,
    A: Any,
    E: Any,
    y_fit: Any,
    w_fit: Any,
    class_to_group: Any,
    *,
    sel: tuple | None = None,
    w_prior: Any = None,
    c: float | None = None,
    target_coverage: float | None = None,
    beta: Any = None,
    M: int = 10,
    widen: bool = True,
    damping: float = 0.0,
    lambda_grid: Any = None,
) -> PluginFit:
    """:func:`fit_cs_plugin` from per-group statistics (Mx = max of eta over G_k, A = its argmax
    class, E = sum of eta over G_k; each [N, K]) instead of eta [N, C]: O(N K) memory, so a
    streamed training set of any size can be refitted. ``sel`` = (Mx, A, E, y, w) of the
    selection split (default: the fit split). With ``target_coverage`` the threshold is the fit
    data's quantile from the fixed point (not re-chosen on eta, which is not kept)."""
    if (c is None) == (target_coverage is None):
        raise ValueError("give exactly one of c / target_coverage")
    c2g = _c2g(class_to_group)
    st_f = _Stats(np.asarray(Mx, np.float64), np.asarray(A, np.int64), np.asarray(E, np.float64))
    y_f = np.asarray(y_fit, np.int64)
    w_f = np.ones(len(y_f)) if w_fit is None else np.asarray(w_fit, np.float64)
    wp_f = _prior_weights(w_prior, w_f)
    if sel is None:
        st_s, y_s, w_s = st_f, y_f, w_f
    else:
        st_s = _Stats(
            np.asarray(sel[0], np.float64),
            np.asarray(sel[1], np.int64),
            np.asarray(sel[2], np.float64),
        )
        y_s = np.asarray(sel[3], np.int64)
        w_s = np.ones(len(y_s)) if sel[4] is None else np.asarray(sel[4], np.float64)
    return _fit_cs_plugin_stats(
        st_f, y_f, w_f, wp_f, st_s, y_s, w_s, c2g, eta_f=None, c=c, target=target_coverage,
        beta=beta, lambda_grid=lambda_grid, M=M, widen=widen, max_widen=6, method=None, n_steps=150,
        lr=1.0, mu_bound=20.0, tau_frac=0.05, damping=damping,
    )  # fmt: skip


def _fit_cs_plugin_stats(
    st_f: _Stats,
    y_f: np.ndarray,
    w_f: np.ndarray,
    wp_f: np.ndarray,
    st_s: _Stats,
    y_s: np.ndarray,
    w_s: np.ndarray,
    c2g: np.ndarray,
    *,
    eta_f: np.ndarray,
    c: float | None,
    target: float | None,
    beta: Any,
    lambda_grid: Any,
    M: int,
    widen: bool,
    max_widen: int,
    method: str | None,
    n_steps: int,
    lr: float,
    mu_bound: float,
    tau_frac: float,
    damping: float = 0.0,
) -> PluginFit:
    K = int(c2g.max()) + 1
    beta_arr = None if beta is None else np.asarray(beta, dtype=np.float64).reshape(-1)
    if beta_arr is not None and (beta_arr.shape != (K,) or np.any(beta_arr < 0)):
        raise ValueError(f"beta must be K={K} non-negative weights")
    beta_obj = np.full(K, 1.0 / K) if beta_arr is None else beta_arr / beta_arr.sum()
    gy_f, gy_s = c2g[y_f], c2g[y_s]
    method = method or ("grid" if K == 2 else "gradient")

    def evaluate(mu: np.ndarray) -> tuple[float, np.ndarray, float]:
        alpha, cc = _fixed_point(st_f, gy_f, w_f, wp_f, mu, beta_arr, c, target, M, damping)
        base, pred = _fast_base(st_s, _u(alpha, beta_arr), mu)
        obj = _objective(base + cc >= 0.0, pred, y_s, c2g, w_s, beta_obj, c)
        return obj, alpha, cc

    if method == "grid":
        if K != 2:
            raise ValueError("the lambda grid search is for K = 2; use method='gradient'")
        fit = _grid_search(evaluate, lambda_grid, widen, max_widen)
        mu_best = np.array([fit["lam"], 0.0])
        grid, objective, widened, info = fit["grid"], fit["obj"], fit["widened"], {}
    elif method == "gradient":
        res = _gradient_search(
            evaluate, st_s, y_s, gy_s, w_s, K, beta_arr, beta_obj, c, target, n_steps, lr,
            mu_bound, tau_frac,
        )  # fmt: skip
        mu_best = res["mu"]
        grid, objective, widened, info = res["mus"], res["obj"], 0, {}
    else:
        raise ValueError(f"unknown method {method!r}")

    alpha, cc = _fixed_point(st_f, gy_f, w_f, wp_f, mu_best, beta_arr, c, target, M, damping)
    rule = PluginRule(alpha, mu_best, cc, beta_arr, c2g)
    if target is not None and eta_f is not None:
        rule = with_coverage(rule, eta_f, w_f, target)
    info["best_objective"] = float(np.min(objective))
    return PluginFit(rule, grid, objective, widened, method, info)


def _grid_search(
    evaluate: Callable[[np.ndarray], tuple[float, np.ndarray, float]],
    lambda_grid: Any,
    widen: bool,
    max_widen: int,
) -> dict[str, Any]:
    grid = np.sort(np.asarray(DEFAULT_LAMBDA_GRID if lambda_grid is None else lambda_grid, float))
    if grid.ndim != 1 or grid.size < 2:
        raise ValueError("lambda_grid needs >= 2 values")
    step = float(np.min(np.diff(grid))) if grid.size > 1 else 0.0
    cache: dict[float, float] = {}

    def obj_of(lam: float) -> float:
        key = round(float(lam), 12)
        if key not in cache:
            cache[key] = evaluate(np.array([key, 0.0]))[0]
        return cache[key]

    widened = 0
    while True:
        obj = np.array([obj_of(v) for v in grid])
        ties = np.flatnonzero(obj <= obj.min() + 1e-12)
        i = int(ties[len(ties) // 2])
        at_lo, at_hi = i == 0, i == grid.size - 1
        if not (widen and (at_lo or at_hi) and widened < max_widen and step > 0):
            break
        span = float(grid[-1] - grid[0])
        n_new = max(int(round(span / step)), 1)
        if at_lo:
            ext = grid[0] - step * np.arange(n_new, 0, -1)
            grid = np.concatenate([ext, grid])
        else:
            ext = grid[-1] + step * np.arange(1, n_new + 1)
            grid = np.concatenate([grid, ext])
        widened += 1
    return {"lam": float(grid[i]), "grid": grid, "obj": obj, "widened": widened}


def _gradient_search(
    evaluate, st_s, y_s, gy_s, w_s, K, beta_arr, beta_obj, c, target, n_steps, lr, mu_bound,
    tau_frac,
) -> dict[str, Any]:  # fmt: skip
    mu = np.zeros(K, dtype=np.float64)
    mus, objs = [], []
    W_s = float(w_s.sum())
    E_free = st_s.E[:, : K - 1]
    for n in range(n_steps + 1):
        obj, alpha, cc = evaluate(mu)
        mus.append(mu.copy())
        objs.append(obj)
        if n == n_steps:
            break
        base, pred = _fast_base(st_s, _u(alpha, beta_arr), mu)
        m = base + cc
        scale = float(np.std(m))
        tau = 1.0 / (tau_frac * (scale if scale > 0 else 1.0))
        s = 1.0 / (1.0 + np.exp(-np.clip(tau * m, -500.0, 500.0)))
        sp = tau * s * (1.0 - s)  # d s / d m
        dm = E_free  # d m_i / d mu_j (j < K-1)
        if target is not None:  # implicit threshold: coverage fixed => d cc / d mu_j
            ws = w_s * sp
            den = ws.sum()
            if den > 0:
                dm = E_free - (ws @ E_free) / den
        err = (pred != y_s).astype(np.float64)
        ws_acc = w_s * s
        D = np.bincount(gy_s, weights=ws_acc, minlength=K)
        e = np.bincount(gy_s, weights=ws_acc * err, minlength=K) / np.maximum(D, 1e-300)
        coef = beta_obj[gy_s] * w_s * (err - e[gy_s]) / np.maximum(D[gy_s], 1e-300)
        if c is not None:
            coef = coef - float(c) * w_s / W_s
        grad = (coef * sp) @ dm
        norm = float(np.linalg.norm(grad))
        if norm == 0.0 or not np.isfinite(norm):
            break
        step = lr * (scale if scale > 0 else 1.0) / np.sqrt(n + 1.0)
        mu[: K - 1] = np.clip(mu[: K - 1] - step * grad / norm, -mu_bound, mu_bound)
    objs_a = np.asarray(objs)
    best = int(np.argmin(objs_a))
    return {"mu": mus[best], "mus": np.asarray(mus), "obj": objs_a}


# --------------------------------------------------------------------------- Algorithm 2


def fit_cs_plugin_at_cost(
    eta_fit: Any, y_fit: Any, w_fit: Any, class_to_group: Any, *, c: float, eta_sel: Any = None,
    y_sel: Any = None, w_sel: Any = None, w_prior: Any = None, beta: Any = None, M: int = 10,
    coverages: Any = None,
) -> tuple[PluginFit, float]:
    """CS-plug-in for a rejection cost ``c`` without Algorithm 1's trivial fixed point.

    At a fixed c the fixed point alpha_k <- K P(accept, y in G_k) can collapse to "accept
    nothing" (alpha -> 0), which turns the rule into a rescaled Chow rule. Instead every coverage
    q of a grid (default 0.10, 0.15, ..., 1.00) is fitted with the threshold at the fit data's
    quantile, and the q minimising sum_k beta_k e_k(sel) + c (1 - q) is kept: the same cost-
    sensitive objective, searched over the operating point. Returns (fit, q)."""
    grid = np.round(np.arange(0.10, 1.0001, 0.05), 4) if coverages is None else np.asarray(coverages, float)
    best = None
    for q in grid:
        f = fit_cs_plugin(eta_fit, y_fit, w_fit, class_to_group, eta_sel=eta_sel, y_sel=y_sel,
                          w_sel=w_sel, w_prior=w_prior, target_coverage=float(q), beta=beta, M=M)
        obj = f.info["best_objective"] + c * (1.0 - float(q))
        if best is None or obj < best[0]:
            best = (obj, float(q), f)
    return best[2], best[1]


def split_S1_S2(
    n: int, frac: float = 0.5, seed: int = 0, labels: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random split of range(n) into (S1, S2) index arrays (sorted), |S1| ~ frac * n.

    With ``labels`` the split is class-stratified: each class sends floor(frac * n_c + U) of its
    n_c samples to S1 (U ~ Uniform[0, 1), stochastic rounding, so rare classes are not all
    sent to one side)."""
    if not 0.0 < frac < 1.0:
        raise ValueError("frac must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        k = int(round(frac * n))
        return np.sort(perm[:k]), np.sort(perm[k:])
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError("labels must have n entries")
    s1 = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        k = int(np.floor(frac * idx.size + rng.random()))
        s1.append(idx[:k])
    in1 = np.zeros(n, dtype=bool)
    if s1:
        in1[np.concatenate(s1)] = True
    return np.flatnonzero(in1), np.flatnonzero(~in1)


@dataclass
class WorstFit:
    """Result of :func:`fit_plugin_worst`: the chosen ``rule`` (round ``best_round``, 0-based),
    ``betas`` [T+1, K] (beta^(0) .. beta^(T)), ``errors`` [T, K] group errors on S2 of each
    round's rule, ``rules`` the T rules."""

    rule: PluginRule
    betas: np.ndarray
    errors: np.ndarray
    best_round: int
    rules: list[PluginRule]


def fit_plugin_worst(
    eta_S1: Any,
    y_S1: Any,
    w_S1: Any,
    eta_S2: Any,
    y_S2: Any,
    w_S2: Any,
    class_to_group: Any,
    *,
    c: float | None = None,
    target_coverage: float | None = None,
    w_prior_S1: Any = None,
    T: int = 25,
    xi: float = 1.0,
    M: int = 10,
    lambda_grid: Any = None,
    widen: bool = True,
    **cs_kwargs: Any,
) -> WorstFit:
    """Algorithm 2, Plug-in[Worst]: min_(h,r) max_k e_k via exponentiated gradient on beta.

    beta^(0) = (1/K, ..., 1/K); for t = 1..T: (h^t, r^t) = CS-plug-in with beta^(t-1) fitted on S1
    (selection of mu also on S1; alpha fixed point under ``w_prior_S1``, default ``w_S1``);
    e^t_k = group errors of (h^t, r^t) on S2 under ``w_S2``, the rule
    applied with the threshold chosen on S1; beta^(t)_k ∝ beta^(t-1)_k exp(xi e^t_k).
    Returned rule: the round with the lowest worst-group error max_k e^t_k on S2 (first such round
    on ties), a deterministic selection in place of the paper's final/averaged iterate.
    """
    if (c is None) == (target_coverage is None):
        raise ValueError("give exactly one of c / target_coverage")
    c2g = _c2g(class_to_group)
    K = int(c2g.max()) + 1
    eta1, y1, w1 = _prep(eta_S1, y_S1, w_S1, c2g)
    wp1 = _prior_weights(w_prior_S1, w1)
    eta2, y2, w2 = _prep(eta_S2, y_S2, w_S2, c2g)
    st1 = _group_stats(eta1, c2g)
    beta = np.full(K, 1.0 / K)
    betas, errors, rules = [beta.copy()], [], []
    opts = {
        "lambda_grid": lambda_grid, "M": M, "widen": widen, "max_widen": 6, "method": None,
        "n_steps": 150, "lr": 1.0, "mu_bound": 20.0, "tau_frac": 0.05,
    }  # fmt: skip
    opts.update(cs_kwargs)
    for _t in range(T):
        fit = _fit_cs_plugin_stats(
            st1, y1, w1, wp1, st1, y1, w1, c2g, eta_f=eta1, c=c, target=target_coverage, beta=beta,
            **opts,
        )  # fmt: skip
        rule = fit.rule
        e = group_errors(rule.accept(eta2), rule.predict(eta2), y2, c2g, w2)
        rules.append(rule)
        errors.append(e)
        beta = beta * np.exp(xi * e)
        beta = beta / beta.sum()
        betas.append(beta.copy())
    errors_a = np.asarray(errors)
    best = int(np.argmin(errors_a.max(axis=1)))
    return WorstFit(rules[best], np.asarray(betas), errors_a, best, rules)


# --------------------------------------------------------------------------- refit protocol


def sweep_curve_inputs(rule: Any, eta_test: Any) -> tuple[np.ndarray, np.ndarray]:
    """(margin m(x) [N] float64, prediction h(x) [N]) of ``rule`` on test; the caller sweeps a
    threshold t over the margins (accept iff m + t >= 0) to trace a risk-coverage curve."""
    return rule.margin(eta_test), np.asarray(rule.predict(eta_test))


class RefitPoint(NamedTuple):
    """One coverage level of :func:`refit_at_coverages`: ``rule`` is the rule fitted on
    validation (its c = the validation threshold); ``test_margin`` is its test margin with the
    threshold re-set on test (accept iff test_margin >= 0, test coverage = ``coverage``);
    ``test_pred`` its test predictions."""

    coverage: float
    rule: Any
    test_margin: np.ndarray
    test_pred: np.ndarray


def refit_at_coverages(
    fit_fn: Callable[[Any, Any, Any, float], Any],
    eta_val: Any,
    y_val: Any,
    w_val: Any,
    eta_test: Any,
    coverages: Sequence[float],
    *,
    w_test: Any = None,
) -> list[RefitPoint]:
    """Coverage-matched refit protocol (no test labels anywhere).

    For each level q: ``rule = fit_fn(eta_val, y_val, w_val, q)`` (fit on validation with the
    threshold at the validation quantile for coverage q); on test the threshold is re-set so that
    the test coverage is q: c_test = threshold_for_coverage(rule.base_margin(eta_test), w_test, q)
    and test_margin = base_margin + c_test. ``w_test`` (default None = unit weights) must not be
    derived from test labels (w_bal is) if the protocol is to stay label-free. ``fit_fn`` may
    return any rule with ``base_margin``/``predict`` (e.g. a plug-in rule on a gated mixture's
    eta); rules without ``base_margin`` are shifted on ``margin`` instead.
    """
    out: list[RefitPoint] = []
    for q in coverages:
        q = float(q)
        rule = fit_fn(eta_val, y_val, w_val, q)
        base = (
            rule.base_margin(eta_test)
            if hasattr(rule, "base_margin")
            else np.asarray(rule.margin(eta_test), dtype=np.float64)
        )
        c_test = threshold_for_coverage(base, w_test, q)
        out.append(RefitPoint(q, rule, base + c_test, np.asarray(rule.predict(eta_test))))
    return out
