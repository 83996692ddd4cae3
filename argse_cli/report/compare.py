"""Pooling results over folds and seeds, statistics with bootstrap CIs, paired comparisons.

A *result* is one method and seed evaluated on one test set (a *fold*: a holdout protocol has one;
cross-fitting has one per fold, each with its own rules fitted on the other folds). Pooled over the
folds (in a fixed fold order), a (method, seed) has one score per test row:

- plug-in methods: the refitted rules' scores ``refit[view] = (S [Q, N], P [Q, N])``
  (:mod:`argse_cli.metrics.refit`) -- the headline;
- every method: its sweep score (the operating point's margin, or Chow's max-probability margin).

Statistics (:func:`argse_cli.metrics.bootstrap.stat_names`): the three AURCs and the balanced /
worst-group errors at the levels. For a method with several seeds the table shows mean +- std over
seeds; its CI is the percentile interval of the **seed-mean** statistic over class-stratified
bootstrap resamples of the test rows (every method and seed on the SAME resamples: the resamples
depend only on the pooled labels, ``n_boot`` and the seed). A comparison A - B uses the same
resamples: the CI of mean_seeds(stat_A) - mean_seeds(stat_B); "A beats B" iff its upper end is < 0.
Chow-type methods have no refit: their refit-view row is their sweep curve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

VIEWS = ("lt", "bal")
W_OF = {"lt": "w_lt", "bal": "w_bal"}
COMPARE_STATS = ("aurc_balanced", "aurc_worst")
COMPARE_TARGETS = ("U-PI", "SB-PI", "Plug-in[Worst]")
"""The plug-in baselines AR-GSE is compared with (and every CS-plug-in); also the 'headline' bands."""


@dataclass
class Result:
    """One (method, seed) on one fold. ``load()`` returns the test arrays: y, class_to_group,
    w_lt, w_bal, score, pred (sweep), refit {view: (S, P)} or None, source_index or None."""

    name: str
    method: str
    seed: int
    kind: str  # "main" (an eval) | "baseline" | "ablation" | "sensitivity"
    setting: str | None
    fold: str  # the test set's identity (the export / import key)
    source: str
    load: Callable[[], dict] = field(repr=False)
    info: dict = field(default_factory=dict)
    gate: Callable[[], Any] | None = field(default=None, repr=False)
    fold_content: str = ""  # xxh3 of the fold's test logits: orders the folds (:func:`fold_order`)


@dataclass
class Pooled:
    """A (method, seed) pooled over the folds (rows concatenated in fold order)."""

    name: str
    seed: int
    kind: str
    setting: str | None
    y: np.ndarray
    c2g: np.ndarray
    w: dict[str, np.ndarray]
    sweep: tuple[np.ndarray, np.ndarray]
    refit: dict[str, tuple[np.ndarray, np.ndarray]] | None
    parts: list[Result]


@dataclass
class Methods:
    """The pooled methods' names by kind, in table order: the evals (AR-GSE variants), the
    baselines, the ablations and the sensitivity gates; ``targets``: the baselines AR-GSE is
    compared with (``COMPARE_TARGETS`` and every CS-plug-in)."""

    evals: list[str]
    baselines: list[str]
    ablations: list[str]
    sensitivity: list[str]

    @classmethod
    def of(cls, pooled: dict) -> Methods:
        kinds = ["main", "baseline", "ablation", "sensitivity"]
        order = sorted(pooled, key=lambda k: (kinds.index(pooled[k].kind), k))
        names = {kind: list(dict.fromkeys(k[0] for k in order if pooled[k].kind == kind)) for kind in kinds}
        return cls(names["main"], names["baseline"], names["ablation"], names["sensitivity"])

    @property
    def main(self) -> list[str]:
        return self.evals + self.baselines

    @property
    def targets(self) -> list[str]:
        return [n for n in self.baselines if n in COMPARE_TARGETS or n.startswith("CS-plug-in")]


def cached(fn: Callable[[], Any]) -> Callable[[], Any]:
    box: list[Any] = []

    def get() -> Any:
        if not box:
            box.append(fn())
        return box[0]

    return get


def fold_order(results: Sequence[Result]) -> list[str]:
    """The folds in a content-defined order: by the xxh3 of each fold's test logits (then its key).

    Pooled rows are concatenated in this order and the class-stratified bootstrap draws positions,
    so the order decides which resamples are drawn. Sorting by the artifact key would tie the CIs
    and p-values to the keys, which move with any upstream VERSION bump although no number does;
    the data's own checksum does not."""
    content = {r.fold: r.fold_content for r in results}
    return sorted(content, key=lambda f: (content[f], f))


def pool(results: Sequence[Result], folds: Sequence[str],
         progress: Callable[[int, int, dict], None] | None = None) -> tuple[dict[tuple[str, int], Pooled], list[str]]:
    """Pool each (name, seed) over ``folds`` (their order); results missing a fold are dropped with a
    warning. The folds' test rows must be disjoint (by source index, when recorded). ``progress(i, n,
    stats)`` is called after each (name, seed) is loaded."""
    warnings: list[str] = []
    by: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        d = by.setdefault((r.name, r.seed), {})
        if r.fold in d:
            warnings.append(f"{r.name} seed {r.seed}: {r.source} duplicates {d[r.fold].source}; kept the first")
            continue
        d[r.fold] = r
    out: dict[tuple[str, int], Pooled] = {}
    for i, (key, d) in enumerate(by.items(), 1):
        if set(d) != set(folds):
            warnings.append(f"{key[0]} seed {key[1]}: results for {len(d)} of {len(folds)} folds; left out")
        else:
            out[key] = _pooled(key, [d[f] for f in folds])
        if progress is not None:
            progress(i, len(by), {"method": key[0], "seed": key[1]})
    return out, warnings


def _pooled(key: tuple[str, int], parts: list[Result]) -> Pooled:
    """One (method, seed): its folds' rows concatenated in fold order."""
    arrs = [p.load() for p in parts]
    refit = None
    if all(a.get("refit") for a in arrs):
        refit = {v: (np.concatenate([a["refit"][v][0] for a in arrs], axis=1),
                     np.concatenate([a["refit"][v][1] for a in arrs], axis=1)) for v in VIEWS}
    return Pooled(
        name=key[0], seed=key[1], kind=parts[0].kind, setting=parts[0].setting,
        y=np.concatenate([a["y"] for a in arrs]), c2g=np.asarray(arrs[0]["class_to_group"]),
        w={v: np.concatenate([a[W_OF[v]] for a in arrs]) for v in VIEWS},
        sweep=(np.concatenate([a["score"] for a in arrs]), np.concatenate([a["pred"] for a in arrs])),
        refit=refit, parts=parts,
    )  # fmt: skip


def check_disjoint(results: Sequence[Result], folds: Sequence[str]) -> dict[str, Any]:
    """Rows per fold; raises if two folds share a source image (when source indices are recorded)."""
    firsts = {f: next(r for r in results if r.fold == f) for f in folds}
    seen: dict[int, str] = {}
    rows = {}
    for f, r in firsts.items():
        a = r.load()
        rows[f] = int(len(a["y"]))
        src = a.get("source_index")
        if src is None:
            continue
        for i in np.asarray(src).tolist():
            if i in seen and seen[i] != f:
                raise AssertionError(f"test folds {seen[i][:12]} and {f[:12]} share source image {i}")
            seen[i] = f
    return {"n_folds": len(folds), "rows": rows, "source_checked": bool(seen)}


def _samples(p: Pooled, view: str, protocol: str, levels: Sequence[float], n_boot: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(estimate [S], bootstrap samples [B, S]) of one pooled (method, seed)."""
    from ..metrics.bootstrap import bootstrap_rc, stat_names
    from ..metrics.refit import bootstrap_refit

    names = stat_names(levels)
    if protocol == "refit" and p.refit is not None:
        S, P = p.refit[view]
        r = bootstrap_refit([(S, P)], p.y, p.c2g, p.w[view], levels=levels, n_boot=n_boot, seed=seed,
                            return_samples=True)[0]
    else:
        score, pred = p.sweep
        r = bootstrap_rc(score, pred, p.y, p.c2g, p.w[view], n_boot=n_boot, seed=seed, levels=levels,
                         return_samples=True)
    est = np.array([r["stats"][n]["estimate"] for n in names])
    return est, r["samples"]


@dataclass
class MethodStats:
    """Per-seed estimates [n_seeds, S], the seed-mean bootstrap samples [B, S], the seeds."""

    seeds: list[int]
    est: np.ndarray
    samples: np.ndarray


def method_stats(pooled: dict[tuple[str, int], Pooled], names: Sequence[str], view: str, protocol: str,
                 levels: Sequence[float], n_boot: int, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict[str, MethodStats]:
    out = {}
    for name in names:
        keys = sorted(k for k in pooled if k[0] == name)
        if not keys:
            continue
        if progress is not None:
            progress(f"{protocol} view ({view}): bootstrap of {name} ({len(keys)} seed(s), {n_boot} resamples)")
        per = [_samples(pooled[k], view, protocol, levels, n_boot, seed) for k in keys]
        out[name] = MethodStats([k[1] for k in keys], np.stack([e for e, _ in per]),
                                np.mean([s for _, s in per], axis=0))
    return out


def interval(samples: np.ndarray, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.percentile(samples, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2], axis=0)
    return lo, hi


def compare(a: MethodStats, b: MethodStats, ci: float = 0.95) -> dict[str, np.ndarray]:
    """diff = mean_seeds(A) - mean_seeds(B) on the sample and its paired-bootstrap CI [lo, hi]."""
    d = a.samples - b.samples
    lo, hi = interval(d, ci)
    return {"diff": a.est.mean(axis=0) - b.est.mean(axis=0), "lo": lo, "hi": hi}


def holm(pvals: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    m = len(pvals)
    order = sorted(range(m), key=lambda i: pvals[i])
    adj, run = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (m - rank) * pvals[i]))
        adj[i] = run
    return adj


def comparisons(doc: dict, stats: Callable, eval_names: list[str], targets: list[str], snames: list[str]) -> None:
    """AR-GSE (balanced / worst) against ``targets`` (refit view): ``doc["comparisons"]`` (per view and
    statistic: the paired difference, its CI, a two-sided bootstrap p-value, Holm's adjustment across
    all of them, the outcome) and ``doc["verdict"]``; ``stats(view, protocol, names)`` gives the
    methods' :class:`MethodStats`."""
    rows = []
    for view in VIEWS:
        ms = stats(view, "refit", eval_names + targets)
        for a in [n for n in eval_names if n.startswith("AR-GSE") and n in ms]:
            for b in [n for n in targets if n in ms]:
                c = compare(ms[a], ms[b])
                d = ms[a].samples - ms[b].samples
                for stat in COMPARE_STATS:
                    j = snames.index(stat)
                    p = float(min(1.0, 2 * min(np.mean(d[:, j] <= 0), np.mean(d[:, j] >= 0))))
                    rows.append({"a": a, "b": b, "view": view, "stat": stat, "diff": float(c["diff"][j]),
                                 "lo": float(c["lo"][j]), "hi": float(c["hi"][j]), "p": p})
    for r, ph in zip(rows, holm([r["p"] for r in rows]), strict=True):
        r["p_holm"] = ph
        r["outcome"] = "win" if r["hi"] < 0 else "loss" if r["lo"] > 0 else "tie"
        r["outcome_holm"] = r["outcome"] if ph < 0.05 else "tie"
    doc["comparisons"] = rows
    wins = [r for r in rows if r["outcome_holm"] == "win"]
    losses = [r for r in rows if r["outcome_holm"] == "loss"]
    doc["verdict"] = {"n": len(rows), "wins": len(wins), "losses": len(losses),
                      "wins_raw": sum(r["outcome"] == "win" for r in rows),
                      "losses_raw": sum(r["outcome"] == "loss" for r in rows)}
