"""One evaluation protocol for every method (AR-GSE, its ablations and every baseline).

**Refit view (the headline).** A plug-in method's risk-coverage curve is traced as the paper does:
at each coverage q of the grid 0.01..1.00 its rule (alpha, mu[, beta]) is re-fitted by the one core
(:mod:`argse_cli.core.plugin_fit`; Algorithm 1, or Algorithm 2 for the worst-group methods) on
validation data only -- alpha's fixed point on tuneV, lambda chosen on val_small (Algorithm 2:
S1 = tuneV, S2 = val_small) -- then read on test at coverage q (:mod:`argse_cli.metrics.refit`).
Each view (long-tailed ``w_lt`` or balanced ``w_bal`` weights) has its own fit: coverage and
errors under the view's weights, alpha's fixed point under the training prior ``w_lt`` (Theorem 1:
eta is P_train(y|x)). Chow-type rules have nothing to refit: their curve is their threshold sweep.

**Sweep view (secondary).** Each plug-in rule fitted once, at its cost-matched operating point for
the rejection cost c (long-tailed view), its margin swept over test.

Test labels are used only to score a rule (and, through the view's weights, to measure coverage);
never to fit alpha, mu, beta, lambda, q or an epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

VIEWS = ("lt", "bal")
WEIGHT_OF_VIEW = {"lt": "w_lt", "bal": "w_bal"}
FIT_SPLIT, SELECT_SPLIT = "tuneV", "val_small"
FIT_ROWS_MAX = 10_000
"""The rule is fitted on at most this many tuneV rows (a larger tuneV is subsampled, class-stratified,
seed 0): the fixed point estimates K P(accept, y in G_k), for which 1e4 rows give ~1% precision,
and the fit's cost grows linearly with the rows."""
PROTOCOL_TEXT = (
    "refit view: at each coverage 0.01..1.00 the rule is re-fitted on validation data (alpha's fixed "
    "point on tuneV, lambda chosen on val_small; Algorithm 2: S1 = tuneV, S2 = val_small) and read on "
    "test at that coverage; sweep view: one rule at the cost-matched operating point, its margin swept "
    "over test; Chow-type rules: threshold sweep"
)


def method_name(gate_cfg: dict) -> str:
    """The table name of an AR-GSE gate from its train-gate config."""
    name = "AR-GSE (worst)" if gate_cfg.get("beta") == "worst" else "AR-GSE (balanced)"
    if gate_cfg.get("uniform_gate"):
        name += " uniform gate"
    return name


@dataclass
class Decisions:
    """One rule on the test rows: the mixture ``eta`` [N, C], ``pred`` = h(x) [N] and the
    ``score`` = margin m(x) [N] (accept iff m(x) >= 0)."""

    eta: Any
    pred: Any
    score: Any


def views_of(Mx: Any, A: Any, E: Any, d: dict, class_to_group: Any, views: Sequence[str] = VIEWS) -> dict:
    """{view: Split}: the core's view of one split (eta's group statistics, the view's weights for
    coverage and errors, the training-prior weights w_lt for alpha's fixed point)."""
    from .core.plugin_fit import Split

    return {v: Split.from_stats(Mx, A, E, d["y"], class_to_group, w=d[WEIGHT_OF_VIEW[v]], w_prior=d["w_lt"])
            for v in views}


def fit_rows(y: Any, cap: int = FIT_ROWS_MAX, seed: int = 0) -> np.ndarray | None:
    """Row indices (sorted) of a class-stratified subsample of size ~cap, or None if len(y) <= cap."""
    y = np.asarray(y)
    if len(y) <= cap:
        return None
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(cap * len(idx) / len(y))))
        keep.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


def views_of_eta(eta: Any, d: dict, class_to_group: Any, views: Sequence[str] = VIEWS) -> dict:
    from .core.plugin_fit import group_stats

    return views_of(*group_stats(eta, class_to_group), d, class_to_group, views)


def fit_curves(splits: dict[str, dict], *, worst: bool = False, T: int = 10, xi: float = 1.0) -> dict[str, Any]:
    """{view: PluginCurve} of one method from ``splits[split][view]`` (:func:`views_of`):
    Algorithm 1 (``worst`` False; fit on tuneV, lambda on val_small) or Algorithm 2 (S1 = tuneV,
    S2 = val_small) at every coverage."""
    from .core.plugin_fit import fit_curve, fit_worst_curve

    out = {}
    for v in splits[FIT_SPLIT]:
        fit, sel = splits[FIT_SPLIT][v], splits[SELECT_SPLIT][v]
        out[v] = fit_worst_curve(fit, sel, T=T, xi=xi) if worst else fit_curve(fit, sel)
    return out


def operating_rule(curves: dict[str, Any], c: float, view: str = "lt") -> tuple[Any, float]:
    """(rule, q*) at the cost-matched operating point of the view's curve (cost-matched Algorithm 1)."""
    from .core.plugin_fit import cost_operating_point

    i = cost_operating_point(curves[view], c)
    return curves[view].rule(i), float(curves[view].coverages[i])


def score_curves(curves: dict[str, Any], eta_test: Any, test: dict, class_to_group: Any) -> dict[str, tuple]:
    """{view: (score [Q, N] float32, pred [Q, N] int64)} of the refitted rules on test."""
    from .core.plugin_fit import curve_scores

    out = {}
    for v, cur in curves.items():
        S, P = curve_scores(cur, views_of_eta(eta_test, test, class_to_group, (v,))[v])
        out[v] = (S.astype(np.float32), P.astype(np.int64))
    return out


def refit_metrics(scored: dict[str, tuple], test: dict, class_to_group: Any, *,
                  levels: Sequence[float] = (0.7, 0.8, 0.9), n_boot: int = 1000, seed: int = 0) -> dict:
    """Per view: the refitted curve, its three AURCs, errors at ``levels`` and bootstrap CIs."""
    from .metrics import AURC_CONVENTION
    from .metrics.refit import bootstrap_refit, refit_aurc, refit_rc

    out: dict[str, Any] = {"aurc_convention": AURC_CONVENTION, "protocol": PROTOCOL_TEXT, "views": {}}
    for v, (S, P) in scored.items():
        w = test[WEIGHT_OF_VIEW[v]]
        curve = refit_rc(S, P, test["y"], class_to_group, w, view=v)
        d: dict[str, Any] = {
            "aurc": {k: refit_aurc(curve, k) for k in ("standard", "balanced", "worst")},
            "errors_at_coverage": _at_levels(curve, levels),
            "curve": curve.to_dict(),
        }
        if n_boot:
            d["bootstrap"] = bootstrap_refit([(S, P)], test["y"], class_to_group, w, levels=levels,
                                             n_boot=n_boot, seed=seed)[0]
        out["views"][v] = d
    return out


def _at_levels(curve: Any, levels: Sequence[float]) -> dict[str, Any]:
    idx = [int(np.argmin(np.abs(curve.coverage - lv))) for lv in levels]
    return {"levels": list(levels),
            "balanced_error": [float(curve.balanced_risk[i]) for i in idx],
            "worst_group_error": [float(curve.worst_risk[i]) for i in idx],
            "risk": [float(curve.risk[i]) for i in idx]}


def evaluate_scores(
    score: Any,
    pred: Any,
    y: Any,
    class_to_group: Any,
    weights: dict[str, Any],
    *,
    levels: Sequence[float] = (0.7, 0.8, 0.9),
    n_boot: int = 1000,
    seed: int = 0,
    probs: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sweep-view metrics of one score for each view; returns (metrics, rc curves by view)."""
    from .metrics import (
        AURC_CONVENTION,
        augrc,
        aurc,
        bootstrap_rc,
        e_aurc,
        ece,
        errors_at_coverage,
        geifman_aurc,
        nll,
        rc_curve,
        selective_metrics,
    )

    out: dict[str, Any] = {"aurc_convention": AURC_CONVENTION, "views": {}}
    curves = {}
    for view, w in weights.items():
        curve = rc_curve(score, pred, y, class_to_group, w, view=view)
        curves[view] = curve
        d: dict[str, Any] = {
            "at_margin_0": selective_metrics(score, pred, y, class_to_group, w, 0.0, view),
            "aurc": {k: aurc(curve, k) for k in ("standard", "balanced", "worst")},
            "augrc": augrc(curve, "standard"),
            "errors_at_coverage": errors_at_coverage(curve, levels),
        }
        if n_boot:
            d["bootstrap"] = bootstrap_rc(score, pred, y, class_to_group, w, n_boot=n_boot, seed=seed,
                                          levels=levels, view=view)
        if probs is not None:
            d["ece"] = ece(probs, y, n_bins=15, w=w)
            d["nll"] = nll(probs, y, w=w)
        out["views"][view] = d
    out["unweighted"] = {
        "geifman_aurc": geifman_aurc(score, pred, y),
        "e_aurc": e_aurc(score, pred, y),
        "note": "Geifman's exact AURC and E-AURC over the test samples as drawn (unit weights)",
    }
    return out, curves


def view_metrics(scored: dict[str, tuple], dec: Decisions, test: dict, class_to_group: Any, *,
                 levels: Sequence[float], n_boot: int, seed: int, progress: Any) -> tuple[dict, dict, dict]:
    """(refit metrics, sweep metrics, sweep curves by view) of a rule on test, one view at a time
    (the same numbers as all views in one call): a progress step per view and protocol."""
    n_steps, refit, sweep, curves = 2 * len(VIEWS), None, None, {}
    for i, v in enumerate(VIEWS, 1):
        r = refit_metrics({v: scored[v]}, test, class_to_group, levels=levels, n_boot=n_boot, seed=seed)
        refit = r if refit is None else {**refit, "views": {**refit["views"], **r["views"]}}
        progress(i, n_steps, {"protocol": "refit", "view": v})
    for i, v in enumerate(VIEWS, len(VIEWS) + 1):
        sw, cv = evaluate_scores(dec.score, dec.pred, test["y"], class_to_group, {v: test[WEIGHT_OF_VIEW[v]]},
                                 levels=levels, n_boot=n_boot, seed=seed, probs=dec.eta)
        sweep = sw if sweep is None else {**sweep, "views": {**sweep["views"], **sw["views"]}}
        curves.update(cv)
        progress(i, n_steps, {"protocol": "sweep", "view": v})
    return refit, sweep, curves
