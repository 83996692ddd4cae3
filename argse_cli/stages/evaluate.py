"""Stage `eval`: a trained gate's risk-coverage metrics on test, both views, bootstrap CIs.

Outputs: ``metrics.json`` (sweep view and refit view, long-tailed and balanced weights, AURC
convention stated), ``rc_curve.csv``, ``rc_curves.json``, figures (RC curves balanced and worst,
margin histogram per group, alpha / beta / coverage trajectories), and the test arrays
(``test/score`` = margin, ``test/pred``, labels, weights) for paired comparisons in `report`.
Nothing here is fitted on test labels.
"""

from __future__ import annotations

from typing import Any

STAGE = "eval"
VERSION = 3
CODE = ("stages/evaluate.py", "evaluation.py", "metrics/*.py", "baselines.py", "rejector.py",
        "guarantees.py", "sag.py", "l2d.py")


def method_name(gate_cfg: dict) -> str:
    name = "AR-GSE (worst)" if gate_cfg.get("beta") == "worst" else "AR-GSE (balanced)"
    if gate_cfg.get("uniform_gate"):
        name += " uniform gate"
    return name


def gate_eval_data(gate_art: Any, with_calib: bool = False) -> tuple[Any, dict, Any, Any]:
    """(GateResult, {split: posteriors/labels/weights}, export, calibrate) of a gate artifact."""
    from .calibrate import load_posteriors
    from .train_gate import load_gate

    res = load_gate(gate_art)
    exp, cal = gate_art.upstream("export"), gate_art.upstream("calibrate")
    experts = gate_art.meta.get("experts")
    splits = ("tuneV", "val_small", "calib", "test") if with_calib else ("tuneV", "val_small", "test")
    data = {s: load_posteriors(exp, cal, s, experts) for s in splits}
    return res, data, exp, cal


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..evaluation import VIEWS, WEIGHT_OF_VIEW, evaluate_scores, refit_view
    from .train_expert import pin_threads

    pin_threads()
    gate_art = inputs["gate"]
    res, data, exp, _ = gate_eval_data(gate_art, with_calib=True)
    c2g = np.asarray(exp.array("class_to_group"))
    t = data["test"]
    eta = res.mixture(t["post"])
    score = res.margin(t["post"]).astype(np.float32)
    pred = res.predict(t["post"])[0]
    weights = {v: t[WEIGHT_OF_VIEW[v]] for v in VIEWS}
    progress.log(f"eval: {len(score)} test rows, {cfg.n_boot} bootstrap resamples")
    sweep, curves = evaluate_scores(score, pred, t["y"], c2g, weights, levels=cfg.levels, n_boot=cfg.n_boot,
                                    seed=cfg.seed, probs=eta)
    refit = None
    if cfg.refit:
        mix = {s: res.mixture(data[s]["post"]) for s in ("tuneV", "val_small", "test")}
        covs = sorted(set(cfg.levels) | set(cfg.refit_grid))
        beta = res.beta if gate_art.config.get("beta") == "worst" else None
        refit = {v: refit_view(lambda s: mix[s], data, c2g, covs, view=v, beta=beta) for v in VIEWS}
    gcfg = gate_art.config
    name = method_name(gcfg)
    metrics = {
        "method": name, "seed": gcfg.get("seed"), "gate_key": gate_art.key, "levels": list(cfg.levels),
        "sweep": sweep, "refit": refit,
        "protocol": "sweep: rule fitted once on validation, threshold swept over its margin on test; "
                    "refit: alpha, mu refitted on tuneV (lambda on val_small) at each coverage, mixture fixed",
    }
    metrics.update(_extras(cfg, res, data, c2g, score, pred, eta, out, progress))
    out.json("metrics.json", metrics)
    out.json("rc_curves.json", {v: {name: c.to_dict()} for v, c in curves.items()})
    _write_csv(out.file_path("rc_curve.csv"), curves)
    out.array("test/score", score)
    out.array("test/pred", pred.astype(np.int64))
    out.array("test/y", t["y"])
    out.array("test/w_lt", t["w_lt"])
    out.array("test/w_bal", t["w_bal"])
    out.array("class_to_group", c2g)
    _figures(out, name, curves, score, t["group"], gate_art.json("history.json"))
    lt = sweep["views"]["lt"]
    out.meta.update(
        method=name, aurc_balanced_lt=lt["aurc"]["balanced"], aurc_worst_lt=lt["aurc"]["worst"],
        coverage_at_margin_0=lt["at_margin_0"]["coverage"],
    )
    progress.log(
        f"{name}: balanced AURC {lt['aurc']['balanced']:.4f}, worst AURC {lt['aurc']['worst']:.4f} "
        f"(long-tailed weights; {sweep['aurc_convention']})"
    )


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
        from ..l2d import deferral_comparison, em_defer, simulate_humans
        from ..nn.gate import build_gating_features
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
        extra["l2d"] = {**comp, "fit": fit.to_dict(), "human_noise": list(cfg.human_noise),
                        "loglik_monotone": bool(np.all(np.diff(ll) >= -1e-9)),
                        "note": "EM fitted on calib, curves on test; humans simulated as noisy label copies"}
        out.file_path("defer.pdf")
        plot_defer({"L2D (EM gate)": comp["l2d"], "AR-GSE rejection as deferral": comp["argse"]},
                   out.file_path("defer.png").with_suffix(""), points={"L2D (EM gate)": comp["l2d_operating_point"]})
    return extra


def _write_csv(path: Any, curves: dict) -> None:
    lines = []
    for view, c in curves.items():
        K = c.group_error.shape[1]
        if not lines:
            lines.append("view,coverage,risk,balanced_risk,worst_risk," + ",".join(f"e_{k}" for k in range(K)))
        for i in range(len(c.coverage)):
            row = [view, c.coverage[i], c.risk[i], c.balanced_risk[i], c.worst_risk[i], *c.group_error[i]]
            lines.append(",".join(str(x) if isinstance(x, str) else f"{float(x):.6g}" for x in row))
    path.write_text("# risk = selective risk on the view's weights; AURC = mean risk over coverage 0.01..1.00\n"
                    + "\n".join(lines) + "\n")


def _figures(out: Any, name: str, curves: dict, score: Any, group: Any, history: dict) -> None:
    from ..report.figures import plot_margin_hist, plot_rc_curves, plot_trajectories

    def stem(n: str) -> Any:
        return out.file_path(f"{n}.png").with_suffix("")

    for kind in ("balanced", "worst"):
        for v, c in curves.items():
            p = stem(f"rc_{kind}_{v}")
            out.file_path(f"rc_{kind}_{v}.pdf")
            plot_rc_curves({name: c.to_dict()}, kind, v, p)
    p = stem("margin_hist")
    out.file_path("margin_hist.pdf")
    plot_margin_hist(score, group, p)
    p = stem("trajectories")
    out.file_path("trajectories.pdf")
    plot_trajectories(history, p)


def summary(meta: dict) -> str:
    return f"{meta.get('method')} bal-AURC={meta.get('aurc_balanced_lt', float('nan')):.4f}"
