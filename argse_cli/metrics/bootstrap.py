"""Class-stratified bootstrap confidence intervals for the risk-coverage statistics.

Resampling: within every class the samples are drawn with replacement, class sizes kept
(:func:`class_stratified_indices`). A resample b is the original sample with count weights
``w_b = w * bincount(idx_b)``, so the score order (tie blocks) is shared by all resamples: the
samples are ordered ONCE by (group x error flag, tie block), and per chunk of resamples we need
one ``bincount`` of the draws, one cumulative sum [B, N + 1] in float64, a vectorised binary
search over the tie-block boundaries for every target coverage, and the same fractional
tie-block interpolation as :func:`argse_cli.metrics.rc.rc_curve`. No Python loop over samples;
the resamples are processed in chunks of up to 128 (<= 1e6 resample x sample entries).

Statistics (names): ``aurc_standard``, ``aurc_balanced``, ``aurc_worst`` (mean risk over the grid
0.01..1.00, :data:`~argse_cli.metrics.rc.AURC_CONVENTION`) and, for each level l,
``balanced_error@l`` and ``worst_error@l``. CIs are percentile intervals
``[q_{(1-ci)/2}, q_{(1+ci)/2}]`` of the bootstrap distribution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from argse_cli.metrics.rc import (
    AURC_CONVENTION,
    COVERAGE_GRID,
    _accepted_at,
    _Blocks,
    _blocks,
    _cum_weights,
    _risks,
)
from argse_cli.metrics.selective import _labels

__all__ = [
    "bootstrap_rc",
    "class_stratified_indices",
    "paired_bootstrap_diff",
    "stat_names",
]

_CELL_BUDGET = 1_000_000  # resamples x samples per chunk (8 MB of float64)
_CI_METHOD = "class-stratified bootstrap, percentile interval"


def stat_names(levels: Sequence[float] = (0.7, 0.8, 0.9)) -> list[str]:
    """Names of the bootstrapped statistics, in column order."""
    names = ["aurc_standard", "aurc_balanced", "aurc_worst"]
    for lv in levels:
        names += [f"balanced_error@{lv:g}", f"worst_error@{lv:g}"]
    return names


class _Stratified:
    """Class-stratified resampling plan: draws are positions in the class-sorted order.

    ``order`` sorts the samples by class (stable); for the sorted position q of class c
    (``start_c <= q < start_c + n_c``) a draw is ``start_c + floor(u * n_c)``, u ~ U[0, 1),
    one uniform per (resample, position) from ``np.random.default_rng(seed).random`` in
    row-major order (so the draws do not depend on how the rows are chunked).
    """

    def __init__(self, y: Any, n_boot: int, seed: int) -> None:
        y = _labels(y)
        if n_boot < 1 or y.shape[0] == 0:
            raise ValueError("need n_boot >= 1 and a non-empty y")
        self.n, self.n_boot = int(y.shape[0]), int(n_boot)
        self.order = np.argsort(y, kind="stable")
        _, start, count = np.unique(y[self.order], return_index=True, return_counts=True)
        cls = np.repeat(np.arange(count.shape[0]), count)
        self.start, self.count = start[cls], count[cls]
        self.rng = np.random.default_rng(seed)

    def chunks(self, rows: int):
        """Yield (r0, r1, positions [r1 - r0, N]) for consecutive blocks of resamples."""
        for r0 in range(0, self.n_boot, rows):
            r1 = min(self.n_boot, r0 + rows)
            u = self.rng.random((r1 - r0, self.n))
            u *= self.count
            k = u.astype(np.int64)
            np.minimum(k, self.count - 1, out=k)
            k += self.start
            yield r0, r1, k


def class_stratified_indices(y: Any, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Resample indices [n_boot, N] (int64), drawn with replacement WITHIN each class.

    Column i of every row holds a sample of class y_i, so each resample keeps the class counts
    exactly. Deterministic given ``seed``; :func:`bootstrap_rc` with the same seed uses exactly
    these resamples (up to the order inside a row, which no statistic depends on).
    """
    plan = _Stratified(y, n_boot, seed)
    out = np.empty((plan.n_boot, plan.n), dtype=np.int64)
    for r0, r1, pos in plan.chunks(max(1, 2_000_000 // plan.n)):
        out[r0:r1, plan.order] = plan.order[pos]
    return out


def _chunk_rows(bl: _Blocks, chunk: int) -> int:
    return max(1, min(int(chunk), _CELL_BUDGET // (bl.w_ch.shape[0] + 1)))


def _levels(levels: Sequence[float]) -> np.ndarray:
    lv = np.asarray(levels, dtype=np.float64).reshape(-1)
    if np.any(~np.isfinite(lv)) or np.any(lv < 0) or np.any(lv > 1):
        raise ValueError("levels must lie in [0, 1]")
    return lv


def _stats_of(S: np.ndarray, bl: _Blocks, lv: np.ndarray) -> np.ndarray:
    """Statistics [B, 3 + 2 L] from cumulative weights S [B, N + 1] (see rc._cum_weights)."""
    G = COVERAGE_GRID.shape[0]
    A, E, Wk = _accepted_at(S, bl, np.concatenate([COVERAGE_GRID, lv]))
    r = _risks(A, E, Wk)
    out = np.empty((S.shape[0], 3 + 2 * lv.shape[0]), dtype=np.float64)
    out[:, 0] = r["risk"][:, :G].mean(axis=1)
    out[:, 1] = r["balanced_risk"][:, :G].mean(axis=1)
    out[:, 2] = r["worst_risk"][:, :G].mean(axis=1)
    out[:, 3::2] = r["balanced_risk"][:, G:]
    out[:, 4::2] = r["worst_risk"][:, G:]
    return out


def _boot_stats(
    bls: Sequence[_Blocks],
    lv: np.ndarray,
    plan: _Stratified | None,
    indices: np.ndarray | None,
    chunk: int = 128,
) -> list[np.ndarray]:
    """Per-resample statistics [B, S] of every method in ``bls`` on the SAME resamples."""
    rows = min(_chunk_rows(bl, chunk) for bl in bls)
    B = plan.n_boot if plan is not None else indices.shape[0]
    outs = [np.empty((B, 3 + 2 * lv.shape[0]), dtype=np.float64) for _ in bls]
    if plan is not None:
        # draws are class-sorted positions: map them straight to (channel, block) positions
        posmaps = [bl.chpos[plan.order] for bl in bls]
        it = plan.chunks(rows)
    else:
        posmaps = [bl.chpos for bl in bls]
        it = ((r0, min(B, r0 + rows), indices[r0 : r0 + rows]) for r0 in range(0, B, rows))
    for r0, r1, pos in it:
        for bl, pm, out in zip(bls, posmaps, outs, strict=True):
            out[r0:r1] = _stats_of(_cum_weights(bl, pos, pm), bl, lv)
    return outs


def _interval(samples: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < ci < 1:
        raise ValueError("ci must lie in (0, 1)")
    q = 100.0 * np.array([(1 - ci) / 2, (1 + ci) / 2])
    lo, hi = np.percentile(samples, q, axis=0)
    return lo, hi


def bootstrap_rc(
    score: Any,
    pred: Any,
    y: Any,
    class_to_group: Any,
    w: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    levels: Sequence[float] = (0.7, 0.8, 0.9),
    ci: float = 0.95,
    view: str = "lt",
    indices: np.ndarray | None = None,
    return_samples: bool = False,
) -> dict[str, Any]:
    """Percentile CIs of the 3 AURCs and the group-balanced / worst-group errors at ``levels``.

    Point estimates are the statistics of the original sample (identical to :func:`rc_curve` +
    :func:`aurc` / :func:`errors_at_coverage`). ``indices`` [B, N] overrides the class-stratified
    resamples drawn from (``n_boot``, ``seed``). Returns
    ``{"view", "n_boot", "seed", "ci", "method", "convention", "stats": {name: {"estimate",
    "lo", "hi"}}}`` (+ ``"samples"`` [B, S] if ``return_samples``).
    """
    bl = _blocks(score, pred, y, class_to_group, w)
    lv = _levels(levels)
    plan = None
    if indices is None:
        plan = _Stratified(y, n_boot, seed)
    else:
        indices = np.asarray(indices)
        if indices.ndim != 2 or indices.shape[1] != bl.w_ch.shape[0]:
            raise ValueError("indices must be [n_boot, N]")
    names = stat_names(lv)
    est = _stats_of(_cum_weights(bl), bl, lv)[0]
    (samples,) = _boot_stats([bl], lv, plan, indices)
    lo, hi = _interval(samples, ci)
    out: dict[str, Any] = {
        "view": view,
        "n_boot": int(samples.shape[0]),
        "seed": int(seed) if indices is None else None,
        "ci": float(ci),
        "method": _CI_METHOD,
        "convention": AURC_CONVENTION,
        "stats": {
            n: {"estimate": float(e), "lo": float(a), "hi": float(b)}
            for n, e, a, b in zip(names, est, lo, hi, strict=True)
        },
    }
    if return_samples:
        out["samples"] = samples
    return out


_ARG_NAMES = ("score", "pred", "y", "class_to_group", "w")


def _method_args(args: Any) -> dict[str, Any]:
    if isinstance(args, Mapping):
        d = {k: args[k] for k in _ARG_NAMES if k in args}
    elif isinstance(args, Sequence):
        if not 4 <= len(args) <= 5:
            raise ValueError("method args: (score, pred, y, class_to_group[, w])")
        d = dict(zip(_ARG_NAMES, args, strict=False))
    else:
        raise TypeError("method args must be a tuple or a dict")
    d.setdefault("w", None)
    missing = [k for k in _ARG_NAMES[:4] if k not in d]
    if missing:
        raise ValueError(f"method args miss {missing}")
    return d


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(np.asarray(a), np.asarray(b))


def paired_bootstrap_diff(
    method_a_args: Any,
    method_b_args: Any,
    n_boot: int = 1000,
    seed: int = 0,
    levels: Sequence[float] = (0.7, 0.8, 0.9),
    ci: float = 0.95,
    view: str = "lt",
) -> dict[str, Any]:
    """Paired bootstrap of (A - B) for every statistic, with the SAME resamples for A and B.

    ``method_*_args``: ``(score, pred, y, class_to_group[, w])`` or a dict with those keys; both
    methods must be evaluated on the same samples (equal y, class_to_group and w). Returns
    ``{"view", ..., "stats": {name: {"a", "b", "diff", "lo", "hi", "excludes_0"}}}`` where
    ``diff = stat(A) - stat(B)`` on the original sample and [lo, hi] is the percentile CI of
    the per-resample differences; ``excludes_0 = lo > 0 or hi < 0``.
    """
    a, b = _method_args(method_a_args), _method_args(method_b_args)
    for k in ("y", "class_to_group", "w"):
        if not _same(a[k], b[k]):
            raise ValueError(f"paired bootstrap needs the same {k} for both methods")
    bla = _blocks(a["score"], a["pred"], a["y"], a["class_to_group"], a["w"])
    blb = _blocks(b["score"], b["pred"], b["y"], b["class_to_group"], b["w"])
    lv = _levels(levels)
    est_a = _stats_of(_cum_weights(bla), bla, lv)[0]
    est_b = _stats_of(_cum_weights(blb), blb, lv)[0]
    sa, sb = _boot_stats([bla, blb], lv, _Stratified(a["y"], n_boot, seed), None)
    lo, hi = _interval(sa - sb, ci)
    names = stat_names(lv)
    return {
        "view": view,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "ci": float(ci),
        "method": "paired " + _CI_METHOD,
        "convention": AURC_CONVENTION,
        "stats": {
            n: {
                "a": float(ea),
                "b": float(eb),
                "diff": float(ea - eb),
                "lo": float(x),
                "hi": float(z),
                "excludes_0": bool(x > 0 or z < 0),
            }
            for n, ea, eb, x, z in zip(names, est_a, est_b, lo, hi, strict=True)
        },
    }
