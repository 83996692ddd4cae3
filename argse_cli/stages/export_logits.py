"""Stage `export-logits`: every expert's raw logits on the held-out splits (fp16, row-chunked).

Layout (one Zarr group per split ``s``; all arrays of a split share the row chunking):
  s/logits        float16 [N, E, C]   expert e's raw logits (no temperature, no prior shift)
  s/labels        int64   [N]
  s/w_lt, s/w_bal float64 [N]         long-tailed / balanced importance weights
  s/group         int64   [N]         g(y)
  s/source_index  int64   [N]         index into the official CIFAR array of the split
  s/row_order     int64   [N]         position of the row in the split's own order
  class_counts [C], class_to_group [C]
Rows are stored in a seeded random order (``row_order``), never sorted by class. Each expert's
loss and tau (its posterior's prior shift) are in ``meta.experts``.

A shared-backbone train-expert artifact (``meta.heads``) contributes one expert per head, in its
head order (one backbone pass for all of them); its entries carry ``head`` (the head's index) and
``shared_backbone: true``. Expert order = the upstream artifacts' order, heads expanded.
"""

from __future__ import annotations

from typing import Any

STAGE = "export-logits"
VERSION = 9
SPLIT_ARRAYS = ("labels", "w_lt", "w_bal", "group")


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..config import HELDOUT_SPLITS
    from ..data.images import load_images, split_arrays
    from ..errors import ArgseError
    from ..experts.trainer import load_model, predict_logits
    from ..runtime import pin_threads

    pin_threads()
    split, experts = inputs["split"], inputs["experts"]
    images = load_images(split)
    counts = split.array("class_counts")
    C = len(counts)
    models, infos = [], []
    for a in experts:
        if a.meta.get("num_classes") != C:
            raise ArgseError("experts", f"expert {a.key[:12]} has {a.meta.get('num_classes')} classes, split has {C}",
                             "train every expert on the same split")
        heads = a.meta.get("heads")
        models.append(load_model(a.read_bytes("model.safetensors"), a.meta["depth"], C, a.meta.get("width", 1),
                                 len(heads) if heads else None))  # fmt: skip
        for h, info in enumerate(heads or [a.meta]):
            e = {"key": a.key, "loss": info["loss"], "tau": info["tau"], "depth": a.meta["depth"],
                 "test_class_balanced_acc": info.get("test_class_balanced_acc")}  # fmt: skip
            if heads:
                e.update(head=h, shared_backbone=True)
            elif a.meta.get("shared_backbone"):
                e.update(shared_backbone=True)
            infos.append(e)
    names = (("train",) if cfg.include_train else ()) + HELDOUT_SPLITS
    sizes = {}
    for si, s in enumerate(names):
        x, _ = split_arrays(split, s, images)
        n = len(x)
        order = np.random.default_rng([cfg.seed, si]).permutation(n)
        xs = x[order]
        out.array(f"{s}/row_order", order.astype(np.int64), chunk_rows=cfg.chunk_rows)
        out.array(f"{s}/source_index", split.array(f"{s}/indices")[order], chunk_rows=cfg.chunk_rows)
        for name in SPLIT_ARRAYS:
            out.array(f"{s}/{name}", split.array(f"{s}/{name}")[order], chunk_rows=cfg.chunk_rows)
        rows = out.rows(f"{s}/logits", (n, len(infos), C), np.float16, cfg.chunk_rows)
        for start in range(0, n, cfg.chunk_rows):
            xb = xs[start : start + cfg.chunk_rows]
            parts = [predict_logits(m, xb, batch_size=cfg.infer_batch_size, device=cfg.device).numpy() for m in models]
            block = np.concatenate([p if p.ndim == 3 else p[:, None] for p in parts], axis=1)  # [n, E, C]
            if np.abs(block).max(initial=0) > 65000:
                raise ArgseError("logits", f"{s}: |logit| exceeds the fp16 range", "check the expert (diverged?)")
            rows.append(block.astype(np.float16))
            progress(min(start + cfg.chunk_rows, n), n, {"split": s})
        sizes[s] = n
    out.array("class_counts", counts)
    out.array("class_to_group", split.array("class_to_group"))
    out.meta.update(
        experts=infos, splits=sizes, num_classes=C, num_experts=len(infos), num_groups=int(split.meta["num_groups"]),
        chunk_rows=cfg.chunk_rows, layout="s/logits float16 [N, E, C]",
    )


def summary(meta: dict) -> str:
    return f"E={meta.get('num_experts')} " + ",".join(e["loss"] for e in meta.get("experts", []))
