"""CPU/GPU benchmark: device-resident trainer vs the plain DataLoader reference trainer.

    python bench/bench_trainer.py [--depth 8] [--epochs 2] [--n-train 5000] [--device cpu]
        [--precision fp32|bf16] [--channels-last] [--compile] [--no-reference]

Data: CIFAR-10-LT (imbalance factor 100, about --n-train images, built from the offline CIFAR-10
copy when $ARGSE_SHARED/data/cifar10/build_cifar10.py exists, ARGSE_SHARED defaulting to
../shared) or a synthetic colour-coded set otherwise; the "data" field of every line says which.
Both trainers run the same recipe (ce loss, cropflip augmentation, and the precision /
channels-last / compile settings given, which the trainer honours on CUDA only) for the same
epochs in the same process. Prints one JSON line per result: training images/s (median over
epochs after the first) and class-balanced test accuracy.

``--no-reference`` trains only ours and prints ``expert_wall_s_resnet{d}_{ep}ep`` (wall time of
``train_expert``, compilation and the first epoch included, the device synchronised; the first
and the median later epoch's seconds attached) and ``bal_test_acc_resnet{d}_{ep}ep`` (no
reference): with ``--device cuda --depth 32 --epochs 200 --n-train 12406 --n-test 10000
--precision bf16 --channels-last --compile`` the one 200-epoch ResNet-32 CIFAR-10-LT expert.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR10_BUILDER as BUILDER  # noqa: E402
from _common import commit  # noqa: E402,F401  (bench_fused reads bt.commit)

from argse_cli.data.cifar import load_cifar  # noqa: E402  (allow-list unpickler)
from argse_cli.experts.trainer import TrainRecipe, predict_logits, train_expert  # noqa: E402


def load_cifar10(data_dir: Path):
    """The official python layout under data_dir (built from the offline copy when missing)."""
    import warnings

    if not (data_dir / "cifar-10-batches-py" / "test_batch").is_file():
        subprocess.run([sys.executable, str(BUILDER), str(data_dir)], check=True)
    with warnings.catch_warnings():  # the offline copy's MD5s differ by construction
        warnings.simplefilter("ignore", UserWarning)
        d = load_cifar("cifar10", data_dir)
    return d.x_train, d.y_train, d.x_test, d.y_test


def synthetic(n_train: int, n_test: int, seed: int):
    """10 classes: class c has a fixed random mean colour + noise. Train and test are drawn from
    the SAME class colours (one generator), so test accuracy measures learning."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(40, 215, size=(10, 3))

    def draw(n: int):
        y = rng.integers(0, 10, n)
        x = means[y][:, None, None, :] + rng.normal(0, 40, size=(n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y

    return (*draw(n_train), *draw(n_test))


def synthetic_pool(n_train: int, n_test: int) -> tuple[int, int]:
    """Pool sizes (train, test) that the long-tail (largest class ~ n_train / 2.66 at IF 100, C =
    10) and the balanced test subset can be drawn from: no more than CIFAR-10's 50k / 10k."""
    return min(50000, 5 * n_train + 500), min(10000, 2 * n_test + 200)


def long_tail(x, y, n_train: int, imb: float, seed: int):
    """Per-class counts n_c = n_max * imb^(-c / (C - 1)), n_max chosen so sum_c n_c ~ n_train."""
    C = int(y.max()) + 1
    ratios = imb ** (-np.arange(C) / (C - 1))
    n_max = n_train / ratios.sum()
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(C):
        idx = np.flatnonzero(y == c)
        keep.append(rng.permutation(idx)[: max(1, int(n_max * ratios[c]))])
    keep = np.sort(np.concatenate(keep))
    return x[keep], y[keep]


def balanced_test(x, y, n_test: int, seed: int):
    C = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[: n_test // C] for c in range(C)]
    )
    return x[keep], y[keep]


def bal_acc(pred: np.ndarray, y: np.ndarray) -> float:
    """Class-balanced accuracy = mean per-class recall."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--data-dir", default="/tmp/argse_bench_cifar10")
    ap.add_argument("--synthetic", action="store_true", help="force synthetic data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-epochs", type=float, default=None,
                    help="lr warm-up epochs (default: min(1, epochs - 1))")  # fmt: skip
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--channels-last", action="store_true", help="CUDA only (trainer setting)")
    ap.add_argument("--compile", action="store_true", help="torch.compile, CUDA only")
    ap.add_argument("--no-reference", action="store_true",
                    help="train ours only: wall time and accuracy of one expert")  # fmt: skip
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    if BUILDER.is_file() and not a.synthetic:
        xtr, ytr, xte, yte = load_cifar10(Path(a.data_dir))
        data = "cifar10-offline-LT100"
    else:
        xtr, ytr, xte, yte = synthetic(*synthetic_pool(a.n_train, a.n_test), a.seed)
        data = "synthetic-LT100"
    xtr, ytr = long_tail(xtr, ytr, a.n_train, 100.0, a.seed)
    xte, yte = balanced_test(xte, yte, a.n_test, a.seed)
    counts = np.bincount(ytr, minlength=10)
    log_pi = np.log(counts / counts.sum())
    print(
        f"data: {data}, train {len(ytr)} (per class {counts.tolist()}), test {len(yte)}, "
        f"threads {torch.get_num_threads()}",
        file=sys.stderr,
    )

    recipe = TrainRecipe(
        depth=a.depth,
        epochs=a.epochs,
        batch_size=a.batch_size,
        warmup_epochs=min(1, a.epochs - 1) if a.warmup_epochs is None else a.warmup_epochs,
        aug="cropflip",
        precision=a.precision,
        compile=a.compile,
        channels_last=a.channels_last,
        seed=a.seed,
        device=a.device,
    )
    settings = {"precision": a.precision, "channels_last": a.channels_last, "compile": a.compile,
                "epochs": a.epochs, "n_train": int(len(ytr)), "n_test": int(len(yte))}  # fmt: skip

    def log(tag):
        return lambda e, n, d: print(
            f"[{tag}] epoch {e}/{n} loss {d['loss']:.3f} {d['img_per_s']:.0f} img/s",
            file=sys.stderr,
        )

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    def acc(model):
        return bal_acc(predict_logits(model, xte, device=a.device).argmax(1).numpy(), yte)

    dev = a.device if a.device == "cpu" else torch.cuda.get_device_name()
    common = {"device": dev, "commit": commit(), "data": data, **settings}
    sync()
    t0 = time.perf_counter()
    ours, h_ours = train_expert(xtr, ytr, "ce", recipe, log_pi, progress=log("ours"))
    sync()
    wall = time.perf_counter() - t0
    if a.no_reference:
        later = [r["time_s"] for r in h_ours[1:]] or [h_ours[0]["time_s"]]
        for line in (
            {"name": f"expert_wall_s_resnet{a.depth}_{a.epochs}ep", "value": round(wall, 2),
             "unit": "s", "reference": None, "ratio": None, "loss": "ce",
             "first_epoch_s": round(h_ours[0]["time_s"], 3),
             "median_epoch_s": round(statistics.median(later), 4)},
            {"name": f"bal_test_acc_resnet{a.depth}_{a.epochs}ep", "value": round(acc(ours), 4),
             "unit": "fraction", "reference": None, "ratio": None, "loss": "ce"},
        ):  # fmt: skip
            print(json.dumps({**line, **common}), flush=True)
        return
    from reference_trainer import train_reference  # torchvision: imported only when needed

    ref, h_ref = train_reference(xtr, ytr, "ce", recipe, log_pi, progress=log("reference"))

    def speed(h):
        return statistics.median(r["img_per_s"] for r in (h[1:] if len(h) > 1 else h))

    s_o, s_r = speed(h_ours), speed(h_ref)
    a_o, a_r = acc(ours), acc(ref)
    for name, v, r, unit in (
        (f"train_throughput_resnet{a.depth}", s_o, s_r, "img/s"),
        (f"bal_test_acc_resnet{a.depth}_{a.epochs}ep", a_o, a_r, "fraction"),
    ):
        print(
            json.dumps(
                {
                    "name": name,
                    "value": round(v, 4),
                    "unit": unit,
                    "reference": round(r, 4),
                    "ratio": round(v / r, 4) if r else None,
                    **common,
                }
            )
        )


if __name__ == "__main__":
    main()
