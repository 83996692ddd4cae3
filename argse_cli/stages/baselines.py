"""Stage `baselines`: every competitor under the same protocol as AR-GSE (see evaluation.py).

Fitted on tuneV / val_small only, never on test:
- Chow (max probability) on each calibrated expert; DE-Chow on the uniform average of experts;
- U-PI: CS-plug-in (Narasimhan et al., Algorithm 1) on the uniform mixture;
- SB-PI: CS-plug-in on the single expert with the best val_small group-balanced error;
- Plug-in[Worst] (Algorithm 2, T rounds of EG on beta, S1 = tuneV, S2 = val_small);
- AR-GSE ablations (gates retrained in-process, one per seed): uniform gate, no routing sparsity,
  hard top-1 routing, 1 / 2 / all (/ 6) experts, balanced posteriors;
- optionally the sensitivity grid: gate depth, tau schedule, lambda_ent, c.
All plug-in rules use the gauge mu_[K-1] = 0 and the training-prior weights for alpha's fixed point.
At the rejection cost c, each plug-in rule's operating coverage is searched (fit_cs_plugin_at_cost:
Algorithm 1's fixed point at a fixed c can collapse to "accept nothing"); Plug-in[Worst] runs at
U-PI's operating coverage.
Outputs: ``baselines.json`` (one entry per method and seed, sweep and refit views, both weightings),
``rc_curves.json`` and the test arrays ``m/<slug>/score``, ``m/<slug>/pred`` for paired bootstraps.
"""

from __future__ import annotations

import re
from typing import Any

STAGE = "baselines"
VERSION = 5
CODE = ("stages/baselines.py", "baselines.py", "evaluation.py", "metrics/*.py", "rejector.py",
        "gate_train.py", "nn/gate.py", "stages/train_gate.py", "experts/calibration.py")


class _Calib:
    """An in-memory calibration (temperatures + prior shifts) with the artifact's read API."""

    def __init__(self, shift: Any, T: Any):
        self._a = {"shift": shift, "temperature": T}

    def array(self, name: str) -> Any:
        return self._a[name]


def slugify(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..baselines import fit_cs_plugin_at_cost, fit_plugin_worst
    from ..config import TrainGateConfig
    from ..evaluation import VIEWS, WEIGHT_OF_VIEW, evaluate_scores, refit_view
    from ..experts.calibration import fit_temperature
    from ..metrics.selective import balanced_error
    from ..rejector import chow_margin
    from .calibrate import load_posteriors, log_prior
    from .train_expert import pin_threads
    from .train_gate import fit_gate

    pin_threads()
    exp, cal, gate_art = inputs["export"], inputs["calibrate"], inputs["gate"]
    c2g = np.asarray(exp.array("class_to_group"))
    losses = [e["loss"] for e in exp.meta["experts"]]
    E = len(losses)
    data = {s: load_posteriors(exp, cal, s) for s in ("tuneV", "val_small", "test")}
    t = data["test"]
    wk = WEIGHT_OF_VIEW[cfg.view]
    weights = {v: t[WEIGHT_OF_VIEW[v]] for v in VIEWS}
    results: list[dict] = []
    curves_out: dict[str, dict] = {v: {} for v in VIEWS}

    def record(name: str, group: str, seed: Any, score: Any, pred: Any, refit_eta: Any = None,
               beta: Any = None, setting: str | None = None, extra: dict | None = None) -> None:
        slug = slugify(f"{name}_s{seed}" if seed is not None else name)
        sweep, curves = evaluate_scores(score, pred, t["y"], c2g, weights, levels=cfg.levels,
                                        n_boot=cfg.n_boot, seed=0)
        refit = None
        if refit_eta is not None:
            refit = {v: refit_view(refit_eta, data, c2g, sorted(set(cfg.levels)), view=v, beta=beta, M=cfg.M)
                     for v in VIEWS}
        out.array(f"m/{slug}/score", np.asarray(score, np.float32))
        out.array(f"m/{slug}/pred", np.asarray(pred, np.int64))
        for v, c in curves.items():
            curves_out[v][slug] = c.to_dict()
        # A deterministic baseline (seed None) does not depend on the gate seed: it is listed once
        # per seed (same arrays) so that paired comparisons with every AR-GSE seed are possible.
        for s in ([seed] if seed is not None else list(cfg.seeds)):
            results.append({"method": name, "seed": s, "deterministic": seed is None, "group": group,
                            "setting": setting, "slug": slug, "sweep": sweep, "refit": refit, **(extra or {})})
        lt = sweep["views"]["lt"]["aurc"]
        progress.log(f"{name:32s} balanced AURC {lt['balanced']:.4f}  worst AURC {lt['worst']:.4f} (lt weights)")

    op_cov: dict[str, float] = {}

    def fit_pi(s_fit: str, eta_of: Any, beta: Any = None, tag: str = "") -> Any:
        fit, q = fit_cs_plugin_at_cost(
            eta_of(s_fit), data[s_fit]["y"], data[s_fit][wk], c2g, c=cfg.c,
            eta_sel=eta_of("val_small"), y_sel=data["val_small"]["y"], w_sel=data["val_small"][wk],
            w_prior=data[s_fit]["w_lt"], beta=beta, M=cfg.M,
        )
        op_cov[tag] = q
        return fit.rule

    # ---- Chow per expert, DE-Chow -----------------------------------------------------
    for e, loss in enumerate(losses):
        p = t["post"][:, e]
        record(f"Chow ({loss})", "baseline", None, chow_margin(p, cfg.c), p.argmax(1))
    uniform = {s: data[s]["post"].mean(axis=1) for s in data}
    record("DE-Chow", "baseline", None, chow_margin(uniform["test"], cfg.c), uniform["test"].argmax(1))

    # ---- U-PI, SB-PI, Plug-in[Worst] ----------------------------------------------------
    rule = fit_pi("tuneV", lambda s: uniform[s], tag="U-PI")
    record("U-PI", "baseline", None, rule.margin(uniform["test"]), rule.predict(uniform["test"]),
           refit_eta=lambda s: uniform[s],
           extra={"alpha": rule.alpha.tolist(), "mu": rule.mu.tolist(), "operating_coverage": op_cov["U-PI"]})
    val_err = []
    for e in range(E):
        r = fit_pi("tuneV", lambda s, e=e: data[s]["post"][:, e])
        pv = data["val_small"]["post"][:, e]
        val_err.append(balanced_error(r.accept(pv), r.predict(pv), data["val_small"]["y"], c2g,
                                      data["val_small"][wk]))
    best = int(np.argmin(val_err))
    single = {s: data[s]["post"][:, best] for s in data}
    rule = fit_pi("tuneV", lambda s: single[s])
    record("SB-PI", "baseline", None, rule.margin(single["test"]), rule.predict(single["test"]),
           refit_eta=lambda s: single[s], extra={"expert": losses[best], "val_balanced_error": val_err})
    wf = fit_plugin_worst(
        uniform["tuneV"], data["tuneV"]["y"], data["tuneV"][wk], uniform["val_small"],
        data["val_small"]["y"], data["val_small"][wk], c2g, target_coverage=op_cov["U-PI"],
        w_prior_S1=data["tuneV"]["w_lt"], T=cfg.T, xi=cfg.xi, M=cfg.M,
    )
    beta_w = wf.betas[wf.best_round]
    record("Plug-in[Worst]", "baseline", None, wf.rule.margin(uniform["test"]), wf.rule.predict(uniform["test"]),
           refit_eta=lambda s: uniform[s], beta=beta_w,
           extra={"beta": beta_w.tolist(), "best_round": wf.best_round})

    # ---- AR-GSE ablations and sensitivity (gates retrained in-process) ------------------
    base = TrainGateConfig.model_validate(gate_art.config)
    if cfg.gate_epochs:
        base = base.model_copy(update={"epochs": cfg.gate_epochs,
                                       "tau_warmup_epochs": min(base.tau_warmup_epochs, cfg.gate_epochs - 1),
                                       "patience": min(base.patience, cfg.gate_epochs)})
    variants: list[tuple[str, str, str | None, dict, Any]] = []
    if cfg.ablations:
        variants += [
            ("AR-GSE uniform gate", "ablation", None, {"uniform_gate": True}, None),
            ("AR-GSE no sparsity", "ablation", None, {"lambda_ent": 0.0}, None),
            ("AR-GSE hard routing", "ablation", None, {"hard_routing": True}, None),
            ("AR-GSE", "ablation", "experts=all", {}, None),
            (f"AR-GSE 1 expert ({losses[best]})", "ablation", "experts=1", {"experts": (best,)}, None),
        ]
        if "ce" in losses and "balsoftmax" in losses:
            pair = (losses.index("ce"), losses.index("balsoftmax"))
            variants.append(("AR-GSE 2 experts (ce+balsoftmax)", "ablation", "experts=2", {"experts": pair}, None))
        if E >= 6:
            variants.append(("AR-GSE 6 experts", "ablation", "experts=6", {"experts": tuple(range(6))}, None))
        # balanced posteriors: refit temperatures for shift = tau - 1 on the same split and view
        shift_b = np.array([e["tau"] - 1.0 for e in exp.meta["experts"]], np.float32)
        fit_split = inputs["calibrate"].config.get("fit_split", "val_small")
        view_c = inputs["calibrate"].config.get("view", "lt")
        Tb = []
        for e in range(E):
            Tb.append(fit_temperature(exp.array(f"{fit_split}/logits")[:, e].astype(np.float32),
                                      exp.array(f"{fit_split}/labels"), log_prior(exp), float(shift_b[e]),
                                      w=exp.array(f"{fit_split}/{WEIGHT_OF_VIEW[view_c]}")))
        variants.append(("AR-GSE balanced posteriors", "ablation", "posterior=balanced", {},
                         _Calib(shift_b, np.asarray(Tb, np.float32))))
    if cfg.sensitivity:
        for label, upd in [("gate 2 layers", {"hidden": (128,)}), ("gate 3 layers", {"hidden": (128, 64)}),
                           ("tau 2->6", {"tau_end": 6.0}), ("tau 2->10", {"tau_end": 10.0}),
                           *[(f"lambda_ent={v:g}", {"lambda_ent": v}) for v in (1e-4, 1e-3, 1e-2)],
                           *[(f"c={v:g}", {"c": v}) for v in (0.02, 0.05, 0.1)]]:
            variants.append((f"AR-GSE {label}", "sensitivity", label, upd, None))
    for seed in cfg.seeds:
        for name, group, setting, upd, calib in variants:
            gcfg = base.model_copy(update={**upd, "seed": seed})
            cal_use = calib if calib is not None else cal
            res = fit_gate(gcfg, exp, cal_use)
            sub = list(gcfg.experts) if gcfg.experts is not None else None
            post = {s: (load_posteriors(exp, cal_use, s, sub)["post"]) for s in ("tuneV", "val_small", "test")} \
                if (calib is not None or sub is not None) else {s: data[s]["post"] for s in data}
            mix = {s: res.mixture(post[s]) for s in post}
            pred = res.predict(post["test"])[0]
            record(name, group, seed, res.margin(post["test"]), pred, refit_eta=lambda s, mix=mix: mix[s],
                   beta=res.beta if gcfg.beta == "worst" else None, setting=setting,
                   extra={"val_objective": float(res.history["objective"][res.history["epoch"].index(res.chosen_epoch)]),
                          "chosen_epoch": int(res.chosen_epoch)})
    out.json("baselines.json", {"levels": list(cfg.levels), "view_fitted": cfg.view, "c": cfg.c,
                                "results": results})
    out.json("rc_curves.json", curves_out)
    out.array("test/y", t["y"])
    out.array("test/w_lt", t["w_lt"])
    out.array("test/w_bal", t["w_bal"])
    out.array("class_to_group", c2g)
    out.meta.update(methods=sorted({r["method"] for r in results}), n_results=len(results),
                    sb_pi_expert=losses[best])


def summary(meta: dict) -> str:
    return f"{meta.get('n_results')} results, SB-PI={meta.get('sb_pi_expert')}"
