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
VERSION = 6


def method_name(gate_cfg: dict) -> str:
    name = "AR-GSE (worst)" if gate_cfg.get("beta") == "worst" else "AR-GSE (balanced)"
    if gate_cfg.get("uniform_gate"):
        name += " uniform gate"
    return name


def gate_eval_data(gate_art: Any, with_calib: bool = False) -> tuple[Any, dict, Any, Any]:
    """(GatedRule, {split: posteriors/labels/weights}, export, calibrate) of a gate artifact."""
    from ..core.expert_data import load_posteriors
    from .train_gate import load_gate

    gr = load_gate(gate_art)
    exp, cal = gate_art.upstream("export"), gate_art.upstream("calibrate")
    experts = gate_art.meta.get("experts")
    splits = ("calib", "test") if with_calib else ("test",)
    data = {s: load_posteriors(exp, cal, s, experts) for s in splits}
    return gr, data, exp, cal


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..evaluation import VIEWS, WEIGHT_OF_VIEW, evaluate_scores, refit_metrics, score_curves
    from ..runtime import pin_threads

    pin_threads()
    gate_art = inputs["gate"]
    gr, data, exp, _ = gate_eval_data(gate_art, with_calib=True)
    c2g = np.asarray(exp.array("class_to_group"))
    t = data["test"]
    eta, pred, score = gr.decide(t["post"])
    weights = {v: t[WEIGHT_OF_VIEW[v]] for v in VIEWS}
    progress.log(f"eval: {len(score)} test rows; refit curves (100 coverages x {len(VIEWS)} views), "
                 f"{cfg.n_boot} bootstrap resamples")
    scored = score_curves(gr.curves, eta, t, c2g)
    # one view at a time (same numbers as all views in one call): a progress step per view and protocol
    progress.phase(f"metrics + bootstrap ({cfg.n_boot} resamples)")
    n_steps, refit, sweep, curves = 2 * len(VIEWS), None, None, {}
    for i, v in enumerate(VIEWS, 1):
        r = refit_metrics({v: scored[v]}, t, c2g, levels=cfg.levels, n_boot=cfg.n_boot, seed=cfg.seed)
        refit = r if refit is None else {**refit, "views": {**refit["views"], **r["views"]}}
        progress(i, n_steps, {"protocol": "refit", "view": v})
    for i, v in enumerate(VIEWS, len(VIEWS) + 1):
        sw, cv = evaluate_scores(score, pred, t["y"], c2g, {v: weights[v]}, levels=cfg.levels, n_boot=cfg.n_boot,
                                 seed=cfg.seed, probs=eta)
        sweep = sw if sweep is None else {**sweep, "views": {**sweep["views"], **sw["views"]}}
        curves.update(cv)
        progress(i, n_steps, {"protocol": "sweep", "view": v})
    progress.phase(None)
    gcfg = gate_art.config
    name = method_name(gcfg)
    metrics = {
        "method": name, "seed": gcfg.get("seed"), "gate_key": gate_art.key, "levels": list(cfg.levels),
        "refit": refit, "sweep": sweep, "operating_point": {"coverage": gr.meta.get("operating_coverage"),
                                                            "cost": gr.meta.get("cost"), "view": gr.meta.get("view")},
    }
    metrics.update(_extras(cfg, gr, data, c2g, score, pred, eta, out, progress))
    _operating_point_warnings(metrics["operating_point"], sweep, progress)
    metrics["warnings"] = list(progress.warnings)
    out.json("metrics.json", metrics)
    out.json("rc_curves.json", {v: {name: c.to_dict()} for v, c in curves.items()})
    _write_csv(out.file_path("rc_curve.csv"), {v: refit["views"][v]["curve"] for v in VIEWS})
    out.json("rc_curve.csv.json", {  # provenance sidecar: the CSV itself is plain (pandas.read_csv reads it)
        "file": "rc_curve.csv", "method": name, "gate_key": gate_art.key, "protocol": "refit",
        "description": refit["protocol"], "aurc_convention": refit["aurc_convention"],
        "columns": {"view": "lt = long-tailed weights w_lt, bal = balanced weights w_bal",
                    "coverage": "target coverage of the refitted rule (grid 0.01..1.00)",
                    "risk": "selective risk", "balanced_risk": "mean of the group errors e_k",
                    "worst_risk": "max of the group errors e_k",
                    "e_k": "error among accepted samples of group k (1.0 when the group has none)"}})
    for v, (S, P) in scored.items():
        out.array(f"refit/{v}/score", S)
        out.array(f"refit/{v}/pred", P.astype(np.int32))
    out.array("test/score", score)
    out.array("test/pred", pred.astype(np.int64))
    out.array("test/y", t["y"])
    out.array("test/w_lt", t["w_lt"])
    out.array("test/w_bal", t["w_bal"])
    if "test/source_index" in exp.manifest.get("arrays", {}):
        out.array("test/source_index", exp.array("test/source_index"))
    out.array("class_to_group", c2g)
    _figures(out, name, refit, curves, score, t["group"], gate_art.json("history.json"), scored, pred, t, c2g, cfg,
             progress)
    lt = refit["views"]["lt"]
    out.meta.update(
        method=name, aurc_balanced_lt=lt["aurc"]["balanced"], aurc_worst_lt=lt["aurc"]["worst"],
        coverage_at_margin_0=sweep["views"]["lt"]["at_margin_0"]["coverage"], warnings=list(progress.warnings),
    )
    progress.log(f"{name}: refit view, long-tailed weights: balanced AURC {lt['aurc']['balanced']:.4f}, "
                 f"worst AURC {lt['aurc']['worst']:.4f}")


def _extras(cfg: Any, res: Any, data: dict, c2g: Any, score: Any, pred: Any, eta: Any, out: Any,
            progress: Any) -> dict:
    """Risk-controlled thresholds (calib), SAG stream modes and learning to defer (issue 8)."""
    import numpy as np

    extra: dict = {}
    t = data["test"]
    if cfg.target_risk is not None:
        from ..guarantees import risk_control_report

        c = data["calib"]
        cal = {"score": res.margin(c["post"]), "pred": res.predict(c["post"])[0], "y": c["y"],
               "w_lt": c["w_lt"], "w_bal": c["w_bal"]}
        tst = {"score": score, "pred": pred, "y": t["y"], "w_lt": t["w_lt"], "w_bal": t["w_bal"]}
        extra["guarantees"] = risk_control_report(cal, tst, c2g, cfg.target_risk, cfg.delta,
                                                  cfg.conformal_epsilon)
        progress.log(f"risk control: target {cfg.target_risk}, delta {cfg.delta} (thresholds on calib)")
    if cfg.sag_mode is not None:
        from ..report.deferral_figures import plot_sag
        from ..sag import sag_stream

        r = sag_stream(score, pred == t["y"], cfg.sag_mode, cfg.sag_target, cfg.sag_window, cfg.sag_batch,
                       p_rand=cfg.sag_p_rand, seed=cfg.seed)
        extra["sag"] = r
        out.file_path("sag.pdf")
        plot_sag(r, out.file_path("sag.png").with_suffix(""))
    if cfg.l2d:
        from ..core.gate import build_gating_features
        from ..l2d import deferral_comparison, em_defer, em_diagnostics, simulate_humans
        from ..report.deferral_figures import plot_defer

        C = len(c2g)
        c = data["calib"]
        m_cal = simulate_humans(c["y"], C, list(cfg.human_noise), seed=cfg.seed)
        m_test = simulate_humans(t["y"], C, list(cfg.human_noise), seed=cfg.seed + 1)
        eta_cal = res.mixture(c["post"])
        fit = em_defer(build_gating_features(c["post"]), eta_cal, m_cal, c["y"], C, seed=cfg.seed)
        gp = fit.gate.predict(build_gating_features(t["post"]))
        comp = deferral_comparison(gp, eta, m_test, t["y"], score, pred)
        ll = np.asarray(fit.loglik)
        diag = em_diagnostics(fit.loglik, fit.eps, cfg.human_noise)
        for w in diag["warnings"]:
            progress.warn(w)
        extra["l2d"] = {**comp, "fit": fit.to_dict(), "human_noise": list(cfg.human_noise),
                        "loglik_monotone": bool(np.all(np.diff(ll) >= -1e-9)), "diagnostics": diag,
                        "note": "EM fitted on calib, curves on test; humans simulated as noisy label copies"}
        out.file_path("defer.pdf")
        plot_defer({"L2D (EM gate)": comp["l2d"], "AR-GSE rejection as deferral": comp["argse"]},
                   out.file_path("defer.png").with_suffix(""), points={"L2D (EM gate)": comp["l2d_operating_point"]})
    return extra


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


BAND_BOOT = 200
"""Bootstrap resamples of the figures' pointwise bands (at most ``n_boot``)."""


def _figures(out: Any, name: str, refit: dict, sweep_curves: dict, score: Any, group: Any, history: dict,
             scored: dict, pred: Any, t: dict, c2g: Any, cfg: Any, progress: Any) -> None:
    """RC figures (refit and sweep curves with their pointwise bootstrap bands, also stored in
    ``rc_bands.json`` for ``argse plot``), the margin histogram and the gate's training curves."""
    from ..evaluation import WEIGHT_OF_VIEW
    from ..report.bands import rc_band
    from ..report.figures import plot_margin_hist, plot_rc_curves, plot_training

    def stem(n: str) -> Any:
        out.file_path(f"{n}.pdf")
        return out.file_path(f"{n}.png").with_suffix("")

    nb = min(BAND_BOOT, cfg.n_boot)
    bands: dict[str, dict] = {}
    if nb:
        progress.phase(f"RC bands ({nb} resamples)")
        for i, v in enumerate(sweep_curves, 1):
            w = t[WEIGHT_OF_VIEW[v]]
            bands[v] = {}
            for protocol, arrs in (("refit", scored[v]), ("sweep", (score, pred))):
                b = rc_band([arrs], t["y"], c2g, w, n_boot=nb, seed=cfg.seed)
                bands[v][protocol] = {k: {"coverage": b[k]["coverage"], "lo": b[k]["lo"], "hi": b[k]["hi"]} for k in b}
            progress(i, len(sweep_curves), {"view": v})
        progress.phase(None)
        out.json("rc_bands.json", {**bands, "n_boot": nb, "seed": cfg.seed,
                                   "note": "95% pointwise percentile bands over class-stratified bootstrap "
                                           "resamples of the test rows"})
    for kind in ("balanced", "worst"):
        for v, c in sweep_curves.items():
            curves = {f"{name} (refit)": {**refit["views"][v]["curve"], "band": bands.get(v, {}).get("refit")},
                      f"{name} (sweep)": {**c.to_dict(), "band": bands.get(v, {}).get("sweep")}}
            plot_rc_curves(curves, kind, v, stem(f"rc_{kind}_{v}"), levels=cfg.levels, subtitle="refit and sweep views")
    plot_margin_hist(score, group, stem("margin_hist"), title=name)
    if history.get("epoch"):
        plot_training(history, stem("trajectories"), title=name)


def summary(meta: dict) -> str:
    return f"{meta.get('method')} bal-AURC={meta.get('aurc_balanced_lt', float('nan')):.4f}"
