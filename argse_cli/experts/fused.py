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
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from argse_cli.experts.augment import apply_augment
from argse_cli.experts.losses import parse_loss, train_tau
from argse_cli.experts.trainer import (
    TrainingDiverged,
    TrainRecipe,
    _to_nchw_u8,
    class_balanced_indices,
    deterministic_on_cpu,
    lr_at,
    make_optimizer,
    normalize,
)
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


def _unstack(params: dict, buffers: dict, depth: int, C: int, E: int) -> list[CifarResNet]:
    """E ordinary models (eval mode, on the params' device) from the stacked tensors."""
    out = []
    for e in range(E):
        m = cifar_resnet(depth, C)
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
) -> list[CifarResNet]:
    """Train one expert per loss spec, all in one vmapped step; returns E models in eval mode.

    Same recipe semantics as :func:`train_expert` (depth, epochs, batch size, lr schedule, SGD,
    augmentation, class-balanced sampling, bf16 autocast on CUDA). ``log_pi`` = log train priors
    [C] (None: from the counts of ``y``). ``seeds[e]`` seeds expert e's init (default
    ``recipe.seed``). ``progress(epoch + 1, epochs, rec)`` gets ``rec`` with the mean ``loss`` /
    ``acc`` over experts, the per-expert lists ``losses`` / ``accs`` and ``img_per_s`` counted
    per expert (steps * batch * E / s). When ``histories`` is a list it is filled with E per-expert
    histories in :func:`train_expert`'s format. ``on_step(step, losses [E])`` sees every step's
    per-expert losses (detached). Raises :class:`TrainingDiverged` on a NaN/inf epoch loss.
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
    if log_pi is None:
        counts = np.bincount(y_np).astype(np.float64)
        log_pi = np.log(np.maximum(counts, 1e-12) / counts.sum())
    log_pi_t = torch.as_tensor(np.asarray(log_pi, dtype=np.float32)).to(dev)
    C = int(log_pi_t.numel())
    if y_np.min() < 0 or y_np.max() >= C:
        raise ValueError(f"labels must lie in [0, {C}) (C = len(log_pi))")
    taus = torch.tensor([train_tau(s) for s in specs], dtype=torch.float32, device=dev)

    with deterministic_on_cpu(cuda):
        models = []
        for s in seeds:
            torch.manual_seed(s)
            models.append(cifar_resnet(recipe.depth, C))
        p0, b0 = torch.func.stack_module_state(models)
        params = {k: v.detach().clone().to(dev).requires_grad_(True) for k, v in p0.items()}
        buffers = {k: v.detach().clone().to(dev) for k, v in b0.items()}
        base = copy.deepcopy(models[0]).to("meta").train()
        del models, p0, b0

        def one(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(base, (p, b), (xb,))

        fwd = torch.vmap(one, in_dims=(0, 0, None))
        opt = make_optimizer(list(params.values()), recipe)

        x_dev = _to_nchw_u8(x_u8, dev)
        y_dev = torch.as_tensor(y_np, device=dev)
        N, bs = x_dev.shape[0], min(recipe.batch_size, x_dev.shape[0])
        steps = N // bs
        total, warm = recipe.epochs * steps, int(round(recipe.warmup_epochs * steps))
        gen = torch.Generator(device=dev).manual_seed(recipe.seed)
        use_bf16 = cuda and recipe.precision == "bf16"
        hist: list[list[dict]] = [[] for _ in range(E)]
        last_finite = torch.full((E,), float("nan"), device=dev)
        prev_loss: list[float | None] = [None] * E
        step = 0
        for epoch in range(recipe.epochs):
            t0 = time.perf_counter()
            if recipe.class_balanced_sampling:
                order = class_balanced_indices(y_dev, steps * bs, gen)
            else:
                order = torch.randperm(N, generator=gen, device=dev)
            loss_sum = torch.zeros(E, device=dev)
            correct = torch.zeros(E, device=dev)
            lr = 0.0
            for s in range(steps):
                idx = order[s * bs : (s + 1) * bs]
                yb = y_dev[idx]
                xb, tb = apply_augment(x_dev[idx], yb, recipe.aug, C, gen)
                xb = normalize(xb)
                lr = lr_at(step, total, warm, recipe.peak_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = fwd(params, buffers, xb)  # [E, B, C]
                losses = logit_adjusted_ce_stacked(logits.float(), tb, log_pi_t, taus)
                opt.zero_grad(set_to_none=True)
                losses.sum().backward()
                opt.step()
                step += 1
                ld = losses.detach()
                if on_step is not None:
                    on_step(step - 1, ld)
                last_finite = torch.where(torch.isfinite(ld), ld, last_finite)
                loss_sum += ld
                correct += (logits.detach().argmax(-1) == yb[None]).sum(1)
            if cuda:
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            ep_loss = (loss_sum / steps).tolist()
            accs = (correct / (steps * bs)).tolist()
            for e in range(E):
                if not math.isfinite(ep_loss[e]):
                    lf = float(last_finite[e])
                    err = TrainingDiverged(epoch, lf if math.isfinite(lf) else prev_loss[e])
                    err.add_note(f"fused expert {e} ({specs[e]})")
                    raise err
            prev_loss = list(ep_loss)
            for e in range(E):
                hist[e].append(
                    {
                        "epoch": epoch,
                        "loss": ep_loss[e],
                        "acc": accs[e],
                        "lr": lr,
                        "img_per_s": steps * bs / dt,  # this expert's images per second
                        "time_s": dt,
                        "fused_experts": E,
                    }
                )
            if progress is not None:
                rec = {
                    "epoch": epoch,
                    "loss": float(np.mean(ep_loss)),
                    "acc": float(np.mean(accs)),
                    "losses": ep_loss,
                    "accs": accs,
                    "lr": lr,
                    "img_per_s": steps * bs * E / dt,  # images counted per expert
                    "time_s": dt,
                }
                progress(epoch + 1, recipe.epochs, rec)
    if histories is not None:
        histories.clear()
        histories.extend(hist)
    return _unstack(params, buffers, recipe.depth, C, E)
