"""Stage `train-gate`: the AR-GSE gate (trained on tuneV, epoch chosen on val_small) and its rule
fitted by the one core on the trained mixture.

Training rows stream from the export artifact (fp16 logits, row-chunked, :class:`ZarrSource`);
val_small is read whole. After training, the mixture's per-group statistics on tuneV (streamed) and
val_small feed the core at every coverage 0.01..1.00 and for both views (Algorithm 1 for
``beta=balanced``, Algorithm 2 for ``beta=worst``); the artifact's rule is the cost-matched
operating point for ``c`` in the config's view.

Artifact: ``gate.safetensors`` (absent for the frozen uniform gate); arrays alpha, mu, beta (the
operating point's rule); ``curves.json`` (per view, per coverage: alpha, mu, beta, c, lambda, the
selection score, widenings); ``history.json`` (per epoch); meta: the operating point, the chosen
epoch and its criterion.
"""

from __future__ import annotations

from typing import Any

STAGE = "train-gate"
VERSION = 6


def _weights_name(cfg: Any) -> str:
    """Training-row weights: w_lt for the NLL (eta estimates P_train(y|x)); the view's otherwise."""
    return "w_lt" if (cfg.gate_loss or "nll") == "nll" else ("w_lt" if cfg.view == "lt" else "w_bal")


def fit_gate(cfg: Any, export_art: Any, calib_art: Any, progress: Any = None) -> Any:
    """Train the gate of a (resolved) train-gate config on an export and a calibration."""
    from ..core.expert_data import ZarrSource, load_posteriors
    from ..core.gate_fit import train_gate

    cfg.check_experts(len(export_art.meta["experts"]))  # an index beyond the export: one line, no work
    experts = list(cfg.experts) if cfg.experts is not None else None
    wname = _weights_name(cfg)
    val = load_posteriors(export_art, calib_art, "val_small", experts)
    src = ZarrSource(export_art, calib_art, "tuneV", wname, cfg.batch_size or 256, cfg.seed or 0,
                     cfg.buffer_chunks or 4, experts)
    c2g = export_art.array("class_to_group")
    return train_gate(src, (val["post"], val["y"], val[wname]), c2g, cfg, progress)


def gate_views(model: Any, export_art: Any, calib_art: Any, split: str, experts: Any) -> dict:
    """{view: Split} of the gate's mixture on a split, streamed chunk by chunk (O(N K) memory);
    at most ``FIT_ROWS_MAX`` rows (:func:`argse_cli.evaluation.fit_rows`)."""
    import numpy as np

    from ..core.expert_data import ZarrSource
    from ..core.plugin_fit import group_stats
    from ..evaluation import fit_rows, views_of

    c2g = export_art.array("class_to_group")
    d = {k: export_art.array(f"{split}/{a}") for k, a in
         (("y", "labels"), ("w_lt", "w_lt"), ("w_bal", "w_bal"))}
    parts = []
    for post, _y, _w in ZarrSource(export_art, calib_art, split, "w_lt", 1, 0, 4, experts).iter_rows():
        parts.append(group_stats(model.mixture(post), c2g))
    Mx, A, E = (np.concatenate([p[i] for p in parts]) for i in range(3))
    keep = fit_rows(d["y"])
    if keep is not None:
        Mx, A, E = Mx[keep], A[keep], E[keep]
        d = {k: v[keep] for k, v in d.items()}
    return views_of(Mx, A, E, d, c2g)


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..evaluation import fit_curves, operating_rule
    from ..runtime import pin_threads

    pin_threads()
    exp, cal = inputs["export"], inputs["calibrate"]
    experts = list(cfg.experts) if cfg.experts is not None else None
    fit = fit_gate(cfg, exp, cal, progress)
    if fit.gate_state is not None:
        from safetensors.numpy import save

        out.file_path("gate.safetensors").write_bytes(save({k: v.numpy() for k, v in fit.gate_state.items()}))
    progress.log(f"train-gate: fitting the rule at 100 coverages x 2 views "
                 f"({'Algorithm 2' if cfg.beta == 'worst' else 'Algorithm 1'})")
    splits = {s: gate_views(fit.model, exp, cal, s, experts) for s in ("tuneV", "val_small")}
    curves = fit_curves(splits, worst=cfg.beta == "worst", T=cfg.T or 10, xi=cfg.xi or 1.0)
    rule, q = operating_rule(curves, cfg.c, cfg.view)
    out.array("alpha", rule.alpha)
    out.array("mu", rule.mu)
    out.array("beta", rule.beta if rule.beta is not None else np.full(rule.K, 1.0 / rule.K))
    out.json("curves.json", {v: c.to_dict() for v, c in curves.items()})
    out.json("history.json", fit.history)
    out.meta.update(
        c=float(rule.c), cost=float(cfg.c), operating_coverage=q, view=cfg.view, uniform_beta=rule.beta is None,
        chosen_epoch=int(fit.chosen_epoch), criterion=fit.criterion, stopped_early=bool(fit.stopped_early),
        epochs_run=len(fit.history.get("epoch", [])), in_dim=int(fit.in_dim), num_experts=int(fit.num_experts),
        experts=experts, alpha=rule.alpha.tolist(), mu=rule.mu.tolist(),
        beta=None if rule.beta is None else rule.beta.tolist(),
        lambda_at_bound=int(sum(int(np.sum(c.at_bound)) for c in curves.values())),
        selective_rule=None if fit.rule_state is None else {k: np.asarray(v).tolist() if not isinstance(v, float)
                                                            else v for k, v in fit.rule_state.items()},
    )  # fmt: skip
    progress.log(
        f"train-gate ({cfg.beta}): epoch {fit.chosen_epoch + 1} by {fit.criterion}; operating point "
        f"q = {q:.2f} for c = {cfg.c:g}, alpha {np.round(rule.alpha, 3).tolist()}, mu {np.round(rule.mu, 3).tolist()}"
    )


class GatedRule:
    """A stored gate and its operating-point rule: ``decide(post) -> (eta, pred, margin)`` in one
    forward pass of the gate (accept iff margin >= 0)."""

    def __init__(self, model: Any, rule: Any, curves: dict, meta: dict):
        self.model, self.rule, self.curves, self.meta = model, rule, curves, meta

    def weights(self, post: Any) -> Any:
        return self.model.weights(post)

    def mixture(self, post: Any) -> Any:
        return self.model.mixture(post)

    def decide(self, post: Any) -> tuple[Any, Any, Any]:
        import numpy as np

        eta = self.model.mixture(post)
        return eta, np.asarray(self.rule.predict(eta), np.int64), self.rule.margin(eta).astype(np.float32)

    def margin(self, post: Any) -> Any:
        return self.decide(post)[2]

    def predict(self, post: Any) -> tuple[Any, Any]:
        _, pred, m = self.decide(post)
        return pred, m >= 0


def load_gate(art: Any) -> GatedRule:
    """The gate and rule of a train-gate artifact (weights read through their checksum; no code runs)."""
    import numpy as np

    from ..core.gate import GatingNet
    from ..core.gate_fit import GateModel
    from ..core.plugin_fit import PluginCurve
    from ..core.rule import PluginRule

    cfg = art.config
    net = None
    if "gate.safetensors" in art.manifest.get("files", {}):
        from safetensors.torch import load

        net = GatingNet(art.meta["in_dim"], art.meta["num_experts"], tuple(cfg["hidden"]), cfg["dropout"])
        net.load_state_dict(load(art.read_bytes("gate.safetensors")))
        net.eval()
    model = GateModel(net, int(art.meta["num_experts"]), bool(cfg.get("hard_routing") or False))
    c2g = np.asarray(art.upstream("export").array("class_to_group"), np.int64)
    beta = None if art.meta.get("uniform_beta", True) else art.array("beta")
    rule = PluginRule(art.array("alpha"), art.array("mu"), float(art.meta["c"]), beta, c2g)
    curves = {v: PluginCurve.from_dict(d) for v, d in art.json("curves.json").items()}
    return GatedRule(model, rule, curves, dict(art.meta))


def summary(meta: dict) -> str:
    return f"epoch={meta.get('chosen_epoch')} q*={meta.get('operating_coverage', float('nan')):.2f}"
