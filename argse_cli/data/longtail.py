"""Long-tailed subsampling of a balanced training set (exponential profile, Cao et al. 2019)."""

from __future__ import annotations

import math

import numpy as np

from argse_cli.errors import ArgseError

# floor() guard: n_max * IF^(-c/(C-1)) can land a hair below an integer (e.g. 49.99999999 for 50).
_FLOOR_EPS = 1e-6


def lt_class_counts(n_max: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """Per-class training counts of the long-tailed subset.

    n_c = floor(n_max * IF^(-c / (C - 1)))  for c = 0..C-1, so n_0 = n_max and n_{C-1} = n_max / IF.
    Class 0 is the most frequent. Returns int64 [C].
    """
    if not math.isfinite(imbalance_factor) or imbalance_factor < 1:
        raise ArgseError(
            field="imbalance_factor",
            problem=f"imbalance factor {imbalance_factor} is below 1",
            fix="use a value >= 1 (1 = balanced, 100 = the usual CIFAR-LT setting)",
        )
    if int(num_classes) < 1:
        raise ArgseError("num_classes", f"{num_classes} classes", "use at least one class")
    if int(n_max) < 1:
        raise ArgseError("n_max", f"{n_max} images for the largest class", "use n_max >= 1")
    C = int(num_classes)
    if C == 1:
        return np.array([int(n_max)], dtype=np.int64)
    counts = np.array(
        [math.floor(n_max * imbalance_factor ** (-c / (C - 1)) + _FLOOR_EPS) for c in range(C)],
        dtype=np.int64,
    )
    if counts.min() < 1:
        raise ArgseError(
            field="imbalance_factor",
            problem=(
                f"imbalance factor {imbalance_factor} with n_max={n_max} leaves class "
                f"{int(np.argmin(counts))} with 0 training images"
            ),
            fix=f"use an imbalance factor <= {n_max}",
        )
    return counts


def lt_class_counts_from_labels(
    y: np.ndarray, num_classes: int, imbalance_factor: float
) -> np.ndarray:
    """lt_class_counts with n_max = the smallest per-class count of the (balanced) labels y."""
    per_class = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes)
    return lt_class_counts(int(per_class.min()), num_classes, imbalance_factor)


def lt_subsample(y: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a random per-class subset: counts[c] items drawn without replacement from class c.

    Returns sorted int64 indices into y. Deterministic for a given seeded numpy Generator.
    """
    y = np.asarray(y, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    picked = []
    for c, n_c in enumerate(counts):
        pool = np.flatnonzero(y == c)
        if n_c < 0:
            raise ArgseError("class_counts", f"class {c} has a negative count", "use counts >= 0")
        if n_c > len(pool):
            raise ArgseError(
                field="imbalance_factor",
                problem=f"class {c} needs {int(n_c)} training images but the data has {len(pool)}",
                fix="lower n_max / the imbalance factor or use the full training set",
            )
        picked.append(rng.choice(pool, size=int(n_c), replace=False))
    if not picked:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(picked)).astype(np.int64)
