"""Measure one candidate CPU expert recipe on the real CIFAR-10-LT split (the probe behind
configs/cifar10lt-cpu.yaml's choice).

Trains the experts of one recipe on the split's long-tailed train set -- a shared backbone with a
head per loss, or independent models -- plus optionally the cRT head on the frozen (ce / shared)
backbone, and prints one JSON line: each head's class-balanced accuracy (mean per-class recall of
the raw argmax) overall and per group on a held-out split (tuneV by default: never test), the
accuracy of its balanced-prior rule argmax_y f_y + (tau - 1) log pi_y, wall times and the load.

    python bench/recipe_probe.py --split KEY --depth 20 --epochs 12 --crt 3 --out probes.jsonl

KEY is a split artifact of the store (``argse split --config configs/cifar10lt-cpu.yaml --print-key``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", required=True, help="split key")
    ap.add_argument("--store", default=os.environ.get("ARGSE_STORE", "artifacts"))
    ap.add_argument("--mode", choices=["shared", "independent"], default="shared")
    ap.add_argument("--heads", default="ce,balsoftmax,logitadjust:2")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--aug", default="cropflip", choices=["cropflip", "plan", "none"])
    ap.add_argument(
        "--crt", type=int, default=0, help="cRT epochs on the frozen backbone (0: none)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--bgrad", default="sum", choices=["sum", "mean"])
    ap.add_argument("--tag", default="")
    ap.add_argument("--evalsplit", default="tuneV", choices=["tuneV", "val_small", "calib"])
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    a = ap.parse_args()

    import numpy as np
    import torch

    from argse_cli.data.images import load_images, split_arrays
    from argse_cli.experts.losses import posterior_tau
    from argse_cli.experts.shared import train_experts_shared
    from argse_cli.experts.trainer import (
        TrainRecipe,
        balanced_rule_logits,
        predict_logits,
        state_dict_to_safetensors_bytes,
        train_expert,
    )
    from argse_cli.store import Store

    torch.set_num_threads(a.threads)
    sp = Store(a.store).open("split", a.split)
    imgs = load_images(sp)
    x, y = split_arrays(sp, "train", imgs)
    xv, yv = split_arrays(sp, a.evalsplit, imgs)
    c2g = sp.array("class_to_group")
    counts = sp.array("class_counts").astype(float)
    log_pi = np.log(counts / counts.sum()).astype(np.float32)
    C, heads = len(counts), a.heads.split(",")

    def grp(pred: np.ndarray) -> tuple[float, list[float]]:
        pc = np.array([np.mean(pred[yv == c] == c) for c in range(C)])
        return round(float(pc.mean()), 4), [
            round(float(pc[c2g == k].mean()), 4) for k in range(c2g.max() + 1)
        ]

    def brule(lg: torch.Tensor, h: str) -> tuple[float, list[float]]:
        return grp(
            balanced_rule_logits(lg, torch.from_numpy(log_pi), posterior_tau(h)).argmax(1).numpy()
        )

    def prog(e: int, n: int, rec: dict) -> None:
        print(
            f"  epoch {e}/{n} loss {rec['loss']:.3f} img/s {rec['img_per_s']:.0f}",
            file=sys.stderr,
            flush=True,
        )

    r = TrainRecipe(
        depth=a.depth,
        width=a.width,
        epochs=a.epochs,
        batch_size=a.bs,
        lr=a.lr,
        warmup_epochs=a.warmup,
        weight_decay=a.wd,
        aug=a.aug,
        eval_every=a.eval_every,
        seed=0,
    )
    res: dict = {"args": vars(a), "heads": {}, "balanced_rule": {}}
    eval_data = (xv, yv) if a.eval_every else None
    t0 = time.perf_counter()
    if a.mode == "shared":
        hist: list = []
        m = train_experts_shared(x, y, heads, r, log_pi, progress=prog, histories=hist, backbone_grad=a.bgrad,
                                 eval_data=eval_data)  # fmt: skip
        lg = predict_logits(m, xv)
        for e, h in enumerate(heads):
            res["heads"][h] = grp(lg[:, e].argmax(1).numpy())
            res["balanced_rule"][h] = brule(lg[:, e], h)
        backbone = state_dict_to_safetensors_bytes(m)
        rates = [row["img_per_s"] for row in hist[0]]
    else:
        rates, backbone = [], None
        for h in heads:
            mm, hh = train_expert(x, y, h, r, log_pi, progress=prog, eval_data=eval_data)
            lgm = predict_logits(mm, xv)
            res["heads"][h] = grp(lgm.argmax(1).numpy())
            res["balanced_rule"][h] = brule(lgm, h)
            rates += [row["img_per_s"] for row in hh]
            backbone = state_dict_to_safetensors_bytes(mm) if h == "ce" else backbone
    res["train_s"] = round(time.perf_counter() - t0, 1)
    if a.crt and backbone is not None:
        t1 = time.perf_counter()
        mc, _ = train_expert(x, y, "decoupled", replace(r, epochs=a.crt, warmup_epochs=0, eval_every=0), log_pi,
                             init_state=backbone, classifier_only=True)  # fmt: skip
        res["heads"]["decoupled"] = grp(predict_logits(mc, xv).argmax(1).numpy())
        res["crt_s"] = round(time.perf_counter() - t1, 1)
    res.update(median_img_per_s=round(float(np.median(rates)), 1), load=os.getloadavg())
    line = json.dumps(res)
    print(line)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
