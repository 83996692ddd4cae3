"""Small random CIFAR sets in the official python layouts, for tests that must not need real data.

Files are protocol-2 pickles of dicts with bytes keys, like the official ones: b"data" is a uint8
[N, 3072] array (CHW rows), labels are plain lists of ints. Row order is shuffled (as officially).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _per_class(n: int | Sequence[int], num_classes: int) -> np.ndarray:
    counts = np.full(num_classes, n, dtype=np.int64) if np.isscalar(n) else np.asarray(n, np.int64)
    if counts.shape != (num_classes,) or (counts < 0).any():
        raise ValueError(f"need one non-negative count per class ({num_classes}), got {n!r}")
    return counts


def _draw(counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.permutation(np.repeat(np.arange(len(counts), dtype=np.int64), counts))
    x = rng.integers(0, 256, size=(len(y), 3072), dtype=np.uint8)
    return x, y


def _dump(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_synthetic_cifar100(
    root: Path,
    n_train_per_class: int | Sequence[int] = 50,
    n_test_per_class: int | Sequence[int] = 10,
    seed: int = 0,
) -> Path:
    """Write <root>/cifar-100-python/{train,test,meta}; coarse label = fine label // 5. Returns dir."""
    rng = np.random.default_rng(seed)
    out = Path(root) / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        x, y = _draw(_per_class(n, 100), rng)
        _dump(
            out / name,
            {
                b"filenames": [f"synthetic_{name}_{i:05d}.png".encode() for i in range(len(y))],
                b"batch_label": f"synthetic {name}".encode(),
                b"fine_labels": [int(v) for v in y],
                b"coarse_labels": [int(v) // 5 for v in y],
                b"data": x,
            },
        )
    _dump(
        out / "meta",
        {
            b"fine_label_names": [f"class_{c:02d}".encode() for c in range(100)],
            b"coarse_label_names": [f"superclass_{c:02d}".encode() for c in range(20)],
        },
    )
    return out


def write_synthetic_cifar10(
    root: Path,
    n_train_per_class: int | Sequence[int] = 100,
    n_test_per_class: int | Sequence[int] = 20,
    seed: int = 0,
) -> Path:
    """Write <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}. Returns dir."""
    rng = np.random.default_rng(seed)
    out = Path(root) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    x, y = _draw(_per_class(n_train_per_class, 10), rng)
    bounds = np.linspace(0, len(y), 6).astype(int)
    batches = [(f"data_batch_{b + 1}", slice(bounds[b], bounds[b + 1])) for b in range(5)]
    xt, yt = _draw(_per_class(n_test_per_class, 10), rng)
    for name, (xx, yy) in [(n, (x[s], y[s])) for n, s in batches] + [("test_batch", (xt, yt))]:
        _dump(
            out / name,
            {
                b"batch_label": f"synthetic {name}".encode(),
                b"labels": [int(v) for v in yy],
                b"data": xx,
                b"filenames": [f"synthetic_{name}_{i:05d}.png".encode() for i in range(len(yy))],
            },
        )
    _dump(
        out / "batches.meta",
        {
            b"num_cases_per_batch": int(bounds[1] - bounds[0]),
            b"label_names": [f"class_{c}".encode() for c in range(10)],
            b"num_vis": 3072,
        },
    )
    return out
