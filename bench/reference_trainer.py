"""The plain reference trainer the device-resident trainer is benchmarked against.

torchvision-style: a Dataset over the uint8 NHWC array with per-sample PIL transforms
RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize(CIFAR mean/std), a
DataLoader(num_workers=max(1, cores - 1), shuffle=True, drop_last=True, pin_memory on CUDA only
-- pinning has no effect without an accelerator and only warns), and the same model, batch size,
optimiser (SGD Nesterov, weight decay), per-step warm-up + cosine schedule, loss, precision
(bf16 autocast on CUDA) and compile mode as :func:`argse_cli.experts.trainer.train_expert`.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from argse_cli.experts.losses import loss_fn
from argse_cli.experts.trainer import CIFAR_MEAN, CIFAR_STD, TrainRecipe, lr_at, make_optimizer
from argse_cli.nn.resnet import cifar_resnet


class ArrayDataset(Dataset):
    """(transform(PIL image of x[i]), y[i]) over a uint8 [N, 32, 32, 3] array."""

    def __init__(self, x_u8: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x_u8, np.asarray(y, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def train_transform():
    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),  # zero padding, as in the reference recipe
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def train_reference(x_u8, y, loss_spec, recipe: TrainRecipe, log_pi, progress=None):
    """Train with the plain DataLoader pipeline; returns (model in eval mode, per-epoch history)."""
    dev = torch.device(recipe.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(recipe.seed)
    log_pi_t = torch.as_tensor(np.asarray(log_pi, dtype=np.float32), device=dev)
    model = cifar_resnet(recipe.depth, int(log_pi_t.numel())).to(dev)
    if cuda and recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if (cuda and recipe.compile) else model
    opt = make_optimizer(model.parameters(), recipe)
    crit = loss_fn(loss_spec, log_pi_t)
    bs = min(recipe.batch_size, len(x_u8))
    loader = DataLoader(
        ArrayDataset(x_u8, y, train_transform()),
        batch_size=bs,
        shuffle=True,
        drop_last=True,
        num_workers=max(1, _cores() - 1),
        pin_memory=cuda,
    )
    steps = len(loader)
    total, warm = recipe.epochs * steps, int(round(recipe.warmup_epochs * steps))
    use_bf16 = cuda and recipe.precision == "bf16"
    history, step = [], 0
    for epoch in range(recipe.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen, lr = 0.0, 0, 0, 0.0
        for xb, yb in loader:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            if cuda and recipe.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            lr = lr_at(step, total, warm, recipe.peak_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = fwd(xb)
            loss = crit(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item()
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        if cuda:
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        rec = {
            "epoch": epoch,
            "loss": loss_sum / steps,
            "acc": correct / seen,
            "lr": lr,
            "img_per_s": seen / dt,
            "time_s": dt,
        }
        history.append(rec)
        if progress is not None:
            progress(epoch + 1, recipe.epochs, rec)
    return model.eval(), history
