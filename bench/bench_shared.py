"""Benchmark: shared-backbone experts (one backbone, E heads) vs E sequential independent models.

    python bench/bench_shared.py --device cpu|cuda --depth D --epochs N [--synthetic]
                                 [--experts 4] [--n-train 12406] [--out FILE.jsonl]

E experts (losses ce, balsoftmax, logitadjust:2, logitadjust:0.5, logitadjust:1.5 in that order),
same recipe and seed, trained in the same process once one after the other with ``train_expert``
(E models) and once together with ``train_experts_shared`` (one backbone, E heads, summed losses,
one forward pass per batch), for the same epochs, on CIFAR-10-LT (imbalance factor 100, about
--n-train images; 12406 = the full CIFAR-10-LT IF=100 train set) from the offline CIFAR-10 copy
when available, else the synthetic colour-coded set of bench_trainer (``--synthetic`` forces it;
the "data" field says which). Both paths are warmed up first (one short run each on 256 images).
Accuracy = class-balanced accuracy (mean per-class recall) on a class-balanced subset of the
official test set (a benchmark figure: nothing is selected on it). Prints JSON lines (and writes
them to ``--out`` when given):

- ``shared_train_throughput_E{E}_resnet{d}``: images/s counted per expert (E * epochs * steps *
  batch / wall s) of the shared run; reference = the sequential runs; ratio = the speedup
  (goal >= 2.5 for E = 4 on CPU). The shared run sits between the sequential ones (a drifting
  load on a shared machine hits both); ``ratio_median_epoch`` = the same ratio from the median
  per-epoch rates (robust to a load spike); ``ratio_cpu_time`` = sequential / shared process CPU
  seconds (CPU only; the least load-sensitive of the three with ``--threads 1``).
- ``shared_acc_shortfall_E{E}_resnet{d}_{ep}ep``: max over experts of (class-balanced accuracy of
  the independent model - that of the shared head), reference 0.02 (the "within 2 points" goal:
  ``pass`` when the shared heads are at most 2 points worse); per-expert accuracies and the max
  absolute gap attached.
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

from argse_cli.experts.shared import train_experts_shared  # noqa: E402
from argse_cli.experts.trainer import TrainRecipe, predict_logits, train_expert  # noqa: E402

LOSSES = ("ce", "balsoftmax", "logitadjust:2", "logitadjust:0.5", "logitadjust:1.5")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=12406)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--backbone-grad", default="sum", choices=("sum", "mean"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-dir", default="/tmp/argse_bench_cifar10")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.experts > len(LOSSES) or a.experts < 1:
        raise SystemExit(f"--experts must be in [1, {len(LOSSES)}]")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")

    if bt.BUILDER.is_file() and not a.synthetic:
        xtr, ytr, xte, yte = bt.load_cifar10(Path(a.data_dir))
        data = "cifar10-offline-LT100"
    else:
        xtr, ytr, xte, yte = bt.synthetic(50000, 10000, a.seed)  # same class colours
        data = "synthetic-LT100"
    xtr, ytr = bt.long_tail(xtr, ytr, a.n_train, 100.0, a.seed)
    xte, yte = bt.balanced_test(xte, yte, a.n_test, a.seed)
    counts = np.bincount(ytr, minlength=10)
    log_pi = np.log(counts / counts.sum())
    specs = list(LOSSES[: a.experts])
    recipe = TrainRecipe(
        depth=a.depth, width=a.width, epochs=a.epochs, batch_size=a.batch_size,
        warmup_epochs=min(1, a.epochs - 1), aug="cropflip", precision=a.precision,
        channels_last=a.device == "cuda", seed=a.seed, device=a.device,
    )  # fmt: skip
    print(f"data {data}: train {len(ytr)}, test {len(yte)}, experts {specs}, {a.device}, "
          f"threads {torch.get_num_threads()}", file=sys.stderr)  # fmt: skip

    def acc(logits: torch.Tensor) -> float:
        return bt.bal_acc(logits.argmax(-1).numpy(), yte)

    warm = replace(recipe, epochs=1, warmup_epochs=0)  # one-time costs (threads, kernels)
    train_expert(xtr[:256], ytr[:256], specs[0], warm, log_pi)
    train_experts_shared(xtr[:256], ytr[:256], specs, warm, log_pi, backbone_grad=a.backbone_grad)
    # shared run in the middle of the sequential ones: slow drifts of a shared machine's load
    # hit both sides alike; per-epoch img/s medians are reported next to the wall-time ratio
    seq_acc, seq_times, seq_epoch_rates, seq_cpu = [], [], [], []
    half = len(specs) // 2
    for i, s in enumerate(specs):
        if i == half:
            _sync(a.device)
            t0, c0 = time.perf_counter(), time.process_time()
            hist: list = []
            shared = train_experts_shared(
                xtr, ytr, specs, recipe, log_pi, histories=hist, backbone_grad=a.backbone_grad
            )
            _sync(a.device)
            t_shared, cpu_shared = time.perf_counter() - t0, time.process_time() - c0
            shared_epoch_rates = [len(specs) * r["img_per_s"] for r in hist[0]]
            lg = predict_logits(shared, xte, device=a.device)  # [N, E, C]
            shared_acc = [acc(lg[:, e]) for e in range(len(specs))]
            print(f"[shared] {len(specs)} heads: {t_shared:.1f} s, bal acc "
                  f"{[round(v, 4) for v in shared_acc]}", file=sys.stderr)  # fmt: skip
        _sync(a.device)
        t0, c0 = time.perf_counter(), time.process_time()
        m, h = train_expert(xtr, ytr, s, recipe, log_pi)
        _sync(a.device)
        seq_times.append(time.perf_counter() - t0)
        seq_cpu.append(time.process_time() - c0)
        seq_epoch_rates += [r["img_per_s"] for r in h]
        seq_acc.append(acc(predict_logits(m, xte, device=a.device)))
        print(f"[sequential] {s}: {seq_times[-1]:.1f} s, bal acc {seq_acc[-1]:.4f}", file=sys.stderr)

    bs = min(a.batch_size, len(ytr))
    images = len(specs) * a.epochs * (len(ytr) // bs) * bs  # counted per expert
    seq_rate, shared_rate = images / sum(seq_times), images / t_shared
    shortfall = max(s - h for s, h in zip(seq_acc, shared_acc, strict=True))
    gap = max(abs(s - h) for s, h in zip(seq_acc, shared_acc, strict=True))
    dev = a.device if a.device == "cpu" else torch.cuda.get_device_name()
    common = {"device": dev, "commit": bt.commit(), "data": data, "experts": specs,
              "epochs": a.epochs, "batch_size": bs, "n_train": int(len(ytr)), "width": a.width,
              "precision": a.precision, "backbone_grad": a.backbone_grad}  # fmt: skip
    tag = f"E{len(specs)}_resnet{a.depth}" + (f"x{a.width}" if a.width != 1 else "")
    lines = [
        {"name": f"shared_train_throughput_{tag}", "value": round(shared_rate, 2), "unit": "img/s",
         "reference": round(seq_rate, 2), "ratio": round(shared_rate / seq_rate, 4),
         "goal_ratio": 2.5, "shared_s": round(t_shared, 2), "sequential_s": round(sum(seq_times), 2),
         "ratio_median_epoch": round(
             float(np.median(shared_epoch_rates) / np.median(seq_epoch_rates)), 4),
         "ratio_cpu_time": round(sum(seq_cpu) / cpu_shared, 4) if a.device == "cpu" else None},
        {"name": f"shared_acc_shortfall_{tag}_{a.epochs}ep", "value": round(shortfall, 4),
         "unit": "fraction", "reference": 0.02, "ratio": round(shortfall / 0.02, 4),
         "pass": bool(shortfall <= 0.02), "max_abs_gap": round(gap, 4),
         "bal_acc_shared": [round(v, 4) for v in shared_acc],
         "bal_acc_sequential": [round(v, 4) for v in seq_acc]},
    ]  # fmt: skip
    text = [json.dumps({"name": ln.pop("name"), **ln, **common}) for ln in lines]
    for t in text:
        print(t)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("".join(t + "\n" for t in text))


if __name__ == "__main__":
    main()
