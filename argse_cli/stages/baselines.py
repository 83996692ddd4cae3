"""Stage `baselines`: every competitor under the protocol of AR-GSE (:mod:`argse_cli.evaluation`),
fitted by the same core with the same search, on tuneV / val_small only, never on test:

- Chow (max probability) on each calibrated expert; DE-Chow on the uniform average of the experts
  (threshold sweeps: nothing to refit);
- CS-plug-in (Algorithm 1) on each expert; SB-PI = the CS-plug-in of the single expert with the
  lowest mean val_small selection score over the coverage grid (long-tailed view);
- U-PI: CS-plug-in on the uniform mixture (the frozen uniform gate's mixture, computed by the same
  code);
- Plug-in[Worst]: Algorithm 2 on the uniform mixture (S1 = tuneV, S2 = val_small);
- AR-GSE ablations (gates retrained in-process, one per seed; ``ablation_variants``): the selective
  primal-dual objective instead of the NLL, no routing sparsity, hard top-1 routing, 1 / 2 experts,
  balanced posteriors; optionally the sensitivity grid. The full AR-GSE rows come from `eval` (the
  report puts them beside the ablations); the frozen uniform gate is U-PI exactly (tested).

Every plug-in method gets the refit view (its rule re-fitted at each coverage 0.01..1.00, both
views) and the sweep view of its cost-matched operating point. Outputs: ``baselines.json`` (one
entry per method and seed) and the test arrays ``m/<slug>/refit/<view>/{score,pred}``,
``m/<slug>/{score,pred}`` for paired bootstraps in `report`.
"""

from __future__ import annotations

import re
from typing import Any

STAGE = "baselines"
VERSION = 12


def slugify(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..ablations import variant_config, variant_mixtures, variants
    from ..core.expert_data import load_posteriors
    from ..core.gate_fit import GateModel
    from ..evaluation import fit_curves, views_of_eta
    from ..runtime import pin_threads

    pin_threads()
    exp, cal, gate_art = inputs["export"], inputs["calibrate"], inputs["gate"]
    c2g = np.asarray(exp.array("class_to_group"))
    losses = [e["loss"] for e in exp.meta["experts"]]
    E = len(losses)
    data = {s: load_posteriors(exp, cal, s) for s in ("tuneV", "val_small", "test")}
    t = data["test"]
    rec = _Recorder(cfg, out, progress, t, c2g)
    # one progress step per method: Chow and CS-plug-in per expert, DE-Chow, SB-PI, U-PI, Plug-in[Worst], gates
    # (each ablation gate's epochs get a bar of their own under this one)
    rec.total = 2 * E + 4 + len(variants(cfg, losses, 0)) * len(cfg.seeds)

    def plugin(name: str, eta: dict, *, worst: bool = False, group: str = "baseline", seed: Any = None,
               setting: str | None = None, extra: dict | None = None) -> dict:
        splits = {s: views_of_eta(eta[s], data[s], c2g) for s in ("tuneV", "val_small")}
        curves = fit_curves(splits, worst=worst, T=cfg.T, xi=cfg.xi)
        rec.plugin(name, curves, eta["test"], group=group, seed=seed, setting=setting, extra=extra)
        return curves

    # ---- Chow per expert, DE-Chow (threshold sweeps) ------------------------------------
    from ..core.rule import chow_margin

    for e, loss in enumerate(losses):
        p = t["post"][:, e]
        rec.sweep_only(f"Chow ({loss})", chow_margin(p, cfg.c), p.argmax(1))
    uniform = {s: GateModel(None, E).mixture(data[s]["post"]) for s in data}
    rec.sweep_only("DE-Chow", chow_margin(uniform["test"], cfg.c), uniform["test"].argmax(1))

    # ---- CS-plug-in per expert, SB-PI, U-PI, Plug-in[Worst] ------------------------------
    single = [{s: data[s]["post"][:, e] for s in data} for e in range(E)]
    cs = [plugin(f"CS-plug-in ({loss})", single[e]) for e, loss in enumerate(losses)]
    sel_score = [float(np.mean(c[cfg.view].objective)) for c in cs]
    best = int(np.argmin(sel_score))
    rec.plugin("SB-PI", cs[best], single[best]["test"],
               extra={"expert": losses[best], "val_mean_selection_score": sel_score})
    plugin("U-PI", uniform)
    plugin("Plug-in[Worst]", uniform, worst=True)

    # ---- AR-GSE ablations and sensitivity (gates retrained in-process) ------------------
    for v in variants(cfg, losses, best):
        for seed in cfg.seeds:
            gcfg = variant_config(gate_art.config, {**v.update, "seed": seed}, cfg.gate_epochs)
            epochs = progress.child(f"{v.name} seed {seed}: gate epochs")
            try:
                eta, fit = variant_mixtures(v, gcfg, exp, cal, data, epochs)
            finally:
                epochs.close()
            plugin(v.name, eta, group=v.group, seed=seed, setting=v.setting,
                   extra={"chosen_epoch": int(fit.chosen_epoch), "criterion": fit.criterion})
    out.json("baselines.json", {"levels": list(cfg.levels), "view_fitted": cfg.view, "c": cfg.c,
                                "results": rec.results})
    out.json("rc_curves.json", rec.curves_out)
    for k in ("y", "w_lt", "w_bal"):
        out.array(f"test/{k}", t[k])
    if "test/source_index" in exp.manifest.get("arrays", {}):
        out.array("test/source_index", exp.array("test/source_index"))
    out.array("class_to_group", c2g)
    out.meta.update(methods=sorted({r["method"] for r in rec.results}), n_results=len(rec.results),
                    sb_pi_expert=losses[best])


class _Recorder:
    """Scores one method on test (refit and sweep views) and records its results and arrays."""

    def __init__(self, cfg: Any, out: Any, progress: Any, test: dict, c2g: Any):
        from ..evaluation import VIEWS, WEIGHT_OF_VIEW

        self.cfg, self.out, self.progress, self.t, self.c2g = cfg, out, progress, test, c2g
        self.weights = {v: test[WEIGHT_OF_VIEW[v]] for v in VIEWS}
        self.results: list[dict] = []
        self.curves_out: dict[str, dict] = {v: {} for v in VIEWS}
        self.done, self.total = 0, 1

    def _step(self, name: str, lt: dict, protocol: str) -> None:
        self.done += 1
        self.progress.log(f"{name:34s} balanced AURC {lt['balanced']:.4f}  worst AURC {lt['worst']:.4f} ({protocol}, lt)")
        self.progress(self.done, max(self.total, self.done), {"method": name})

    def _entries(self, name: str, group: str, seed: Any, slug: str, entry: dict) -> None:
        # A deterministic baseline (seed None) does not depend on the gate seed: it is listed once
        # per seed (same arrays) so that paired comparisons with every AR-GSE seed are possible.
        for s in ([seed] if seed is not None else list(self.cfg.seeds)):
            self.results.append({"method": name, "seed": s, "deterministic": seed is None, "group": group,
                                 "slug": slug, **entry})

    def _sweep(self, slug: str, score: Any, pred: Any) -> dict:
        import numpy as np

        from ..evaluation import evaluate_scores

        sweep, curves = evaluate_scores(score, pred, self.t["y"], self.c2g, self.weights, levels=self.cfg.levels,
                                        n_boot=self.cfg.n_boot, seed=0)
        self.out.array(f"m/{slug}/score", np.asarray(score, np.float32))
        self.out.array(f"m/{slug}/pred", np.asarray(pred, np.int64))
        for v, c in curves.items():
            self.curves_out[v][slug] = c.to_dict()
        return sweep

    def sweep_only(self, name: str, score: Any, pred: Any) -> None:
        slug = slugify(name)
        sweep = self._sweep(slug, score, pred)
        self._entries(name, "baseline", None, slug, {"setting": None, "sweep": sweep, "refit": None})
        self._step(name, sweep["views"]["lt"]["aurc"], "sweep")

    def plugin(self, name: str, curves: dict, eta_test: Any, *, group: str = "baseline", seed: Any = None,
               setting: str | None = None, extra: dict | None = None) -> None:
        import numpy as np

        from ..evaluation import operating_rule, refit_metrics, score_curves

        slug = slugify(f"{name}_s{seed}" if seed is not None else name)
        scored = score_curves(curves, eta_test, self.t, self.c2g)
        refit = refit_metrics(scored, self.t, self.c2g, levels=self.cfg.levels, n_boot=self.cfg.n_boot, seed=0)
        for v, (S, P) in scored.items():
            self.out.array(f"m/{slug}/refit/{v}/score", S)
            self.out.array(f"m/{slug}/refit/{v}/pred", P.astype(np.int32))
        rule, q = operating_rule(curves, self.cfg.c, self.cfg.view)
        sweep = self._sweep(slug, rule.margin(eta_test), rule.predict(eta_test))
        fit = {v: {"lambda": c.lam.tolist(), "widened": c.widened.tolist(), "at_bound": c.at_bound.tolist(),
                   "alpha": c.alpha.tolist(), "beta": c.beta.tolist(), "rounds": c.rounds.tolist()}
               for v, c in curves.items()}
        self._entries(name, group, seed, slug, {"setting": setting, "refit": refit, "sweep": sweep, "fit": fit,
                                                "operating_coverage": q, **(extra or {})})
        self._step(name, refit["views"]["lt"]["aurc"], "refit")


def summary(meta: dict) -> str:
    return f"{meta.get('n_results')} results, SB-PI={meta.get('sb_pi_expert')}"
