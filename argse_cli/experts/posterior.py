"""Expert posteriors from logits, always computed in float32 (fp16 logits are promoted first).

Symbols: ``f`` logits [N, C], ``pi`` train class priors [C], ``tau`` = tau_e of the expert's loss
(:func:`argse_cli.experts.losses.posterior_tau`), ``T`` > 0 a temperature.

    eta_train(x) = softmax((f + tau log pi) / T)     posterior under the TRAINING prior pi
    eta_bal(x)   = softmax(f / T)                    balanced posterior (for tau = 1 experts)

For a tau = 1 expert at T = 1 the two are linked by Bayes' rule:
eta_train_y = pi_y eta_bal_y / sum_y' pi_y' eta_bal_y'.

numpy in -> numpy out, torch in -> torch out (same device).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["balanced_posterior", "train_prior_posterior"]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)


def _scaled_softmax(logits: Any, shift: Any, T: float):
    """softmax((logits + shift) / T) in float32; ``shift`` is None or broadcastable [C]."""
    if not float(T) > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    if _is_torch(logits):
        import torch

        z = logits.float()
        if shift is not None:
            s = shift if _is_torch(shift) else torch.as_tensor(np.asarray(shift))
            z = z + s.to(device=z.device, dtype=torch.float32)
        return torch.softmax(z / float(T), dim=-1)
    z = np.asarray(logits).astype(np.float32)
    if shift is not None:
        s = shift.detach().cpu().numpy() if _is_torch(shift) else np.asarray(shift)
        z = z + s.astype(np.float32)
    return _softmax_np(z / np.float32(T))


def train_prior_posterior(logits: Any, log_pi: Any, tau: float, T: float = 1.0):
    """eta_train = softmax((f + tau * log pi) / T), float32."""
    if tau == 0:
        return _scaled_softmax(logits, None, T)
    if log_pi is None:
        raise ValueError("log_pi is required when tau != 0")
    if _is_torch(log_pi):
        shift = log_pi.float() * float(tau)
    else:
        shift = np.asarray(log_pi, dtype=np.float32) * np.float32(tau)
    return _scaled_softmax(logits, shift, T)


def balanced_posterior(logits: Any, T: float = 1.0):
    """eta_bal = softmax(f / T), float32."""
    return _scaled_softmax(logits, None, T)
