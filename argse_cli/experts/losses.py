"""Expert training losses: logit-adjusted cross-entropy (Menon et al., ICLR 2021).

Symbols: ``f`` logits [B, C]; ``pi`` train class priors [C] (``log_pi = log pi``); ``tau`` >= 0.

    L(f, y) = -log softmax(f + tau * log pi)_y            (hard label y)
    L(f, q) = -sum_y q_y log softmax(f + tau * log pi)_y  (soft target q, rows sum to 1)

tau = 0 is plain CE; tau = 1 is Balanced Softmax (Ren et al., 2020). Minimising L makes
softmax(f + tau log pi) estimate the training posterior, i.e. f estimates
log p_train(y|x) - tau log pi + const; :func:`posterior_tau` gives the tau_e that puts an expert
back on the training prior: eta_train = softmax(f + tau_e log pi).

Loss specs: "ce", "balsoftmax", "logitadjust:TAU", "decoupled" (cRT, Kang et al., 2020: the
classifier is re-trained with class-balanced sampling and plain CE, so its logits estimate the
balanced posterior and tau_e = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_KINDS",
    "logit_adjusted_ce",
    "loss_fn",
    "parse_loss",
    "posterior_tau",
    "train_tau",
]

LOSS_KINDS = ("ce", "balsoftmax", "logitadjust", "decoupled")
_SPEC_HELP = (
    'expected "ce", "balsoftmax", "logitadjust:TAU" (TAU a finite number >= 0) or "decoupled"'
)


def parse_loss(spec: str) -> tuple[str, float]:
    """Parse a loss spec into (kind, tau): ce -> 0, balsoftmax -> 1, logitadjust:TAU -> TAU,
    decoupled -> 1 (the tau of its posterior; its training loss is plain CE)."""
    if not isinstance(spec, str):
        raise ValueError(f"loss spec must be a string, got {type(spec).__name__}; {_SPEC_HELP}")
    s = spec.strip().lower()
    if s == "ce":
        return "ce", 0.0
    if s == "balsoftmax":
        return "balsoftmax", 1.0
    if s == "decoupled":
        return "decoupled", 1.0
    if s.startswith("logitadjust:"):
        raw = s.split(":", 1)[1].strip()
        try:
            tau = float(raw)
        except ValueError:
            raise ValueError(
                f"loss spec {spec!r}: TAU {raw!r} is not a number; {_SPEC_HELP}"
            ) from None
        if not math.isfinite(tau) or tau < 0:
            raise ValueError(f"loss spec {spec!r}: TAU must be finite and >= 0; {_SPEC_HELP}")
        return "logitadjust", tau
    raise ValueError(f"unknown loss spec {spec!r}; {_SPEC_HELP}")


def posterior_tau(spec: str) -> float:
    """tau_e such that softmax(f + tau_e log pi) is the expert's TRAINING-prior posterior:
    0 for ce, 1 for balsoftmax, TAU for logitadjust:TAU, 1 for decoupled."""
    return parse_loss(spec)[1]


def train_tau(spec: str) -> float:
    """tau used inside the training loss: as :func:`posterior_tau` except decoupled -> 0 (plain CE
    with class-balanced sampling)."""
    kind, tau = parse_loss(spec)
    return 0.0 if kind == "decoupled" else tau


def logit_adjusted_ce(
    logits: torch.Tensor, targets: torch.Tensor, log_pi: torch.Tensor, tau: float
) -> torch.Tensor:
    """Mean over the batch of -sum_y q_y log softmax(f + tau log pi)_y (float32 arithmetic).

    ``targets`` are int labels [B] (q = one-hot) or soft targets [B, C] (mixup/cutmix)."""
    z = logits.float()
    if tau != 0.0:
        z = z + float(tau) * log_pi.to(device=z.device, dtype=torch.float32)
    if targets.dim() == 1 and not targets.is_floating_point():
        return F.cross_entropy(z, targets.long())
    if targets.shape != z.shape:
        raise ValueError(
            f"soft targets must be [B, C] = {tuple(z.shape)}, got {tuple(targets.shape)}"
        )
    return -(targets.float() * F.log_softmax(z, dim=1)).sum(dim=1).mean()


def loss_fn(
    spec: str, log_pi: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Callable ``(logits, targets) -> scalar loss`` for a loss spec (uses :func:`train_tau`)."""
    tau = train_tau(spec)
    log_pi = torch.as_tensor(log_pi, dtype=torch.float32)

    def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_ce(logits, targets, log_pi, tau)

    return _loss
