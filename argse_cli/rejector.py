"""The group-aware plug-in rejector (Narasimhan et al., ICLR 2024, Theorem 1, Eq. 12-13).

Symbols (the paper's):

- ``eta``  [N, C]  posterior P_train(y | x) (mixture or single expert), rows sum to 1;
- ``class_to_group`` [C]  g(y) in {0..K-1}, 0 = head;
- ``alpha`` [K] > 0, ``mu`` [K], ``beta`` [K] on the simplex (None = uniform 1/K), ``c`` rejection cost.

With ``u_k = K * beta_k / alpha_k`` (``u_k = 1/alpha_k`` for uniform beta):

- prediction  ``h(x) = argmax_y u_[g(y)] * eta_y``
- margin      ``m(x) = max_y u_[g(y)] * eta_y - sum_y (u_[g(y)] - mu_[g(y)]) * eta_y + c``
- accept iff ``m(x) >= 0``; soft acceptance ``s_tau(x) = sigmoid(tau * m(x))``.

alpha = 1, mu = 0, uniform beta gives Chow's rule: accept iff max_y eta_y >= 1 - c.
Since sum_y eta_y = 1, adding d to every mu_k equals adding d to c; the gauge is fixed
once by ``mu_[K-1] = 0`` (:func:`fix_mu_gauge`) and mu is never re-centred.

Every function takes numpy arrays or torch tensors and returns the same kind; the
arithmetic is float32 at least (fp16 inputs are promoted).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "acceptance_prob",
    "chow_margin",
    "fix_mu_gauge",
    "group_weights_u",
    "plugin_margin",
    "plugin_predict",
]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _as_float(x: Any, like: Any = None):
    """float32 (or float64 if already float64) array/tensor of ``x`` in the namespace of ``like``."""
    ref = x if like is None else like
    if _is_torch(ref):
        import torch

        t = x if _is_torch(x) else torch.as_tensor(np.asarray(x))
        if _is_torch(ref):
            t = t.to(ref.device)
        return t if t.dtype == torch.float64 else t.float()
    a = np.asarray(x)
    return a if a.dtype == np.float64 else a.astype(np.float32, copy=False)


def _as_index(g: Any, like: Any):
    if _is_torch(like):
        import torch

        t = g if _is_torch(g) else torch.as_tensor(np.asarray(g))
        return t.to(device=like.device, dtype=torch.long)
    return np.asarray(g, dtype=np.int64)


def group_weights_u(alpha: Any, beta: Any = None) -> Any:
    """u_k = K * beta_k / alpha_k; with beta=None (uniform 1/K) this is 1/alpha_k."""
    alpha = _as_float(alpha)
    if beta is None:
        return 1.0 / alpha
    beta = _as_float(beta, like=alpha)
    K = alpha.shape[-1]
    return K * beta / alpha


def plugin_predict(eta: Any, alpha: Any, class_to_group: Any, beta: Any = None) -> Any:
    """h(x) = argmax_y u_[g(y)] * eta_y (divides by alpha; never multiplies)."""
    eta = _as_float(eta)
    u = _as_float(group_weights_u(alpha, beta), like=eta)
    g = _as_index(class_to_group, eta)
    score = eta * u[g]
    return score.argmax(-1) if _is_torch(score) else np.argmax(score, axis=-1)


def plugin_margin(
    eta: Any, alpha: Any, mu: Any, c: float, class_to_group: Any, beta: Any = None
) -> Any:
    """m(x) = max_y u_[g(y)] eta_y - sum_y (u_[g(y)] - mu_[g(y)]) eta_y + c; accept iff m >= 0.

    Raising ``c`` raises every margin by the same amount, so coverage never drops.
    """
    eta = _as_float(eta)
    u = _as_float(group_weights_u(alpha, beta), like=eta)
    mu = _as_float(mu, like=eta)
    g = _as_index(class_to_group, eta)
    u_y = u[g]
    score = eta * u_y
    if _is_torch(score):
        best = score.max(-1).values
        thr = (eta * (u_y - mu[g])).sum(-1)
    else:
        best = score.max(axis=-1)
        thr = (eta * (u_y - mu[g])).sum(axis=-1)
    return best - thr + c


def chow_margin(eta: Any, c: float) -> Any:
    """Chow's rule as a margin: max_y eta_y - (1 - c); accept iff >= 0."""
    eta = _as_float(eta)
    best = eta.max(-1).values if _is_torch(eta) else eta.max(axis=-1)
    return best - (1.0 - c)


def acceptance_prob(margin: Any, tau: float) -> Any:
    """s_tau(x) = sigmoid(tau * m(x)); larger tau is sharper (tends to 1{m >= 0})."""
    if _is_torch(margin):
        import torch

        return torch.sigmoid(tau * margin)
    m = np.asarray(margin, dtype=np.float64)
    z = np.clip(tau * m, -500.0, 500.0)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32 if np.asarray(margin).dtype != np.float64 else np.float64)


def fix_mu_gauge(mu: Any, c: float) -> tuple[Any, float]:
    """Move mu to the gauge mu_[K-1] = 0 without changing any margin.

    Adding d to every mu_k adds d to every margin, exactly as adding d to c does, so
    (mu, c) and (mu - mu_[K-1], c + mu_[K-1]) define the same rule.
    """
    if _is_torch(mu):
        d = float(mu[-1])
        return mu - d, c + d
    mu = np.asarray(mu, dtype=np.float64)
    d = float(mu[-1])
    return mu - d, c + d
