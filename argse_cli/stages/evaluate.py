"""Stage `eval`: a trained gate's risk-coverage metrics on test, both views, bootstrap CIs.

Headline: the refit view -- the gate artifact's rules, fitted at every coverage 0.01..1.00 on
validation data (tuneV / val_small) by the one core, read on test at their coverage
(:mod:`argse_cli.evaluation`). Secondary: the sweep view of the operating-point rule.

Outputs: ``metrics.json`` (``refit`` and ``sweep``, each per view with AURCs, errors at the levels
and bootstrap CIs; the AURC convention stated), ``rc_curve.csv`` (plain CSV; its provenance in
``rc_curve.csv.json``), ``rc_curves.json``, figures,
and the test arrays for paired comparisons in `report`: ``refit/<view>/score`` [Q, N],
``refit/<view>/pred`` [Q, N], ``test/score`` (the operating point's margin), ``test/pred``,
labels, weights and source indices. Nothing here is fitted on test labels.
"""

from __future__ import annotations

from typing import Any

STAGE = "eval"
VERSION = 10


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..core.gated import load_gate_data
    from ..eval_extras import eval_extras
    from ..evaluation import VIEWS, Decisions, method_name, score_curves, view_metrics
    from ..report.eval_figures import EvalCurves, eval_figures
    from ..runtime import pin_threads

    pin_threads()
    gate_art = inputs["gate"]
    gr, data, exp = load_gate_data(gate_art, ("calib", "test"))
    c2g = np.asarray(exp.array("class_to_group"))
    t = data["test"]
    dec = Decisions(*gr.decide(t["post"]))
    progress.log(f"eval: {len(dec.score)} test rows; refit curves (100 coverages x {len(VIEWS)} views), "
                 f"{cfg.n_boot} bootstrap resamples")
    scored = score_curves(gr.curves, dec.eta, t, c2g)
    progress.phase(f"metrics + bootstrap ({cfg.n_boot} resamples)")
    refit, sweep, curves = view_metrics(scored, dec, t, c2g, levels=cfg.levels, n_boot=cfg.n_boot, seed=cfg.seed,
                                        progress=progress)
    progress.phase(None)
    gcfg = gate_art.config
    name = method_name(gcfg)
    metrics = {
        "method": name, "seed": gcfg.get("seed"), "gate_key": gate_art.key, "levels": list(cfg.levels),
        "refit": refit, "sweep": sweep, "operating_point": {"coverage": gr.meta.get("operating_coverage"),
                                                            "cost": gr.meta.get("cost"), "view": gr.meta.get("view")},
    }
    metrics.update(eval_extras(cfg, gr, data, c2g, dec, out, progress))
    _operating_point_warnings(metrics["operating_point"], sweep, progress)
    metrics["warnings"] = list(progress.warnings)
    out.json("metrics.json", metrics)
    out.json("rc_curves.json", {v: {name: c.to_dict()} for v, c in curves.items()})
    _write_csv(out.file_path("rc_curve.csv"), {v: refit["views"][v]["curve"] for v in VIEWS})
    out.json("rc_curve.csv.json", _csv_sidecar(name, gate_art.key, refit))
    _write_arrays(out, scored, dec, t, exp, c2g)
    eval_figures(out, EvalCurves(name, refit, curves, scored, dec, t, c2g), gate_art.json("history.json"), cfg,
                 progress)
    lt = refit["views"]["lt"]
    out.meta.update(
        method=name, aurc_balanced_lt=lt["aurc"]["balanced"], aurc_worst_lt=lt["aurc"]["worst"],
        coverage_at_margin_0=sweep["views"]["lt"]["at_margin_0"]["coverage"], warnings=list(progress.warnings),
    )
    progress.log(f"{name}: refit view, long-tailed weights: balanced AURC {lt['aurc']['balanced']:.4f}, "
                 f"worst AURC {lt['aurc']['worst']:.4f}")


def _write_arrays(out: Any, scored: dict, dec: Any, t: dict, exp: Any, c2g: Any) -> None:
    """The test arrays `report` pairs methods on: refitted rules, operating point, labels, weights."""
    import numpy as np

    for v, (S, P) in scored.items():
        out.array(f"refit/{v}/score", S)
        out.array(f"refit/{v}/pred", P.astype(np.int32))
    out.array("test/score", dec.score)
    out.array("test/pred", dec.pred.astype(np.int64))
    out.array("test/y", t["y"])
    out.array("test/w_lt", t["w_lt"])
    out.array("test/w_bal", t["w_bal"])
    if "test/source_index" in exp.manifest.get("arrays", {}):
        out.array("test/source_index", exp.array("test/source_index"))
    out.array("class_to_group", c2g)


def _csv_sidecar(name: str, gate_key: str, refit: dict) -> dict:
    """Provenance of ``rc_curve.csv`` (the CSV itself is plain: pandas.read_csv reads it)."""
    return {
        "file": "rc_curve.csv", "method": name, "gate_key": gate_key, "protocol": "refit",
        "description": refit["protocol"], "aurc_convention": refit["aurc_convention"],
        "columns": {"view": "lt = long-tailed weights w_lt, bal = balanced weights w_bal",
                    "coverage": "target coverage of the refitted rule (grid 0.01..1.00)",
                    "risk": "selective risk", "balanced_risk": "mean of the group errors e_k",
                    "worst_risk": "max of the group errors e_k",
                    "e_k": "error among accepted samples of group k (1.0 when the group has none)"}}


def _operating_point_warnings(op: dict, sweep: dict, progress: Any) -> None:
    """Say so when the operating point accepts everything or nothing on test (long-tailed view)."""
    cov = sweep["views"]["lt"]["at_margin_0"]["coverage"]
    what = "everything" if cov >= 1 - 1e-12 else "nothing" if cov <= 1e-12 else None
    if what:
        progress.warn(f"the operating point (rejection cost c = {op.get('cost')}) accepts {what} on test "
                      f"(coverage {cov:.3f}, long-tailed weights); the refit view's curves are unaffected")


def _write_csv(path: Any, curves: dict) -> None:
    """The refitted curves (both views) as plain CSV; conventions are in metrics.json."""
    lines = []
    for view, c in curves.items():
        ge = c["group_error"]
        K = len(ge[0])
        if not lines:
            lines.append("view,coverage,risk,balanced_risk,worst_risk," + ",".join(f"e_{k}" for k in range(K)))
        for i in range(len(c["coverage"])):
            row = [c["coverage"][i], c["risk"][i], c["balanced_risk"][i], c["worst_risk"][i], *ge[i]]
            lines.append(view + "," + ",".join(f"{float(x):.6g}" for x in row))
    path.write_text("\n".join(lines) + "\n")


def summary(meta: dict) -> str:
    return f"{meta.get('method')} bal-AURC={meta.get('aurc_balanced_lt', float('nan')):.4f}"
