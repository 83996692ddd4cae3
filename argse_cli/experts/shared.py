"""Shared-backbone experts (BalPoE style): one CIFAR ResNet backbone, one linear head per loss.

Symbols: ``f(x)`` the backbone's pooled features [B, D]; head e has (W_e, b_e) and its logits are
``z_e = W_e f + b_e`` [B, C]; ``tau_e`` = :func:`argse_cli.experts.losses.train_tau` of head e's
loss spec; ``pi`` the train class priors. Per head the logit-adjusted cross-entropy

    L_e = mean_b -sum_y q_{b,y} log softmax(z_e(x_b) + tau_e log pi)_y ,

and one SGD step per batch on the summed objective ``L = sum_e L_e`` -- ONE forward and backward
pass of the backbone per batch for all E heads. Head e's parameters enter L only through L_e,
so each head gets exactly the gradient of its own loss, and the backbone gets
dL/dtheta = sum_e dL_e/dtheta (``backbone_grad = "sum"``, the default). ``backbone_grad = "mean"``
scales the backbone's gradient by 1/E (it descends the mean loss (1/E) sum_e L_e, as in BalPoE's
averaged objective). Measured on CIFAR-10-LT (ResNet-8, 3 epochs, 4 heads, bench_shared.py's data,
1 thread): "sum" put every head within 0.7 points of its independently trained model, "mean" left
balanced softmax 2.9 points short.

The model is :class:`argse_cli.nn.resnet.CifarResNet` with ``num_heads = E``: ``model(x)`` is
[B, E, C] and head e is ``model(x)[:, e]``. Each head is exported and calibrated downstream as its
own expert (its loss spec and posterior tau). cRT ("decoupled") is not a head here: train it with
:func:`argse_cli.experts.trainer.train_expert` (``classifier_only=True``) on this model's
state -- a new linear head re-trained with class-balanced sampling on the frozen shared backbone.
Same recipe, batch order and augmentation stream as :func:`argse_cli.experts.trainer.train_expert`
(one loop: :func:`argse_cli.experts.loop.run_loop`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from argse_cli.experts.fused import logit_adjusted_ce_stacked
from argse_cli.experts.loop import Checkpoint, deterministic_on_cpu, run_loop
from argse_cli.experts.losses import parse_loss, train_tau
from argse_cli.experts.trainer import (
    TrainRecipe,
    _balanced_accuracy,
    _prior,
    module_task,
    predict_logits,
)
from argse_cli.nn.resnet import CifarResNet, cifar_resnet

__all__ = ["BACKBONE_GRAD", "grad_scale", "train_experts_shared"]

BACKBONE_GRAD = ("sum", "mean")


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: float) -> torch.Tensor:
        ctx.s = s
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.s, None


def grad_scale(x: torch.Tensor, s: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``s`` in the backward pass."""
    return x if s == 1.0 else _GradScale.apply(x, s)


def train_experts_shared(
    x_u8: Any,
    y: Any,
    loss_specs: Sequence[str],
    recipe: TrainRecipe,
    log_pi: Any = None,
    progress: Callable[[int, int, dict], None] | None = None,
    *,
    histories: list | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    checkpoint: Checkpoint | None = None,
    on_resume: Callable[[int, int], None] | None = None,
    backbone_grad: str = "sum",
    eval_data: tuple[Any, Any] | None = None,
) -> CifarResNet:
    """Train one backbone with one head per loss spec; returns the model (eval mode), ``model(x)``
    [B, E, C].

    ``log_pi`` = log train priors [C] (None: from the counts of ``y``). ``histories`` (a list) is
    filled with E per-head histories in :func:`train_expert`'s format; ``progress``,
    ``on_step``, ``checkpoint`` and ``on_resume`` as in :func:`argse_cli.experts.loop.run_loop`.
    ``eval_data`` = (x_u8, y): every ``recipe.eval_every`` epochs each head's class-balanced
    accuracy on it goes into the histories (``eval_bal_acc``).
    Raises :class:`argse_cli.experts.loop.TrainingDiverged` on a NaN/inf epoch loss."""
    specs = list(loss_specs)
    if not specs:
        raise ValueError("loss_specs is empty")
    if len(set(specs)) != len(specs):
        raise ValueError(f"loss specs must be distinct, got {specs}")
    for s in specs:
        if parse_loss(s)[0] == "decoupled":
            raise ValueError(
                "'decoupled' (cRT) is not a jointly trained head: train it with train_expert "
                "(classifier_only=True) on the shared model's state"
            )
    if backbone_grad not in BACKBONE_GRAD:
        raise ValueError(f"backbone_grad must be one of {BACKBONE_GRAD}, got {backbone_grad!r}")
    E = len(specs)
    dev = torch.device(recipe.device)
    cuda = dev.type == "cuda"
    y_np = np.asarray(y).astype(np.int64)
    log_pi_t = _prior(y_np, log_pi, dev)
    C = int(log_pi_t.numel())
    taus = torch.tensor([train_tau(s) for s in specs], dtype=torch.float32, device=dev)
    s_back = 1.0 / E if backbone_grad == "mean" else 1.0  # "sum": grad_scale is the identity

    with deterministic_on_cpu(cuda):
        torch.manual_seed(recipe.seed)
        model = cifar_resnet(recipe.depth, C, recipe.width, num_heads=E).to(dev)
        if cuda and recipe.channels_last:
            model.to(memory_format=torch.channels_last)
        feats = torch.compile(model.features) if (cuda and recipe.compile) else model.features

        def losses(xb: torch.Tensor, tb: Any) -> tuple[torch.Tensor, torch.Tensor]:
            f = grad_scale(feats(xb), s_back)
            logits = model.fc(f.float()).transpose(0, 1)  # [E, B, C]
            return logit_adjusted_ce_stacked(logits, tb, log_pi_t, taus), logits

        def evaluate() -> list[float]:
            assert eval_data is not None
            lg = predict_logits(model, eval_data[0], device=dev)  # [N, E, C]
            return [_balanced_accuracy(lg[:, e].argmax(1).numpy(), eval_data[1], C) for e in range(E)]

        task = module_task(model, specs, losses, list(model.parameters()))
        hist = run_loop(
            task, x_u8, y_np, recipe, C, progress=progress, checkpoint=checkpoint,
            on_step=on_step, on_resume=on_resume, evaluate=evaluate if eval_data is not None else None,
        )  # fmt: skip
    if histories is not None:
        histories.clear()
        histories.extend(hist)
    return model.eval()
