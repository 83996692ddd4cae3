"""One evaluation protocol for every method (AR-GSE, its ablations and every baseline).

*Sweep view* (main): the method's rule is fitted once on validation data; its score is its margin
(accept iff margin >= 0 at the fitted cost), and the risk-coverage curve sweeps a threshold over
that margin on test.

*Refit view*: at each coverage level, every plug-in method refits alpha and mu on validation data
at that coverage (Algorithm 1's fixed point, threshold at the validation quantile; AR-GSE with its
trained mixture held fixed) and is evaluated on test at the same coverage (the test threshold is
set from test margins alone, never test labels). Chow-type rules have nothing to refit: their
refit view equals their sweep view.

Both views are computed under the long-tailed (``w_lt``) and the balanced (``w_bal``) weights;
every output names its view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

VIEWS = ("lt", "bal")
WEIGHT_OF_VIEW = {"lt": "w_lt", "bal": "w_bal"}


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
    """Sweep-view metrics of one method for each view; returns (metrics, rc curves by view)."""
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


def refit_view(
    fit_eta: Callable[[str], Any],
    data: dict[str, dict],
    class_to_group: Any,
    coverages: Sequence[float],
    *,
    view: str,
    beta: Any = None,
    M: int = 10,
) -> dict[str, Any]:
    """Refit alpha, mu at each coverage on tuneV (lambda chosen on val_small); evaluate on test.

    The fixed point's P(accept, y in G_k) uses the training-prior weights ``w_lt`` (Theorem 1:
    eta is P_train(y|x)); errors and coverage use the view's weights.

    ``fit_eta(split) -> eta [N, C]`` gives the method's (fixed) posterior on a split;
    ``data[split]`` holds labels ``y`` and weights ``w_lt``/``w_bal``. Test labels are used only
    to score the refitted rule, never to fit or to threshold it.
    """
    from .baselines import fit_cs_plugin
    from .metrics import rc_curve

    wk = WEIGHT_OF_VIEW[view]
    eta_fit, eta_sel, eta_test = fit_eta("tuneV"), fit_eta("val_small"), fit_eta("test")
    t = data["test"]
    rows = []
    for cov in coverages:
        fit = fit_cs_plugin(
            eta_fit, data["tuneV"]["y"], data["tuneV"][wk], class_to_group,
            eta_sel=eta_sel, y_sel=data["val_small"]["y"], w_sel=data["val_small"][wk],
            w_prior=data["tuneV"]["w_lt"], target_coverage=float(cov), beta=beta, M=M,
        )
        rule = fit.rule
        # Measurement at matched coverage (as every RC curve does): read the refitted rule's test
        # curve at this coverage; alpha, mu and lambda never saw a test label.
        curve = rc_curve(rule.margin(eta_test), rule.predict(eta_test), t["y"], class_to_group, t[wk],
                         coverages=[float(cov)], view=view)
        rows.append({
            "coverage": float(cov), "balanced_error": float(curve.balanced_risk[0]),
            "worst_group_error": float(curve.worst_risk[0]), "risk": float(curve.risk[0]),
            "group_error": [float(v) for v in curve.group_error[0]], "alpha": np.asarray(rule.alpha).tolist(),
            "mu": np.asarray(rule.mu).tolist(), "widened": int(fit.widened),
        })
    return {"view": view, "rows": rows}
