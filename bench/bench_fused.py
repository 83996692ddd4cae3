"""Benchmark: fused multi-expert training (vmap over stacked ResNets) vs sequential train_expert.

    python bench/bench_fused.py [--depth 8] [--epochs 2] [--experts 3] [--n-train 5000]
                                [--device auto|cpu|cuda]

E experts (losses ce, balsoftmax, logitadjust:2, logitadjust:0.5, ... in that order), same recipe
and seed, trained once one after the other with ``train_expert`` and once together with
``train_experts_fused``, in the same process, on CIFAR-10-LT (imbalance factor 100, about
--n-train images; the offline CIFAR-10 copy when available, else the synthetic colour-coded set
of bench_trainer with ``--synthetic`` -- the "data" field says which; the synthetic set is
learnable in a few CPU epochs, so accuracies are not compared between near-chance models). Both
paths are warmed up first (one short run each on 256 images). Prints three JSON lines:

- ``fused_train_throughput_E{E}_resnet{d}``: images/s counted per expert (E * epochs * steps *
  batch / wall s) of the fused run; reference = the sequential runs; ratio = the speedup.
- ``fused_max_acc_gap_E{E}_resnet{d}_{ep}ep``: max over experts of |class-balanced test accuracy
  fused - unfused| (reference 0.01: the 1-point acceptance), per-expert accuracies attached.
- ``expert_wall_s_resnet{d}_{ep}ep``: wall time of the first sequential expert (with
  ``--device cuda --depth 32 --epochs 200 --n-train 12406`` this is the issue's one 200-epoch
  ResNet-32 CIFAR-10-LT expert); no reference.

The acceptance speedup is a GPU figure; on CPU the vmapped grouped convolutions are not expected
to beat E plain ones (the line is reported for information).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_trainer as bt  # noqa: E402

from argse_cli.experts.fused import train_experts_fused  # noqa: E402
from argse_cli.experts.trainer import TrainRecipe, predict_logits, train_expert  # noqa: E402

LOSSES = ("ce", "balsoftmax", "logitadjust:2", "logitadjust:0.5", "logitadjust:1.5")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-dir", default="/tmp/argse_bench_cifar10")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.experts > len(LOSSES):
        raise SystemExit(f"at most {len(LOSSES)} experts")

    if bt.BUILDER.is_file() and not a.synthetic:
        xtr, ytr, xte, yte = bt.load_cifar10(Path(a.data_dir))
        data = "cifar10-offline-LT100"
    else:
        xtr, ytr, xte, yte = bt.synthetic(*bt.synthetic_pool(a.n_train, a.n_test), a.seed)
        data = "synthetic-LT100"
    xtr, ytr = bt.long_tail(xtr, ytr, a.n_train, 100.0, a.seed)
    xte, yte = bt.balanced_test(xte, yte, a.n_test, a.seed)
    counts = np.bincount(ytr, minlength=10)
    log_pi = np.log(counts / counts.sum())
    specs = list(LOSSES[: a.experts])
    recipe = TrainRecipe(
        depth=a.depth, epochs=a.epochs, batch_size=a.batch_size,
        warmup_epochs=min(1, a.epochs - 1), aug="cropflip", precision=a.precision,
        seed=a.seed, device=device,
    )  # fmt: skip
    print(f"data {data}: train {len(ytr)}, test {len(yte)}, experts {specs}, {device}, "
          f"threads {torch.get_num_threads()}", file=sys.stderr)  # fmt: skip

    def acc(m) -> float:
        return bt.bal_acc(predict_logits(m, xte, device=device).argmax(1).numpy(), yte)

    warm = replace(recipe, epochs=1, warmup_epochs=0)  # one-time costs (threads, kernels)
    train_expert(xtr[:256], ytr[:256], specs[0], warm, log_pi)
    train_experts_fused(xtr[:256], ytr[:256], specs, warm, log_pi)
    seq_models, seq_times = [], []
    for s in specs:
        _sync(device)
        t0 = time.perf_counter()
        m, _ = train_expert(xtr, ytr, s, recipe, log_pi)
        _sync(device)
        seq_times.append(time.perf_counter() - t0)
        seq_models.append(m)
        print(f"[sequential] {s}: {seq_times[-1]:.1f} s", file=sys.stderr)
    _sync(device)
    t0 = time.perf_counter()
    fused_models = train_experts_fused(xtr, ytr, specs, recipe, log_pi)
    _sync(device)
    t_fused = time.perf_counter() - t0
    print(f"[fused] {len(specs)} experts: {t_fused:.1f} s", file=sys.stderr)

    bs = min(a.batch_size, len(ytr))
    images = len(specs) * a.epochs * (len(ytr) // bs) * bs  # counted per expert
    seq_rate, fused_rate = images / sum(seq_times), images / t_fused
    acc_seq = [acc(m) for m in seq_models]
    acc_fused = [acc(m) for m in fused_models]
    gap = max(abs(f - s) for f, s in zip(acc_fused, acc_seq, strict=True))
    dev = device if device == "cpu" else torch.cuda.get_device_name()
    common = {"device": dev, "commit": bt.commit(), "data": data, "experts": specs,
              "epochs": a.epochs, "batch_size": bs, "n_train": int(len(ytr)),
              "precision": a.precision}  # fmt: skip
    lines = [
        {"name": f"fused_train_throughput_E{len(specs)}_resnet{a.depth}",
         "value": round(fused_rate, 2), "unit": "img/s", "reference": round(seq_rate, 2),
         "ratio": round(fused_rate / seq_rate, 4), "fused_s": round(t_fused, 2),
         "sequential_s": round(sum(seq_times), 2)},
        {"name": f"fused_max_acc_gap_E{len(specs)}_resnet{a.depth}_{a.epochs}ep",
         "value": round(gap, 4), "unit": "fraction", "reference": 0.01,
         "ratio": round(gap / 0.01, 4), "pass": bool(gap <= 0.01),
         "bal_acc_fused": [round(v, 4) for v in acc_fused],
         "bal_acc_sequential": [round(v, 4) for v in acc_seq]},
        {"name": f"expert_wall_s_resnet{a.depth}_{a.epochs}ep", "value": round(seq_times[0], 2),
         "unit": "s", "reference": None, "ratio": None, "loss": specs[0]},
    ]  # fmt: skip
    for line in lines:
        name = line.pop("name")
        print(json.dumps({"name": name, **line, **common}))


if __name__ == "__main__":
    main()
