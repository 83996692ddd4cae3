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

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PluginRule",
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


# --------------------------------------------------------------------------- fitted rules


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
