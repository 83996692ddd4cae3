"""AR-GSE gating network: C-independent gating features, the MLP gate and the mixture posterior.

Layout convention: expert posteriors are ``[B, E, C]`` (batch, expert, class), float32
probabilities (rows sum to 1 over C).

Per-expert features (7 per expert, expert-major: ``[B, E, 7]`` flattened to ``[B, 7*E]``),
with ``p_e`` the posterior of expert e and ``pbar = (1/E) sum_e p_e``:

0. entropy            ``H(p_e) = -sum_y p_ey log p_ey``              (nats, in [0, log C])
1. top-k mass         ``sum of the k largest p_ey``, k = min(5, C)
2. residual mass      ``1 - top-k mass``
3. max probability    ``max_y p_ey``
4. top1-top2 gap      ``p_e(1) - p_e(2)`` (sorted; equals max prob when C = 1)
5. KL to the mean     ``KL(p_e || pbar) = sum_y p_ey (log p_ey - log pbar_y)``
6. cosine to the mean ``<p_e, pbar> / (|p_e| |pbar|)``

None of these depends on C, so the gate input width is ``7*E`` for any number of classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FEATURES_PER_EXPERT",
    "GatingNet",
    "build_gating_features",
    "feature_dim",
    "mixture_posterior",
    "straight_through_top1",
]

FEATURES_PER_EXPERT = 7
_EPS = 1e-12


def feature_dim(num_experts: int) -> int:
    """Gate input width F = 7*E."""
    return FEATURES_PER_EXPERT * num_experts


def _per_expert_features(p: torch.Tensor) -> torch.Tensor:
    """[B, E, C] float32 probabilities -> [B, E, 7] features (see module docstring).

    Computed with one [B, E, C] temporary (log p, clamped at 1e-12): the sums over classes are
    batched dot products, and KL(p_e || pbar) = sum_y p_ey log p_ey - sum_y p_ey log pbar_y."""
    C = p.shape[-1]
    logp = p.clamp_min(_EPS).log_()
    p_logp = torch.einsum("bec,bec->be", p, logp)  # sum_y p log p = -H(p_e)
    del logp
    k = min(5, C)
    top = p.topk(min(max(k, 2), C), dim=-1).values
    topk_mass = top[..., :k].sum(-1)
    residual = 1.0 - topk_mass
    pmax = top[..., 0]
    gap = top[..., 0] - top[..., 1] if C >= 2 else pmax
    pbar = p.mean(dim=1, keepdim=True)  # [B, 1, C]
    kl = p_logp - torch.bmm(p, pbar.clamp_min(_EPS).log().transpose(1, 2))[..., 0]
    dot = torch.bmm(p, pbar.transpose(1, 2))[..., 0]
    cos = dot / (torch.linalg.vector_norm(p, dim=-1) * torch.linalg.vector_norm(pbar, dim=-1)).clamp_min(_EPS)
    return torch.stack([-p_logp, topk_mass, residual, pmax, gap, kl, cos], dim=-1)


def build_gating_features(posteriors: Any) -> Any:
    """Gate input features [B, 7*E] float32 from expert posteriors [B, E, C] (see the module docstring;
    expert-major). numpy in -> numpy out, torch in -> torch out (same device); float32 whatever the
    input precision."""
    as_numpy = not isinstance(posteriors, torch.Tensor)
    p = torch.as_tensor(np.asarray(posteriors)) if as_numpy else posteriors
    if p.ndim != 3:
        raise ValueError(f"posteriors must be [B, E, C], got shape {tuple(p.shape)}")
    p = p.float()
    B, E, _ = p.shape
    feats = _per_expert_features(p).reshape(B, FEATURES_PER_EXPERT * E)
    return feats.cpu().numpy() if as_numpy else feats


class GatingNet(nn.Module):
    """MLP gate: features [B, F] -> logits [B, E] -> softmax weights w [B, E] (rows sum to 1)."""

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.in_dim, self.num_experts = int(in_dim), int(num_experts)
        self.hidden, self.dropout = tuple(int(h) for h in hidden), float(dropout)
        layers: list[nn.Module] = []
        d = self.in_dim
        for h in self.hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(self.dropout)]
            d = h
        layers.append(nn.Linear(d, self.num_experts))
        self.mlp = nn.Sequential(*layers)

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised gate scores [B, E]."""
        return self.mlp(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture weights w = softmax(gate_logits(x)) [B, E]."""
        return torch.softmax(self.gate_logits(x), dim=-1)


def mixture_posterior(w: Any, posteriors: Any) -> Any:
    """eta_y = sum_e w_e p_ey: weights [B, E], posteriors [B, E, C] -> eta [B, C] float32."""
    if isinstance(w, torch.Tensor) or isinstance(posteriors, torch.Tensor):
        w_t = torch.as_tensor(w).float()
        p_t = torch.as_tensor(posteriors).to(w_t.device).float()
        return torch.einsum("be,bec->bc", w_t, p_t)
    w_n = np.asarray(w, dtype=np.float32)
    p_n = np.asarray(posteriors, dtype=np.float32)
    return np.einsum("be,bec->bc", w_n, p_n).astype(np.float32, copy=False)


def straight_through_top1(w: torch.Tensor) -> torch.Tensor:
    """Hard routing: forward one_hot(argmax_e w_e), backward d/dw of the soft weights (identity)."""
    hard = torch.nn.functional.one_hot(w.argmax(-1), w.shape[-1]).to(w.dtype)
    return hard + (w - w.detach())
