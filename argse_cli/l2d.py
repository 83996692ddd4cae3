"""Learning to defer to several (simulated) human experts by EM (numpy / scipy only).

Latent source ``z in {0 = classifier, 1..H = human_h}`` of the label of x:

- gate             ``pi_z(x) = p(z | x) = softmax(f_theta(phi(x)))_z`` on gating features phi(x)
  (softmax regression, or a one-hidden-layer tanh MLP with ``gate_hidden > 0``);
- classifier       ``p(y | x, z = 0) = eta_y(x)`` (the calibrated mixture posterior, fixed);
- human h          ``p(y | m_h, z = h) = 1 - eps_h`` if ``y = m_h``, else ``eps_h / (C - 1)``.

Observed-data log-likelihood ``L = sum_i log sum_z pi_z(x_i) p(y_i | x_i, m_i, z)``.

- E-step: ``r_iz = pi_z(x_i) p(y_i | ., z) / sum_z' pi_z'(x_i) p(y_i | ., z')``.
- M-step: ``eps_h = sum_i r_ih [y_i != m_hi] / sum_i r_ih`` (exact maximiser) and the gate by
  maximising ``Q(theta) = sum_i sum_z r_iz log pi_z(x_i)`` (cross-entropy to the soft targets) with
  L-BFGS from the current theta; the new theta is kept only if Q did not decrease. Both M-step
  parts do not decrease the expected complete log-likelihood, so L is non-decreasing.

The model is a *mixture*: y is explained by one source. Humans simulated as independent noisy
copies of the true label (:func:`simulate_humans`) do not follow it: when one human errs another
source explains y, and the maximum-likelihood eps_h then collapses towards 0 (measured: ~1e-11
for two humans at 0.3, also with class-dependent noise), so eps_h is only interpretable as a
noise rate on data drawn from the model itself (:func:`sample_from_model`: human h is a noisy
copy of y on the samples it is responsible for and uninformative elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, logsumexp, softmax

__all__ = [
    "EMSettings",
    "Gate",
    "L2DResult",
    "defer_curve",
    "deferral_comparison",
    "em_defer",
    "em_diagnostics",
    "human_loglik",
    "observed_loglik",
    "sample_from_model",
    "simulate_humans",
]

_TINY = 1e-12


# --------------------------------------------------------------------------- simulation
def simulate_humans(
    y: Any,
    C: int,
    noise_rates: Any,
    class_dependent: Any = None,
    seed: int = 0,
) -> np.ndarray:
    """Simulated human labels ``m`` [H, N]: each a noisy copy of the true label.

    Human h keeps ``y_i`` with probability ``1 - eps_h(y_i)`` and otherwise answers a class drawn
    uniformly from the C - 1 OTHER classes (symmetric noise, the human likelihood of the model).
    ``eps_h(y) = noise_rates[h]``, or ``class_dependent[h, y]`` when ``class_dependent`` [H, C]
    is given (it then overrides ``noise_rates``). Humans are independent given y.
    """
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    if class_dependent is not None:
        cd = np.asarray(class_dependent, dtype=np.float64)
        if cd.ndim != 2 or cd.shape[1] != C:
            raise ValueError("class_dependent must have shape [H, C]")
        eps = cd[:, y]  # [H, N]
    else:
        nr = np.asarray(noise_rates, dtype=np.float64).reshape(-1)
        eps = np.broadcast_to(nr[:, None], (nr.size, y.size))
    if np.any(eps < 0) or np.any(eps > 1):
        raise ValueError("noise rates must lie in [0, 1]")
    H = eps.shape[0]
    flip = rng.random((H, y.size)) < eps
    other = (y[None, :] + rng.integers(1, C, size=(H, y.size))) % C
    return np.where(flip, other, y[None, :]).astype(np.int64)


def sample_from_model(
    gate_probs: Any, eta: Any, eps: Any, C: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``(y, m, z)`` from the L2D mixture itself (a well-specified synthetic problem).

    Human labels m_h ~ Uniform(C), independent of everything; ``z ~ gate_probs`` [N, H+1];
    ``y ~ eta(x)`` if z = 0, else ``y = m_z`` with probability ``1 - eps_z`` and a uniform other
    class otherwise. Within its own region (z = h) human h is a noisy copy of y with noise eps_h.
    """
    rng = np.random.default_rng(seed)
    gp = np.asarray(gate_probs, dtype=np.float64)
    eta = np.asarray(eta, dtype=np.float64)
    eps = np.asarray(eps, dtype=np.float64).reshape(-1)
    N, H = gp.shape[0], gp.shape[1] - 1
    m = rng.integers(0, C, size=(H, N))
    z = (rng.random(N)[:, None] > np.cumsum(gp, axis=1)).sum(axis=1).clip(max=H)
    y_clf = (rng.random(N)[:, None] > np.cumsum(eta, axis=1)).sum(axis=1).clip(max=C - 1)
    hz = np.clip(z - 1, 0, None)
    mz = m[hz, np.arange(N)]
    flip = rng.random(N) < eps[hz]
    y_h = np.where(flip, (mz + rng.integers(1, C, size=N)) % C, mz)
    y = np.where(z == 0, y_clf, y_h)
    return y.astype(np.int64), m.astype(np.int64), z.astype(np.int64)


# --------------------------------------------------------------------------- gate
@dataclass
class Gate:
    """Gate ``pi(x) = softmax(f_theta((phi(x) - mean) / std))`` over ``n_out = H + 1`` sources.

    ``hidden = 0``: softmax regression ``f = X W + b``; ``hidden > 0``: ``f = tanh(X W1 + b1) W2
    + b2``. ``theta`` is the flat parameter vector.
    """

    n_in: int
    n_out: int
    hidden: int
    mean: np.ndarray
    std: np.ndarray
    theta: np.ndarray = field(repr=False)

    def _shapes(self) -> list[tuple[int, int]]:
        if self.hidden == 0:
            return [(self.n_in, self.n_out), (1, self.n_out)]
        h = self.hidden
        return [(self.n_in, h), (1, h), (h, self.n_out), (1, self.n_out)]

    def _unpack(self, theta: np.ndarray) -> list[np.ndarray]:
        out, i = [], 0
        for r, c in self._shapes():
            out.append(theta[i : i + r * c].reshape(r, c))
            i += r * c
        return out

    def standardise(self, features: Any) -> np.ndarray:
        X = np.asarray(features, dtype=np.float64)
        X = X[:, None] if X.ndim == 1 else X
        return (X - self.mean) / self.std

    def logits(self, X: np.ndarray, theta: np.ndarray | None = None) -> tuple:
        p = self._unpack(self.theta if theta is None else theta)
        if self.hidden == 0:
            return X @ p[0] + p[1], None
        hid = np.tanh(X @ p[0] + p[1])
        return hid @ p[2] + p[3], hid

    def predict(self, features: Any) -> np.ndarray:
        """``pi(x)`` [N, H+1] (column 0 = classifier)."""
        return softmax(self.logits(self.standardise(features))[0], axis=1)

    def q_and_grad(self, theta: np.ndarray, X: np.ndarray, R: np.ndarray) -> tuple[float, Any]:
        """``Q(theta) = sum_i sum_z R_iz log pi_z(x_i)`` and its gradient (rows of R sum to 1)."""
        f, hid = self.logits(X, theta)
        logp = log_softmax(f, axis=1)
        q = float(np.sum(R * logp))
        d = R - np.exp(logp) * R.sum(axis=1, keepdims=True)  # dQ/df
        p = self._unpack(theta)
        if self.hidden == 0:
            g = [X.T @ d, d.sum(axis=0, keepdims=True)]
        else:
            dh = (d @ p[2].T) * (1.0 - hid**2)
            g = [X.T @ dh, dh.sum(axis=0, keepdims=True), hid.T @ d, d.sum(axis=0, keepdims=True)]
        return q, np.concatenate([x.reshape(-1) for x in g])


def _new_gate(features: np.ndarray, n_out: int, hidden: int, seed: int) -> Gate:
    X = features[:, None] if features.ndim == 1 else features
    mean, std = X.mean(axis=0), X.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    g = Gate(X.shape[1], n_out, int(hidden), mean, std, np.empty(0))
    rng = np.random.default_rng(seed)
    parts = []
    for k, (r, c) in enumerate(g._shapes()):
        if hidden and k == 0:
            parts.append(rng.normal(0.0, 1.0 / np.sqrt(r), size=r * c))
        else:
            parts.append(np.zeros(r * c))  # zero output layer: uniform gate at the start
    g.theta = np.concatenate(parts)
    return g


# --------------------------------------------------------------------------- likelihood
def human_loglik(y: np.ndarray, m: np.ndarray, eps: np.ndarray, C: int) -> np.ndarray:
    """``log p(y_i | m_hi, z = h)`` [N, H]: log(1 - eps_h) if y = m_h else log(eps_h / (C - 1))."""
    agree = m.T == y[:, None]
    e = np.clip(eps, _TINY, 1.0 - _TINY)[None, :]
    return np.where(agree, np.log1p(-e), np.log(e / (C - 1)))


def _log_comp(eta_y: np.ndarray, y, m, eps, C) -> np.ndarray:
    """[N, H+1] log p(y_i | ., z): column 0 = log eta_y(x_i), then the humans."""
    return np.concatenate(
        [np.log(np.maximum(eta_y, _TINY))[:, None], human_loglik(y, m, eps, C)], 1
    )


def observed_loglik(gate_probs: Any, eta: Any, m: Any, y: Any, eps: Any, C: int) -> float:
    """``L = sum_i log sum_z pi_z(x_i) p(y_i | x_i, m_i, z)`` (float64)."""
    y = np.asarray(y, dtype=np.int64)
    eta = np.asarray(eta, dtype=np.float64)
    lc = _log_comp(eta[np.arange(y.size), y], y, np.asarray(m), np.asarray(eps, float), C)
    lp = np.log(np.maximum(np.asarray(gate_probs, dtype=np.float64), _TINY))
    return float(logsumexp(lp + lc, axis=1).sum())


@dataclass
class L2DResult:
    """EM fit: ``eps`` [H], ``loglik`` [n_iter + 1] (index 0 = before the first iteration; the
    penalised objective when ``l2 > 0``), the ``gate``, final responsibilities ``resp`` [N, H+1],
    ``n_iter`` run, ``converged`` (relative increase below ``tol``)."""

    eps: np.ndarray
    loglik: list[float]
    gate: Gate
    resp: np.ndarray
    n_iter: int
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "eps": self.eps.tolist(),
            "loglik": list(self.loglik),
            "n_iter": self.n_iter,
            "converged": self.converged,
            "gate_hidden": self.gate.hidden,
        }


@dataclass(frozen=True)
class EMSettings:
    """The EM schedule of :func:`em_defer`.

    ``n_iter``: iterations at most; ``tol``: stop when the relative increase of L falls below it
    (0 = run all ``n_iter``); ``m_steps``: L-BFGS iterations per gate M-step; ``l2``: penalty
    ``l2/2 |theta|^2`` on the gate; ``gate_hidden``: hidden units of the gate (0 = softmax
    regression); ``eps_init``: starting eps [H] (default: each human's raw disagreement rate with y).
    """

    n_iter: int = 50
    gate_hidden: int = 0
    m_steps: int = 25
    l2: float = 0.0
    tol: float = 0.0
    eps_init: Any = None


def em_defer(
    features: Any,
    eta: Any,
    m: Any,
    y: Any,
    C: int,
    *,
    seed: int = 0,
    em: EMSettings = EMSettings(),
) -> L2DResult:
    """Fit the gate and the human noise rates eps_h by EM (see the module docstring).

    ``features`` [N, d] gating features, ``eta`` [N, C] the classifier's calibrated posterior,
    ``m`` [H, N] human labels, ``y`` [N] labels; ``seed`` initialises the gate. Each M-step runs at
    most ``em.m_steps`` L-BFGS iterations on ``-Q(theta) + l2/2 |theta|^2`` from the current theta
    and keeps the result only if that objective improved, so the (penalised, if ``l2 > 0``)
    observed log-likelihood never decreases. The schedule is ``em`` (:class:`EMSettings`).
    """
    X0 = np.asarray(features, dtype=np.float64)
    eta = np.asarray(eta, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    m = np.asarray(m, dtype=np.int64)
    m = m[None, :] if m.ndim == 1 else m
    H, N = m.shape
    if eta.shape != (N, C) or y.size != N or X0.shape[0] != N:
        raise ValueError("features [N, d], eta [N, C], m [H, N] and y [N] must agree")
    gate = _new_gate(X0, H + 1, em.gate_hidden, seed)
    fit = _EMFit(gate, gate.standardise(X0), eta[np.arange(N), y], m, y, C, em.l2)
    eps = (
        np.mean(m != y[None, :], axis=1).clip(0.01, 0.99)
        if em.eps_init is None
        else np.asarray(em.eps_init, dtype=np.float64).reshape(-1)
    )
    ll, lj = fit.objective(gate.theta, eps)
    hist = [ll]
    converged = False
    n_done = 0
    for _ in range(em.n_iter):
        n_done += 1
        R = _responsibilities(lj)  # E-step
        eps = fit.eps_step(R)
        fit.gate_step(R, em.m_steps)
        ll_new, lj = fit.objective(gate.theta, eps)
        hist.append(ll_new)
        if em.tol > 0 and ll_new - ll <= em.tol * abs(ll):
            converged = True
            break
        ll = ll_new
    return L2DResult(
        eps=eps, loglik=hist, gate=gate, resp=_responsibilities(lj), n_iter=n_done,
        converged=converged,
    )  # fmt: skip


def _responsibilities(lj: np.ndarray) -> np.ndarray:
    """E-step ``r_iz = pi_z p(y_i | ., z) / sum_z' pi_z' p(y_i | ., z')`` from ``lj`` = their logs."""
    return np.exp(lj - logsumexp(lj, axis=1, keepdims=True))


class _EMFit:
    """One EM problem: the gate (updated in place), standardised features X, ``eta_y(x_i)``,
    human labels m [H, N], labels y [N], C classes and the gate's L2 weight."""

    def __init__(self, gate: Gate, X: np.ndarray, eta_y: np.ndarray, m: np.ndarray,
                 y: np.ndarray, C: int, l2: float):  # fmt: skip
        self.gate, self.X, self.eta_y, self.m, self.y, self.C, self.l2 = gate, X, eta_y, m, y, C, l2
        self.N = y.size

    def penalty(self, theta: np.ndarray) -> float:
        return 0.5 * self.l2 * float(theta @ theta)

    def objective(self, theta: np.ndarray, eps: np.ndarray) -> tuple[float, np.ndarray]:
        """(penalised L, ``lj`` [N, H+1] = log pi_z(x_i) + log p(y_i | ., z))."""
        f, _ = self.gate.logits(self.X, theta)
        lj = log_softmax(f, axis=1) + _log_comp(self.eta_y, self.y, self.m, eps, self.C)
        return float(logsumexp(lj, axis=1).sum()) - self.penalty(theta), lj

    def eps_step(self, R: np.ndarray) -> np.ndarray:
        """M-step for eps (closed form): ``eps_h = sum_i r_ih [y_i != m_hi] / sum_i r_ih``."""
        disagree = (self.m != self.y[None, :]).T  # [N, H]
        eps = (R[:, 1:] * disagree).sum(0) / np.maximum(R[:, 1:].sum(0), _TINY)
        return np.clip(eps, _TINY, 1.0 - _TINY)

    def gate_step(self, R: np.ndarray, m_steps: int) -> None:
        """M-step for the gate: L-BFGS on ``(-Q(theta) + l2/2 |theta|^2) / N``, kept only if it
        did not increase."""

        def fun(theta: np.ndarray, R: np.ndarray) -> tuple[float, np.ndarray]:
            q, g = self.gate.q_and_grad(theta, self.X, R)
            return (-q + self.penalty(theta)) / self.N, (-g + self.l2 * theta) / self.N

        f0 = fun(self.gate.theta, R)[0]
        res = minimize(
            fun, self.gate.theta, args=(R,), jac=True, method="L-BFGS-B",
            options={"maxiter": m_steps},
        )  # fmt: skip
        if np.isfinite(res.fun) and res.fun <= f0:
            self.gate.theta = np.asarray(res.x, dtype=np.float64)


def em_diagnostics(
    loglik: Any,
    eps: Any,
    simulated_noise: Any = None,
    *,
    rel_tol: float = 1e-6,
    noise_tol: float = 0.05,
) -> dict[str, Any]:
    """Convergence of an EM fit and the fitted noise against the simulated one, with warnings.

    ``loglik`` = [L_0, ..., L_T] (:class:`L2DResult`). The fit counts as converged iff its last
    relative increase ``(L_T - L_{T-1}) / |L_{T-1}|`` is at most ``rel_tol`` (a fit that stopped
    by its own ``tol`` meets this whenever ``tol <= rel_tol``). With ``simulated_noise`` (the
    humans' simulated rates), ``max_h |eps_h - noise_h| > noise_tol`` is flagged: eps_h then is not
    an estimate of the humans' noise (see the module docstring: independent noisy humans do not
    follow the mixture). Returns ``converged``, ``last_rel_increase``, ``max_noise_gap`` and
    ``warnings`` (one line each).
    """
    ll = np.asarray(loglik, dtype=np.float64).reshape(-1)
    eps = np.asarray(eps, dtype=np.float64).reshape(-1)
    rel = float((ll[-1] - ll[-2]) / max(abs(ll[-2]), _TINY)) if ll.size >= 2 else float("inf")
    converged = bool(rel <= rel_tol)
    warnings: list[str] = []
    if not converged:
        warnings.append(f"L2D: EM not converged after {max(ll.size - 1, 0)} iterations (last relative "
                        f"log-likelihood increase {rel:.2g} > {rel_tol:g}); results use the last iterate")
    gap = None
    if simulated_noise is not None:
        sim = np.asarray(simulated_noise, dtype=np.float64).reshape(-1)
        gap = float(np.max(np.abs(eps - sim))) if sim.size == eps.size else float("inf")
        if gap > noise_tol:
            fitted, simulated = "/".join(f"{e:.3f}" for e in eps), "/".join(f"{e:.3g}" for e in sim)
            warnings.append(f"L2D: fitted human noise {fitted} vs simulated {simulated}: eps is not a "
                            "noise estimate here (independent noisy humans do not follow the mixture model)")
    return {"converged": converged, "last_rel_increase": rel if np.isfinite(rel) else None,
            "max_noise_gap": gap, "rel_tol": rel_tol, "noise_tol": noise_tol, "warnings": warnings}


# --------------------------------------------------------------------------- deferral
def defer_curve(
    keep_score: Any,
    pred: Any,
    m: Any,
    y: Any,
    defer_to: Any,
    shares: Any = None,
    w: Any = None,
) -> dict[str, Any]:
    """System accuracy against the share of samples the model keeps.

    Samples are ranked by ``keep_score`` (descending; L2D: ``pi_0(x)``, AR-GSE: the margin); the
    top ``round(share * N)`` keep the model's ``pred``, the rest go to human ``defer_to[i]``
    (index into m's rows) whose label ``m[defer_to[i], i]`` is the answer. System accuracy
    ``sum_i w_i [answer_i = y_i] / sum_i w_i`` (w = None: unweighted; w_lt / w_bal: that view).
    ``shares`` default 0, 0.01, .., 1. Returns lists ``share_kept`` and ``accuracy``.
    """
    s = np.asarray(keep_score, dtype=np.float64).reshape(-1)
    pred = np.asarray(pred, dtype=np.int64).reshape(-1)
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    m = np.asarray(m, dtype=np.int64)
    m = m[None, :] if m.ndim == 1 else m
    d = np.asarray(defer_to, dtype=np.int64).reshape(-1)
    N = y.size
    w = np.ones(N) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
    shares = np.round(np.arange(101) / 100, 2) if shares is None else np.asarray(shares, float)
    order = np.argsort(-s, kind="stable")
    model_ok = (w * (pred == y))[order]
    human_ok = (w * (m[d, np.arange(N)] == y))[order]
    cm = np.concatenate([[0.0], np.cumsum(model_ok)])
    sh = np.concatenate([np.cumsum(human_ok[::-1])[::-1], [0.0]])
    k = np.clip(np.round(shares * N).astype(np.int64), 0, N)
    acc = (cm[k] + sh[k]) / w.sum()
    return {"share_kept": (k / N).tolist(), "accuracy": acc.tolist()}


def deferral_comparison(
    gate_probs: Any,
    eta: Any,
    m: Any,
    y: Any,
    margin: Any,
    pred_argse: Any,
    shares: Any = None,
    w: Any = None,
) -> dict[str, Any]:
    """L2D vs AR-GSE's rejection read as deferral, on the same humans and routing.

    - ``l2d``: keep by ``pi_0(x)`` with the classifier's ``argmax eta``;
    - ``argse``: keep by the AR-GSE margin with the plug-in prediction ``pred_argse``;
    both defer a sample to the human the gate ranks highest, ``argmax_h pi_h(x)``, so the curves
    differ only in which samples the model keeps. Also ``l2d_operating_point``: the share the
    gate keeps by itself (``pi_0(x) >= max_h pi_h(x)``) and the accuracy there.
    """
    gp = np.asarray(gate_probs, dtype=np.float64)
    eta = np.asarray(eta, dtype=np.float64)
    defer_to = np.argmax(gp[:, 1:], axis=1)
    pred_l2d = np.argmax(eta, axis=1)
    l2d = defer_curve(gp[:, 0], pred_l2d, m, y, defer_to, shares, w)
    ars = defer_curve(margin, pred_argse, m, y, defer_to, shares, w)
    keep = gp[:, 0] >= gp[:, 1:].max(axis=1)
    share = float(keep.mean())
    op = defer_curve(gp[:, 0], pred_l2d, m, y, defer_to, [share], w)
    return {
        "l2d": l2d,
        "argse": ars,
        "l2d_operating_point": {"share_kept": op["share_kept"][0], "accuracy": op["accuracy"][0]},
        "routing": "deferred samples go to argmax_h pi_h(x) (the gate's best human)",
        "view": "unweighted" if w is None else "weighted",
    }
