"""What `eval` adds to the curves when its config asks: risk-controlled thresholds fitted on calib
(:mod:`argse_cli.guarantees`), the SAG online stream (:mod:`argse_cli.sag`) and learning to defer to
simulated humans (:mod:`argse_cli.l2d`). Nothing here is fitted on test labels.
"""

from __future__ import annotations

from typing import Any

from .evaluation import Decisions


def eval_extras(cfg: Any, gr: Any, data: dict, c2g: Any, dec: Decisions, out: Any, progress: Any) -> dict:
    """``{"guarantees", "sag", "l2d"}`` (those the config enables) for a gate ``gr`` whose test
    decisions are ``dec``; ``data`` holds the calib and test posteriors."""
    extra: dict = {}
    if cfg.target_risk is not None:
        extra["guarantees"] = _risk_control(cfg, gr, data, c2g, dec)
        progress.log(f"risk control: target {cfg.target_risk}, delta {cfg.delta} (thresholds on calib)")
    if cfg.sag_mode is not None:
        extra["sag"] = _sag(cfg, data["test"], dec, out)
    if cfg.l2d:
        extra["l2d"] = _l2d(cfg, gr, data, c2g, dec, out, progress)
    return extra


def _risk_control(cfg: Any, gr: Any, data: dict, c2g: Any, dec: Decisions) -> dict:
    """Thresholds on the margin fitted on calib (LTT, Mondrian conformal), read on test."""
    from .guarantees import risk_control_report

    c, t = data["calib"], data["test"]
    cal = {"score": gr.margin(c["post"]), "pred": gr.predict(c["post"])[0], "y": c["y"],
           "w_lt": c["w_lt"], "w_bal": c["w_bal"]}
    tst = {"score": dec.score, "pred": dec.pred, "y": t["y"], "w_lt": t["w_lt"], "w_bal": t["w_bal"]}
    return risk_control_report(cal, tst, c2g, cfg.target_risk, cfg.delta, cfg.conformal_epsilon)


def _sag(cfg: Any, t: dict, dec: Decisions, out: Any) -> dict:
    """The SAG stream over the test rows in order (its figure into ``sag.{pdf,png}``)."""
    from .report.deferral_figures import plot_sag
    from .sag import sag_stream

    r = sag_stream(dec.score, dec.pred == t["y"], cfg.sag_mode, cfg.sag_target, cfg.sag_window, cfg.sag_batch,
                   p_rand=cfg.sag_p_rand, seed=cfg.seed)
    out.file_path("sag.pdf")
    plot_sag(r, out.file_path("sag.png").with_suffix(""))
    return r


def _l2d(cfg: Any, gr: Any, data: dict, c2g: Any, dec: Decisions, out: Any, progress: Any) -> dict:
    """EM learning to defer fitted on calib, compared on test with rejection as deferral."""
    import numpy as np

    from .core.gate import build_gating_features
    from .l2d import deferral_comparison, em_defer, em_diagnostics, simulate_humans
    from .report.deferral_figures import plot_defer

    C = len(c2g)
    c, t = data["calib"], data["test"]
    m_cal = simulate_humans(c["y"], C, list(cfg.human_noise), seed=cfg.seed)
    m_test = simulate_humans(t["y"], C, list(cfg.human_noise), seed=cfg.seed + 1)
    eta_cal = gr.mixture(c["post"])
    fit = em_defer(build_gating_features(c["post"]), eta_cal, m_cal, c["y"], C, seed=cfg.seed)
    gp = fit.gate.predict(build_gating_features(t["post"]))
    comp = deferral_comparison(gp, dec.eta, m_test, t["y"], dec.score, dec.pred)
    ll = np.asarray(fit.loglik)
    diag = em_diagnostics(fit.loglik, fit.eps, cfg.human_noise)
    for w in diag["warnings"]:
        progress.warn(w)
    out.file_path("defer.pdf")
    plot_defer({"L2D (EM gate)": comp["l2d"], "AR-GSE rejection as deferral": comp["argse"]},
               out.file_path("defer.png").with_suffix(""), points={"L2D (EM gate)": comp["l2d_operating_point"]})
    return {**comp, "fit": fit.to_dict(), "human_noise": list(cfg.human_noise),
            "loglik_monotone": bool(np.all(np.diff(ll) >= -1e-9)), "diagnostics": diag,
            "note": "EM fitted on calib, curves on test; humans simulated as noisy label copies"}
