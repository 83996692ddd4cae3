"""Stage `train-expert`: one expert (one loss), or a shared backbone with one head per loss, on the
split's long-tailed train set.

Artifact (independent expert, or the cRT head of either mode): ``model.safetensors`` (weights;
loading never executes code), ``history.json`` (per epoch), arrays ``test/per_class_acc`` [C] and
``test/per_group_acc`` [K]; meta holds the loss, its posterior tau and the class-balanced test
accuracy (mean per-class recall) of the raw argmax -- the number the literature reports -- and,
next to it, the accuracy of the expert's own balanced-prior rule argmax_y f_y + (tau - 1) log pi_y
(``test_balanced_rule_acc``; the same for tau = 1, i.e. balsoftmax and decoupled; for logitadjust:2
the raw argmax is over-corrected towards the tail by a factor 1 / pi_y, by design).

Shared backbone (``loss = "shared"``): ``model.safetensors`` holds the backbone and the H heads
(:class:`argse_cli.nn.resnet.CifarResNet` with ``num_heads = H``), ``history.json`` one history per
head, ``test/per_class_acc`` [H, C], ``test/per_group_acc`` [H, K]; ``meta.heads`` lists each head's
loss, tau and test accuracies. ``decoupled`` in shared mode (``upstream.backbone`` = the shared
artifact) is a new linear head re-trained with class-balanced sampling on the frozen shared
backbone, stored as an ordinary single-head model.

Every model stored is the final epoch; nothing is selected on test (its accuracy is report-only).
Resume (``RESUMABLE``): the store writer works in the key's pending dir, which survives a kill;
the trainer checkpoints into its ``scratch/checkpoint/`` every ``checkpoint_every`` epochs (and
after the last) and a rerun of the key continues from the last checkpoint, saying so in one line
(bit-equal final weights on CPU). One metrics row per epoch (see :mod:`argse_cli.experts.loop`)
goes to the pending dir's ``metrics.jsonl`` (readable while it runs, published with the
artifact), whose path is printed at start. A diverged run deletes its checkpoint.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any

STAGE = "train-expert"
VERSION = 7
RESUMABLE = True  # the writer keeps its pending dir across a kill: checkpoints + metrics log


def _checkpoint(cfg: Any, out: Any, progress: Any) -> Any:
    """The trainer's checkpoint in the pending artifact's scratch dir (saved every
    ``checkpoint_every`` epochs; 0 = never) and its metrics log (``out.log_metrics``); prints the
    log's path. None when the writer is not resumable."""
    from ..experts.loop import DirCheckpoint

    if getattr(out, "pending", None) is None:
        return None
    progress.log(f"metrics log: {out.metrics_path}")
    return DirCheckpoint(out.scratch("checkpoint"), cfg.checkpoint_every, log=out.log_metrics,
                         on_note=lambda m: print(f"train-expert: {m}", file=sys.stderr, flush=True))


def _group_acc(pred: Any, yt: Any, c2g: Any, C: int) -> tuple[Any, Any]:
    """(per-class recall [C] (NaN for a class absent from yt), per-group mean recall [K])."""
    import numpy as np

    per_class = np.array([np.mean(pred[yt == c] == c) if np.any(yt == c) else np.nan for c in range(C)])
    K = int(c2g.max()) + 1
    return per_class, np.array([np.nanmean(per_class[c2g == k]) for k in range(K)])


def _recipe(cfg: Any) -> Any:
    """The trainer's recipe from the stage config (cRT: its own epochs, no warm-up, class-balanced
    sampling)."""
    from ..experts.trainer import TrainRecipe

    decoupled = cfg.loss == "decoupled"
    return TrainRecipe(
        depth=cfg.depth, width=cfg.width, epochs=cfg.decoupled_epochs if decoupled else cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        warmup_epochs=0 if decoupled else cfg.warmup_epochs, aug=cfg.aug, precision=cfg.precision,
        compile=cfg.compile, channels_last=cfg.device == "cuda", seed=cfg.seed, device=cfg.device,
        class_balanced_sampling=decoupled,
    )  # fmt: skip


def _backbone(cfg: Any, inputs: dict) -> bytes | None:
    """cRT's frozen backbone (weights of the upstream ce / shared artifact); None otherwise."""
    from ..errors import ArgseError

    if cfg.loss != "decoupled":
        return None
    bb = inputs["backbone"]
    if (bb.meta.get("depth"), bb.meta.get("width", 1)) != (cfg.depth, cfg.width):
        raise ArgseError("upstream.backbone", f"backbone {bb.key[:12]} is ResNet-{bb.meta.get('depth')} "
                         f"x{bb.meta.get('width', 1)}, cRT asks for ResNet-{cfg.depth} x{cfg.width}",
                         "train the backbone with the same depth and width")  # fmt: skip
    return bb.read_bytes("model.safetensors")


def _train(cfg: Any, x: Any, y: Any, log_pi: Any, init: bytes | None, out: Any, progress: Any) -> tuple[Any, Any]:
    """Train (resuming from the pending dir's checkpoint when there is one): (model, history)."""
    from ..errors import ArgseError
    from ..experts.shared import train_experts_shared
    from ..experts.trainer import TrainingDiverged, train_expert

    recipe = _recipe(cfg)
    decoupled, shared = cfg.loss == "decoupled", cfg.loss == "shared"
    what = f"shared backbone with heads {', '.join(cfg.heads)}" if shared else cfg.loss
    if decoupled and cfg.shared_backbone:
        what += " (cRT head on the frozen shared backbone)"
    width = f" x{cfg.width}" if cfg.width != 1 else ""
    progress.log(f"train-expert {what}: {len(y)} images, ResNet-{cfg.depth}{width}, {recipe.epochs} epochs, {cfg.device}")
    ckpt = _checkpoint(cfg, out, progress)
    resumed_at: list[int] = []

    def resumed(epoch: int, epochs: int) -> None:  # printed even with --quiet
        resumed_at.append(epoch)
        print(f"train-expert: resuming from the checkpoint after epoch {epoch}/{epochs} "
              f"({ckpt.path if ckpt is not None else ''})", file=sys.stderr, flush=True)  # fmt: skip

    def prog(i: int, n: int, rec: dict) -> None:  # the per-head lists stay in the metrics log
        progress(i, n, {k: v for k, v in rec.items() if not isinstance(v, list | tuple)})

    try:
        if shared:
            hist: list = []
            model = train_experts_shared(x, y, cfg.heads, recipe, log_pi, progress=prog, histories=hist,
                                         checkpoint=ckpt, on_resume=resumed)  # fmt: skip
            history: Any = hist
        else:
            model, history = train_expert(
                x, y, cfg.loss, recipe, log_pi, progress=prog, init_state=init, classifier_only=decoupled,
                checkpoint=ckpt, on_resume=resumed,
            )  # fmt: skip
    except TrainingDiverged as e:
        if ckpt is not None:  # a rerun of this key would diverge again: keep no checkpoint
            shutil.rmtree(ckpt.dir, ignore_errors=True)
        raise ArgseError("train_expert.lr", str(e), "lower --lr; nothing was published") from None
    if ckpt is not None and out.resumed and not resumed_at:
        print("train-expert: an interrupted run left no usable checkpoint; trained from the start",
              file=sys.stderr, flush=True)  # fmt: skip
    return model, history


def _test_accuracies(heads: list[str], logits: Any, yt: Any, c2g: Any, log_pi: Any) -> tuple[Any, Any, list[dict]]:
    """Report-only test accuracies of each head (never used for selection): per-class [H, C],
    per-group [H, K], and per head its raw and balanced-prior-rule class-balanced accuracies."""
    import numpy as np
    import torch

    from ..experts.losses import posterior_tau
    from ..experts.trainer import balanced_rule_logits

    C = logits.shape[-1]
    accs = [_group_acc(logits[:, h].argmax(1).numpy(), yt, c2g, C) for h in range(len(heads))]
    per_class, per_group = np.stack([a[0] for a in accs]), np.stack([a[1] for a in accs])
    lp = torch.from_numpy(log_pi)
    bal = [_group_acc(balanced_rule_logits(logits[:, h], lp, posterior_tau(l)).argmax(1).numpy(), yt, c2g, C)
           for h, l in enumerate(heads)]  # fmt: skip
    info = [{"loss": l, "tau": posterior_tau(l), "test_class_balanced_acc": float(np.nanmean(per_class[h])),
             "test_group_acc": [float(v) for v in per_group[h]],
             "test_balanced_rule_acc": float(np.nanmean(bal[h][0])),
             "test_balanced_rule_group_acc": [float(v) for v in bal[h][1]]}
            for h, l in enumerate(heads)]  # fmt: skip
    return per_class, per_group, info


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..data.images import load_images, split_arrays
    from ..experts.trainer import load_model, predict_logits, state_dict_to_safetensors_bytes
    from ..runtime import pin_threads

    pin_threads()
    split = inputs["split"]
    images = load_images(split)
    x, y = split_arrays(split, "train", images)
    counts = split.array("class_counts").astype(np.float64)
    log_pi = np.log(counts / counts.sum()).astype(np.float32)
    C, shared = len(counts), cfg.loss == "shared"
    model, history = _train(cfg, x, y, log_pi, _backbone(cfg, inputs), out, progress)
    blob = state_dict_to_safetensors_bytes(model.cpu())
    out.file_path("model.safetensors").write_bytes(blob)
    out.json("history.json", history)

    heads = list(cfg.heads) if shared else [cfg.loss]
    model = load_model(blob, cfg.depth, C, cfg.width, len(heads) if shared else None)
    xt, yt = split_arrays(split, "test", images)
    logits = predict_logits(model, xt, device="cpu")
    logits = logits if shared else logits[:, None]  # [N, H, C]
    per_class, per_group, info = _test_accuracies(heads, logits, yt, split.array("class_to_group"), log_pi)
    out.array("test/per_class_acc", per_class if shared else per_class[0])
    out.array("test/per_group_acc", per_group if shared else per_group[0])
    out.meta.update(depth=cfg.depth, width=cfg.width, num_classes=C, shared_backbone=cfg.shared_backbone)
    if shared:
        out.meta.update(loss="shared", heads=info, num_heads=len(heads),
                        final_train_loss=[h[-1]["loss"] for h in history] if history[0] else None)  # fmt: skip
    else:
        out.meta.update(**info[0], final_train_loss=history[-1].get("loss") if history else None)
    for i in info:
        line = (f"{i['loss']}: class-balanced test accuracy {i['test_class_balanced_acc']:.4f} "
                f"(per group {', '.join(f'{v:.4f}' for v in i['test_group_acc'])})")  # fmt: skip
        if i["tau"] != 1.0:
            line += (f"; its balanced-prior rule (logits + {i['tau'] - 1:g} log pi) "
                     f"{i['test_balanced_rule_acc']:.4f} "
                     f"(per group {', '.join(f'{v:.4f}' for v in i['test_balanced_rule_group_acc'])})")  # fmt: skip
        progress.log(line)


def summary(meta: dict) -> str:
    if meta.get("loss") == "shared":
        return "shared " + " ".join(
            f"{h['loss']}={h.get('test_class_balanced_acc', float('nan')):.4f}" for h in meta.get("heads", [])
        )
    return f"{meta.get('loss')} bal-acc={meta.get('test_class_balanced_acc', float('nan')):.4f}"
