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
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from argse_cli.experts.augment import AUG_PRESETS
from argse_cli.experts.loop import (
    MAX_LOSS,
    Checkpoint,
    LoopTask,
    TrainingDiverged,
    deterministic_on_cpu,
    run_loop,
)
from argse_cli.experts.losses import loss_fn, parse_loss
from argse_cli.nn.resnet import CifarResNet, cifar_resnet, init_weights

__all__ = [
    "MAX_LOSS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "TrainRecipe",
    "TrainingDiverged",
    "balanced_rule_logits",
    "class_balanced_indices",
    "deterministic_on_cpu",
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


@dataclass
class TrainRecipe:
    depth: int = 32
    width: int = 1  # channel multiplier of the CIFAR ResNet ({16, 32, 64} * width)
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


def _prior(y_np: np.ndarray, log_pi: Any, dev: torch.device) -> torch.Tensor:
    """log train priors as a float32 tensor on ``dev`` (None: from the counts of y)."""
    if log_pi is None:
        counts = np.bincount(y_np).astype(np.float64)
        log_pi = np.log(np.maximum(counts, 1e-12) / counts.sum())
    t = torch.as_tensor(
        np.asarray(log_pi, dtype=np.float32) if not torch.is_tensor(log_pi) else log_pi.float()
    ).to(dev)
    C = int(t.numel())
    if y_np.min() < 0 or y_np.max() >= C:
        raise ValueError(f"labels must lie in [0, {C}) (C = len(log_pi))")
    return t


def module_task(
    model: torch.nn.Module,
    names: list[str],
    losses: Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]],
    params: list[torch.Tensor],
    train: bool = True,
) -> LoopTask:
    """A :class:`LoopTask` over one module: its state dict is the checkpointed state;
    ``train=False`` keeps it in eval mode while training (cRT: frozen BN statistics)."""

    def load(d: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(d)

    return LoopTask(
        names=names, params=params, losses=losses, set_train=lambda: model.train(train),
        state=model.state_dict, load_state=load,
    )  # fmt: skip


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
    checkpoint: Checkpoint | None = None,
    on_resume: Callable[[int, int], None] | None = None,
) -> tuple[CifarResNet, list[dict]]:
    """Train one expert; returns (model in eval mode on recipe.device, per-epoch history).

    ``log_pi`` = log train priors [C] (None: from the counts of ``y_train``; C = len(log_pi)).
    ``eval_data`` = (x_u8, y) evaluated every ``recipe.eval_every`` epochs (class-balanced acc).
    ``checkpoint`` (:class:`argse_cli.experts.loop.Checkpoint`): resume from / save to it, one
    metrics row per epoch (see :func:`argse_cli.experts.loop.run_loop`).
    cRT with ``init_state`` of another architecture's head (a shared-backbone model): every
    backbone tensor must match; the ``fc.*`` tensors are ignored (the head is re-initialised).
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
    log_pi_t = _prior(y_np, log_pi, dev)
    C = int(log_pi_t.numel())

    with deterministic_on_cpu(cuda):
        torch.manual_seed(recipe.seed)
        model = cifar_resnet(recipe.depth, C, recipe.width)
        if init_state is not None:
            sd = _load_state(init_state)
            if classifier_only:  # the head is re-initialised below: keep ours (any head shape)
                sd = {**{k: v for k, v in sd.items() if not k.startswith("fc.")},
                      **{k: v for k, v in model.state_dict().items() if k.startswith("fc.")}}  # fmt: skip
            model.load_state_dict(sd)
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
        params = list(model.fc.parameters() if classifier_only else model.parameters())
        crit = loss_fn("ce" if classifier_only and kind == "decoupled" else loss_spec, log_pi_t)

        def losses(xb: torch.Tensor, tb: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if classifier_only:
                with torch.no_grad():
                    feats = model.features(xb)
                logits = model.fc(feats.float())
            else:
                logits = fwd(xb)
            return crit(logits.float(), tb)[None], logits[None]

        def evaluate() -> list[float]:
            assert eval_data is not None
            lg = predict_logits(model, eval_data[0], device=dev)
            return [_balanced_accuracy(lg.argmax(1).numpy(), eval_data[1], C)]

        task = module_task(model, [loss_spec], losses, params, train=not classifier_only)
        hist = run_loop(
            task, x_train_u8, y_np, recipe, C, progress=progress, checkpoint=checkpoint,
            evaluate=evaluate if eval_data is not None else None, on_resume=on_resume,
        )  # fmt: skip
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, hist[0]


def balanced_rule_logits(logits: torch.Tensor, log_pi: Any, tau: float) -> torch.Tensor:
    """Scores of the expert's own balanced-prior Bayes rule: with eta_train = softmax(f + tau log pi),
    argmax_y eta_train_y / pi_y = argmax_y (f_y + (tau - 1) log pi_y); returns f + (tau - 1) log pi.

    tau = 1 (balsoftmax, decoupled): the raw logits; tau = 0 (ce): post-hoc logit adjustment
    f - log pi; tau = 2: f + log pi (the raw argmax of a tau = 2 expert over-corrects by 1 / pi)."""
    z = logits.float()
    if tau == 1.0:
        return z
    return z + (float(tau) - 1.0) * torch.as_tensor(log_pi, dtype=torch.float32, device=z.device)


def _balanced_accuracy(pred: np.ndarray, y: np.ndarray, C: int) -> float:
    """Mean per-class recall over the classes present in y."""
    y = np.asarray(y)
    recalls = [float(np.mean(pred[y == c] == c)) for c in range(C) if np.any(y == c)]
    return float(np.mean(recalls))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x_u8: Any, batch_size: int = 1024, device=None):
    """Eval-mode logits (no augmentation, normalised inputs) -> float32 CPU tensor [N, C]
    ([N, H, C] for a shared-backbone model with H heads)."""
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
        heads = getattr(model.fc, "num_heads", None)
        shape = (0, model.fc.out_features) if heads is None else (0, heads, model.fc.out_features)
        return torch.zeros(shape)
    return torch.cat(outs)


def state_dict_to_safetensors_bytes(model: torch.nn.Module) -> bytes:
    """safetensors serialisation of the state dict (CPU, contiguous); metadata holds
    depth, num_classes, width and (shared backbone) num_heads."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {}
    if isinstance(model, CifarResNet):
        meta = {"depth": str(model.depth), "num_classes": str(model.num_classes), "width": str(model.width)}
        if model.num_heads is not None:
            meta["num_heads"] = str(model.num_heads)
    return save(sd, metadata=meta)


def load_model(
    src: bytes | str | os.PathLike, depth: int, num_classes: int, width: int = 1,
    num_heads: int | None = None,
) -> CifarResNet:
    """Rebuild a CIFAR ResNet from safetensors bytes or a file (never executes code); eval mode.
    The architecture comes from the arguments; a mismatching state dict is refused."""
    model = cifar_resnet(depth, num_classes, width, num_heads)
    model.load_state_dict(_load_state(src))
    return model.eval()
