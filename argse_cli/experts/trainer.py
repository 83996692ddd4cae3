"""Device-resident expert trainer (airbench style): the uint8 train set lives on the device, every
step samples indices on the device, augments the batch there and runs SGD.

Recipe (:class:`TrainRecipe`): SGD, Nesterov momentum 0.9, weight decay 5e-4 on all parameters,
peak lr = lr * batch_size / 128, per-step schedule (:func:`lr_at`): linear warm-up over
``warmup_epochs`` then cosine decay to 0. Loss: logit-adjusted CE of the loss spec
(:mod:`argse_cli.experts.losses`). Inputs are normalised with the CIFAR-10 mean / std.

cRT (``classifier_only=True``, Kang et al., 2020): load ``init_state`` (the ce expert), keep the
backbone frozen in eval mode (BN running stats unchanged), re-initialise ``fc`` and train it alone
with class-balanced sampling and plain CE (the "decoupled" spec); the caller sets the epochs (10).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from argse_cli.experts.augment import AUG_PRESETS, apply_augment
from argse_cli.experts.losses import loss_fn, parse_loss
from argse_cli.nn.resnet import CifarResNet, cifar_resnet, init_weights

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "TrainRecipe",
    "TrainingDiverged",
    "class_balanced_indices",
    "load_model",
    "lr_at",
    "make_optimizer",
    "normalize",
    "predict_logits",
    "state_dict_to_safetensors_bytes",
    "train_expert",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


MAX_LOSS = 1e4  # a mean cross-entropy above this means the logits exploded: treated as divergence


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf."""

    def __init__(self, epoch: int, last_finite_loss: float | None):
        self.epoch, self.last_finite_loss = epoch, last_finite_loss
        last = "none" if last_finite_loss is None else f"{last_finite_loss:.6g}"
        super().__init__(
            f"training diverged at epoch {epoch}: loss is NaN/inf or above {MAX_LOSS:g} (last finite loss {last}); "
            "lower the learning rate or use precision=fp32"
        )


@dataclass
class TrainRecipe:
    depth: int = 32
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1  # per 128 images; scaled linearly with batch_size
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4
    warmup_epochs: float = 5
    aug: str = "cropflip"
    precision: str = "fp32"  # "fp32" | "bf16" (bf16 autocast on CUDA only)
    compile: bool = False  # torch.compile, CUDA only
    channels_last: bool = False  # CUDA only
    seed: int = 0
    device: str = "cpu"  # "cpu" | "cuda"
    class_balanced_sampling: bool = False
    eval_every: int = 0  # evaluate eval_data every k epochs (0 = never)

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.aug not in AUG_PRESETS:
            raise ValueError(f"aug must be one of {list(AUG_PRESETS)}, got {self.aug!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 128.0


@contextmanager
def deterministic_on_cpu(cuda: bool) -> Iterator[None]:
    """On CPU, torch's deterministic algorithms (warn-only) for the block; the previous setting is
    restored afterwards. On CUDA the setting is left as it is."""
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if not cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Per-step lr: peak * (step + 1) / W for step < W, then
    peak * (1 + cos(pi * (step - W) / (S - W))) / 2, reaching 0 at step = S."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def make_optimizer(params, recipe: TrainRecipe) -> torch.optim.SGD:
    return torch.optim.SGD(
        params,
        lr=recipe.peak_lr,
        momentum=recipe.momentum,
        nesterov=recipe.momentum > 0,
        weight_decay=recipe.weight_decay,
    )


_NORM_CACHE: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with the CIFAR-10 channel statistics; x float in [0, 1], NCHW."""
    key = (str(x01.device), x01.dtype)
    if key not in _NORM_CACHE:  # built once per device: no host->device copy per step
        _NORM_CACHE[key] = (
            torch.tensor(CIFAR_MEAN, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1),
            torch.tensor(CIFAR_STD, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1),
        )
    mean, std = _NORM_CACHE[key]
    return (x01 - mean) / std


def class_balanced_indices(
    y: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n_samples indices drawn with replacement with P(i) proportional to 1 / n_{y_i}, so every
    present class is drawn with probability 1 / (#present classes)."""
    counts = torch.bincount(y)
    w = 1.0 / counts[y].double()
    return torch.multinomial(w, n_samples, replacement=True, generator=generator)


def _to_nchw_u8(x_u8: Any, device) -> torch.Tensor:
    """[N, 32, 32, 3] uint8 numpy/torch (NHWC) -> uint8 NCHW tensor on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(x_u8)) if isinstance(x_u8, np.ndarray) else x_u8
    if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    return t.to(device).permute(0, 3, 1, 2).contiguous()


def _load_state(src: Any) -> dict[str, torch.Tensor]:
    """A state dict from a dict of tensors, safetensors bytes or a safetensors file path."""
    if isinstance(src, dict):
        return src
    from safetensors.torch import load, load_file

    if isinstance(src, bytes | bytearray | memoryview):
        return load(bytes(src))
    if isinstance(src, str | os.PathLike):
        return load_file(os.fspath(src))
    raise TypeError(f"cannot load a state dict from {type(src).__name__}")


def train_expert(
    x_train_u8: np.ndarray,
    y_train: np.ndarray,
    loss_spec: str,
    recipe: TrainRecipe,
    log_pi: Any = None,
    progress: Callable[[int, int, dict], None] | None = None,
    init_state: Any = None,
    classifier_only: bool = False,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[CifarResNet, list[dict]]:
    """Train one expert; returns (model in eval mode on recipe.device, per-epoch history).

    ``log_pi`` = log train priors [C] (None: from the counts of ``y_train``; C = len(log_pi)).
    ``eval_data`` = (x_u8, y) evaluated every ``recipe.eval_every`` epochs (class-balanced acc).
    Raises :class:`TrainingDiverged` when the loss becomes NaN/inf."""
    kind, _ = parse_loss(loss_spec)
    if kind == "decoupled" and not classifier_only:
        raise ValueError(
            "loss 'decoupled' is cRT: call with classifier_only=True and init_state = the ce expert"
        )
    if classifier_only and init_state is None:
        raise ValueError("classifier_only=True needs init_state (the backbone to keep frozen)")
    dev = torch.device(recipe.device)
    cuda = dev.type == "cuda"
    y_np = np.asarray(y_train).astype(np.int64)
    if log_pi is None:
        counts = np.bincount(y_np).astype(np.float64)
        log_pi = np.log(np.maximum(counts, 1e-12) / counts.sum())
    log_pi_t = torch.as_tensor(
        np.asarray(log_pi, dtype=np.float32) if not torch.is_tensor(log_pi) else log_pi.float()
    ).to(dev)
    C = int(log_pi_t.numel())
    if y_np.min() < 0 or y_np.max() >= C:
        raise ValueError(f"labels must lie in [0, {C}) (C = len(log_pi))")

    with deterministic_on_cpu(cuda):
        torch.manual_seed(recipe.seed)
        model = cifar_resnet(recipe.depth, C)
        if init_state is not None:
            model.load_state_dict(_load_state(init_state))
        if classifier_only:
            init_weights(model.fc)  # cRT: re-initialise the classifier
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.fc.parameters():
                p.requires_grad_(True)
            recipe = replace(recipe, class_balanced_sampling=True)
        model.to(dev)
        if cuda and recipe.channels_last:
            model.to(memory_format=torch.channels_last)
        fwd = torch.compile(model) if (cuda and recipe.compile and not classifier_only) else model
        params = model.fc.parameters() if classifier_only else model.parameters()
        opt = make_optimizer(params, recipe)
        crit = loss_fn("ce" if classifier_only and kind == "decoupled" else loss_spec, log_pi_t)

        x_dev = _to_nchw_u8(x_train_u8, dev)
        y_dev = torch.as_tensor(y_np, device=dev)
        N, bs = x_dev.shape[0], min(recipe.batch_size, x_dev.shape[0])
        steps = N // bs  # drop_last
        total, warm = recipe.epochs * steps, int(round(recipe.warmup_epochs * steps))
        gen = torch.Generator(device=dev).manual_seed(recipe.seed)
        use_bf16 = cuda and recipe.precision == "bf16"
        history: list[dict] = []
        last_finite = torch.full((), float("nan"), device=dev)
        prev_epoch_loss: float | None = None
        step = 0
        for epoch in range(recipe.epochs):
            model.train(not classifier_only)  # cRT: backbone BN stays in eval mode
            t0 = time.perf_counter()
            if recipe.class_balanced_sampling:
                order = class_balanced_indices(y_dev, steps * bs, gen)
            else:
                order = torch.randperm(N, generator=gen, device=dev)
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev)
            lr = 0.0
            for s in range(steps):
                idx = order[s * bs : (s + 1) * bs]
                yb = y_dev[idx]
                xb, tb = apply_augment(x_dev[idx], yb, recipe.aug, C, gen)
                xb = normalize(xb)
                if cuda and recipe.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                lr = lr_at(step, total, warm, recipe.peak_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    if classifier_only:
                        with torch.no_grad():
                            feats = model.features(xb)
                        logits = model.fc(feats.float())
                    else:
                        logits = fwd(xb)
                loss = crit(logits.float(), tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                ld = loss.detach()
                last_finite = torch.where(torch.isfinite(ld), ld, last_finite)
                loss_sum += ld
                correct += (logits.detach().argmax(1) == yb).sum()
            if cuda:
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            epoch_loss = float(loss_sum) / steps
            if not math.isfinite(epoch_loss) or epoch_loss > MAX_LOSS:
                lf = float(last_finite)
                raise TrainingDiverged(epoch, lf if math.isfinite(lf) else prev_epoch_loss)
            prev_epoch_loss = epoch_loss
            rec = {
                "epoch": epoch,
                "loss": epoch_loss,
                "acc": float(correct) / (steps * bs),
                "lr": lr,
                "img_per_s": steps * bs / dt,
                "time_s": dt,
            }
            if eval_data is not None and recipe.eval_every and (epoch + 1) % recipe.eval_every == 0:
                lg = predict_logits(model, eval_data[0], device=dev)
                rec["eval_bal_acc"] = _balanced_accuracy(lg.argmax(1).numpy(), eval_data[1], C)
            history.append(rec)
            if progress is not None:
                progress(epoch + 1, recipe.epochs, rec)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, history


def _balanced_accuracy(pred: np.ndarray, y: np.ndarray, C: int) -> float:
    """Mean per-class recall over the classes present in y."""
    y = np.asarray(y)
    recalls = [float(np.mean(pred[y == c] == c)) for c in range(C) if np.any(y == c)]
    return float(np.mean(recalls))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x_u8: Any, batch_size: int = 1024, device=None):
    """Eval-mode logits (no augmentation, normalised inputs) -> float32 CPU tensor [N, C]."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    x_u8 = torch.from_numpy(np.ascontiguousarray(x_u8)) if isinstance(x_u8, np.ndarray) else x_u8
    outs = []
    try:
        for i in range(0, x_u8.shape[0], batch_size):
            xb = _to_nchw_u8(x_u8[i : i + batch_size], dev)
            outs.append(model(normalize(xb.float() / 255.0)).float().cpu())
    finally:
        model.train(was_training)
    if not outs:
        return torch.zeros(0, model.fc.out_features)
    return torch.cat(outs)


def state_dict_to_safetensors_bytes(model: torch.nn.Module) -> bytes:
    """safetensors serialisation of the state dict (CPU, contiguous); metadata holds
    depth and num_classes."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {}
    if isinstance(model, CifarResNet):
        meta = {"depth": str(model.depth), "num_classes": str(model.num_classes)}
    return save(sd, metadata=meta)


def load_model(src: bytes | str | os.PathLike, depth: int, num_classes: int) -> CifarResNet:
    """Rebuild a CIFAR ResNet from safetensors bytes or a file (never executes code); eval mode."""
    model = cifar_resnet(depth, num_classes)
    model.load_state_dict(_load_state(src))
    return model.eval()
