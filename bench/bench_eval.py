"""Benchmark: class-stratified bootstrap of the risk-coverage statistics (CPU).

N = 10,000 synthetic samples (C = 10 classes, 2 groups, long-tailed), 1,000 resamples,
3 AURCs (standard, group-balanced, worst-group) + 6 errors@coverage (balanced and worst at
0.7 / 0.8 / 0.9), balanced-view weights. Median wall time of 3 repeats; prints one JSON line.

    python bench/bench_eval.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import commit as _commit  # noqa: E402

from argse_cli.metrics import bootstrap_rc  # noqa: E402

REFERENCE_S = 2.0
N, C, N_BOOT, REPEATS = 10_000, 10, 1_000, 3


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    prior = np.exp(-0.35 * np.arange(C))
    y = rng.choice(C, size=N, p=prior / prior.sum())
    class_to_group = (np.arange(C) >= 3).astype(np.int64)  # 3 head classes, 7 tail
    correct = rng.random(N) < np.where(class_to_group[y] == 0, 0.85, 0.6)
    pred = np.where(correct, y, (y + 1 + rng.integers(0, C - 1, N)) % C)
    score = rng.normal(size=N) + 1.5 * correct  # a margin-like confidence
    w_bal = N / (C * np.bincount(y, minlength=C)[y])
    return score, pred, y, class_to_group, w_bal


def main() -> None:
    score, pred, y, c2g, w = _problem()
    bootstrap_rc(score, pred, y, c2g, w, n_boot=20, seed=1)  # warm-up (imports, caches)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = bootstrap_rc(score, pred, y, c2g, w, n_boot=N_BOOT, seed=0, view="bal")
        times.append(time.perf_counter() - t0)
    assert len(out["stats"]) == 9
    value = statistics.median(times)
    print(
        json.dumps(
            {
                "name": "eval_bootstrap",
                "value": round(value, 4),
                "unit": "s",
                "reference": REFERENCE_S,
                "ratio": round(value / REFERENCE_S, 4),
                "device": "cpu",
                "commit": _commit(),
            }
        )
    )


if __name__ == "__main__":
    main()
