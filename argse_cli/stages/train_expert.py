"""Stage `train-expert`: one expert (one loss) on the split's long-tailed train set.

Artifact: ``model.safetensors`` (weights; loading never executes code), ``history.json`` (per
epoch), arrays ``test/per_class_acc`` [C] and ``test/per_group_acc`` [K]; meta holds the
class-balanced test accuracy (mean per-class recall). The stored model is the final epoch;
nothing is selected on test.
"""

from __future__ import annotations

from typing import Any

STAGE = "train-expert"
VERSION = 4


def pin_threads() -> None:
    """Deterministic CPU runs: a fixed thread count (the cores we have, at most 8)."""
    import os

    import torch

    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))


def split_arrays(split_art: Any, name: str, images: Any) -> tuple[Any, Any]:
    """(x uint8 [n,32,32,3], y) of one split, read through the split artifact's indices."""
    src = split_art.meta["sources"][name]
    idx = split_art.array(f"{name}/indices")
    x = (images.x_train if src == "train" else images.x_test)[idx]
    return x, split_art.array(f"{name}/labels")


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..errors import ArgseError
    from ..experts.trainer import (
        TrainingDiverged,
        TrainRecipe,
        load_model,
        predict_logits,
        state_dict_to_safetensors_bytes,
        train_expert,
    )
    from .split import load_images

    pin_threads()
    split = inputs["split"]
    images = load_images(split)
    x, y = split_arrays(split, "train", images)
    counts = split.array("class_counts").astype(np.float64)
    log_pi = np.log(counts / counts.sum()).astype(np.float32)
    C = len(counts)
    decoupled = cfg.loss == "decoupled"
    recipe = TrainRecipe(
        depth=cfg.depth, epochs=cfg.decoupled_epochs if decoupled else cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        warmup_epochs=0 if decoupled else cfg.warmup_epochs, aug=cfg.aug, precision=cfg.precision,
        compile=cfg.compile, channels_last=cfg.device == "cuda", seed=cfg.seed, device=cfg.device,
        class_balanced_sampling=decoupled,
    )
    init = None
    if decoupled:
        init = inputs["backbone"].read_bytes("model.safetensors")
    progress.log(f"train-expert {cfg.loss}: {len(y)} images, ResNet-{cfg.depth}, {recipe.epochs} epochs, {cfg.device}")
    try:
        model, history = train_expert(
            x, y, cfg.loss, recipe, log_pi, progress=progress, init_state=init, classifier_only=decoupled,
        )
    except TrainingDiverged as e:
        raise ArgseError("train_expert.lr", str(e), "lower --lr; nothing was published") from None
    blob = state_dict_to_safetensors_bytes(model.cpu())
    out.file_path("model.safetensors").write_bytes(blob)
    out.json("history.json", history)

    # Report-only accuracy on test (never used for selection).
    model = load_model(blob, cfg.depth, C)
    xt, yt = split_arrays(split, "test", images)
    pred = predict_logits(model, xt, device="cpu").argmax(1).numpy()
    c2g = split.array("class_to_group")
    per_class = np.array([np.mean(pred[yt == c] == c) if np.any(yt == c) else np.nan for c in range(C)])
    K = int(c2g.max()) + 1
    per_group = np.array([np.nanmean(per_class[c2g == k]) for k in range(K)])
    out.array("test/per_class_acc", per_class)
    out.array("test/per_group_acc", per_group)
    from ..experts.losses import posterior_tau

    out.meta.update(
        loss=cfg.loss, tau=posterior_tau(cfg.loss), depth=cfg.depth, num_classes=C,
        test_class_balanced_acc=float(np.nanmean(per_class)),
        test_group_acc=[float(v) for v in per_group],
        final_train_loss=history[-1].get("loss") if history else None,
    )
    progress.log(
        f"{cfg.loss}: class-balanced test accuracy {np.nanmean(per_class):.4f} "
        f"(per group {', '.join(f'{v:.4f}' for v in per_group)})"
    )


def summary(meta: dict) -> str:
    return f"{meta.get('loss')} bal-acc={meta.get('test_class_balanced_acc', float('nan')):.4f}"
