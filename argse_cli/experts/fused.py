"""Fused multi-expert training: E same-architecture CIFAR ResNets trained in ONE step per batch.

The E experts' parameters and buffers are stacked along a new leading axis
(``torch.func.stack_module_state``) and one forward ``functional_call`` of a parameter-free
("meta") copy of the architecture is vectorised over that axis with ``torch.func.vmap``; the input
batch is NOT vectorised (``in_dims=None``): every expert sees the same augmented batch, drawn from
one generator exactly as :func:`argse_cli.experts.trainer.train_expert` draws it. On a GPU the
vmapped convolutions become one grouped kernel per layer instead of E launches.

Loss: expert e has its own logit-adjustment tau_e (:func:`argse_cli.experts.losses.train_tau`),

    L_e = mean_b -sum_y q_{b,y} log softmax(f_e(x_b) + tau_e log pi)_y ,   L = sum_e L_e ,

and since expert e's parameters enter L only through L_e, dL/dtheta_e = dL_e/dtheta_e: the
gradient each expert gets is the one of its own unfused run. One SGD optimiser (Nesterov,
weight decay, the trainer's per-step lr schedule) runs over the stacked tensors; SGD is
element-wise, so it is E independent SGD runs.

BatchNorm: functional BN with the buffers handled per expert. The running mean / var /
num_batches_tracked buffers are stacked like the parameters and passed to ``functional_call``
with ``in_dims=0``, so under vmap each expert normalises with its own batch statistics (train
mode) and its own slice of the stacked buffers is updated in place -- no
``replace_all_batch_norm_modules_`` (that would drop the running statistics needed at eval).
After training the stacked tensors are copied back into E ordinary ``CifarResNet`` modules.

Init: expert e is built right after ``torch.manual_seed(seeds[e])`` (default: ``recipe.seed``
for all, which is what E separate ``train_expert`` calls with the same recipe do), and the batch
order / augmentation come from ``torch.Generator().manual_seed(recipe.seed)``: with the same
seeds a fused run reproduces the unfused runs up to floating-point summation order.

Not supported: cRT (``decoupled``, classifier-only) -- train it with ``train_expert``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from argse_cli.experts.loop import Checkpoint, LoopTask, deterministic_on_cpu, run_loop
from argse_cli.experts.losses import parse_loss, train_tau
from argse_cli.experts.trainer import TrainRecipe, _prior
from argse_cli.nn.resnet import CifarResNet, cifar_resnet

__all__ = ["logit_adjusted_ce_stacked", "train_experts_fused"]


def logit_adjusted_ce_stacked(
    logits: torch.Tensor, targets: torch.Tensor, log_pi: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """Per-expert logit-adjusted CE, [E]: L_e = mean_b -sum_y q_{b,y} log softmax(f_e + tau_e log pi)_y.

    ``logits`` [E, B, C]; ``targets`` int labels [B] (q = one-hot) or soft targets [B, C] shared by
    all experts; ``log_pi`` [C]; ``tau`` [E]. float32 arithmetic."""
    z = logits.float() + tau.float()[:, None, None] * log_pi.float()[None, None, :]
    E, B, C = z.shape
    if targets.dim() == 1 and not targets.is_floating_point():
        nll = F.cross_entropy(z.reshape(E * B, C), targets.long().repeat(E), reduction="none")
        return nll.view(E, B).mean(1)
    if tuple(targets.shape) != (B, C):
        raise ValueError(f"soft targets must be [B, C] = {(B, C)}, got {tuple(targets.shape)}")
    return -(targets.float()[None] * F.log_softmax(z, dim=-1)).sum(-1).mean(-1)


def _unstack(params: dict, buffers: dict, depth: int, C: int, E: int, width: int = 1) -> list[CifarResNet]:
    """E ordinary models (eval mode, on the params' device) from the stacked tensors."""
    out = []
    for e in range(E):
        m = cifar_resnet(depth, C, width)
        sd = {k: v[e].detach().cpu().clone() for k, v in {**params, **buffers}.items()}
        m.load_state_dict(sd)
        out.append(m.to(next(iter(params.values())).device).eval())
    return out


def train_experts_fused(
    x_u8: Any,
    y: Any,
    loss_specs: Sequence[str],
    recipe: TrainRecipe,
    log_pi: Any = None,
    progress: Callable[[int, int, dict], None] | None = None,
    *,
    seeds: Sequence[int] | None = None,
    histories: list | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    checkpoint: Checkpoint | None = None,
) -> list[CifarResNet]:
    """Train one expert per loss spec, all in one vmapped step; returns E models in eval mode.

    Same recipe semantics as :func:`train_expert` (one loop: :func:`argse_cli.experts.loop.run_loop`).
    ``log_pi`` = log train priors [C] (None: from the counts of ``y``). ``seeds[e]`` seeds
    expert e's init (default ``recipe.seed``). ``progress(epoch + 1, epochs, rec)`` gets the
    loop's metrics row (mean ``loss`` / ``acc`` over experts, per-expert ``losses`` / ``accs``).
    When ``histories`` is a list it is filled with E per-expert histories in
    :func:`train_expert`'s format. ``on_step(step, losses [E])`` sees every step's per-expert
    losses (detached). ``checkpoint``: resume / metrics log as in the loop. Raises
    :class:`TrainingDiverged` on a NaN/inf epoch loss.
    """
    specs = list(loss_specs)
    if not specs:
        raise ValueError("loss_specs is empty")
    for s in specs:
        if parse_loss(s)[0] == "decoupled":
            raise ValueError("fused training does not do cRT ('decoupled'): use train_expert")
    E = len(specs)
    seeds = [recipe.seed] * E if seeds is None else [int(s) for s in seeds]
    if len(seeds) != E:
        raise ValueError(f"need one seed per expert ({E}), got {len(seeds)}")
    dev = torch.device(recipe.device)
    cuda = dev.type == "cuda"
    y_np = np.asarray(y).astype(np.int64)
    log_pi_t = _prior(y_np, log_pi, dev)
    C = int(log_pi_t.numel())
    taus = torch.tensor([train_tau(s) for s in specs], dtype=torch.float32, device=dev)

    with deterministic_on_cpu(cuda):
        models = []
        for s in seeds:
            torch.manual_seed(s)
            models.append(cifar_resnet(recipe.depth, C, recipe.width))
        p0, b0 = torch.func.stack_module_state(models)
        params = {k: v.detach().clone().to(dev).requires_grad_(True) for k, v in p0.items()}
        buffers = {k: v.detach().clone().to(dev) for k, v in b0.items()}
        base = copy.deepcopy(models[0]).to("meta").train()
        del models, p0, b0

        def one(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(base, (p, b), (xb,))

        fwd = torch.vmap(one, in_dims=(0, 0, None))

        def losses(xb: torch.Tensor, tb: Any) -> tuple[torch.Tensor, torch.Tensor]:
            logits = fwd(params, buffers, xb)  # [E, B, C]
            return logit_adjusted_ce_stacked(logits.float(), tb, log_pi_t, taus), logits

        def state() -> dict[str, torch.Tensor]:
            return {**{f"p.{k}": v for k, v in params.items()}, **{f"b.{k}": v for k, v in buffers.items()}}

        def load_state(d: dict[str, torch.Tensor]) -> None:
            with torch.no_grad():
                for k, v in params.items():
                    v.copy_(d[f"p.{k}"])
                for k, v in buffers.items():
                    v.copy_(d[f"b.{k}"])

        task = LoopTask(
            names=specs, params=list(params.values()), losses=losses, set_train=lambda: None,
            state=state, load_state=load_state,
        )  # fmt: skip
        hist = run_loop(
            task, x_u8, y_np, recipe, C, progress=progress, checkpoint=checkpoint, on_step=on_step
        )
    if histories is not None:
        histories.clear()
        histories.extend(hist)
    return _unstack(params, buffers, recipe.depth, C, E, recipe.width)
