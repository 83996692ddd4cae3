"""Leak-free, class-stratified splits: train / tuneV / val_small / calib / test.

Protocol "paper" (default; Narasimhan et al., ICLR 2024): train = the long-tailed (LT) subset of the
official TRAIN set; tuneV / val_small / calib / test = a class-stratified partition of the official,
balanced TEST set (default fractions 0.2 / 0.1 / 0.1 / 0.6).
Protocol "fractions": all five splits carved from the LT subset (default 0.80/0.08/0.06/0.03/0.03).

Every split carries two importance weights per sample so that a weighted split mimics a target
distribution:  w_lt = pi_train(y) / pi_split(y)  (long-tailed view) and  w_bal = (1/C) / pi_split(y)
(balanced view), with pi_train the LT training class frequencies and pi_split the split's own.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from argse_cli.data.longtail import lt_subsample
from argse_cli.errors import ArgseError

SPLITS = ("train", "tuneV", "val_small", "calib", "test")
HELDOUT = ("tuneV", "val_small", "calib", "test")
PROTOCOLS = ("paper", "fractions")
PAPER_FRACTIONS = {"tuneV": 0.2, "val_small": 0.1, "calib": 0.1, "test": 0.6}
LT_FRACTIONS = {"train": 0.80, "tuneV": 0.08, "val_small": 0.06, "calib": 0.03, "test": 0.03}
MIN_PER_GROUP = 10  # protocol "fractions" warns for any (split, group) with fewer samples
_FRAC_TOL = 1e-6


class LeakError(AssertionError):
    """Two splits share an image, a split repeats one, or a held-out split holds a train image."""


@dataclass
class SplitPart:
    """One split. indices point into the official array named by source ('train' or 'test')."""

    name: str
    source: str
    indices: np.ndarray  # int64, sorted
    labels: np.ndarray  # int64
    group: np.ndarray  # int64, class_to_group[labels]
    w_lt: np.ndarray  # float64, pi_train(y) / pi_split(y)
    w_bal: np.ndarray  # float64, (1/C) / pi_split(y)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class SplitResult:
    protocol: str
    fractions: dict[str, float]
    seed: int
    class_counts: np.ndarray  # LT train counts per class (defines pi_train)
    class_to_group: np.ndarray
    splits: dict[str, SplitPart]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def num_groups(self) -> int:
        return int(self.class_to_group.max()) + 1 if len(self.class_to_group) else 0

    def __getitem__(self, name: str) -> SplitPart:
        return self.splits[name]


def largest_remainder(n: int, fractions) -> np.ndarray:
    """Integer counts summing exactly to n, proportional to fractions (Hamilton's method).

    counts_i = floor(n * f_i) plus one for the (n - sum floor) entries with the largest fractional
    parts n*f_i - floor(n*f_i); ties go to the earlier entry. Fractions are normalised to sum 1;
    a zero fraction always gets 0.
    """
    f = np.asarray(list(fractions), dtype=np.float64)
    if n < 0 or (f < 0).any() or f.sum() <= 0:
        raise ArgseError(
            "fractions", f"cannot split {n} items by {f.tolist()}", "use fractions >= 0"
        )
    f = f / f.sum()
    exact = n * f
    counts = np.floor(exact + 1e-9).astype(np.int64)
    counts = np.minimum(counts, n)
    left = n - int(counts.sum())
    if left > 0:
        rem = np.where(f > 0, exact - counts, -np.inf)
        order = np.argsort(-rem, kind="stable")
        counts[order[:left]] += 1
    elif left < 0:  # only reachable through float noise; take back from the largest
        for i in np.argsort(-counts, kind="stable")[:-left]:
            counts[i] -= 1
    return counts


def stratified_partition(
    labels: np.ndarray,
    fractions: dict[str, float],
    rng: np.random.Generator,
    class_to_group: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Partition positions 0..len(labels)-1 into named splits, stratified by class.

    Per class: shuffle its positions with rng, then cut consecutive chunks of largest_remainder
    sizes. A class with fewer items than there are splits with a positive fraction is pooled with
    the other such classes of its group; each group pool is shuffled and cut the same way, so small
    classes keep their group represented in as many splits as possible.
    Returns {name: sorted int64 positions}.
    """
    labels = np.asarray(labels, dtype=np.int64)
    names = list(fractions)
    fr = [float(fractions[s]) for s in names]
    n_active = sum(1 for v in fr if v > 0)
    if class_to_group is None:
        class_to_group = np.zeros(int(labels.max()) + 1 if len(labels) else 0, dtype=np.int64)
    class_to_group = np.asarray(class_to_group, dtype=np.int64)
    out: dict[str, list[np.ndarray]] = {s: [] for s in names}
    pools: dict[int, list[np.ndarray]] = {}

    def cut(pos: np.ndarray) -> None:
        counts = largest_remainder(len(pos), fr)
        start = 0
        for s, k in zip(names, counts, strict=True):
            out[s].append(pos[start : start + k])
            start += k

    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        if len(pos) >= n_active:
            cut(pos)
        else:
            pools.setdefault(int(class_to_group[c]), []).append(pos)
    for g in sorted(pools):
        cut(rng.permutation(np.concatenate(pools[g])))
    return {
        s: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64)
        for s, v in out.items()
    }


def _check_fractions(fractions: dict[str, float], expected: tuple[str, ...], protocol: str):
    keys = set(fractions)
    if keys != set(expected):
        raise ArgseError(
            "fractions",
            f"protocol {protocol!r} needs fractions for exactly {list(expected)}, got {sorted(keys)}",
            f"give one fraction per split: {', '.join(expected)}",
        )
    bad = {k: v for k, v in fractions.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ArgseError("fractions", f"negative or non-finite fractions {bad}", "use values >= 0")
    total = float(sum(fractions.values()))
    if abs(total - 1.0) > _FRAC_TOL:
        raise ArgseError(
            "fractions", f"fractions sum to {total:.6g}, not 1", "make the fractions sum to 1"
        )


def split_weights(labels: np.ndarray, class_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w_lt, w_bal) per sample: w_lt = pi_train(y)/pi_split(y), w_bal = (1/C)/pi_split(y).

    pi_train(c) = class_counts[c] / sum(class_counts); pi_split(c) = n_split(c) / n_split.
    Classes absent from the split have no rows, so no division by zero occurs.
    """
    labels = np.asarray(labels, dtype=np.int64)
    cc = np.asarray(class_counts, dtype=np.float64)
    C = len(cc)
    if len(labels) == 0:
        return np.zeros(0), np.zeros(0)
    pi_train = cc / cc.sum()
    pi_split = np.bincount(labels, minlength=C).astype(np.float64) / len(labels)
    p = pi_split[labels]  # > 0 for every present label
    return pi_train[labels] / p, (1.0 / C) / p


def make_splits(
    y_train: np.ndarray,
    y_test: np.ndarray,
    counts_lt: np.ndarray,
    protocol: str = "paper",
    fractions: dict[str, float] | None = None,
    class_to_group: np.ndarray | None = None,
    seed: int = 0,
) -> SplitResult:
    """Draw the LT subset of the official train labels and the five splits; checks disjointness.

    Random streams: SeedSequence(seed) spawns one Generator for the LT subsample and one for the
    partition, so changing the partition fractions does not change the LT subset.
    """
    if protocol not in PROTOCOLS:
        raise ArgseError("protocol", f"unknown protocol {protocol!r}", "use paper or fractions")
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    counts_lt = np.asarray(counts_lt, dtype=np.int64)
    C = len(counts_lt)
    if class_to_group is None:
        class_to_group = np.zeros(C, dtype=np.int64)
    class_to_group = np.asarray(class_to_group, dtype=np.int64)
    if len(class_to_group) != C:
        raise ArgseError(
            "groups", f"class_to_group has {len(class_to_group)} entries for {C} classes",
            "build class_to_group from the LT class counts",
        )  # fmt: skip
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if len(y) and (y.min() < 0 or y.max() >= C):
            raise ArgseError("labels", f"{name} has labels outside [0, {C})", "check the dataset")
    ss_lt, ss_part = np.random.SeedSequence(seed).spawn(2)
    rng_lt, rng_part = np.random.default_rng(ss_lt), np.random.default_rng(ss_part)
    lt_idx = lt_subsample(y_train, counts_lt, rng_lt)

    notes: list[str] = []
    if protocol == "paper":
        fr = dict(PAPER_FRACTIONS if fractions is None else fractions)
        _check_fractions(fr, HELDOUT, protocol)
        fr = {s: float(fr[s]) for s in HELDOUT}
        parts = stratified_partition(y_test, fr, rng_part, class_to_group)
        placed = {"train": ("train", lt_idx)}
        placed.update({s: ("test", parts[s]) for s in HELDOUT})
    else:
        fr = dict(LT_FRACTIONS if fractions is None else fractions)
        _check_fractions(fr, SPLITS, protocol)
        fr = {s: float(fr[s]) for s in SPLITS}
        parts = stratified_partition(y_train[lt_idx], fr, rng_part, class_to_group)
        placed = {s: ("train", np.sort(lt_idx[parts[s]])) for s in SPLITS}

    splits: dict[str, SplitPart] = {}
    for s, (source, idx) in placed.items():
        idx = np.asarray(idx, dtype=np.int64)
        y = (y_train if source == "train" else y_test)[idx]
        w_lt, w_bal = split_weights(y, counts_lt)
        splits[s] = SplitPart(s, source, idx, y, class_to_group[y], w_lt, w_bal)

    result = SplitResult(protocol, fr, int(seed), counts_lt, class_to_group, splits, notes)
    if protocol == "fractions":
        for s, g, n in split_table(result):
            if n < MIN_PER_GROUP:
                msg = (
                    f"split {s} has only {n} samples of group {g} (< {MIN_PER_GROUP}); "
                    "metrics on it are noisy -- consider --protocol paper"
                )
                notes.append(msg)
                warnings.warn(msg, UserWarning, stacklevel=2)
    check_disjoint(result)
    return result


def check_disjoint(result: SplitResult) -> None:
    """Raise LeakError on any (source, index) repeated inside a split or shared by two splits.

    Sharing covers the case that matters most: a held-out split holding an image of the official
    TRAIN set that the experts train on.
    """
    owner: dict[tuple[str, int], str] = {}
    for s, part in result.splits.items():
        idx = np.asarray(part.indices, dtype=np.int64)
        uniq, cnt = np.unique(idx, return_counts=True)
        if (cnt > 1).any():
            raise LeakError(f"split {s} repeats {part.source} index {int(uniq[cnt > 1][0])}")
        for i in idx.tolist():
            key = (part.source, i)
            if key in owner:
                other = owner[key]
                if "train" in (s, other):
                    held = other if s == "train" else s
                    raise LeakError(
                        f"held-out split {held} contains {part.source} index {i}, "
                        "which the experts train on"
                    )
                raise LeakError(f"splits {other} and {s} share {part.source} index {i}")
            owner[key] = s


def split_table(result: SplitResult) -> list[tuple[str, int, int]]:
    """Rows (split, group, count) for every split and every group, zeros included."""
    K = result.num_groups
    rows = []
    for s, part in result.splits.items():
        counts = np.bincount(part.group, minlength=K)
        rows.extend((s, k, int(counts[k])) for k in range(K))
    return rows
