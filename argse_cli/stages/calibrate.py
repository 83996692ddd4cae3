"""Stage `calibrate`: one temperature T_e per expert, fitted on val_small.

Posterior of expert e on the training prior (the plug-in rule assumes eta = P_train(y|x)):
    p_e = softmax((f_e + shift_e * log pi) / T_e),   shift_e = tau_e
(tau = 0 for ce, 1 for balsoftmax and decoupled, TAU for logitadjust:TAU). With
``posterior: balanced`` (ablation) shift_e = tau_e - 1, i.e. every expert's balanced posterior.
T_e minimises the importance-weighted NLL (target view long-tailed by default) over log T.
Temperatures are applied at read time (:func:`apply_calibration`), so recalibrating never needs a
re-export.
"""

from __future__ import annotations

from typing import Any

STAGE = "calibrate"
VERSION = 3


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..core.expert_data import log_prior
    from ..experts.calibration import calibration_metrics, fit_temperature

    exp = inputs["export"]
    log_pi = log_prior(exp)
    experts = exp.meta["experts"]
    shift = np.array([e["tau"] - (1.0 if cfg.posterior == "balanced" else 0.0) for e in experts], np.float32)
    wkey = "w_lt" if cfg.view == "lt" else "w_bal"
    fit = {k: exp.array(f"{cfg.fit_split}/{k}") for k in ("logits", "labels", wkey)}
    test = {k: exp.array(f"test/{k}") for k in ("logits", "labels", wkey)}
    temps, rows = [], []
    for e, info in enumerate(experts):
        f_fit = fit["logits"][:, e].astype(np.float32)
        T = fit_temperature(f_fit, fit["labels"], log_pi, float(shift[e]), w=fit[wkey])
        temps.append(T)
        row = {"expert": info["loss"], "T": T}
        for sname, d in ((cfg.fit_split, fit), ("test", test)):
            f = d["logits"][:, e].astype(np.float32)
            for when, t in (("before", 1.0), ("after", T)):
                m = calibration_metrics(f, d["labels"], log_pi, float(shift[e]), T=t, w=d[wkey])
                row[f"{sname}_nll_{when}"] = m["nll"]
                row[f"{sname}_ece_{when}"] = m["ece"]
        rows.append(row)
    out.array("temperature", np.asarray(temps, np.float32))
    out.array("shift", shift)
    out.json("calibration.json", {"view": cfg.view, "posterior": cfg.posterior, "experts": rows})
    out.meta.update(temperatures=[float(t) for t in temps], view=cfg.view, posterior=cfg.posterior, table=rows)
    if not getattr(progress, "quiet", False):
        _print(rows, cfg)


def _print(rows: list[dict], cfg: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"temperature scaling ({cfg.view} weights, {cfg.posterior} posterior)")
    for c in ("expert", "T", "split", "NLL before", "NLL after", "ECE before", "ECE after"):
        t.add_column(c, justify="right")
    for r in rows:
        for sname in (cfg.fit_split, "test"):
            t.add_row(r["expert"], f"{r['T']:.3f}", sname, *(f"{r[f'{sname}_{m}_{w}']:.4f}"
                      for m in ("nll", "ece") for w in ("before", "after")))
    Console(stderr=True).print(t)


def summary(meta: dict) -> str:
    return "T=" + ",".join(f"{t:.2f}" for t in meta.get("temperatures", []))
