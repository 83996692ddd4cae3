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
VERSION = 2
CODE = ("stages/calibrate.py", "experts/calibration.py", "experts/posterior.py", "metrics/calibration.py")


def log_prior(export_art: Any) -> Any:
    import numpy as np

    counts = export_art.array("class_counts").astype(np.float64)
    return np.log(counts / counts.sum()).astype(np.float32)


def apply_calibration(logits: Any, log_pi: Any, shift: Any, T: Any) -> Any:
    """p[n, e, :] = softmax((f[n, e, :] + shift_e * log pi) / T_e), float32 (fp16 in is fine).

    numpy in, numpy out; computed with torch's vectorised kernels in one float32 buffer (the
    fp16 -> float32 cast is the only copy; the caller's array is never modified)."""
    import numpy as np
    import torch

    f = torch.from_numpy(np.ascontiguousarray(logits))
    z = f.to(torch.float32, copy=True)
    sh = torch.as_tensor(np.asarray(shift, np.float32))
    lp = torch.as_tensor(np.asarray(log_pi, np.float32))
    z.add_(sh[:, None] * lp[None, :])
    z.div_(torch.as_tensor(np.asarray(T, np.float32))[:, None])
    z.sub_(z.amax(dim=-1, keepdim=True))
    z.exp_()
    z.div_(z.sum(dim=-1, keepdim=True))
    return z.numpy()


def load_posteriors(export_art: Any, calib_art: Any, split: str, experts: Any = None) -> dict:
    """Calibrated posteriors [N, E, C] of a split plus labels, weights and groups (in memory)."""
    import numpy as np

    logits = export_art.array(f"{split}/logits")
    shift, T = calib_art.array("shift"), calib_art.array("temperature")
    if experts is not None:
        idx = np.asarray(experts, dtype=np.int64)
        logits, shift, T = logits[:, idx], shift[idx], T[idx]
    return {
        "post": apply_calibration(logits, log_prior(export_art), shift, T),
        "y": export_art.array(f"{split}/labels"),
        "w_lt": export_art.array(f"{split}/w_lt"),
        "w_bal": export_art.array(f"{split}/w_bal"),
        "group": export_art.array(f"{split}/group"),
    }


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

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
